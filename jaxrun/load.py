"""Checkpoint -> parameters on a mesh, each device's shard read from the memory-mapped tensors.

The tree comes from the one declaration (jaxrun.params.declare, with the formats the checkpoint
stores); each leaf's `source` says where its values are (ref.checkpoint's normalised view, so both
expert layouts read alike). Every leaf goes through `jax.make_array_from_callback`, which asks only
for the shards of this process's own devices: each distinct shard is read once (a replicated leaf
once per process, not once per device), so a process reads only its own routed experts (with several
processes, each holds E/N of them) and the host never holds a whole model. `BytesRead` counts the
checkpoint bytes a process read.
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


class BytesRead:
    """Bytes of checkpoint tensors read (as stored, before any conversion)."""

    def __init__(self):
        self.total = 0

    def add(self, a: np.ndarray) -> np.ndarray:
        self.total += a.nbytes
        return a


def bytes_summary(per_process: list[int]) -> str:
    """'12.3 MB of the checkpoint', or with several processes each one's share: '6.2 + 6.1 MB ...'."""
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)) if max(per_process) >= s
                       or s == 1)
    return (" + ".join(f"{b / scale:.4g}" for b in per_process) + f" {unit} of the checkpoint"
            + (" (per process)" if len(per_process) > 1 else ""))


def reader(ckpt: Checkpoint, param: Param, dtype, count: BytesRead | None = None):
    """index (a tuple of slices) -> that slice of the leaf, as a numpy array of the leaf's dtype (the
    bytes of the stored slice added to `count`)."""
    want = np.dtype(resolve_dtype(param, dtype))
    raw = _stored(ckpt, param)
    count = count or BytesRead()
    return lambda idx: np.asarray(count.add(raw(idx)), want)


def _stored(ckpt: Checkpoint, param: Param):
    """index -> that slice of the leaf as the checkpoint stores it (a view of the mapped file where it can)."""
    src = param.source
    if isinstance(src, Tensor):
        return lambda idx: ckpt.tensor(src.name).reshape(param.shape)[idx]
    if isinstance(src, LinearPart):
        return lambda idx: _part(ckpt.linear(src.module), src.part)[idx]
    if isinstance(src, ExpertPart):
        def experts(idx):
            rows = range(param.shape[0])[idx[0]]
            proj = src.proj.removesuffix("_proj")
            return np.stack([_part(getattr(ckpt.expert(src.layer, e), proj), src.part)[idx[1:]] for e in rows])
        return experts
    if isinstance(src, KVScale):
        return lambda idx: np.asarray(ckpt.kv_scales(src.layer)["kv".index(src.kind)], np.float32)[idx]
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


def load(model: str, mesh, precision: str = "f32", dense: str = "replicated", progress: bool = True,
         count: BytesRead | None = None):
    """(checkpoint, params on mesh) for a checkpoint directory or hub id; the checkpoint bytes this
    process read are added to `count`."""
    ckpt = open_checkpoint(model)
    check_experts(ckpt.config.text.num_experts, mesh.size)
    dtype = compute_dtype(precision)
    declared = describe(ckpt)
    specs = param_specs(declared, mesh, dense)
    flat, treedef = jax.tree.flatten(declared, is_leaf=lambda x: isinstance(x, Param))
    out = []
    bar = tqdm(zip(flat, jax.tree.leaves(shardings(specs, mesh))), total=len(flat), desc="loading",
               unit="tensor", file=sys.stderr, disable=not progress)
    for param, sh in bar:
        out.append(jax.make_array_from_callback(param.shape, sh, _once(reader(ckpt, param, dtype, count))))
    return ckpt, jax.tree.unflatten(treedef, out)


def _once(read):
    """read, called once per distinct index (the local devices holding the same shard share it)."""
    seen = {}

    def shard(idx):
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in seen:
            seen[key] = read(idx)
        return seen[key]
    return shard


def place(params, declared: Params, mesh, dense: str = "replicated"):
    """Parameters held on the host (e.g. jaxrun.params.init's) placed on mesh by the sharding rules."""
    return jax.device_put(params, shardings(param_specs(declared, mesh, dense), mesh))
