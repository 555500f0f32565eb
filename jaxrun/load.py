"""Checkpoint -> parameters on a mesh, each device's shard read from the memory-mapped tensors.

The tree comes from the one declaration (jaxrun.params.declare, with the formats the checkpoint
stores); each leaf's `source` says where its values are (ref.checkpoint's normalised view, so both
expert layouts read alike). Replicated leaves are read once and copied to every device; split leaves
go through `jax.make_array_from_callback`, so each device's shard is read on its own (for routed
experts: only that device's experts) and the host never holds a whole model.
"""
from __future__ import annotations

import sys

import jax
import numpy as np
from tqdm import tqdm

from jaxrun.options import compute_dtype
from jaxrun.params import (ExpertInputScales, ExpertPart, Formats, KVScale, LinearPart, Param, Params, Tensor, declare,
                           resolve_dtype)
from jaxrun.sharding import check_experts, param_specs, shardings
from ref.checkpoint import Checkpoint, FP8Weight, NVFP4Weight, open_checkpoint

_PARTS = {NVFP4Weight: {"weight": "packed", "weight_scale": "weight_scale", "weight_scale_2": "weight_scale_2",
                        "input_scale": "input_scale"},
          FP8Weight: {"weight": "weight_e4m3", "weight_scale": "weight_scale", "input_scale": "input_scale"}}


def _part(w, part: str):
    """A part of ref.checkpoint's DenseWeight / NVFP4Weight / FP8Weight by the checkpoint's tensor suffix.
    An NVFP4 linear's input_global_scale is the activation quantizer's G: compressed-tensors' stored one,
    else fp32(1 / input_scale) (ModelOpt)."""
    if isinstance(w, NVFP4Weight) and part == "input_global_scale":
        g = w.input_global_scale
        return np.asarray(np.float32(1) / w.input_scale if g is None else g, np.float32).reshape(())
    if type(w) in _PARTS:
        return getattr(w, _PARTS[type(w)][part])
    return w.weight


def reader(ckpt: Checkpoint, param: Param, dtype):
    """index (a tuple of slices) -> that slice of the leaf, as a numpy array of the leaf's dtype."""
    src, want = param.source, np.dtype(resolve_dtype(param, dtype))
    if isinstance(src, Tensor):
        return lambda idx: np.asarray(ckpt.tensor(src.name).reshape(param.shape)[idx], want)
    if isinstance(src, LinearPart):
        return lambda idx: np.asarray(_part(ckpt.linear(src.module), src.part)[idx], want)
    if isinstance(src, ExpertPart):
        def experts(idx):
            rows = range(param.shape[0])[idx[0]]
            return np.stack([np.asarray(_part(getattr(ckpt.expert(src.layer, e), src.proj.removesuffix("_proj")),
                                              src.part)[idx[1:]], want) for e in rows])
        return experts
    if isinstance(src, KVScale):
        return lambda idx: np.asarray(ckpt.kv_scales(src.layer)["kv".index(src.kind)], want)[idx]
    if isinstance(src, ExpertInputScales):
        gate_up = ckpt.expert_input_scales(src.layer)                    # [E]: max(gate, up), read once

        def input_scales(idx):                                           # [E, 2], down read per expert asked
            rows = range(param.shape[0])[idx[0]]
            down = [float(ckpt.expert(src.layer, e, prefetch=False).down.input_scale) for e in rows]
            return np.stack([gate_up[idx[0]], np.array(down, np.float32)], axis=1)[(slice(None),) + tuple(idx[1:])]
        return input_scales
    raise TypeError(f"no reader for a parameter source {src!r}")


def describe(ckpt: Checkpoint) -> Params:
    """The declared parameter tree of a checkpoint (its formats read from the files)."""
    return declare(ckpt.config, Formats.from_checkpoint(ckpt))


def load(model: str, mesh, precision: str = "f32", dense: str = "replicated", progress: bool = True):
    """(checkpoint, params on mesh) for a checkpoint directory or hub id."""
    ckpt = open_checkpoint(model)
    check_experts(ckpt.config.text.num_experts, mesh.size)
    dtype = compute_dtype(precision)
    declared = describe(ckpt)
    specs = param_specs(declared, mesh.size, dense)
    flat, treedef = jax.tree.flatten(declared, is_leaf=lambda x: isinstance(x, Param))
    out = []
    bar = tqdm(zip(flat, jax.tree.leaves(shardings(specs, mesh))), total=len(flat), desc="loading",
               unit="tensor", file=sys.stderr, disable=not progress)
    for param, sh in bar:
        read = reader(ckpt, param, dtype)
        if sh.is_fully_replicated:
            out.append(jax.device_put(read(tuple(slice(None) for _ in param.shape)), sh))
        else:
            out.append(jax.make_array_from_callback(param.shape, sh, read))
    return ckpt, jax.tree.unflatten(treedef, out)


def place(params, declared: Params, mesh, dense: str = "replicated"):
    """Parameters held on the host (e.g. jaxrun.params.init's) placed on mesh by the sharding rules."""
    return jax.device_put(params, shardings(param_specs(declared, mesh.size, dense), mesh))
