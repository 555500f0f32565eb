"""The matmul primitives: dot (float32 accumulation), linear (a dense or NVFP4 weight), and the
product with a weight decoded as even/odd column planes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrun.nvfp4 import EXACT_SHIFT, nvfp4_matrix, tiny_global

HIGHEST = lax.Precision.HIGHEST


def planes_matmul(h, planes, dt):
    """h [N, K] @ W.T for W given as nvfp4_planes (even, odd) [out, K/2] -> [N, out] float32. The
    weights are rounded to dt first, as `linear` rounds them."""
    even, odd = (w.astype(dt) for w in planes)
    h = h.astype(dt)
    return dot("ni,oi->no", h[:, 0::2], even) + dot("ni,oi->no", h[:, 1::2], odd)


def dot(eq, a, b):
    """einsum with float32 accumulation and result. XLA:CPU has no bf16 x bf16 -> f32 dot, so there
    the (exactly representable) bf16 inputs are widened first: the same products and sums."""
    if a.dtype != jnp.float32 and jax.default_backend() == "cpu":
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def linear(x, p, dt):
    """x [..., in] @ W.T -> [..., out]; float32 accumulation, result in dt. An NVFP4 weight is
    decoded inside; on CPU, under a cond on its global being tiny (tiny_global), the exact path."""
    x = x.astype(dt)
    if "w" in p:
        return dot("...i,oi->...o", x, p["w"].astype(dt)).astype(dt)

    def mm(exact):
        y = dot("...i,oi->...o", x, nvfp4_matrix(p["q"], p["s"], p["s2"], dt, exact))
        return (y * 2.0 ** -EXACT_SHIFT if exact else y).astype(dt)

    if jax.default_backend() != "cpu":
        return mm(False)
    return lax.cond(tiny_global(p["s2"]), lambda: mm(True), lambda: mm(False))
