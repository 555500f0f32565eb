"""The tensors a Qwen3.5-MoE config implies: names and logical shapes, in one place.

Each module is a table from its own field names (the checkpoint's: `in_proj_qkv`, `A_log`, `q_norm`,
`shared_expert`...) to the `Tensor` it stores, nested as the model nests its modules (`model_tensors`).
The writer (ref.synth), the validator (ref.checkpoint_check), the reference's weight wiring
(ref.weights) and jaxrun's parameter declaration (jaxrun.params) all read names from these tables, so
what we write is what we check and what both forward passes read. Routed experts are listed separately
(`expert_shapes`) because they come in two layouts. Shapes are logical [out, in]; an NVFP4-quantized
linear stores `.weight` as U8 [out, in/2].
"""
from __future__ import annotations

from typing import NamedTuple

from ref.config import FULL, Config, TextConfig

PROJS = ("gate_proj", "up_proj", "down_proj")


class Tensor(NamedTuple):
    name: str                # full name in the checkpoint
    shape: tuple[int, ...]   # logical shape; a linear's [out, in]
    linear: bool = False     # used as x @ W.T, so it may be stored quantized (name ends in .weight)


def _linear(name: str, out: int, inp: int) -> Tensor:
    return Tensor(f"{name}.weight", (out, inp), True)


def layer_prefix(cfg: Config, layer: int | str) -> str:
    """'model.language_model.layers.{i}.' for decoder layer i, 'mtp.layers.0.' for "mtp"."""
    return "mtp.layers.0." if layer == "mtp" else f"{cfg.text_prefix}layers.{int(layer)}."


def expert_shapes(t: TextConfig) -> dict[str, tuple[int, int]]:
    """Logical [out, in] of one routed expert's projections."""
    h, i = t.hidden_size, t.moe_intermediate_size
    return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def experts_prefix(cfg: Config, layer: int | str) -> str:
    """Prefix of a layer's routed-expert tensors (per-expert '.{e}.gate_proj...' or fused '.gate_up_proj')."""
    return layer_prefix(cfg, layer) + "mlp.experts"


def sparse_moe(t: TextConfig, p: str) -> dict:
    """The MoE block under prefix p ('...layers.{i}.'), routed experts excluded: router `gate`, the shared
    expert and its sigmoid gate."""
    h, s, m = t.hidden_size, t.shared_expert_intermediate_size, f"{p}mlp."
    return {"gate": _linear(m + "gate", t.num_experts, h),
            "shared_expert": {"gate_proj": _linear(m + "shared_expert.gate_proj", s, h),
                              "up_proj": _linear(m + "shared_expert.up_proj", s, h),
                              "down_proj": _linear(m + "shared_expert.down_proj", h, s)},
            "shared_expert_gate": _linear(m + "shared_expert_gate", 1, h)}


def gated_attention(t: TextConfig, p: str) -> dict:
    """`self_attn` of a full-attention layer; q_proj rows are per head [query | gate]."""
    h, d, a = t.hidden_size, t.head_dim, f"{p}self_attn."
    q, kv = t.num_attention_heads, t.num_key_value_heads
    return {"q_proj": _linear(a + "q_proj", 2 * q * d, h), "k_proj": _linear(a + "k_proj", kv * d, h),
            "v_proj": _linear(a + "v_proj", kv * d, h), "o_proj": _linear(a + "o_proj", h, q * d),
            "q_norm": Tensor(a + "q_norm.weight", (d,)), "k_norm": Tensor(a + "k_norm.weight", (d,))}


def gated_deltanet(t: TextConfig, p: str) -> dict:
    """`linear_attn` of a linear-attention layer."""
    h, hv, a = t.hidden_size, t.linear_num_value_heads, f"{p}linear_attn."
    return {"in_proj_qkv": _linear(a + "in_proj_qkv", t.linear_conv_dim, h),
            "in_proj_z": _linear(a + "in_proj_z", t.linear_value_dim, h),
            "in_proj_b": _linear(a + "in_proj_b", hv, h), "in_proj_a": _linear(a + "in_proj_a", hv, h),
            "conv1d": Tensor(a + "conv1d.weight", (t.linear_conv_dim, 1, t.linear_conv_kernel_dim)),
            "dt_bias": Tensor(a + "dt_bias", (hv,)), "A_log": Tensor(a + "A_log", (hv,)),
            "norm": Tensor(a + "norm.weight", (t.linear_value_head_dim,)),
            "out_proj": _linear(a + "out_proj", h, t.linear_value_dim)}


def decoder_layer(cfg: Config, layer: int | str) -> dict:
    """Decoder layer i (or the MTP head's, "mtp": always full attention), routed experts excluded."""
    t, p = cfg.text, layer_prefix(cfg, layer)
    full = layer == "mtp" or t.layer_types[layer] == FULL
    mixer = {"self_attn": gated_attention(t, p)} if full else {"linear_attn": gated_deltanet(t, p)}
    return {"input_layernorm": Tensor(f"{p}input_layernorm.weight", (t.hidden_size,)), **mixer,
            "post_attention_layernorm": Tensor(f"{p}post_attention_layernorm.weight", (t.hidden_size,)),
            "mlp": sparse_moe(t, p)}


def mtp_module(cfg: Config) -> dict:
    """The MTP head: fc over [norm(embedding) | norm(hidden)], one decoder layer, a final norm; {} if absent."""
    t = cfg.text
    if t.mtp_num_hidden_layers == 0:
        return {}
    h = t.hidden_size
    return {"fc": _linear("mtp.fc", h, 2 * h), "pre_fc_norm_embedding": Tensor("mtp.pre_fc_norm_embedding.weight", (h,)),
            "pre_fc_norm_hidden": Tensor("mtp.pre_fc_norm_hidden.weight", (h,)), "norm": Tensor("mtp.norm.weight", (h,)),
            "layers": [decoder_layer(cfg, "mtp")]}


def model_tensors(cfg: Config) -> dict:
    """The text model as nested module tables, routed experts excluded."""
    t, p = cfg.text, cfg.text_prefix
    return {"embed_tokens": Tensor(f"{p}embed_tokens.weight", (t.vocab_size, t.hidden_size)),
            "layers": [decoder_layer(cfg, i) for i in range(t.num_hidden_layers)],
            "norm": Tensor(f"{p}norm.weight", (t.hidden_size,)),
            "lm_head": _linear("lm_head", t.vocab_size, t.hidden_size), "mtp": mtp_module(cfg)}


def flatten(module) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a (nested) module table, in table order."""
    if isinstance(module, Tensor):
        return {module.name: module.shape}
    parts = module.values() if isinstance(module, dict) else module
    return {name: shape for part in parts for name, shape in flatten(part).items()}


def layer_tensors(cfg: Config, i: int) -> dict[str, tuple[int, ...]]:
    """Decoder layer i, routed experts excluded."""
    return flatten(decoder_layer(cfg, i))


def mtp_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The MTP module (a full-attention MoE layer plus fc and norms), routed experts excluded."""
    return flatten(mtp_module(cfg))


def vision_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    if v is None or not cfg.multimodal:
        return {}
    h, m = v.hidden_size, v.hidden_size * v.spatial_merge_size ** 2
    out = {"model.visual.patch_embed.proj.weight": (h, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
           "model.visual.patch_embed.proj.bias": (h,), "model.visual.pos_embed.weight": (v.num_position_embeddings, h)}
    for b in range(v.depth):
        p = f"model.visual.blocks.{b}"
        for name, (o, i) in {"attn.qkv": (3 * h, h), "attn.proj": (h, h), "mlp.linear_fc1": (v.intermediate_size, h),
                             "mlp.linear_fc2": (h, v.intermediate_size)}.items():
            out |= {f"{p}.{name}.weight": (o, i), f"{p}.{name}.bias": (o,)}
        out |= {f"{p}.{n}.{w}": (h,) for n in ("norm1", "norm2") for w in ("weight", "bias")}
    out |= {"model.visual.merger.norm.weight": (h,), "model.visual.merger.norm.bias": (h,),
            "model.visual.merger.linear_fc1.weight": (m, m), "model.visual.merger.linear_fc1.bias": (m,),
            "model.visual.merger.linear_fc2.weight": (v.out_hidden_size, m),
            "model.visual.merger.linear_fc2.bias": (v.out_hidden_size,)}
    return out


def dense_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor but the routed experts, in file order (embeddings, layers, norm, head, MTP, vision)."""
    return flatten(model_tensors(cfg)) | vision_tensors(cfg)


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D `.weight` used as x @ W.T (so it may be stored NVFP4); embeddings are lookups, not linears."""
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith(("embed_tokens.weight",
                                                                              "pos_embed.weight"))


def expert_layers(cfg: Config) -> list[int | str]:
    """The layers with routed experts: 0..L-1, and "mtp" when there is an MTP module."""
    return list(range(cfg.text.num_hidden_layers)) + (["mtp"] if cfg.text.mtp_num_hidden_layers else [])
