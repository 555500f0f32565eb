"""The sharding rules, in one place: logical axes (declared per parameter in jaxrun.params) -> mesh axes.

The mesh is 1-D, axis "expert" over N devices. Routed experts are split along their expert axis, E/N
per device, in both layouts of the dense weights:
- "replicated": every dense weight whole on every device;
- "sharded": tensor-parallel over the same axis: column-parallel (output features split) for the
  embedding and lm_head (vocabulary), q/k/v, the DeltaNet in-projections and conv channels and the
  shared expert's gate/up; row-parallel (input features split) for o_proj, DeltaNet out_proj and the
  shared expert's down. XLA inserts the collectives the dense maths needs.
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

AXIS = "expert"

# logical axis -> mesh axis (None: not split), per dense layout
_REPLICATED = {"experts": AXIS, "vocab": None, "embed": None, "attn_out": None, "attn_in": None,
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
    """Mesh over the first n visible devices (all by default); ValueError if there are fewer."""
    devices = jax.devices()
    n = len(devices) if n is None else n
    if n < 1 or n > len(devices):
        raise ValueError(f"--devices {n}: {len(devices)} {devices[0].platform} device(s) visible")
    return Mesh(np.array(devices[:n]), (AXIS,))


def check_experts(num_experts: int, n: int) -> None:
    if num_experts % n:
        raise ValueError(f"--devices {n}: must divide num_experts {num_experts}")


def logical_spec(param: Param, n: int, dense: str) -> P:
    """PartitionSpec of one declared leaf on an n-device mesh."""
    check_choice("--dense", dense, DENSE_LAYOUTS)
    rules = RULES[dense]
    spec = []
    for axis, size in zip(param.axes, param.shape):
        if axis not in rules:
            raise ValueError(f"logical axis {axis!r} (a parameter of shape {param.shape}) has no sharding rule")
        mesh_axis = rules[axis]
        spec.append(mesh_axis if mesh_axis is not None and size % n == 0 else None)
    return P(*spec) if any(spec) else P()


def param_specs(declared, n: int, dense: str = "replicated"):
    """The PartitionSpec of every declared leaf (a tree like `declared`)."""
    def container(node):
        if isinstance(node, NVFP4):                 # codes and block scales split alike
            w, s = logical_spec(node.weight, n, dense), logical_spec(node.weight_scale, n, dense)
            same = w if w == s else P()   # one of the two parts cannot be split: keep both whole
            scalars = jax.tree.map(lambda p: logical_spec(p, n, dense), node._replace(weight=None, weight_scale=None),
                                   is_leaf=lambda x: isinstance(x, Param))
            return scalars._replace(weight=same, weight_scale=same)
        return logical_spec(node, n, dense)

    return jax.tree.map(container, declared, is_leaf=lambda x: isinstance(x, (Param, NVFP4)))


def shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def bytes_per_device(declared, specs, n: int, dtype) -> int:
    """Parameter bytes one device holds: each leaf's size divided by n along its split dimension."""
    total = 0
    for p, s in zip(leaves(declared), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        split = n if any(d == AXIS for d in s) else 1
        total += int(np.prod(p.shape)) * np.dtype(resolve_dtype(p, dtype)).itemsize // split
    return total
