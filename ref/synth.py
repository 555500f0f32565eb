"""Random-weight Qwen3.5-MoE NVFP4 checkpoints in exactly the real on-disk layout.

    python -m ref.synth OUT_DIR [--preset tiny|small|397b] [--layers N] [--seed S]
                                [--expert-layout per-expert|fused] [--recipe modelopt-0.37|modelopt-0.45]
                                [--variant modelopt|modelopt-mixed|compressed-tensors]
                                [--fast] [--shard-size 5GB] [--force]

Writes config.json (VL wrapper with quantization_config), hf_quant_config.json, generation_config.json,
preprocessor_config.json, tokenizer.json / tokenizer_config.json (ref.synth_tokenizer), and the weights
as model.safetensors or model.safetensors.index.json + model-0000N-of-0000M.safetensors. Routed experts
are NVFP4 (ref.nvfp4.quantize_weight) with gate/up tied (one global amax, one input scale); everything
else is BF16 (A_log F32), the MTP experts included. Input scales come from a calibration forward pass
(ref.model, float32) over a short prompt: per expert amax of the inputs routed to it / 2688, the
layer's max for experts never hit. `--fast` skips quantization and calibration: random valid codes,
block scales and input scales (for the big shapes). Weights are drawn per tensor (per expert) from
seeded generators, so both expert layouts hold identical values. Written to a temporary directory and
renamed into place.

Variants (the same underlying BF16 values, other storage; spec/nvfp4.md sections 11 and 13):
  modelopt            the default above (the seed checkpoint's layout)
  modelopt-mixed      as NVIDIA's "-V2": per-tensor FP8 (W8A8 static) linear attention in_proj_qkv /
                      in_proj_z / out_proj, full attention q/k/v/o and shared experts; NVFP4 routed
                      experts; FP8 KV-cache scales; config quant_algo MIXED_PRECISION with quantized_layers
  compressed-tensors  as llm-compressor: NVFP4 (inverted globals, weight_packed) on routed and shared
                      experts, full attention and the DeltaNet in_proj_qkv / in_proj_z / out_proj;
                      per-expert layout only; no hf_quant_config.json
Their static input scales come from a calibration pass over the default variant written first
(the same weights): expert inputs as above; the inputs of q/k/v, in_proj_qkv/z and the shared
experts measured; o_proj and out_proj, whose inputs the pass does not record, get upper bounds
(max|v| and sqrt(head_dim) * max|norm weight| * max|silu(z)|). Fused pieces share their amaxes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from ref import checkpoint_layout as layout
from ref.config import FULL, LINEAR, QWEN35_397B, SEED_EXCLUDE_MODULES, Config, PreprocessorConfig, QuantConfig, \
    TextConfig, VisionConfig, config_dict, hf_quant_config_dict, preprocessor_config_dict
from ref.errors import CheckpointError, ConfigError, FormatError
from ref.nvfp4 import E2M1_VALUES, E4M3_MAX, GLOBAL_DIVISOR, dequantize, quantize_weight, quantize_weight_ct
from ref.safetensors_io import LazyTensor, overwrite_tensors, write_safetensors
from ref.synth_tokenizer import SPECIAL_ID, build_tokenizer, tokenizer_config
from ref.synth_variants import VARIANTS, Calibration, DenseQuantizer, check_variant, kv_scale_tensors, measure_dense, \
    variant_quant

PRESETS = ("tiny", "small", "397b")
LAYOUTS = ("per-expert", "fused")
RECIPES = {"modelopt-0.37": "modelopt 0.37.0", "modelopt-0.45": "modelopt 0.45.0"}
SHARD_SIZE = {"tiny": 256 * 1024, "small": 64 * 1024 ** 2, "397b": 5 * 1000 ** 3}
BF16, F32 = "BF16", "F32"
E2M1_RMS = float(np.sqrt(np.mean(E2M1_VALUES.astype(np.float64) ** 2)))  # of uniformly random codes
CHUNK = 1 << 24  # elements generated at a time for big tensors


# ------------------------------------------------------------------------------------------------
# Presets

def special_base(preset: str, vocab_size: int) -> int:
    """Id of <|endoftext|>, the first of Qwen's 26 special tokens (248044 in the real model)."""
    return 248044 if preset == "397b" else vocab_size - 32


def preset_config(preset: str = "tiny", layers: int | None = None, recipe: str = "modelopt-0.37") -> Config:
    if preset == "397b":
        cfg = QWEN35_397B
    elif preset in ("tiny", "small"):
        cfg = _small_config(preset)
    else:
        raise ConfigError(f"preset {preset!r}: expected one of {list(PRESETS)}")
    if recipe not in RECIPES:
        raise ConfigError(f"recipe {recipe!r}: expected one of {list(RECIPES)}")
    text = cfg.text
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be positive, got {layers}")
        kinds = tuple(FULL if (i + 1) % 4 == 0 else LINEAR for i in range(layers))
        text = dataclasses.replace(text, num_hidden_layers=layers, layer_types=kinds)
    quant = dataclasses.replace(cfg.quant, producer=RECIPES[recipe])
    return dataclasses.replace(cfg, text=text, quant=quant)


def _small_config(preset: str) -> Config:
    tiny = preset == "tiny"
    vocab = 512 if tiny else 4096
    base = special_base(preset, vocab)
    n = 4 if tiny else 8
    text = TextConfig(
        hidden_size=64 if tiny else 512, num_hidden_layers=n,
        layer_types=tuple(FULL if (i + 1) % 4 == 0 else LINEAR for i in range(n)),
        num_attention_heads=4 if tiny else 8, num_key_value_heads=2, head_dim=32 if tiny else 64,
        linear_num_key_heads=2 if tiny else 4, linear_num_value_heads=4 if tiny else 8,
        linear_key_head_dim=16 if tiny else 64, linear_value_head_dim=16 if tiny else 64, linear_conv_kernel_dim=4,
        num_experts=16 if tiny else 64, num_experts_per_tok=4 if tiny else 10,
        moe_intermediate_size=32 if tiny else 128, shared_expert_intermediate_size=32 if tiny else 128,
        vocab_size=vocab, max_position_embeddings=262144, partial_rotary_factor=0.25,
        mrope_section=(2, 1, 1) if tiny else (3, 3, 2), mrope_interleaved=True, mtp_num_hidden_layers=1,
        eos_token_ids=(base + SPECIAL_ID["<|im_end|>"],))
    vision = VisionConfig(depth=2, hidden_size=32 if tiny else 64, num_heads=2, intermediate_size=64 if tiny else 128,
                          out_hidden_size=text.hidden_size, num_position_embeddings=16 if tiny else 64)
    # Qwen3.5's processor settings with a smaller pixel budget: tiny images stay a few merged tokens.
    preprocessor = PreprocessorConfig(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=(0.5,) * 3,
                                      image_std=(0.5,) * 3, min_pixels=64 * 64 if tiny else 128 * 128,
                                      max_pixels=256 * 256 if tiny else 512 * 512)
    specials = {"image_token_id": base + SPECIAL_ID["<|image_pad|>"],
                "video_token_id": base + SPECIAL_ID["<|video_pad|>"],
                "vision_start_token_id": base + SPECIAL_ID["<|vision_start|>"],
                "vision_end_token_id": base + SPECIAL_ID["<|vision_end|>"]}
    quant = QuantConfig("NVFP4", 16, SEED_EXCLUDE_MODULES, None, RECIPES["modelopt-0.37"])
    return Config(text=text, vision=vision, quant=quant, multimodal=True, special_tokens=specials,
                  preprocessor=preprocessor)


# ------------------------------------------------------------------------------------------------
# Weights

def _rng(seed: int, *key) -> np.random.Generator:
    return np.random.default_rng([seed] + [zlib.crc32(str(k).encode()) for k in key])


def _normal(rng: np.random.Generator, shape, std: float, mean: float = 0.0, dtype=ml_dtypes.bfloat16) -> np.ndarray:
    """mean + std * N(0, 1) in float32, rounded to `dtype`, generated in chunks (big tensors)."""
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)
    for lo in range(0, flat.size, CHUNK):
        n = min(CHUNK, flat.size - lo)
        flat[lo:lo + n] = (rng.standard_normal(n, np.float32) * np.float32(std) + np.float32(mean)).astype(dtype)
    return out


def dense_value(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A non-expert tensor: magnitudes chosen so activations stay O(1) and routing is spread."""
    rng = _rng(seed, name)
    if name.endswith("A_log"):  # A = exp(A_log) in [1, 16], kept in F32
        return np.log(rng.uniform(1, 16, shape)).astype(np.float32)
    if name.endswith("dt_bias"):  # softplus^-1 of dt log-uniform in [1e-3, 1e-1]
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
        return (dt + np.log(-np.expm1(-dt))).astype(ml_dtypes.bfloat16)
    if name.endswith("conv1d.weight"):
        return _normal(rng, shape, 1 / math.sqrt(shape[-1]))
    if name.startswith("model.visual."):
        if ".norm" in name:
            return _normal(rng, shape, 0.05, 1.0 if name.endswith("weight") else 0.0)
        if name.endswith("pos_embed.weight"):  # comparable to the patch embeddings, so positions matter
            return _normal(rng, shape, 0.5)
        if name.endswith("bias"):
            return _normal(rng, shape, 0.02)
        return _normal(rng, shape, 1 / math.sqrt(math.prod(shape[1:])))
    if name.endswith("linear_attn.norm.weight"):  # plain weight (not 1 + w)
        return _normal(rng, shape, 0.05, 1.0)
    if len(shape) == 1:  # zero-centred RMSNorm weights, used as 1 + w
        return _normal(rng, shape, 0.05)
    if name.endswith("embed_tokens.weight"):
        return _normal(rng, shape, 1.0)
    if name.endswith("mlp.gate.weight"):  # router logits of std ~2: peaked but not degenerate
        return _normal(rng, shape, 2 / math.sqrt(shape[1]))
    if name == "lm_head.weight":  # logits of std ~3, so greedy choices have margins
        return _normal(rng, shape, 3 / math.sqrt(shape[1]))
    return _normal(rng, shape, 1 / math.sqrt(shape[1]))


class ExpertWeights:
    """Routed-expert tensors, drawn per (layer, expert, projection) so both layouts agree.

    Each array is generated once however the layout orders the tensors: BF16 (MTP) weights and
    --fast codes / block scales / scalars come from their own generators; quantized experts are
    cached a layer at a time (quantization yields codes and scales together). ct: compressed-tensors
    names and recipe (weight_packed, inverted globals); calib: input scales from a Calibration
    instead of placeholders (which ref.synth.calibrate overwrites in place)."""

    def __init__(self, cfg: Config, seed: int, recipe: str, fast: bool, ct: bool = False,
                 calib: Calibration | None = None):
        self.cfg, self.seed, self.recipe, self.fast, self.ct, self.calib = cfg, seed, recipe, fast, ct, calib
        self.shapes = layout.expert_shapes(cfg.text)
        self._quantized = lru_cache(maxsize=cfg.text.num_experts)(self._quantize)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The stored tensors of one quantized projection, in file order."""
        return ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale") if self.ct else \
            ("weight", "weight_scale", "weight_scale_2", "input_scale")

    def get(self, layer, e: int, key: str) -> np.ndarray:
        """One array, e.g. get(0, 5, "up_proj.weight_scale")."""
        proj, kind = key.split(".", 1)
        if layer == "mtp":
            return self._float(layer, e, proj)
        if kind in ("input_scale", "input_global_scale"):
            return self._input_scale(layer, e, proj)
        if kind in ("weight_scale_2", "weight_global_scale") and self.fast:
            g = self._scalars(layer, e)[f"{proj}.weight_scale_2"]
            return np.full((1,), np.float32(1) / g, np.float32) if self.ct else g
        if not self.fast:
            return self._quantized(layer, e)[key]
        rows, k = self.shapes[proj]
        rng = _rng(self.seed, "weight" if kind == "weight_packed" else kind, layer, e, proj)
        if kind in ("weight", "weight_packed"):
            return rng.integers(0, 256, (rows, k // 2), dtype=np.uint8)
        return rng.uniform(E4M3_MAX / 4, E4M3_MAX, (rows, k // 16)).astype(ml_dtypes.float8_e4m3fn)

    def arrays(self, layer, e: int) -> dict[str, np.ndarray]:
        """All of expert e's arrays: {proj.<kind>} for the kinds above, or {proj.weight} (BF16, the
        MTP experts)."""
        kinds = ("weight",) if layer == "mtp" else self.kinds
        return {f"{p}.{k}": self.get(layer, e, f"{p}.{k}") for p in layout.PROJS for k in kinds}

    def _float(self, layer, e: int, proj: str) -> np.ndarray:
        out, k = self.shapes[proj]
        return _normal(_rng(self.seed, "expert", layer, e, proj), (out, k), 1 / math.sqrt(k))

    def _quantize(self, layer, e: int) -> dict[str, np.ndarray]:
        """ModelOpt (or compressed-tensors) export of expert e: gate and up share one global amax."""
        w = {p: self._float(layer, e, p).astype(np.float32) for p in layout.PROJS}
        tied = np.float32(max(np.abs(w["gate_proj"]).max(), np.abs(w["up_proj"]).max()))
        out = {}
        for proj in layout.PROJS:
            amax = None if proj == "down_proj" else tied
            if self.ct:
                packed, scale, g = quantize_weight_ct(w[proj], amax)
                out |= {f"{proj}.weight_packed": packed, f"{proj}.weight_scale": scale,
                        f"{proj}.weight_global_scale": g}
                continue
            packed, scale, scale_2 = quantize_weight(w[proj], self.recipe, global_scale=amax)
            out |= {f"{proj}.weight": packed, f"{proj}.weight_scale": scale, f"{proj}.weight_scale_2": scale_2}
        return out

    def _input_scale(self, layer, e: int, proj: str) -> np.ndarray:
        """input_scale = amax / 2688 (ModelOpt, F32 []) or input_global_scale = 2688 / amax (F32 [1])."""
        if self.calib is None:
            s = self._scalars(layer, e)[f"{proj}.input_scale"]
            return np.full((1,), np.float32(1) / s, np.float32) if self.ct else s
        amax = float(self.calib.experts[layer][e, 1 if proj == "down_proj" else 0])
        if self.ct:
            return np.full((1,), np.float32(GLOBAL_DIVISOR / amax), np.float32)
        return np.asarray(np.float32(amax / GLOBAL_DIVISOR), np.float32)

    def _scalars(self, layer, e: int) -> dict[str, np.ndarray]:
        """Random valid global and input scales (the input scales are placeholders unless --fast)."""
        rng = _rng(self.seed, "scales", layer, e)
        ws2_gu, ws2_d = (np.float32(1 / math.sqrt(k) / (E2M1_RMS * 0.65 * E4M3_MAX) * rng.uniform(0.8, 1.25))
                         for _, k in (self.shapes["gate_proj"], self.shapes["down_proj"]))
        in_gu, in_d = (np.float32(rng.uniform(2, 8) / GLOBAL_DIVISOR), np.float32(rng.uniform(0.5, 2) / GLOBAL_DIVISOR))
        s = {"gate_proj": (ws2_gu, in_gu), "up_proj": (ws2_gu, in_gu), "down_proj": (ws2_d, in_d)}
        return {f"{p}.{k}": np.asarray(v, np.float32) for p, (a, b) in s.items()
                for k, v in (("weight_scale_2", a), ("input_scale", b))}


def _plan(cfg: Config, seed: int, expert_layout: str, recipe: str, fast: bool, variant: str = "modelopt",
          calib: Calibration | None = None) -> dict[str, LazyTensor]:
    """Every tensor of the checkpoint in file order, as LazyTensors."""
    t = cfg.text
    experts = ExpertWeights(cfg, seed, recipe, fast, variant == "compressed-tensors", calib)
    dense = layout.dense_tensors(cfg)
    quantizer = DenseQuantizer(cfg, variant, lambda name, shape: dense_value(name, shape, seed), calib,
                               lambda *key: _rng(seed, *key))
    plan: dict[str, LazyTensor] = {}

    def add_dense(names):
        for name in names:
            module = name[:-len(".weight")]
            if module in quantizer.kinds:
                plan.update(quantizer.tensors(module))
                continue
            shape = dense[name]
            plan[name] = LazyTensor(F32 if name.endswith("A_log") else BF16, shape,
                                    lambda name=name, shape=shape: dense_value(name, shape, seed))

    layer_keys = {i: layout.layer_tensors(cfg, i) for i in range(t.num_hidden_layers)}
    add_dense([f"{cfg.text_prefix}embed_tokens.weight"])
    for i in range(t.num_hidden_layers):
        add_dense(layer_keys[i])
        if variant == "modelopt-mixed" and t.layer_types[i] == FULL:
            plan |= kv_scale_tensors(cfg, f"{cfg.text_prefix}layers.{i}", calib, lambda *key: _rng(seed, *key))
        plan |= _expert_plan(cfg, i, experts, expert_layout)
    add_dense([f"{cfg.text_prefix}norm.weight", "lm_head.weight"])
    if t.mtp_num_hidden_layers:
        add_dense(layout.mtp_tensors(cfg))
        plan |= _expert_plan(cfg, "mtp", experts, expert_layout)
    add_dense(layout.vision_tensors(cfg))
    return plan


def _expert_plan(cfg: Config, layer, experts: ExpertWeights, expert_layout: str) -> dict[str, LazyTensor]:
    n = cfg.text.num_experts
    p = "mtp.layers.0.mlp.experts" if layer == "mtp" else f"{cfg.text_prefix}layers.{layer}.mlp.experts"
    bf16 = layer == "mtp"
    plan = {}
    if expert_layout == "per-expert":
        for e in range(n):
            for proj, (rows, k) in experts.shapes.items():
                def get(key, e=e, proj=proj):
                    return lambda: experts.get(layer, e, f"{proj}.{key}")
                if bf16:
                    plan[f"{p}.{e}.{proj}.weight"] = LazyTensor(BF16, (rows, k), get("weight"))
                    continue
                shapes = {"U8": (rows, k // 2), "F8_E4M3": (rows, k // 16), F32: (1,) if experts.ct else ()}
                for kind, dtype in zip(experts.kinds, ("U8", "F8_E4M3", F32, F32)):
                    plan[f"{p}.{e}.{proj}.{kind}"] = LazyTensor(dtype, shapes[dtype], get(kind))
        return plan

    def rows_of(projs, key) -> Callable[[], Iterator[np.ndarray]]:  # expert by expert, gate rows first
        return lambda: (np.concatenate([experts.get(layer, e, f"{q}.{key}") for q in projs]) for e in range(n))

    def stacked(projs, key) -> Callable[[], np.ndarray]:  # [E, 2] for (gate, up), [E] for one projection
        def f():
            a = np.array([[experts.get(layer, e, f"{q}.{key}") for q in projs] for e in range(n)], np.float32)
            return a if len(projs) > 1 else a[:, 0]
        return f

    i, h = experts.shapes["gate_proj"]
    for name, projs, (rows, k) in ((f"{p}.gate_up_proj", ("gate_proj", "up_proj"), (2 * i, h)),
                                   (f"{p}.down_proj", ("down_proj",), (h, i))):
        if bf16:
            plan[name] = LazyTensor(BF16, (n, rows, k), rows_of(projs, "weight"))
            continue
        plan |= {name: LazyTensor("U8", (n, rows, k // 2), rows_of(projs, "weight")),
                 f"{name}_weight_scale": LazyTensor("F8_E4M3", (n, rows, k // 16), rows_of(projs, "weight_scale")),
                 f"{name}_weight_scale_2": LazyTensor(F32, (n, len(projs)) if len(projs) > 1 else (n,),
                                                      stacked(projs, "weight_scale_2")),
                 f"{name}_input_scale": LazyTensor(F32, (n,), stacked(projs[:1], "input_scale"))}
    return plan


# ------------------------------------------------------------------------------------------------
# Files

def _shards(plan: dict[str, LazyTensor], shard_size: int) -> list[dict[str, LazyTensor]]:
    shards, size = [{}], 0
    for name, t in plan.items():
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_files(d: Path, cfg: Config, preset: str, plan: dict[str, LazyTensor], shard_size: int,
                 log: Callable[[str], None]) -> None:
    base = special_base(preset, cfg.text.vocab_size)
    endoftext, im_end = base + SPECIAL_ID["<|endoftext|>"], base + SPECIAL_ID["<|im_end|>"]
    _write_json(d / "config.json", config_dict(cfg))
    if cfg.quant.convention == "modelopt":  # llm-compressor writes no hf_quant_config.json
        _write_json(d / "hf_quant_config.json", hf_quant_config_dict(cfg.quant))
    _write_json(d / "generation_config.json", {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext],
                                               "pad_token_id": endoftext, "do_sample": True, "temperature": 0.6,
                                               "top_k": 20, "top_p": 0.95})
    if cfg.preprocessor is not None:
        _write_json(d / "preprocessor_config.json", preprocessor_config_dict(cfg.preprocessor))
    (d / "tokenizer.json").write_text(build_tokenizer(base, min(base, 1000)), encoding="utf-8")
    _write_json(d / "tokenizer_config.json", tokenizer_config(base))
    shards = _shards(plan, shard_size)
    if len(shards) == 1:
        write_safetensors(d / "model.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(d / name, shard, {"format": "pt"})
        weight_map |= {t: name for t in shard}
        log(f"wrote {name} ({sum(t.nbytes for t in shard.values()) / 1e6:.1f} MB, {len(shard)} tensors)")
    _write_json(d / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(t.nbytes for t in plan.values())},
                 "weight_map": dict(sorted(weight_map.items()))})


# ------------------------------------------------------------------------------------------------
# Calibration

CALIBRATION_PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "Explain in one paragraph why the sky is blue, then add 17 and 25."}]


def calibrate(directory: Path, seed: int, n_random: int = 48, log: Callable[[str], None] = print,
              dense: bool = False) -> Calibration:
    """Set every routed expert's input scales from one float32 forward pass (ref.model, w4a16):
    input_scale = amax(inputs routed to the expert) / 2688, gate/up tied; the layer's max for experts
    never hit. Prints router entropy and hidden-state RMS per layer. Returns the amaxes; dense=True
    also measures the dense linears' inputs and the KV amaxes (ref.synth_variants.measure_dense)."""
    from ref import layers as L
    from ref.checkpoint import open_checkpoint
    from ref.model import Model
    from ref.tokenizer import load_tokenizer

    ckpt = open_checkpoint(directory)
    t, tok = ckpt.config.text, load_tokenizer(directory)
    base = min(tok.token_id("<|endoftext|>"), t.vocab_size)
    ids = tok.encode(tok.apply_chat_template(CALIBRATION_PROMPT))
    ids += _rng(seed, "calibration").integers(0, base, n_random).tolist()
    dumps: dict = {}
    Model(ckpt, precision="f32").prefill(ids, dumps=dumps)
    p32, n = L.Precision("f32"), t.num_experts
    cal = Calibration()
    for i in range(t.num_hidden_layers):
        w = ckpt.lm(f"layers.{i}.post_attention_layernorm.weight").astype(np.float32)
        x = L.rms_norm(dumps[f"layers.{i}.after_mixer"], w, t.rms_norm_eps, p32)  # [T, H] expert inputs
        topk = dumps[f"layers.{i}.topk_ids"]                                         # [T, k]
        amax = np.full((n, 2), np.nan)                                               # (gate/up, down) inputs
        for e in np.unique(topk):
            xe, ex = x[(topk == e).any(axis=1)], ckpt.expert(i, int(e))
            g, u = (xe @ dequantize(m.packed, m.weight_scale, m.weight_scale_2).T for m in (ex.gate, ex.up))
            amax[e] = np.abs(xe).max(), np.abs(L.silu(g) * u).max()
        hit = ~np.isnan(amax[:, 0])
        amax[~hit] = amax[hit].max(axis=0)
        cal.experts[i] = amax
        _store_input_scales(ckpt, i, (amax / GLOBAL_DIVISOR).astype(np.float32))    # [E, 2]
        if dense:
            h_in = dumps["embeddings"] if i == 0 else dumps[f"layers.{i - 1}.after_moe"]
            measure_dense(ckpt, i, h_in, x, cal, lambda a, wt: L.rms_norm(a, wt, t.rms_norm_eps, p32), L.silu)
        probs = L.softmax(dumps[f"layers.{i}.router_logits"].astype(np.float64))
        entropy = float(np.mean(-np.sum(probs * np.log(np.maximum(probs, 1e-300)), axis=-1)))
        rms = float(np.sqrt(np.mean(dumps[f"layers.{i}.after_moe"].astype(np.float64) ** 2)))
        log(f"layer {i} ({t.layer_types[i]}): router entropy {entropy:.2f} nats (uniform {math.log(n):.2f}), "
            f"{int(hit.sum())}/{n} experts hit, hidden RMS {rms:.2f}")
    logits = dumps["logits"].astype(np.float64)
    log(f"{len(ids)} calibration tokens; logits std {logits.std():.2f}")
    return cal


def _store_input_scales(ckpt, layer: int, scales: np.ndarray) -> None:
    """Write calibrated input scales [E, 2] (gate/up, down) into the checkpoint's files in place."""
    p = ckpt.experts_prefix(layer)
    if ckpt.expert_layout(layer) == "fused":
        values = {f"{p}.gate_up_proj_input_scale": scales[:, 0], f"{p}.down_proj_input_scale": scales[:, 1]}
    else:
        values = {f"{p}.{e}.{proj}.input_scale": scales[e, 1 if proj == "down_proj" else 0]
                  for e in range(len(scales)) for proj in layout.PROJS}
    by_file: dict[Path, dict[str, np.ndarray]] = {}
    for name, v in values.items():
        by_file.setdefault(ckpt.file_of(name).path, {})[name] = np.asarray(v, np.float32)
    for path, vals in by_file.items():
        overwrite_tensors(path, vals)


# ------------------------------------------------------------------------------------------------
# Entry points

def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, expert_layout: str = "per-expert",
                     recipe: str = "modelopt-0.37", fast: bool = False, force: bool = False, layers: int | None = None,
                     shard_size: int | None = None, log: Callable[[str], None] | None = None,
                     variant: str = "modelopt") -> Path:
    """Write a random-weight checkpoint; returns out_dir. Never leaves a half-written directory."""
    log = log or (lambda msg: None)
    if expert_layout not in LAYOUTS:
        raise CheckpointError(f"expert_layout {expert_layout!r}: expected one of {list(LAYOUTS)}")
    check_variant(variant, expert_layout)
    cfg = preset_config(preset, layers, recipe)
    out = Path(out_dir)
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        calib = None
        if variant != "modelopt" and not fast:
            calib = _calibrate_default(out, cfg, preset, seed, expert_layout, recipe, shard_size, log)
        vcfg = dataclasses.replace(cfg, quant=variant_quant(cfg, variant, expert_layout))
        plan = _plan(vcfg, seed, expert_layout, recipe, fast, variant, calib)
        _write_files(tmp, vcfg, preset, plan, shard_size or SHARD_SIZE[preset], log)
        if variant == "modelopt" and not fast:
            calibrate(tmp, seed, log=log)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _calibrate_default(out: Path, cfg: Config, preset: str, seed: int, expert_layout: str, recipe: str,
                       shard_size: int | None, log: Callable[[str], None]) -> Calibration:
    """The amaxes a variant's scales come from: the default checkpoint with the same weights,
    written next to `out` and calibrated (dense linears and KV included), then removed."""
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.calibration-", dir=out.parent))
    try:
        plan = _plan(cfg, seed, expert_layout, recipe, False)
        _write_files(stage, cfg, preset, plan, shard_size or SHARD_SIZE[preset], lambda msg: None)
        return calibrate(stage, seed, log=log, dense=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def user_cache(name: str) -> Path:
    """$XDG_CACHE_HOME (or ~/.cache)/qwen35-nvfp4-spec/name: where the project keeps what it makes once."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen35-nvfp4-spec" / name


def cached_checkpoint(preset: str = "tiny", seed: int = 0) -> Path:
    """A `preset` checkpoint under user_cache(preset), written once and reused."""
    out = user_cache(preset)
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing the {preset} synthetic checkpoint to {out} (once)", file=sys.stderr)
        write_checkpoint(out, preset=preset, seed=seed)
    return out


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CheckpointError(f"{out}: directory is not empty (use --force to replace it)")
        if not (out / "config.json").is_file():
            raise CheckpointError(f"{out}: refusing to replace a non-empty directory without config.json")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished directory into place (the old one, if any, goes only after that)."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / "x")
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def parse_size(text: str) -> int:
    """'5GB', '200MB', '256KiB', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 200MB, 4096)")
    unit = (1024 if m.group(3) else 1000) ** "_KMGT".index(m.group(2).upper() or "_")
    return max(1, int(float(m.group(1)) * unit))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ref.synth", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expert-layout", choices=LAYOUTS, default="per-expert")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="modelopt-0.37")
    ap.add_argument("--variant", choices=VARIANTS, default="modelopt",
                    help="storage variant: the seed checkpoint's (default), NVIDIA's mixed FP8/NVFP4 '-V2', or "
                         "compressed-tensors NVFP4 (per-expert layout)")
    ap.add_argument("--fast", action="store_true", help="random codes and scales: no quantization, no calibration")
    ap.add_argument("--shard-size", type=parse_size, help="bytes per shard, e.g. 5GB (default: per preset)")
    ap.add_argument("--force", action="store_true", help="replace an existing checkpoint directory")
    a = ap.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the temporary dir goes too
    try:
        out = write_checkpoint(a.out_dir, a.preset, a.seed, a.expert_layout, a.recipe, a.fast, a.force, a.layers,
                               a.shard_size, log=print, variant=a.variant)
    except (CheckpointError, ConfigError, FormatError, OSError) as e:
        print(f"ref.synth: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ref.synth: interrupted; {a.out_dir} left as it was", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
