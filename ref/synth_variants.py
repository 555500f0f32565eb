"""The other storage variants ref.synth writes (`--variant`): which modules each quantizes, their
config, and the tensors of their quantized dense linears, KV scales and routed experts' scalars.

  modelopt-mixed      NVIDIA's "-V2": per-tensor FP8 (static W8A8) for linear_attn in_proj_qkv /
                      in_proj_z / out_proj, self_attn q/k/v/o and the shared experts; NVFP4 routed
                      experts; FP8 KV scales; MIXED_PRECISION with quantized_layers
  compressed-tensors  llm-compressor NVFP4 (weight_packed, inverted globals) on the same dense linears
                      and the routed experts, per-expert layout
Both keep the router, shared_expert_gate, in_proj_a/b, conv1d, lm_head, embeddings, vision and MTP in
BF16. Every scale derives from one Calibration (amaxes) of the default checkpoint with the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np

from ref import checkpoint_layout as layout
from ref.config import Config, QuantConfig
from ref.errors import CheckpointError
from ref.fp8 import quantize_fp8_weight
from ref.nvfp4 import E4M3_MAX, GLOBAL_DIVISOR, quantize_weight_ct
from ref.safetensors_io import LazyTensor

VARIANTS = ("modelopt", "modelopt-mixed", "compressed-tensors")
CT_PRODUCER = "compressed-tensors 0.12.2"
# BF16 modules (ModelOpt wildcards for the mixed variant; compressed-tensors names / "re:" regexes)
MIXED_EXCLUDE = ("lm_head", "model.language_model.layers.*.linear_attn.conv1d",
                 "model.language_model.layers.*.linear_attn.in_proj_a",
                 "model.language_model.layers.*.linear_attn.in_proj_b", "model.language_model.layers.*.mlp.gate",
                 "model.language_model.layers.*.mlp.shared_expert_gate", "model.visual*", "mtp*")
CT_IGNORE = ("lm_head", r"re:.*mlp\.gate$", r"re:.*mlp\.shared_expert_gate$", r"re:.*linear_attn\.in_proj_[ab]$",
             r"re:.*visual.*", r"re:^mtp.*")
QUANTIZED_DENSE = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                   "linear_attn": ("in_proj_qkv", "in_proj_z", "out_proj"),
                   "shared_expert": ("gate_proj", "up_proj", "down_proj")}
FUSED = (("q_proj", "k_proj", "v_proj"), ("in_proj_qkv", "in_proj_z"), ("gate_proj", "up_proj"))
F32 = "F32"


@dataclass
class Calibration:
    """Amaxes measured on the default checkpoint: expert inputs [E, 2] (gate/up, down) per layer,
    dense-linear inputs per module, (key, value) per full-attention prefix."""
    experts: dict[int, np.ndarray] = field(default_factory=dict)
    dense: dict[str, float] = field(default_factory=dict)
    kv: dict[str, tuple[float, float]] = field(default_factory=dict)


def check_variant(variant: str, expert_layout: str) -> None:
    if variant not in VARIANTS:
        raise CheckpointError(f"variant {variant!r}: expected one of {list(VARIANTS)}")
    if variant == "compressed-tensors" and expert_layout != "per-expert":
        raise CheckpointError("variant 'compressed-tensors': llm-compressor writes per-expert tensors only "
                              "(use --expert-layout per-expert)")


def quantized_dense(cfg: Config, variant: str) -> dict[str, str]:
    """Dense linear module -> "fp8" | "nvfp4" for the variant (MTP and vision stay BF16)."""
    if variant == "modelopt":
        return {}
    kind = "fp8" if variant == "modelopt-mixed" else "nvfp4"
    out = {}
    for name, shape in layout.dense_tensors(cfg).items():
        if not layout.is_linear(name, shape) or name.startswith(("mtp.", "model.visual.")):
            continue
        parts = name[:-len(".weight")].split(".")
        if len(parts) > 1 and parts[-1] in QUANTIZED_DENSE.get(parts[-2], ()):
            out[name[:-len(".weight")]] = kind
    return out


def variant_quant(cfg: Config, variant: str, expert_layout: str) -> QuantConfig:
    """The variant's QuantConfig (the default's unchanged)."""
    q = cfg.quant
    if variant == "modelopt":
        return q
    if variant == "compressed-tensors":
        return QuantConfig("NVFP4", 16, CT_IGNORE, None, CT_PRODUCER, "compressed-tensors")
    layers = [(m, "FP8") for m in quantized_dense(cfg, variant)]
    for i in range(cfg.text.num_hidden_layers):
        p = f"{cfg.text_prefix}layers.{i}.mlp.experts"
        if expert_layout == "per-expert":
            layers += [(f"{p}.{e}.{proj}", "NVFP4") for e in range(cfg.text.num_experts) for proj in layout.PROJS]
        else:
            layers += [(f"{p}.gate_up_proj", "NVFP4"), (f"{p}.down_proj", "NVFP4")]
    return QuantConfig("MIXED_PRECISION", 16, MIXED_EXCLUDE, "FP8", q.producer, "modelopt_mixed",
                       tuple(sorted(layers)))


def _fused_group(module: str, modules) -> tuple[str, ...]:
    parent, leaf = module.rsplit(".", 1)
    for group in FUSED:
        if leaf in group and all(f"{parent}.{x}" in modules for x in group):
            return tuple(f"{parent}.{x}" for x in group)
    return (module,)


class DenseQuantizer:
    """Stored tensors of the dense linears a variant quantizes, from the BF16 values `value(name,
    shape)`; pieces engines fuse share the weight amax and the input amax."""

    def __init__(self, cfg: Config, variant: str, value: Callable, calib: Calibration | None,
                 rng: Callable[..., np.random.Generator]):
        self.kinds = quantized_dense(cfg, variant)
        self.shapes = layout.dense_tensors(cfg)
        self.value, self.calib, self.rng = value, calib, rng
        self._arrays = lru_cache(maxsize=None)(self._quantize)

    def tensors(self, module: str) -> dict[str, LazyTensor]:
        """{name: LazyTensor} replacing `module.weight`, in file order."""
        out, k = self.shapes[module + ".weight"]

        def get(key):
            return lambda: self._arrays(module)[key]
        if self.kinds[module] == "fp8":
            return {f"{module}.weight": LazyTensor("F8_E4M3", (out, k), get("weight")),
                    f"{module}.weight_scale": LazyTensor(F32, (), get("weight_scale")),
                    f"{module}.input_scale": LazyTensor(F32, (), get("input_scale"))}
        return {f"{module}.weight_packed": LazyTensor("U8", (out, k // 2), get("weight_packed")),
                f"{module}.weight_scale": LazyTensor("F8_E4M3", (out, k // 16), get("weight_scale")),
                f"{module}.weight_global_scale": LazyTensor(F32, (1,), get("weight_global_scale")),
                f"{module}.input_global_scale": LazyTensor(F32, (1,), get("input_global_scale"))}

    def input_amax(self, module: str) -> float:
        group = _fused_group(module, self.kinds)
        if self.calib is None:  # --fast: a placeholder of the right magnitude, per group
            return float(self.rng("dense input", group[0]).uniform(2, 8))
        return max(self.calib.dense[m] for m in group)

    def _quantize(self, module: str) -> dict[str, np.ndarray]:
        group = _fused_group(module, self.kinds)
        w = self.value(module + ".weight", self.shapes[module + ".weight"]).astype(np.float32)
        w_amax = np.float32(max(np.abs(self.value(m + ".weight", self.shapes[m + ".weight"]).astype(np.float32)).max()
                                for m in group))
        x_amax = np.float32(self.input_amax(module))
        if self.kinds[module] == "fp8":
            q, scale = quantize_fp8_weight(w, w_amax)
            return {"weight": q, "weight_scale": scale,
                    "input_scale": np.asarray(np.float32(x_amax / np.float32(E4M3_MAX)), np.float32)}
        packed, scale, g = quantize_weight_ct(w, w_amax)
        return {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": g,
                "input_global_scale": np.full((1,), np.float32(np.float32(GLOBAL_DIVISOR) / x_amax), np.float32)}


def kv_scale_tensors(cfg: Config, prefix: str, calib: Calibration | None,
                     rng: Callable[..., np.random.Generator]) -> dict[str, LazyTensor]:
    """ModelOpt FP8 KV-cache scales of one full-attention layer: amax / 448, F32 []."""
    if calib is None:
        amax = tuple(float(rng("kv", prefix, kind).uniform(4, 16)) for kind in "kv")
    else:
        amax = calib.kv[prefix]
    vals = {kind: np.asarray(np.float32(np.float32(a) / np.float32(E4M3_MAX)), np.float32)
            for kind, a in zip("kv", amax)}
    return {f"{prefix}.self_attn.{kind}_proj.{kind}_scale": LazyTensor(F32, (), lambda v=v: v)
            for kind, v in vals.items()}


def measure_dense(ckpt, layer: int, h_in: np.ndarray, after_mixer_normed: np.ndarray, out: Calibration,
                  rms_norm: Callable, silu: Callable) -> None:
    """Input amaxes of layer `layer`'s dense linears (BF16 weights of the default checkpoint) into
    `out`: h_in [T, H] the layer input, after_mixer_normed [T, H] the MoE input."""
    t, lm = ckpt.config.text, ckpt.lm
    pre = f"{ckpt.config.text_prefix}layers.{layer}"
    x = rms_norm(h_in, lm(f"layers.{layer}.input_layernorm.weight").astype(np.float32))      # [T, H]

    def w(name):
        return lm(f"layers.{layer}.{name}").astype(np.float32)
    ax = float(np.abs(x).max())
    if t.layer_types[layer] == "full_attention":
        v = x @ w("self_attn.v_proj.weight").T                                                  # [T, kv*D]
        k = (x @ w("self_attn.k_proj.weight").T).reshape(x.shape[0], t.num_key_value_heads, t.head_dim)
        k = rms_norm(k, w("self_attn.k_norm.weight"))
        half = t.rotary_dim // 2                          # rotate-half RoPE turns pairs (i, i + rd/2)
        pairs = np.hypot(k[..., :half], k[..., half:t.rotary_dim])
        k_amax = float(max(pairs.max(), np.abs(k[..., t.rotary_dim:]).max(initial=0.0)))
        out.kv[pre] = (k_amax, float(np.abs(v).max()))
        out.dense |= {f"{pre}.self_attn.{m}": ax for m in ("q_proj", "k_proj", "v_proj")}
        out.dense[f"{pre}.self_attn.o_proj"] = float(np.abs(v).max())  # |softmax mix * sigmoid| <= max|v|
    else:
        z = x @ w("linear_attn.in_proj_z.weight").T                                             # [T, Hv*dv]
        bound = math.sqrt(t.linear_value_head_dim) * float(np.abs(w("linear_attn.norm.weight")).max()) * \
            float(np.abs(silu(z)).max())                  # each element of an RMS-normalised row <= sqrt(d)
        out.dense |= {f"{pre}.linear_attn.in_proj_qkv": ax, f"{pre}.linear_attn.in_proj_z": ax,
                      f"{pre}.linear_attn.out_proj": bound}
    y = after_mixer_normed
    g, u = (y @ w(f"mlp.shared_expert.{m}.weight").T for m in ("gate_proj", "up_proj"))
    ay = float(np.abs(y).max())
    out.dense |= {f"{pre}.mlp.shared_expert.gate_proj": ay, f"{pre}.mlp.shared_expert.up_proj": ay,
                  f"{pre}.mlp.shared_expert.down_proj": float(np.abs(silu(g) * u).max())}
