"""The tensors a Qwen3.5-MoE config implies (model.md §2): names and logical shapes.

One table shared by the writer (ref.synth) and the validator (ref.checkpoint_check), so what we write
is what we check. Routed experts are listed separately (`expert_shapes`) because they come in two
layouts. Shapes are logical [out, in]; an NVFP4-quantized linear stores `.weight` as U8 [out, in/2].
"""
from __future__ import annotations

from ref.config import FULL, Config, TextConfig

PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_shapes(t: TextConfig) -> dict[str, tuple[int, int]]:
    """Logical [out, in] of one routed expert's projections."""
    h, i = t.hidden_size, t.moe_intermediate_size
    return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def _moe(p: str, t: TextConfig) -> dict[str, tuple[int, ...]]:
    h, s = t.hidden_size, t.shared_expert_intermediate_size
    return {f"{p}.mlp.gate.weight": (t.num_experts, h),
            f"{p}.mlp.shared_expert.gate_proj.weight": (s, h), f"{p}.mlp.shared_expert.up_proj.weight": (s, h),
            f"{p}.mlp.shared_expert.down_proj.weight": (h, s), f"{p}.mlp.shared_expert_gate.weight": (1, h)}


def _full_attention(p: str, t: TextConfig) -> dict[str, tuple[int, ...]]:
    h, d = t.hidden_size, t.head_dim
    q, kv = t.num_attention_heads, t.num_key_value_heads
    return {f"{p}.self_attn.q_proj.weight": (2 * q * d, h),  # per head: [query | gate]
            f"{p}.self_attn.k_proj.weight": (kv * d, h), f"{p}.self_attn.v_proj.weight": (kv * d, h),
            f"{p}.self_attn.o_proj.weight": (h, q * d),
            f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,)}


def _linear_attention(p: str, t: TextConfig) -> dict[str, tuple[int, ...]]:
    h, hv = t.hidden_size, t.linear_num_value_heads
    a = f"{p}.linear_attn"
    return {f"{a}.in_proj_qkv.weight": (t.linear_conv_dim, h), f"{a}.in_proj_z.weight": (t.linear_value_dim, h),
            f"{a}.in_proj_b.weight": (hv, h), f"{a}.in_proj_a.weight": (hv, h),
            f"{a}.conv1d.weight": (t.linear_conv_dim, 1, t.linear_conv_kernel_dim),
            f"{a}.dt_bias": (hv,), f"{a}.A_log": (hv,), f"{a}.norm.weight": (t.linear_value_head_dim,),
            f"{a}.out_proj.weight": (h, t.linear_value_dim)}


def layer_tensors(cfg: Config, i: int) -> dict[str, tuple[int, ...]]:
    """Decoder layer i, routed experts excluded."""
    t = cfg.text
    p = f"{cfg.text_prefix}layers.{i}"
    mixer = _full_attention if t.layer_types[i] == FULL else _linear_attention
    return {f"{p}.input_layernorm.weight": (t.hidden_size,), **mixer(p, t),
            f"{p}.post_attention_layernorm.weight": (t.hidden_size,), **_moe(p, t)}


def mtp_tensors(cfg: Config) -> dict[str, tuple[int, ...]]:
    """The MTP module (a full-attention MoE layer plus fc and norms), routed experts excluded."""
    t = cfg.text
    if t.mtp_num_hidden_layers == 0:
        return {}
    h, p = t.hidden_size, "mtp.layers.0"
    return {"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
            "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,),
            f"{p}.input_layernorm.weight": (h,), **_full_attention(p, t),
            f"{p}.post_attention_layernorm.weight": (h,), **_moe(p, t)}


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
    t = cfg.text
    out = {f"{cfg.text_prefix}embed_tokens.weight": (t.vocab_size, t.hidden_size)}
    for i in range(t.num_hidden_layers):
        out |= layer_tensors(cfg, i)
    out |= {f"{cfg.text_prefix}norm.weight": (t.hidden_size,), "lm_head.weight": (t.vocab_size, t.hidden_size)}
    return out | mtp_tensors(cfg) | vision_tensors(cfg)


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D `.weight` used as x @ W.T (so it may be stored NVFP4); embeddings are lookups, not linears."""
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith(("embed_tokens.weight",
                                                                              "pos_embed.weight"))


def expert_layers(cfg: Config) -> list[int | str]:
    """The layers with routed experts: 0..L-1, and "mtp" when there is an MTP module."""
    return list(range(cfg.text.num_hidden_layers)) + (["mtp"] if cfg.text.mtp_num_hidden_layers else [])
