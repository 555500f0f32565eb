"""The sharding rules, in one place: a 1-D mesh with axis 'expert' over N devices.

Routed experts: every expert tensor is split along its leading expert axis, E/N experts per device.
Dense weights: replicated, or (`dense="sharded"`) tensor-parallel over the same axis: column-parallel
(output rows split) for embeddings, lm_head, q/k/v, DeltaNet in-projections and conv, shared-expert
gate/up; row-parallel (input columns split) for o_proj, DeltaNet out_proj and shared-expert down. A
dimension is split only when N divides it; XLA inserts the collectives the dense maths needs. Norm
weights, gates' biases, router and caches are replicated. Tokens are replicated; the routed-expert sum
runs in `shard_map`: each device sums its own experts (moe.local_experts) and a psum combines.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrun.moe import local_experts

AXIS = "expert"
DENSE_MODES = ("replicated", "sharded")
_COLUMN = {("embed",), ("lm_head",), ("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "qkv"), ("attn", "z"),
           ("attn", "b"), ("attn", "a"), ("attn", "conv"), ("shared", "gate"), ("shared", "up")}
_ROW = {("attn", "o"), ("attn", "out"), ("shared", "down")}


def make_mesh(n: int | None = None) -> Mesh:
    """Mesh over the first n visible devices (all by default); ValueError if there are fewer."""
    devices = jax.devices()
    n = len(devices) if n is None else n
    if n < 1 or n > len(devices):
        raise ValueError(f"--devices {n}: {len(devices)} {devices[0].platform} device(s) visible")
    return Mesh(np.array(devices[:n]), (AXIS,))


def _names(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_spec(path, shape, n: int, dense: str) -> P:
    """PartitionSpec of one parameter, from its path in the pytree and its shape."""
    names = _names(path)
    if "experts" in names:
        return P(AXIS, *([None] * (len(shape) - 1)))
    if dense == "replicated" or len(shape) == 0 or names[-1] == "s2":
        return P()
    owner = names[:-1] if names[-1] in ("w", "q", "s") else names
    owner = owner[-2:] if len(owner) >= 2 else owner
    if owner in _COLUMN or owner[-1:] in _COLUMN:
        dim = 0
    elif owner in _ROW:
        dim = len(shape) - 1
    else:
        return P()
    if shape[dim] % n:
        return P()
    spec = [None] * len(shape)
    spec[dim] = AXIS
    return P(*spec)


def param_specs(params, n: int, dense: str = "replicated"):
    """Pytree of PartitionSpecs for params (arrays or ShapeDtypeStructs) on an n-device mesh."""
    if dense not in DENSE_MODES:
        raise ValueError(f"--dense {dense!r}: expected one of {list(DENSE_MODES)}")
    return jax.tree_util.tree_map_with_path(lambda p, a: param_spec(p, a.shape, n, dense), params)


def shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def check_experts(num_experts: int, n: int) -> None:
    if num_experts % n:
        raise ValueError(f"--devices {n}: must divide num_experts {num_experts}")


def routed_experts(mesh: Mesh, dt, exact: bool = False, activations: str = "w4a16", act_scale: str = "per-expert"):
    """The routed-expert sum (x [N, H], ids [N, k], weights [N, k], experts) -> [N, H] f32, with the
    experts split over the mesh's 'expert' axis, tokens replicated, psum to combine. exact: see
    moe.exact_decode_needed. activations "w4a4": the experts' GEMM inputs quantized with each
    expert's input scales, or (act_scale "max") the layer's largest, a pmax over the devices."""

    def local(x, ids, wts, experts):
        e_loc = jax.tree.leaves(experts)[0].shape[0]
        first = jax.lax.axis_index(AXIS) * e_loc
        act = None
        if activations == "w4a4" and "in_s" in experts:                 # else (MTP experts without) W4A16
            act = experts["in_s"]                                          # [E_local, 2]
            if act_scale == "max":
                act = jnp.broadcast_to(jax.lax.pmax(jnp.max(act, axis=0), AXIS), act.shape)
        y = local_experts(x, ids, wts, experts, first, dt, all_local=mesh.size == 1, exact=exact, act=act)
        return jax.lax.psum(y, AXIS)

    def routed(x, ids, wts, experts):
        specs = jax.tree.map(lambda a: P(AXIS, *([None] * (a.ndim - 1))), experts)
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), specs), out_specs=P(),
                             check_vma=False)(x, ids, wts, experts)

    return routed


def bytes_per_device(shapes, specs, n: int) -> int:
    """Parameter bytes one device holds: each leaf's size divided by n along its split dimension."""
    total = 0
    for a, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        split = n if any(d == AXIS for d in s) else 1
        total += int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize // split
    return total
