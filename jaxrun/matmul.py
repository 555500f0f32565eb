"""The matmul primitives: dot (float32 accumulation) and linear (a dense, NVFP4 or per-tensor FP8
weight, with the engines' quantized inputs under activations "w4a4" where the weight has an input scale)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxrun.nvfp4 import EXACT_SHIFT, activation_values, nvfp4_matrix, quantize_fp8, tiny_global
from jaxrun.options import Options
from jaxrun.params import FP8, NVFP4

HIGHEST = lax.Precision.HIGHEST


def dot(eq, a, b, opts: Options):
    """einsum with float32 accumulation and result. Where the platform has no bf16 x bf16 -> f32 dot
    (opts.widen_bf16_dots), the (exactly representable) bf16 inputs are widened first: the same
    products and sums."""
    if a.dtype != jnp.float32 and opts.widen_bf16_dots:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def _quantized_inputs(p, opts: Options) -> bool:
    return opts.activations == "w4a4" and p.input_scale is not None


def fp8_linear(x, p: FP8, opts: Options):
    """A per-tensor FP8 linear (ref.fp8.fp8_linear). W8A16: W = e4m3 * weight_scale (float32) in the
    compute dtype. W8A8 (activations "w4a4", a static input_scale): x quantized by vLLM's static
    scaled_fp8_quant, the e4m3 products summed in float32, scaled once by f32(input_scale * weight_scale)."""
    dt = opts.dtype
    w = p.weight.astype(jnp.float32)
    if not _quantized_inputs(p, opts):
        return dot("...i,oi->...o", x.astype(dt), (w * p.weight_scale).astype(dt), opts).astype(dt)
    a = quantize_fp8(x, p.input_scale, "reciprocal").astype(jnp.float32)
    return (dot("...i,oi->...o", a, w, opts) * (p.input_scale * p.weight_scale)).astype(dt)


def nvfp4_w4a4_linear(x, p: NVFP4, opts: Options):
    """A dense NVFP4 linear with quantized inputs (ref.nvfp4.nvfp4_matmul): x quantized by the engines'
    quantizer with G = input_global_scale, block values multiplied in float32, scaled once by
    f32(input_scale * weight_scale_2)."""
    a = activation_values(x, p.input_scale, p.input_global_scale)
    w = nvfp4_matrix(p.weight, p.weight_scale, jnp.float32(1), jnp.float32, False)   # e2m1 * block scale
    return (dot("...i,oi->...o", a, w, opts) * (p.input_scale * p.weight_scale_2)).astype(opts.dtype)


def linear(x, p, opts: Options):
    """x [..., in] @ W.T -> [..., out]; float32 accumulation, result in the compute dtype. An NVFP4
    weight is decoded inside; where the platform flushes subnormals, under a cond on its global being
    tiny (tiny_global), the exact path. FP8 weights: fp8_linear; quantized inputs under "w4a4"."""
    dt = opts.dtype
    x = x.astype(dt)
    if isinstance(p, FP8):
        return fp8_linear(x, p, opts)
    if not isinstance(p, NVFP4):
        return dot("...i,oi->...o", x, p.weight.astype(dt), opts).astype(dt)
    if _quantized_inputs(p, opts):
        return nvfp4_w4a4_linear(x, p, opts)

    def mm(exact):
        w = nvfp4_matrix(p.weight, p.weight_scale, p.weight_scale_2, dt, exact)
        y = dot("...i,oi->...o", x, w, opts)
        return (y * 2.0 ** -EXACT_SHIFT if exact else y).astype(dt)

    if not opts.flushes_subnormals:
        return mm(False)
    return lax.cond(tiny_global(p.weight_scale_2), lambda: mm(True), lambda: mm(False))
