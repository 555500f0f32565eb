"""One lazy, memory-mapped reader for Qwen3.5-MoE checkpoints (BF16, ModelOpt NVFP4, ModelOpt
mixed precision with per-tensor FP8 linears, compressed-tensors NVFP4).

Opening a checkpoint parses config.json and the safetensors headers, nothing else. Tensors are
zero-copy views of the mapped files, so a computation touches only the bytes it reads. Routed experts
come out in one normalised form from either on-disk layout:

    per-expert   {P}.{e}.gate_proj.weight / .weight_scale / .weight_scale_2 / .input_scale, up_proj, down_proj
    fused 3-D    {P}.gate_up_proj [E, 2I, H/2] (gate rows first) + gate_up_proj_weight_scale[_2] / _input_scale,
                 {P}.down_proj [E, H, I/2] + down_proj_weight_scale[_2] / _input_scale

with P = "<prefix>layers.{i}.mlp.experts" (or "mtp.layers.0.mlp.experts"), scalar scales stored as
[], [1], [E] or [E, 2] (gate, up) in F32 or BF16 and always returned as float32 0-d arrays.

Every linear comes out as one of three normalised forms (Checkpoint.linear):
    DenseWeight   .weight (BF16/F16/F32)
    NVFP4Weight   ModelOpt .weight / .weight_scale / .weight_scale_2 / .input_scale, or
                  compressed-tensors .weight_packed / .weight_scale / .weight_global_scale /
                  .input_global_scale with the globals inverted as vLLM does (nvfp4.invert_global_scale)
    FP8Weight     .weight (F8_E4M3, as weight_e4m3) / .weight_scale (F32 []) / .input_scale (F32 [])

`python -m ref.checkpoint check DIR|REPO` validates and lints a checkpoint (ref.checkpoint_check, run by
this package's __main__, so the reader never imports its checker).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ref import checkpoint_layout as layout
from ref.config import Config, load_config
from ref.errors import CheckpointError, FormatError
from ref.nvfp4 import invert_global_scale
from ref.safetensors_io import SafetensorsFile

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]


@dataclass(frozen=True)
class DenseWeight:
    weight: np.ndarray  # [out, in], as stored (usually bfloat16)

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape


@dataclass(frozen=True)
class NVFP4Weight:
    packed: np.ndarray  # uint8 [out, in/2], element 2j in the low nibble
    weight_scale: np.ndarray  # float8_e4m3fn [out, in/16]
    weight_scale_2: np.ndarray  # float32 0-d, dequant direction
    input_scale: np.ndarray | None  # float32 0-d dequant direction, None when the input quantizer is off
    input_global_scale: np.ndarray | None = None  # float32 0-d: compressed-tensors' stored multiplier G
    # (vLLM's dense compressed-tensors linears quantize inputs with it unchanged: nvfp4.quantize_activation
    # global_scale=); None for ModelOpt, whose G is fp32(1 / input_scale)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], 2 * self.packed.shape[1]


@dataclass(frozen=True)
class FP8Weight:
    """A per-tensor FP8 linear. The codes are not called `weight` on purpose: code written for
    DenseWeight must fail on it, not read e4m3 codes as values without their scale."""
    weight_e4m3: np.ndarray  # float8_e4m3fn [out, in], the stored `.weight`
    weight_scale: np.ndarray  # float32 0-d: w = e4m3 * weight_scale
    input_scale: np.ndarray | None  # float32 0-d static activation scale, None when weight-only

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight_e4m3.shape


Weight = DenseWeight | NVFP4Weight | FP8Weight


@dataclass(frozen=True)
class Expert:
    gate: Weight  # [I, H]
    up: Weight  # [I, H]
    down: Weight  # [H, I]


def _scalar(x: np.ndarray, where: str) -> np.ndarray:
    """A stored scalar scale ([] or [1], F32 or BF16) -> float32 0-d (a view when already F32)."""
    if x.size != 1:
        raise CheckpointError(f"{where}: expected a scalar, got shape {list(x.shape)}")
    x = x.reshape(())
    return x if x.dtype == np.float32 else np.asarray(x, dtype=np.float32).reshape(())


class Checkpoint:
    """A checkpoint directory: config, tensor names and lazy tensor views."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.config: Config = load_config(self.directory)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}  # tensor name -> shard file name
        self._names: list[str] | None = None
        index = self.directory / INDEX
        if index.exists():
            self._read_index(index)
        elif (self.directory / SINGLE).exists():
            self._add_file(SINGLE, None)
        else:
            raise CheckpointError(f"{self.directory}: no {INDEX} and no {SINGLE}")

    def _read_index(self, index: Path) -> None:
        try:
            raw = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: not valid JSON ({e})") from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        by_file: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_file.setdefault(shard, []).append(name)
        for shard, names in sorted(by_file.items()):
            self._add_file(shard, names)

    def _add_file(self, shard: str, names: list[str] | None) -> None:
        path = self.directory / shard
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{self.directory / INDEX}: shard name {shard!r} is not a file in the checkpoint")
        if not path.is_file():
            listed = f" (listed for tensor '{names[0]}')" if names else ""
            raise CheckpointError(f"{path}: shard file missing{listed}")
        f = SafetensorsFile(path)
        for name in names if names is not None else f.tensors:
            if name not in f.tensors:
                raise CheckpointError(f"{path}: tensor '{name}' is in {INDEX} but not in this shard")
            self._where[name] = shard
        self._files[shard] = f

    # ---- names and tensors --------------------------------------------------------------------

    def names(self) -> list[str]:
        if self._names is None:
            self._names = sorted(self._where)
        return list(self._names)

    def has(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> SafetensorsFile:
        try:
            return self._files[self._where[name]]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor '{name}'") from None

    def tensor(self, name: str, row: int | None = None, prefetch: bool = False) -> np.ndarray:
        """Zero-copy view of a tensor as stored (or of its row `row` along the first axis).
        prefetch=True starts reading all of it at once (for callers that will read it whole)."""
        return self.file_of(name).tensor(name, row, prefetch)

    def lm(self, name: str) -> np.ndarray:
        """A language-model tensor by its name under the text prefix, e.g. lm("norm.weight")."""
        return self.tensor(self.config.text_prefix + name)

    # ---- linears and experts ------------------------------------------------------------------

    def linear(self, module: str, prefetch: bool = True) -> Weight:
        """Any linear by full module name (no '.weight'), in one of the normalised forms (module
        docstring). prefetch: start reading the weight now (False when only the scalars will be
        looked at)."""
        if self.has(module + ".weight_packed"):
            return self._ct_nvfp4(module, prefetch)
        if not self.has(module + ".weight_scale"):
            w = self._matrix(module + ".weight", None, prefetch)
            if w.dtype.name == "float8_e4m3fn":
                raise CheckpointError(f"{self._at(module + '.weight')}: FP8 weight without '{module}.weight_scale'")
            return DenseWeight(w)
        if self.file_of(module + ".weight").info(module + ".weight").dtype == "F8_E4M3":
            return self._fp8(module, prefetch)
        opt = module + ".input_scale"
        return self._nvfp4(module + ".weight", self.tensor(module + ".weight", prefetch=prefetch),
                           self.tensor(module + ".weight_scale", prefetch=prefetch),
                           _scalar(self.tensor(module + ".weight_scale_2"), self._at(module + ".weight_scale_2")),
                           _scalar(self.tensor(opt), self._at(opt)) if self.has(opt) else None)

    def kv_scales(self, layer: int | str) -> tuple[np.ndarray, np.ndarray, str]:
        """(k_scale, v_scale, source) of a full-attention layer (int) or "mtp", float32 0-d, as the
        engines settle them (vLLM / SGLang BaseKVCacheMethod.process_weights_after_loading):
        both stored -> each ("checkpoint"); only k_scale -> k_scale for both ("k_scale for both");
        neither -> 1.0 ("default 1.0"); only v_scale -> CheckpointError (the engines assert).
        Names: ModelOpt '<attn>.k_proj.k_scale' / '<attn>.v_proj.v_scale', or compressed-tensors
        '<attn>.k_scale' / '<attn>.v_scale' (attn = the layer's self_attn)."""
        t = self.config.text
        if layer == "mtp":
            if t.mtp_num_hidden_layers < 1:
                raise CheckpointError(f"{self.directory}: config has no MTP layer (mtp_num_hidden_layers = 0)")
            attn = "mtp.layers.0.self_attn"
        elif isinstance(layer, (int, np.integer)) and int(layer) in t.full_attention_layers:
            attn = f"{self.config.text_prefix}layers.{int(layer)}.self_attn"
        else:
            raise CheckpointError(f"{self.directory}: layer {layer!r} is not a full-attention layer "
                                  f"{list(t.full_attention_layers)} or 'mtp'")
        found = {}
        for kind in ("k", "v"):
            for name in (f"{attn}.{kind}_proj.{kind}_scale", f"{attn}.{kind}_scale"):
                if self.has(name):
                    v = _scalar(self.tensor(name), self._at(name))
                    if not (np.isfinite(v) and v > 0):
                        raise CheckpointError(f"{self._at(name)}: KV scale must be finite and positive, got {float(v)}")
                    found[kind] = v
                    break
        if "k" in found and "v" in found:
            return found["k"], found["v"], "checkpoint"
        if "k" in found:
            return found["k"], found["k"], "k_scale for both"
        if "v" in found:
            raise CheckpointError(f"{self.directory}: '{attn}' has a v_scale but no k_scale (engines require "
                                  f"k_scale when any KV scale is present)")
        one = np.asarray(np.float32(1), dtype=np.float32)
        return one, one, "default 1.0"

    def experts_prefix(self, layer: int | str) -> str:
        t = self.config.text
        if layer == "mtp":
            if t.mtp_num_hidden_layers < 1:
                raise CheckpointError(f"{self.directory}: config has no MTP layer (mtp_num_hidden_layers = 0)")
            return "mtp.layers.0.mlp.experts"
        if not (isinstance(layer, (int, np.integer)) and 0 <= layer < t.num_hidden_layers):
            raise CheckpointError(f"{self.directory}: layer {layer!r} not in 0..{t.num_hidden_layers - 1} or 'mtp'")
        return f"{self.config.text_prefix}layers.{int(layer)}.mlp.experts"

    def expert_layout(self, layer: int | str) -> str:
        """'per-expert' or 'fused' for this layer's routed experts."""
        p = self.experts_prefix(layer)
        if self.has(f"{p}.0.gate_proj.weight") or self.has(f"{p}.0.gate_proj.weight_packed"):
            return "per-expert"
        if self.has(f"{p}.gate_up_proj"):
            return "fused"
        raise CheckpointError(f"{self.directory}: neither '{p}.0.gate_proj.weight' nor '{p}.gate_up_proj' present")

    def expert(self, layer: int | str, e: int, prefetch: bool = True) -> Expert:
        """gate [I, H], up [I, H], down [H, I] of routed expert e of `layer` (an int or "mtp").
        prefetch: start reading its bytes now (False when only the scalars will be looked at)."""
        p = self.experts_prefix(layer)
        n = self.config.text.num_experts
        if not (isinstance(e, (int, np.integer)) and 0 <= e < n):
            raise CheckpointError(f"{self.directory}: expert {e!r} not in 0..{n - 1}")
        e = int(e)
        if self.expert_layout(layer) == "per-expert":
            ex = Expert(*(self.linear(f"{p}.{e}.{proj}", prefetch) for proj in layout.PROJS))
            names = [f"{p}.{e}.{proj}.weight" for proj in layout.PROJS]
        else:
            gate, up = self._fused(f"{p}.gate_up_proj", e, 2, prefetch)
            (down,) = self._fused(f"{p}.down_proj", e, 1, prefetch)
            ex, names = Expert(gate, up, down), [f"{p}.gate_up_proj"] * 2 + [f"{p}.down_proj"]
        for w, name, want in zip((ex.gate, ex.up, ex.down), names, layout.expert_shapes(self.config.text).values()):
            if w.shape != want:
                raise CheckpointError(f"{self._at(name)}: expert {e} is [out, in] = {list(w.shape)}, config implies "
                                      f"{list(want)}")
        return ex

    def expert_input_scales(self, layer: int | str) -> np.ndarray | None:
        """float32 [E]: per expert max(gate, up) input_scale; None when the experts are not NVFP4."""
        p, n = self.experts_prefix(layer), self.config.text.num_experts
        if self.expert_layout(layer) == "per-expert":
            ws = [self.linear(f"{p}.{e}.{proj}", prefetch=False) for e in range(n) for proj in ("gate_proj", "up_proj")]
            if not all(isinstance(w, NVFP4Weight) and w.input_scale is not None for w in ws):
                return None
            return np.array([w.input_scale for w in ws], np.float32).reshape(n, 2).max(axis=1)
        name = f"{p}.gate_up_proj_input_scale"
        if not self.has(name):
            return None
        return self._expert_scales(name, halves=2).max(axis=1)  # [E, 2] -> [E]

    # ---- helpers ------------------------------------------------------------------------------

    def _at(self, name: str) -> str:
        return f"{self.file_of(name).path}: tensor '{name}'"

    def _matrix(self, name: str, row: int | None = None, prefetch: bool = True) -> np.ndarray:
        w = self.tensor(name, row, prefetch)
        if w.ndim != 2:
            raise CheckpointError(f"{self._at(name)}: expected a 2-D weight, got shape {list(w.shape)}")
        return w

    def _ct_nvfp4(self, module: str, prefetch: bool) -> NVFP4Weight:
        """A compressed-tensors NVFP4 linear, its quantization-direction globals inverted."""
        g_name, in_name = module + ".weight_global_scale", module + ".input_global_scale"
        if not self.has(g_name):
            raise CheckpointError(f"{self._at(module + '.weight_packed')}: no '{g_name}'")
        try:
            g2 = invert_global_scale(self.tensor(g_name))
            g_in = self.tensor(in_name) if self.has(in_name) else None
            s_in = invert_global_scale(g_in) if g_in is not None else None
        except FormatError as e:
            raise CheckpointError(f"{self.directory}: module '{module}': {e}") from None
        w = self._nvfp4(module + ".weight_packed", self.tensor(module + ".weight_packed", prefetch=prefetch),
                        self.tensor(module + ".weight_scale", prefetch=prefetch), g2, s_in)
        return NVFP4Weight(w.packed, w.weight_scale, w.weight_scale_2, w.input_scale,
                           None if g_in is None else _scalar(g_in, self._at(in_name)))

    def _fp8(self, module: str, prefetch: bool) -> FP8Weight:
        w = self._matrix(module + ".weight", None, prefetch)
        ws = self.tensor(module + ".weight_scale")
        if ws.size != 1:
            raise CheckpointError(f"{self._at(module + '.weight_scale')}: FP8 weight_scale must be per-tensor "
                                  f"([] or [1]), got shape {list(ws.shape)}")
        opt = module + ".input_scale"
        return FP8Weight(w, _scalar(ws, self._at(module + ".weight_scale")),
                         _scalar(self.tensor(opt), self._at(opt)) if self.has(opt) else None)

    def _nvfp4(self, name: str, packed, scale, scale_2, input_scale) -> NVFP4Weight:
        self._check_nvfp4(name, packed, scale)
        return NVFP4Weight(packed, scale, scale_2, input_scale)

    def _check_nvfp4(self, name: str, packed: np.ndarray, scale: np.ndarray) -> None:
        if packed.dtype != np.uint8 or packed.ndim != 2:
            raise CheckpointError(f"{self._at(name)}: NVFP4 weight must be U8 [out, in/2], got "
                                  f"{packed.dtype} {list(packed.shape)}")
        out, k = packed.shape[0], packed.shape[1] * 2
        if scale.dtype.name != "float8_e4m3fn" or scale.shape != (out, k // 16) or k % 16:
            raise CheckpointError(f"{self._at(name)}: weight_scale must be F8_E4M3 [{out}, {k // 16}] for packed "
                                  f"{list(packed.shape)}, got {scale.dtype} {list(scale.shape)}")

    def _expert_scales(self, name: str, halves: int, e: int | None = None) -> np.ndarray:
        """A fused scale tensor ([], [1], [E] or [E, 2]) -> float32 [halves] for expert e, or [E, halves]."""
        n = self.config.text.num_experts
        shape = self.file_of(name).info(name).shape
        if shape in ((), (1,)):
            s = np.full((1 if e is not None else n, halves), _scalar(self.tensor(name), self._at(name)))
        elif shape == (n,):
            v = self.tensor(name) if e is None else self.tensor(name, e)[None]  # [m]
            s = np.repeat(v.astype(np.float32)[:, None], halves, axis=1)
        elif shape == (n, 2) and halves == 2:
            s = self.tensor(name) if e is None else self.tensor(name, e)[None]  # [m, 2]
        else:
            allowed = "[], [1], [E] or [E, 2]" if halves == 2 else "[], [1] or [E]"
            raise CheckpointError(f"{self._at(name)}: scale shape {list(shape)} is not {allowed} with E = {n}")
        s = np.asarray(s, dtype=np.float32)
        return s if e is None else s[0]

    def _fused(self, name: str, e: int, halves: int, prefetch: bool) -> list[Weight]:
        """Expert e's slice of a fused 3-D tensor, split into `halves` row blocks (gate, up)."""
        w = self._matrix(name, e, prefetch)
        rows = w.shape[0] // halves
        if w.shape[0] % halves:
            raise CheckpointError(f"{self._at(name)}: {w.shape[0]} rows do not split into {halves} equal halves")
        if not self.has(name + "_weight_scale"):
            return [DenseWeight(w[h * rows:(h + 1) * rows]) for h in range(halves)]
        scale = self.tensor(name + "_weight_scale", e, prefetch)
        g2 = self._expert_scales(name + "_weight_scale_2", halves, e)
        opt = name + "_input_scale"
        ins = self._expert_scales(opt, halves, e) if self.has(opt) else None
        self._check_nvfp4(name, w, scale)
        return [NVFP4Weight(w[h * rows:(h + 1) * rows], scale[h * rows:(h + 1) * rows], g2[h].reshape(()),
                            None if ins is None else ins[h].reshape(())) for h in range(halves)]


def open_checkpoint(model: str | Path) -> Checkpoint:
    """A checkpoint directory, or a Hugging Face repo id (downloaded / taken from the HF cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return Checkpoint(path)
    text = str(model)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith((".", "/")):
        raise CheckpointError(f"{model}: not a checkpoint directory (and not a Hugging Face repo id)")
    return Checkpoint(_download(text))


def _download(repo_id: str) -> Path:
    """snapshot_download of only the files a checkpoint needs; honours HF_HUB_OFFLINE and the cache."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(f"{repo_id}: not a directory, and huggingface_hub is not installed") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise CheckpointError(f"{repo_id}: not a directory and not in the Hugging Face cache ({why})") from None
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id}: not a directory and not a valid Hugging Face repo id ({e})") from None
    except Exception as e:  # HTTP errors: missing repo, gated repo, no network
        raise CheckpointError(f"{repo_id}: download failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
