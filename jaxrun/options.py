"""Every backend-dependent choice of the compiled maths, made once, in one static object.

The runner builds `Options` from the mesh, the numerical modes and the parameters (`Options.build`),
and every jitted function takes it in place of loose flags. Each field can be set by hand, so the
code path chosen for one platform can be selected and tested on another (e.g. the GPU form of the
decode slots on CPU).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrun.nvfp4 import tiny_global
from jaxrun.params import NVFP4, Experts
from ref.modes import JAX_PRECISIONS, Modes, check_choice

SPARE_SLOTS = ("skip", "repeat")
EXPERT_KERNELS = ("sorted", "ragged")
SLOT_KERNELS = ("dot", "fused")
TRIANGULAR_SOLVES = ("substitution", "lapack")


@dataclass(frozen=True)
class Options:
    mesh: Mesh
    precision: str = "f32"              # compute dtype: "f32" | "bf16"
    activations: str = "w4a16"          # "w4a4": routed-expert GEMM inputs quantized as the engines do
    act_scale: str = "per-expert"       # W4A4 input scale: each expert's, or the layer's largest ("max")
    exact_experts: bool = False         # routed experts' NVFP4 products formed in integers (some global is tiny)
    flushes_subnormals: bool = True     # the platform reads subnormal floats as zero (XLA:CPU): a dense
                                        # NVFP4 linear then checks its global at run time (nvfp4.tiny_global)
    widen_bf16_dots: bool = True        # no bf16 x bf16 -> f32 dot on the platform: widen the inputs first
    spare_slots: str = "skip"           # decode slots without an expert: skipped under a cond ("skip", CPU)
                                        # or recomputing a held expert with weight 0 ("repeat", GPU: a cond
                                        # waits for its predicate on the host)
    decode_apart: bool = True           # routed experts are decoded from copies of their packed bytes
                                        # (XLA:CPU decodes much slower fused with the slicing of the stack)
    expert_kernel: str = "sorted"       # more than slot_tokens tokens (jaxrun.moe): "sorted", a loop over
                                        # the experts with 2-D products (CPU); "ragged", chunks of experts
                                        # decoded to the compute dtype and grouped products (accelerators)
    slot_kernel: str = "dot"            # the decode slots' products: "dot" on the decoded weights (CPU);
                                        # "fused", decoding fused into a multiply-reduce that reads only
                                        # the packed bytes (accelerators: the step is memory-bound)
    slot_tokens: int = 2                # up to this many tokens run as decode slots (a decode or speculative
                                        # step; accelerators: batched decode steps too, each picked expert's
                                        # packed bytes read once)
    triangular_solve: str = "substitution"  # DeltaNet's chunk solve: forward substitution in XLA ops (CPU:
                                        # jaxlib's LAPACK solve can deadlock XLA's thread pool) or "lapack"
    kv_cache_dtype: str = "auto"        # the attention caches' stored form (ref.modes): auto | fp8_e4m3 | nvfp4
    kv_engine: str = "vllm"             # whose FP8 KV store rule
    kv_prefill: str = "cache"           # a prefill's tokens attend to their stored K/V, or their "fresh" ones
    state_dtype: str = "float32"        # the DeltaNet state as stored between forward calls

    def __post_init__(self):
        check_choice("precision", self.precision, JAX_PRECISIONS)
        self.modes()                                # the mode fields, checked as every tool checks them
        check_choice("spare_slots", self.spare_slots, SPARE_SLOTS)
        check_choice("expert_kernel", self.expert_kernel, EXPERT_KERNELS)
        check_choice("triangular_solve", self.triangular_solve, TRIANGULAR_SOLVES)
        check_choice("slot_kernel", self.slot_kernel, SLOT_KERNELS)
        if self.slot_tokens < 1:
            raise ValueError(f"slot_tokens: expected at least 1, got {self.slot_tokens}")

    def modes(self) -> Modes:
        """The numerical modes these options run."""
        return Modes(self.precision, self.activations, self.act_scale, self.kv_cache_dtype, self.kv_engine,
                     self.kv_prefill, self.state_dtype)

    @property
    def dtype(self):
        return compute_dtype(self.precision)

    @property
    def devices(self) -> int:
        return self.mesh.size

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def for_platform(mesh: Mesh, modes: Modes, platform: str | None = None) -> "Options":
        """The choices for the mesh's platform (default: the mesh's devices'), exactness off."""
        platform = platform or mesh.devices.flat[0].platform
        cpu = platform == "cpu"
        return Options(mesh, modes.precision, modes.activations, modes.act_scale, flushes_subnormals=cpu,
                       widen_bf16_dots=cpu, spare_slots="skip" if cpu else "repeat", decode_apart=cpu,
                       expert_kernel="sorted" if cpu else "ragged", slot_kernel="dot" if cpu else "fused",
                       slot_tokens=2 if cpu else 8, triangular_solve="substitution" if cpu else "lapack",
                       kv_cache_dtype=modes.kv_cache_dtype, kv_engine=modes.kv_engine, kv_prefill=modes.kv_prefill,
                       state_dtype=modes.state_dtype)

    @staticmethod
    def build(mesh: Mesh, modes: Modes, params, platform: str | None = None) -> "Options":
        """for_platform, with exact expert decoding where the concrete parameters need it."""
        o = Options.for_platform(mesh, modes, platform)
        return o.replace(exact_experts=o.flushes_subnormals and exact_decode_needed(params))


def exact_decode_needed(params) -> bool:
    """Whether some routed expert's NVFP4 global scale is tiny enough for a decoded value to be
    subnormal (nvfp4.tiny_global), so that where subnormals are flushed its products must be formed in
    integers. Read from the concrete parameters (any tree holding Experts), so the compiled functions
    specialise on it: no runtime cond."""
    experts = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Experts))
    globals_ = [proj.weight_scale_2 for ex in experts if isinstance(ex, Experts)
                for proj in (ex.gate_proj, ex.up_proj, ex.down_proj) if isinstance(proj, NVFP4)]
    return bool(globals_) and bool(tiny_global(jnp.concatenate([jnp.ravel(g) for g in globals_])))


def compute_dtype(precision: str):
    """The JAX dtype of a jaxrun precision mode."""
    check_choice("precision", precision, JAX_PRECISIONS)
    return {"f32": jnp.float32, "bf16": jnp.bfloat16}[precision]


def default_precision() -> str:
    """f32 on CPU, bf16 on accelerators."""
    return "f32" if jax.default_backend() == "cpu" else "bf16"
