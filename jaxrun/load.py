"""Checkpoint -> parameter pytree on a mesh, each device's shard built from memory-mapped tensors.

`describe` maps every parameter of jaxrun.model's pytree to a `Leaf` (shape, dtype, and a reader
that returns any slice from the checkpoint's memory-mapped tensors); `load` then places each leaf
with its sharding: replicated leaves are read once and copied to every device, split leaves through
`jax.make_array_from_callback`, so each device's shard is read on its own (for routed experts: only
that device's experts) and the host never holds a whole model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from ref.checkpoint import Checkpoint, DenseWeight, NVFP4Weight, open_checkpoint
from ref.config import FULL
from jaxrun.runner import DTYPES
from jaxrun.sharding import check_experts, param_specs, shardings


@dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[tuple], np.ndarray]  # index (tuple of slices) -> that slice, in dtype


def _array(a: np.ndarray, dtype) -> Leaf:
    dtype = np.dtype(dtype)
    return Leaf(tuple(a.shape), dtype, lambda idx: np.asarray(a[idx], dtype=dtype))


def _linear(w, dt) -> dict:
    if isinstance(w, DenseWeight):
        return {"w": _array(w.weight, dt)}
    return {"q": _array(w.packed, np.uint8), "s": _array(w.weight_scale, w.weight_scale.dtype),
            "s2": _array(w.weight_scale_2, np.float32)}


def _experts(ckpt: Checkpoint, layer: int | str, dt) -> dict:
    """Routed experts of one layer as stacked [E, ...] leaves, read expert by expert."""
    cfg = ckpt.config.text
    first = ckpt.expert(layer, 0)
    out = {}
    for proj in ("gate", "up", "down"):
        w0 = getattr(first, proj)

        def part(field, dtype, proj=proj):
            def read(idx):
                rows = range(cfg.num_experts)[idx[0]]
                return np.stack([np.asarray(getattr(getattr(ckpt.expert(layer, e), proj), field)[idx[1:]], dtype)
                                 for e in rows])
            shape = (cfg.num_experts,) + tuple(np.shape(getattr(w0, field)))
            return Leaf(shape, np.dtype(dtype), read)

        if isinstance(w0, NVFP4Weight):
            out[proj] = {"q": part("packed", np.uint8), "s": part("weight_scale", w0.weight_scale.dtype),
                         "s2": part("weight_scale_2", np.float32)}
        else:
            out[proj] = {"w": part("weight", dt)}
    gate_up = ckpt.expert_input_scales(layer) if isinstance(first.gate, NVFP4Weight) else None
    if gate_up is not None:
        out["in_s"] = _input_scales(ckpt, layer, gate_up)
    return out


def _input_scales(ckpt: Checkpoint, layer: int | str, gate_up: np.ndarray) -> Leaf:
    """Per expert input scales [E, 2] (for W4A4): max(gate, up), the shared GEMM input's, and down's,
    read when the leaf is (only those of the experts asked for)."""
    def read(idx):
        rows = range(len(gate_up))[idx[0]]
        down = [float(ckpt.expert(layer, e, prefetch=False).down.input_scale) for e in rows]
        return np.stack([gate_up[idx[0]], np.array(down, np.float32)], axis=1)[(slice(None),) + tuple(idx[1:])]
    return Leaf((len(gate_up), 2), np.dtype(np.float32), read)


def _layer(ckpt: Checkpoint, prefix: str, kind: str, experts_of, dt) -> dict:
    """One decoder layer whose tensors are named prefix + "self_attn." etc. (full names);
    experts_of: the layer argument of Checkpoint.expert (an index, or "mtp")."""
    f32 = np.float32
    lin = lambda name: _linear(ckpt.linear(prefix + name), dt)
    vec = lambda name: _array(ckpt.tensor(prefix + name), f32)
    if kind == FULL:
        attn = {"q": lin("self_attn.q_proj"), "k": lin("self_attn.k_proj"), "v": lin("self_attn.v_proj"),
                "o": lin("self_attn.o_proj"), "q_norm": vec("self_attn.q_norm.weight"),
                "k_norm": vec("self_attn.k_norm.weight")}
    else:
        a = "linear_attn."
        conv = ckpt.tensor(prefix + a + "conv1d.weight")
        attn = {"qkv": lin(a + "in_proj_qkv"), "z": lin(a + "in_proj_z"), "b": lin(a + "in_proj_b"),
                "a": lin(a + "in_proj_a"), "conv": _array(conv.reshape(conv.shape[0], conv.shape[-1]), dt),
                "dt_bias": vec(a + "dt_bias"), "A_log": vec(a + "A_log"), "norm": vec(a + "norm.weight"),
                "out": lin(a + "out_proj")}
    mlp = {"router": lin("mlp.gate"), "experts": _experts(ckpt, experts_of, dt),
           "shared": {p: lin(f"mlp.shared_expert.{p}_proj") for p in ("gate", "up", "down")},
           "shared_gate": lin("mlp.shared_expert_gate")}
    return {"input_norm": vec("input_layernorm.weight"), "post_norm": vec("post_attention_layernorm.weight"),
            "attn": attn, "mlp": mlp}


def describe(ckpt: Checkpoint, dt) -> dict:
    """The parameter pytree of jaxrun.model with a Leaf for every parameter; "mtp" when the
    checkpoint has the MTP head."""
    cfg, pre = ckpt.config.text, ckpt.config.text_prefix
    f32 = np.float32
    tree = {"embed": _array(ckpt.lm("embed_tokens.weight"), dt), "norm": _array(ckpt.lm("norm.weight"), f32),
            "lm_head": _linear(ckpt.linear("lm_head"), dt),
            "layers": [_layer(ckpt, f"{pre}layers.{i}.", kind, i, dt) for i, kind in enumerate(cfg.layer_types)]}
    if ckpt.has("mtp.fc.weight"):
        tree["mtp"] = {"fc": _linear(ckpt.linear("mtp.fc"), dt),
                       "norm_embedding": _array(ckpt.tensor("mtp.pre_fc_norm_embedding.weight"), f32),
                       "norm_hidden": _array(ckpt.tensor("mtp.pre_fc_norm_hidden.weight"), f32),
                       "norm": _array(ckpt.tensor("mtp.norm.weight"), f32),
                       "layer": _layer(ckpt, "mtp.layers.0.", FULL, "mtp", dt)}
    return tree


def load(model: str, mesh, precision: str = "f32", dense: str = "replicated", progress: bool = True):
    """(checkpoint, params on mesh) for a checkpoint directory or hub id."""
    ckpt = open_checkpoint(model)
    check_experts(ckpt.config.text.num_experts, mesh.size)
    dt = DTYPES[precision]
    tree = describe(ckpt, dt)
    shards = shardings(param_specs(tree, mesh.size, dense), mesh)
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, Leaf))
    out = []
    bar = tqdm(zip(leaves, jax.tree.leaves(shards)), total=len(leaves), desc="loading", unit="tensor",
               file=sys.stderr, disable=not progress)
    for leaf, sh in bar:
        if sh.is_fully_replicated:
            out.append(jax.device_put(leaf.read(tuple(slice(None) for _ in leaf.shape)), sh))
        else:
            out.append(jax.make_array_from_callback(leaf.shape, sh, leaf.read))
    return ckpt, jax.tree.unflatten(treedef, out)
