"""The matmul primitives: dot (float32 accumulation) and linear (a dense or NVFP4 weight)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxrun.nvfp4 import EXACT_SHIFT, nvfp4_matrix, tiny_global
from jaxrun.options import Options
from jaxrun.params import NVFP4

HIGHEST = lax.Precision.HIGHEST


def dot(eq, a, b, opts: Options):
    """einsum with float32 accumulation and result. Where the platform has no bf16 x bf16 -> f32 dot
    (opts.widen_bf16_dots), the (exactly representable) bf16 inputs are widened first: the same
    products and sums."""
    if a.dtype != jnp.float32 and opts.widen_bf16_dots:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def linear(x, p, opts: Options):
    """x [..., in] @ W.T -> [..., out]; float32 accumulation, result in the compute dtype. An NVFP4
    weight is decoded inside; where the platform flushes subnormals, under a cond on its global being
    tiny (tiny_global), the exact path."""
    dt = opts.dtype
    x = x.astype(dt)
    if not isinstance(p, NVFP4):
        return dot("...i,oi->...o", x, p.weight.astype(dt), opts).astype(dt)

    def mm(exact):
        w = nvfp4_matrix(p.weight, p.weight_scale, p.weight_scale_2, dt, exact)
        y = dot("...i,oi->...o", x, w, opts)
        return (y * 2.0 ** -EXACT_SHIFT if exact else y).astype(dt)

    if not opts.flushes_subnormals:
        return mm(False)
    return lax.cond(tiny_global(p.weight_scale_2), lambda: mm(True), lambda: mm(False))
