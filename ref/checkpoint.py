"""One lazy, memory-mapped reader for Qwen3.5-MoE checkpoints (BF16 or ModelOpt NVFP4).

Opening a checkpoint parses config.json and the safetensors headers, nothing else. Tensors are
zero-copy views of the mapped files, so a computation touches only the bytes it reads. Routed experts
come out in one normalised form from either on-disk layout:

    per-expert   {P}.{e}.gate_proj.weight / .weight_scale / .weight_scale_2 / .input_scale, up_proj, down_proj
    fused 3-D    {P}.gate_up_proj [E, 2I, H/2] (gate rows first) + gate_up_proj_weight_scale[_2] / _input_scale,
                 {P}.down_proj [E, H, I/2] + down_proj_weight_scale[_2] / _input_scale

with P = "<prefix>layers.{i}.mlp.experts" (or "mtp.layers.0.mlp.experts"), scalar scales stored as
[], [1], [E] or [E, 2] (gate, up) in F32 or BF16 and always returned as float32 0-d arrays.

`python -m ref.checkpoint check DIR|REPO` validates and lints a checkpoint (ref.checkpoint_check).
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ref import checkpoint_layout as layout
from ref.config import Config, load_config
from ref.errors import CheckpointError
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
    weight_scale_2: np.ndarray  # float32 0-d
    input_scale: np.ndarray | None  # float32 0-d, None when the input quantizer is off

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], 2 * self.packed.shape[1]


Weight = DenseWeight | NVFP4Weight


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
        """Any linear by full module name (no '.weight'): NVFP4 when '.weight_scale' is present.
        prefetch: start reading the weight now (False when only the scalars will be looked at)."""
        if not self.has(module + ".weight_scale"):
            return DenseWeight(self._matrix(module + ".weight", None, prefetch))
        opt = module + ".input_scale"
        return self._nvfp4(module + ".weight", self.tensor(module + ".weight", prefetch=prefetch),
                           self.tensor(module + ".weight_scale", prefetch=prefetch),
                           _scalar(self.tensor(module + ".weight_scale_2"), self._at(module + ".weight_scale_2")),
                           _scalar(self.tensor(opt), self._at(opt)) if self.has(opt) else None)

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
        if self.has(f"{p}.0.gate_proj.weight"):
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
            names = [f"{p}.{e}.{proj}.input_scale" for e in range(n) for proj in ("gate_proj", "up_proj")]
            if not self.has(f"{p}.0.gate_proj.weight_scale") or not all(map(self.has, names)):
                return None
            vals = np.array([_scalar(self.tensor(x), self._at(x)) for x in names], np.float32)
            return vals.reshape(n, 2).max(axis=1)
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


if __name__ == "__main__":
    from ref.checkpoint_check import main

    sys.exit(main())
