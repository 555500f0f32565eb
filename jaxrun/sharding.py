"""The sharding rules, in one place: logical axes (declared per parameter in jaxrun.params) -> mesh axes.

One process: the mesh is 1-D, axis "expert" over N devices. Several processes (jax.distributed, one
per host): the mesh is 2-D, "host" (the processes) x "expert" (each process's own devices), and a rule
may name a group of mesh axes. Routed experts are split along their expert axis over every device of
every process ("host" and "expert": E/N per device), in both layouts of the dense weights:
- "replicated": every dense weight whole on every device;
- "sharded": tensor-parallel over the same axis: column-parallel (output features split) for the
  embedding and lm_head (vocabulary), q/k/v, the DeltaNet in-projections and conv channels and the
  shared expert's gate/up; row-parallel (input features split) for o_proj, DeltaNet out_proj and the
  shared expert's down, within a host only ("expert": replicated over "host"), so that the only
  collective that crosses hosts is the routed experts' psum. XLA inserts the collectives the dense
  maths needs.
Norms, gates, the router, the MTP fc, the vision tower and the caches (jaxrun.params.declare_cache)
stay replicated. A dimension whose size the mesh axis does not divide stays whole (and the two parts of
an NVFP4 weight are always split alike). A logical axis without a rule is an error: nothing is
replicated by accident.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrun.params import NVFP4, Param, leaves, resolve_dtype
from ref.modes import DENSE_LAYOUTS, check_choice

AXIS = "expert"   # the devices of one process (the only axis of a single-process mesh)
HOSTS = "host"    # the processes of a multi-process run
EXPERT_AXES = (HOSTS, AXIS)  # the routed experts span every device

# logical axis -> mesh axis or group of mesh axes (None: not split), per dense layout. Axes a mesh
# lacks are left out of a group (a single-process mesh has no "host").
_REPLICATED = {"experts": EXPERT_AXES, "vocab": None, "embed": None, "attn_out": None, "attn_in": None,
               "deltanet_out": None, "deltanet_in": None, "deltanet_heads": None, "conv_kernel": None,
               "head_dim": None, "shared_mlp": None, "expert_mlp": None, "router": None, "gate_out": None,
               "mtp_in": None, "scale_pair": None,
               # the vision tower: replicated in both layouts
               "vision_embed": None, "vision_patch": None, "vision_positions": None, "vision_qkv": None,
               "vision_mlp": None, "vision_merged": None, "vision_out": None,
               # caches
               "batch": None, "kv_heads": None, "cache_seq": None, "cache_head_dim": None, "conv_window": None,
               "cache_channels": None, "cache_heads": None, "cache_key_dim": None, "cache_value_dim": None}
_TENSOR_PARALLEL = ("vocab", "attn_out", "attn_in", "deltanet_out", "deltanet_in", "shared_mlp")
RULES = {"replicated": _REPLICATED, "sharded": _REPLICATED | {a: AXIS for a in _TENSOR_PARALLEL}}


def make_mesh(n: int | None = None) -> Mesh:
    """One process: a mesh over the first n visible devices (all by default); ValueError if there are
    fewer. Several processes: every device of every process, "host" x "expert" (processes in order,
    each one's devices by id); n, if given, must be that total."""
    devices = jax.devices()
    if jax.process_count() > 1:
        return _multiprocess_mesh(devices, n)
    n = len(devices) if n is None else n
    if n < 1 or n > len(devices):
        raise ValueError(f"--devices {n}: {len(devices)} {devices[0].platform} device(s) visible")
    return Mesh(np.array(devices[:n]), (AXIS,))


def _multiprocess_mesh(devices, n: int | None) -> Mesh:
    processes = jax.process_count()
    if n is not None and n != len(devices):
        raise ValueError(f"--devices {n}: a run of {processes} processes uses every device of every process "
                         f"({len(devices)})")
    per = {}
    for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
        per.setdefault(d.process_index, []).append(d)
    counts = sorted({len(v) for v in per.values()})
    if len(per) != processes or len(counts) != 1:
        raise ValueError(f"every process must hold the same number of devices, found "
                         f"{ {p: len(v) for p, v in per.items()} } (process: devices)")
    return Mesh(np.array([per[p] for p in sorted(per)]), (HOSTS, AXIS))


def axis_sizes(mesh) -> dict[str, int]:
    """{mesh axis: size} of a Mesh, of a 1-D mesh of n devices given as an int, or given as a dict."""
    if isinstance(mesh, int):
        return {AXIS: mesh}
    return dict(mesh) if isinstance(mesh, dict) else dict(mesh.shape)


def mesh_axes(rule, sizes: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes a rule (None, an axis, or a group) names that the mesh has."""
    group = () if rule is None else (rule,) if isinstance(rule, str) else rule
    return tuple(a for a in group if a in sizes)


def replicated_across_hosts(x, mesh):
    """x (inside jit) whole on every device when the mesh spans several processes, so that XLA keeps
    what follows (the sampler's sort over the vocabulary) off the network instead of splitting it
    across hosts; unchanged on a single-process mesh."""
    if HOSTS not in axis_sizes(mesh):
        return x
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*([None] * (x.ndim - 1)), AXIS)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def expert_axes(mesh) -> str | tuple[str, ...]:
    """The routed experts' mesh axes, as shard_map and the collectives name them: "expert" on one
    process, ("host", "expert") on several."""
    axes = mesh_axes(EXPERT_AXES, axis_sizes(mesh))
    return axes[0] if len(axes) == 1 else axes


def check_experts(num_experts: int, n: int) -> None:
    if num_experts % n:
        raise ValueError(f"--devices {n}: must divide num_experts {num_experts}")


def logical_spec(param: Param, mesh, dense: str) -> P:
    """PartitionSpec of one declared leaf on a mesh (a Mesh, or n for a 1-D mesh of n devices)."""
    check_choice("--dense", dense, DENSE_LAYOUTS)
    rules, sizes = RULES[dense], axis_sizes(mesh)
    spec = []
    for axis, size in zip(param.axes, param.shape):
        if axis not in rules:
            raise ValueError(f"logical axis {axis!r} (a parameter of shape {param.shape}) has no sharding rule")
        group = mesh_axes(rules[axis], sizes)
        split = int(np.prod([sizes[a] for a in group]))
        spec.append(None if not group or size % split else group[0] if len(group) == 1 else group)
    return P(*spec) if any(spec) else P()


def param_specs(declared, mesh, dense: str = "replicated"):
    """The PartitionSpec of every declared leaf (a tree like `declared`) on a mesh (or n devices)."""
    def container(node):
        if isinstance(node, NVFP4):                 # codes and block scales split alike
            w, s = logical_spec(node.weight, mesh, dense), logical_spec(node.weight_scale, mesh, dense)
            same = w if w == s else P()   # one of the two parts cannot be split: keep both whole
            scalars = jax.tree.map(lambda p: logical_spec(p, mesh, dense), node._replace(weight=None, weight_scale=None),
                                   is_leaf=lambda x: isinstance(x, Param))
            return scalars._replace(weight=same, weight_scale=same)
        return logical_spec(node, mesh, dense)

    return jax.tree.map(container, declared, is_leaf=lambda x: isinstance(x, (Param, NVFP4)))


def shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def split_count(spec: P, mesh) -> int:
    """Into how many parts a leaf with this PartitionSpec is split on the mesh (or n devices)."""
    sizes = axis_sizes(mesh)
    named = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return int(np.prod([sizes[a] for a in named]))


def bytes_per_device(declared, specs, mesh, dtype) -> int:
    """Parameter bytes one device holds: each leaf's size divided by the parts it is split into."""
    total = 0
    for p, s in zip(leaves(declared), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        total += int(np.prod(p.shape)) * np.dtype(resolve_dtype(p, dtype)).itemsize // split_count(s, mesh)
    return total
