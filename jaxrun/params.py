"""jaxrun's parameters, declared once.

Typed containers (NamedTuples, hence pytrees) named after the checkpoint's modules and tensors
(`in_proj_qkv`, `A_log`, `q_proj`, `shared_expert`...). `declare` builds the model's tree with a
`Param` at every leaf: shape, dtype, logical axes and the checkpoint tensor it comes from (names from
ref.checkpoint_layout, the project's one table of names). Everything else is derived from that tree:
loading (jaxrun.load), random parameters (`init`), abstract shapes (`abstract`) and shardings
(jaxrun.sharding maps the logical axes to mesh axes through one rules table).

A new weight is one line in `declare` (and its use in the maths): e.g. a bias on o_proj would be a
field of `GatedAttention` declared with `_vector(t["o_proj_bias"], "embed")`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ref import checkpoint_layout as layout
from ref.config import FULL, Config, TextConfig

COMPUTE = "compute"  # dtype of a leaf stored in the run's compute dtype (float32 or bfloat16)


# ------------------------------------------------------------------------------------------------
# Where a leaf comes from in the checkpoint (jaxrun.load reads each kind)

class Tensor(NamedTuple):
    """A stored tensor by full name, read in the Param's shape (conv1d [C, 1, K] as [C, K])."""
    name: str


class LinearPart(NamedTuple):
    """A part of a (non-expert) linear through ref.checkpoint's normalised view: "weight" (dense, or NVFP4
    packed codes), "weight_scale" or "weight_scale_2"."""
    module: str
    part: str


class ExpertPart(NamedTuple):
    """A part of every routed expert's projection `proj` of one layer, stacked over experts (either layout)."""
    layer: int | str
    proj: str
    part: str


class ExpertInputScales(NamedTuple):
    """The routed experts' input scales of one layer, [E, 2]: max(gate, up) and down (W4A4)."""
    layer: int | str


class KVScale(NamedTuple):
    """A full-attention layer's KV-cache scale, "k" or "v", as the engines settle it (Checkpoint.kv_scales:
    the checkpoint's, or 1.0)."""
    layer: int | str
    kind: str


@dataclass(frozen=True)
class Param:
    shape: tuple[int, ...]
    dtype: Any              # a numpy dtype, or COMPUTE
    axes: tuple[str, ...]   # one logical axis per dimension (jaxrun.sharding.RULES)
    source: Any             # Tensor | LinearPart | ExpertPart | ExpertInputScales (None: state)
    init: str               # random initialisation rule (_init_leaf)
    scale: float = 0.0      # its scale: standard deviation, or the constant


# ------------------------------------------------------------------------------------------------
# The containers

class Dense(NamedTuple):
    weight: Any             # [(E,) out, in] compute dtype


class NVFP4(NamedTuple):
    weight: Any             # uint8 [(E,) out, in/2], element 2j in the low nibble
    weight_scale: Any       # float8_e4m3fn [(E,) out, in/16]
    weight_scale_2: Any     # float32 [] (or [E])
    input_scale: Any = None         # dense linears with calibrated inputs (W4A4): float32 [] dequant direction
    input_global_scale: Any = None  # float32 [] the activation quantizer's G (compressed-tensors: as stored)


class FP8(NamedTuple):
    """A per-tensor FP8 linear (ModelOpt mixed precision, spec/nvfp4.md §11)."""
    weight: Any             # float8_e4m3fn [out, in]
    weight_scale: Any       # float32 []: w = e4m3 * weight_scale
    input_scale: Any = None  # float32 [] static activation scale (W8A8), None when weight-only


class Experts(NamedTuple):
    """The routed experts of one layer, stacked on a leading expert axis."""
    gate_proj: Any          # Dense | NVFP4, [E, I, H]
    up_proj: Any            # [E, I, H]
    down_proj: Any          # [E, H, I]
    input_scale: Any = None  # float32 [E, 2]: gate/up, down (NVFP4 experts with calibrated inputs)


class SharedExpert(NamedTuple):
    gate_proj: Any          # [Is, H]
    up_proj: Any            # [Is, H]
    down_proj: Any          # [H, Is]


class SparseMoe(NamedTuple):
    gate: Any               # router [E, H]
    experts: Experts
    shared_expert: SharedExpert
    shared_expert_gate: Any  # [1, H]


class GatedDeltaNet(NamedTuple):
    in_proj_qkv: Any        # [C, H], C = 2 Hk dk + Hv dv
    in_proj_z: Any          # [Hv dv, H]
    in_proj_b: Any          # [Hv, H]
    in_proj_a: Any          # [Hv, H]
    conv1d: Any             # [C, K] compute dtype
    dt_bias: Any            # float32 [Hv]
    A_log: Any              # float32 [Hv]
    norm: Any               # float32 [dv] (plain weight)
    out_proj: Any           # [H, Hv dv]


class GatedAttention(NamedTuple):
    q_proj: Any             # [nH 2D, H]: per head [query | gate]
    k_proj: Any             # [nKV D, H]
    v_proj: Any             # [nKV D, H]
    o_proj: Any             # [H, nH D]
    q_norm: Any             # float32 [D] (1 + w)
    k_norm: Any             # float32 [D]
    k_scale: Any = None     # float32 [] KV-cache scales (quantized caches)
    v_scale: Any = None


class DecoderLayer(NamedTuple):
    input_layernorm: Any    # float32 [H]
    linear_attn: GatedDeltaNet | None
    self_attn: GatedAttention | None
    post_attention_layernorm: Any
    mlp: SparseMoe


class MTP(NamedTuple):
    fc: Any                 # [H, 2H]
    pre_fc_norm_embedding: Any
    pre_fc_norm_hidden: Any
    norm: Any
    layers: tuple           # (DecoderLayer,): one full-attention layer


# The vision tower, model.visual.* (BF16 in the checkpoint, never quantized; replicated)

class BiasedLinear(NamedTuple):
    weight: Any             # [out, in] compute dtype
    bias: Any               # float32 [out]


class LayerNorm(NamedTuple):
    weight: Any             # float32 [D]
    bias: Any               # float32 [D]


class PatchEmbed(NamedTuple):
    proj: BiasedLinear      # [D, C*T*P*P]: the Conv3d kernel [D, C, T, P, P] flattened


class PosEmbed(NamedTuple):
    weight: Any             # [S*S, D] compute dtype, the learned side x side table


class VisionAttention(NamedTuple):
    qkv: BiasedLinear       # [3D, D]: q heads | k heads | v heads
    proj: BiasedLinear      # [D, D]


class VisionMLP(NamedTuple):
    linear_fc1: BiasedLinear  # [I, D]
    linear_fc2: BiasedLinear  # [D, I]


class VisionBlock(NamedTuple):
    norm1: LayerNorm
    attn: VisionAttention
    norm2: LayerNorm
    mlp: VisionMLP


class PatchMerger(NamedTuple):
    norm: LayerNorm         # over D
    linear_fc1: BiasedLinear  # [m^2 D, m^2 D]
    linear_fc2: BiasedLinear  # [O, m^2 D]


class Visual(NamedTuple):
    patch_embed: PatchEmbed
    pos_embed: PosEmbed
    blocks: tuple           # VisionBlock per block
    merger: PatchMerger


class Params(NamedTuple):
    embed_tokens: Any       # [V, H] compute dtype
    layers: tuple           # DecoderLayer per layer
    norm: Any               # float32 [H]
    lm_head: Any            # [V, H]
    mtp: MTP | None = None
    visual: Visual | None = None  # the vision tower, when the checkpoint has one


class DeltaNetCache(NamedTuple):
    conv: Any               # [B, K-1, C] the last K-1 pre-conv inputs (compute dtype)
    state: Any              # [B, Hv, dk, dv] in the state dtype (float32, or bfloat16: SGLang --mamba-ssm-dtype)


class KVCache(NamedTuple):
    """Keys (after norm and RoPE) and values as the KV-cache dtype stores them: "auto" the compute dtype
    [B, nKV, S, D]; "fp8_e4m3" e4m3 codes [B, nKV, S, D] (times the layer's k_scale / v_scale);
    "nvfp4" packed E2M1 codes uint8 [B, nKV, S, D/2] and E4M3 block scales [B, nKV, S, D/16]."""
    k: Any
    v: Any
    k_block_scales: Any = None
    v_block_scales: Any = None


# ------------------------------------------------------------------------------------------------
# The declaration

@dataclass(frozen=True)
class Formats:
    """How the checkpoint stores what `declare` cannot know from the config: the non-expert linears
    stored NVFP4, the layers whose routed experts are NVFP4, those of them with input scales, and
    whether there is an MTP head. `from_checkpoint` reads them; random parameters use `random`."""
    nvfp4_linears: frozenset = frozenset()
    nvfp4_experts: frozenset = frozenset()
    expert_input_scales: frozenset = frozenset()
    mtp: bool = False
    vision: bool = False    # the checkpoint has the vision tower (model.visual.*)
    fp8_linears: frozenset = frozenset()          # non-expert linears stored per-tensor FP8
    linear_input_scales: frozenset = frozenset()  # those of the quantized linears with input scales

    @staticmethod
    def random(cfg: Config, mtp: bool = False, vision: bool = False) -> "Formats":
        """NVFP4 routed experts (without input scales), everything else dense; an MTP head and the
        vision tower if asked."""
        layers = list(range(cfg.text.num_hidden_layers)) + (["mtp"] if mtp else [])
        return Formats(frozenset(), frozenset(layers), frozenset(), mtp, vision and cfg.vision is not None)

    @staticmethod
    def from_checkpoint(ckpt) -> "Formats":
        from ref.checkpoint import FP8Weight, NVFP4Weight
        cfg = ckpt.config
        mtp = ckpt.has("mtp.fc.weight")
        linears = [t.name[:-len(".weight")] for t in _tensors(layout.model_tensors(cfg)) if t.linear]
        quantized = {m: ckpt.linear(m, prefetch=False) for m in linears if ckpt.has(m + ".weight_scale")}
        layers = [x for x in layout.expert_layers(cfg) if x != "mtp" or mtp]
        nvfp4 = [x for x in layers if isinstance(ckpt.expert(x, 0, prefetch=False).gate, NVFP4Weight)]
        vision = cfg.vision is not None and ckpt.has(VISUAL + "patch_embed.proj.weight")
        return Formats(frozenset(m for m, w in quantized.items() if isinstance(w, NVFP4Weight)), frozenset(nvfp4),
                       frozenset(x for x in nvfp4 if ckpt.expert_input_scales(x) is not None), mtp, vision,
                       frozenset(m for m, w in quantized.items() if isinstance(w, FP8Weight)),
                       frozenset(m for m, w in quantized.items() if w.input_scale is not None))


def _tensors(module):
    if isinstance(module, layout.Tensor):
        yield module
    else:
        for part in (module.values() if isinstance(module, dict) else module):
            yield from _tensors(part)


def declare(cfg: Config, formats: Formats) -> Params:
    """The parameter tree of `cfg` with a Param at every leaf."""
    d, names = _Declare(cfg.text, formats), layout.model_tensors(cfg)
    mtp = None
    if formats.mtp:
        m = names["mtp"]
        mtp = MTP(d.linear(m["fc"], "embed", "mtp_in"), d.vector(m["pre_fc_norm_embedding"], "embed"),
                  d.vector(m["pre_fc_norm_hidden"], "embed"), d.vector(m["norm"], "embed"),
                  (d.decoder_layer(m["layers"][0], "mtp"),))
    e = names["embed_tokens"]
    return Params(Param(e.shape, COMPUTE, ("vocab", "embed"), Tensor(e.name), "normal", 0.5),
                  tuple(d.decoder_layer(layer, i) for i, layer in enumerate(names["layers"])),
                  d.vector(names["norm"], "embed"), d.linear(names["lm_head"], "vocab", "embed"), mtp,
                  declare_visual(cfg) if formats.vision else None)


class _Declare:
    """The declarations of the language model's modules, from ref.checkpoint_layout's tables of their
    tensors and the formats the checkpoint stores them in."""

    def __init__(self, t: TextConfig, formats: Formats):
        self.t, self.formats = t, formats

    def linear(self, tensor: layout.Tensor, out_axis: str, in_axis: str):
        """A linear weight [out, in]: dense, per-tensor FP8 or NVFP4 as stored (with input scales
        where the checkpoint has them)."""
        module, (out, inp), f = tensor.name[:-len(".weight")], tensor.shape, self.formats

        def scalar(part, value):
            return Param((), np.float32, (), LinearPart(module, part), "constant", value)
        inputs = module in f.linear_input_scales
        if module in f.fp8_linears:
            return FP8(Param((out, inp), jnp.float8_e4m3fn, (out_axis, in_axis), LinearPart(module, "weight"), "e4m3"),
                       scalar("weight_scale", inp ** -0.5 / 2), scalar("input_scale", 1 / 64) if inputs else None)
        if module not in f.nvfp4_linears:
            return Dense(Param((out, inp), COMPUTE, (out_axis, in_axis), LinearPart(module, "weight"), "normal",
                               inp ** -0.5))
        return NVFP4(Param((out, inp // 2), np.uint8, (out_axis, in_axis), LinearPart(module, "weight"), "codes"),
                     Param((out, inp // 16), jnp.float8_e4m3fn, (out_axis, in_axis),
                           LinearPart(module, "weight_scale"), "block_scales"),
                     scalar("weight_scale_2", _global(inp)), scalar("input_scale", 1 / 448) if inputs else None,
                     scalar("input_global_scale", 448.0) if inputs else None)

    @staticmethod
    def vector(tensor: layout.Tensor, axis: str, init: str = "normal"):
        return Param(tensor.shape, np.float32, (axis,), Tensor(tensor.name), init, 0.1)

    def experts(self, layer) -> Experts:
        """A layer's routed experts stacked [E, ...] (each projection dense or NVFP4), with the experts'
        input scales where stored."""
        E, shapes = self.t.num_experts, layout.expert_shapes(self.t)
        axes = {"gate_proj": ("expert_mlp", "embed"), "up_proj": ("expert_mlp", "embed"),
                "down_proj": ("embed", "expert_mlp")}

        def proj(name):
            (out, inp), ax = shapes[name], ("experts",) + axes[name]
            part = lambda p: ExpertPart(layer, name, p)  # noqa: E731
            if layer not in self.formats.nvfp4_experts:
                return Dense(Param((E, out, inp), COMPUTE, ax, part("weight"), "normal", inp ** -0.5))
            return NVFP4(Param((E, out, inp // 2), np.uint8, ax, part("weight"), "codes"),
                         Param((E, out, inp // 16), jnp.float8_e4m3fn, ax, part("weight_scale"), "block_scales"),
                         Param((E,), np.float32, ("experts",), part("weight_scale_2"), "constant", _global(inp)))

        scales = None
        if layer in self.formats.expert_input_scales:
            scales = Param((E, 2), np.float32, ("experts", "scale_pair"), ExpertInputScales(layer), "constant",
                           1 / 448)
        return Experts(*(proj(n) for n in layout.PROJS), input_scale=scales)

    def moe(self, m: dict, layer) -> SparseMoe:
        s = m["shared_expert"]
        return SparseMoe(self.linear(m["gate"], "router", "embed"), self.experts(layer),
                         SharedExpert(self.linear(s["gate_proj"], "shared_mlp", "embed"),
                                      self.linear(s["up_proj"], "shared_mlp", "embed"),
                                      self.linear(s["down_proj"], "embed", "shared_mlp")),
                         self.linear(m["shared_expert_gate"], "gate_out", "embed"))

    def deltanet(self, a: dict) -> GatedDeltaNet:
        C, _, K = a["conv1d"].shape
        projections = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
        return GatedDeltaNet(
            *(self.linear(a[n], "deltanet_out", "embed") for n in projections),
            conv1d=Param((C, K), COMPUTE, ("deltanet_out", "conv_kernel"), Tensor(a["conv1d"].name), "normal", 0.5),
            dt_bias=self.vector(a["dt_bias"], "deltanet_heads", "one_plus"),
            A_log=self.vector(a["A_log"], "deltanet_heads", "log_uniform"),
            norm=self.vector(a["norm"], "head_dim", "one_plus"),
            out_proj=self.linear(a["out_proj"], "embed", "deltanet_in"))

    def attention(self, a: dict, layer) -> GatedAttention:
        kv_scale = lambda kind: Param((), np.float32, (), KVScale(layer, kind), "constant", 1.0)  # noqa: E731
        return GatedAttention(*(self.linear(a[n], "attn_out", "embed") for n in ("q_proj", "k_proj", "v_proj")),
                              o_proj=self.linear(a["o_proj"], "embed", "attn_in"),
                              q_norm=self.vector(a["q_norm"], "head_dim"), k_norm=self.vector(a["k_norm"], "head_dim"),
                              k_scale=kv_scale("k"), v_scale=kv_scale("v"))

    def decoder_layer(self, d: dict, layer) -> DecoderLayer:
        return DecoderLayer(self.vector(d["input_layernorm"], "embed"),
                            self.deltanet(d["linear_attn"]) if "linear_attn" in d else None,
                            self.attention(d["self_attn"], layer) if "self_attn" in d else None,
                            self.vector(d["post_attention_layernorm"], "embed"), self.moe(d["mlp"], layer))


VISUAL = "model.visual."


def declare_visual(cfg: Config) -> Visual:
    """The vision tower's parameters (names and shapes from ref.checkpoint_layout.vision_tensors):
    matrices in the compute dtype, biases and LayerNorm parameters float32; every axis replicated."""
    shapes = layout.vision_tensors(cfg)

    def shape(name: str) -> tuple[int, ...]:
        return shapes[VISUAL + name]

    def linear(module: str, out_axis: str, in_axis: str) -> BiasedLinear:
        out = shape(module + ".weight")[0]
        inp = int(np.prod(shape(module + ".weight")[1:]))        # the patch embedding's kernel flattened
        return BiasedLinear(Param((out, inp), COMPUTE, (out_axis, in_axis), Tensor(VISUAL + module + ".weight"),
                                  "normal", inp ** -0.5),
                            Param((out,), np.float32, (out_axis,), Tensor(VISUAL + module + ".bias"), "normal", 0.02))

    def norm(module: str) -> LayerNorm:
        d = shape(module + ".weight")
        return LayerNorm(Param(d, np.float32, ("vision_embed",), Tensor(VISUAL + module + ".weight"), "one_plus", 0.1),
                         Param(d, np.float32, ("vision_embed",), Tensor(VISUAL + module + ".bias"), "normal", 0.1))

    def block(i: int) -> VisionBlock:
        b = f"blocks.{i}."
        return VisionBlock(norm(b + "norm1"),
                           VisionAttention(linear(b + "attn.qkv", "vision_qkv", "vision_embed"),
                                           linear(b + "attn.proj", "vision_embed", "vision_embed")),
                           norm(b + "norm2"),
                           VisionMLP(linear(b + "mlp.linear_fc1", "vision_mlp", "vision_embed"),
                                     linear(b + "mlp.linear_fc2", "vision_embed", "vision_mlp")))

    table = shape("pos_embed.weight")
    return Visual(PatchEmbed(linear("patch_embed.proj", "vision_embed", "vision_patch")),
                  PosEmbed(Param(table, COMPUTE, ("vision_positions", "vision_embed"),
                                 Tensor(VISUAL + "pos_embed.weight"), "normal", 0.5)),
                  tuple(block(i) for i in range(cfg.vision.depth)),
                  PatchMerger(norm("merger.norm"), linear("merger.linear_fc1", "vision_merged", "vision_merged"),
                              linear("merger.linear_fc2", "vision_out", "vision_merged")))


def declare_cache(cfg: TextConfig, B: int, max_len: int, kinds=None, kv_cache_dtype: str = "auto",
                  state_dtype: str = "float32") -> tuple:
    """The per-layer caches of B sequences and max_len positions (kinds: the layers' types, default the
    main model's; the MTP head's is kinds=(FULL,)), zeros at the start of a sequence. The attention
    caches hold K/V in kv_cache_dtype's stored form (KVCache), the DeltaNet state is state_dtype."""
    out = []
    for kind in kinds or cfg.layer_types:
        if kind == FULL:
            axes = ("batch", "kv_heads", "cache_seq", "cache_head_dim")
            shape = (B, cfg.num_key_value_heads, max_len, cfg.head_dim)
            if kv_cache_dtype == "auto":
                kv = Param(shape, COMPUTE, axes, None, "constant")
                out.append(KVCache(kv, kv))
            elif kv_cache_dtype == "fp8_e4m3":
                kv = Param(shape, jnp.float8_e4m3fn, axes, None, "constant")
                out.append(KVCache(kv, kv))
            elif kv_cache_dtype == "nvfp4":
                codes = Param(shape[:-1] + (cfg.head_dim // 2,), np.uint8, axes, None, "constant")
                scales = Param(shape[:-1] + (cfg.head_dim // 16,), jnp.float8_e4m3fn, axes, None, "constant")
                out.append(KVCache(codes, codes, scales, scales))
            else:
                raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: expected auto, fp8_e4m3 or nvfp4")
        else:
            state = {"float32": np.float32, "bfloat16": jnp.bfloat16}[state_dtype]
            out.append(DeltaNetCache(
                Param((B, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim), COMPUTE,
                      ("batch", "conv_window", "cache_channels"), None, "constant"),
                Param((B, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim), state,
                      ("batch", "cache_heads", "cache_key_dim", "cache_value_dim"), None, "constant")))
    return tuple(out)


def leaves(tree) -> list[Param]:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Param))


def resolve_dtype(param: Param, dtype):
    """The leaf's dtype in a run whose compute dtype is `dtype`."""
    return dtype if param.dtype == COMPUTE else param.dtype


def abstract(declared: Params, dtype) -> Params:
    """ShapeDtypeStructs of every leaf (compute dtype `dtype`)."""
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, resolve_dtype(p, dtype)), declared,
                        is_leaf=lambda x: isinstance(x, Param))


# ------------------------------------------------------------------------------------------------
# Random parameters (tests before a checkpoint exists, the 397B-shape GPU check)

def _global(fan_in: int) -> float:
    """A random NVFP4 weight's global scale: random codes (rms ~3.2) and block scales (~1.2) then give
    weights of about 0.6 / sqrt(fan_in)."""
    return 0.25 * fan_in ** -0.5 / 6


def _init_leaf(key, p: Param, dtype):
    """One random leaf by its rule: "normal" N(0, scale^2), "one_plus" 1 + N(0, scale^2) (plain weights
    near 1), "log_uniform" log U(1, 16) (A_log), "constant", "codes" (random bytes), "block_scales"
    (E4M3 of U(0.5, 2)), "e4m3" (E4M3 of N(0, 4): FP8 weights)."""
    dt = resolve_dtype(p, dtype)
    if p.init in ("normal", "one_plus"):
        x = jax.random.normal(key, p.shape, jnp.float32) * p.scale
        return (x + (p.init == "one_plus")).astype(dt)
    if p.init == "log_uniform":
        return jnp.log(jax.random.uniform(key, p.shape, minval=1, maxval=16)).astype(dt)
    if p.init == "constant":
        return jnp.full(p.shape, p.scale, dt)
    if p.init == "codes":
        return jax.random.randint(key, p.shape, 0, 256, jnp.int32).astype(jnp.uint8)
    if p.init == "block_scales":
        return jax.random.uniform(key, p.shape, jnp.float32, 0.5, 2.0).astype(jnp.float8_e4m3fn)
    if p.init == "e4m3":
        return jnp.clip(jax.random.normal(key, p.shape, jnp.float32) * 2, -448, 448).astype(jnp.float8_e4m3fn)
    raise ValueError(f"random init: no rule {p.init!r} for a leaf of shape {p.shape}")


def init(key, declared: Params, dtype) -> Params:
    """Random parameters of the declared shapes, compute dtype `dtype`; leaf i from fold_in(key, i)."""
    flat, treedef = jax.tree.flatten(declared, is_leaf=lambda x: isinstance(x, Param))
    return jax.tree.unflatten(treedef, [_init_leaf(jax.random.fold_in(key, i), p, dtype) for i, p in enumerate(flat)])
