"""NVFP4 inside jit: weight decoding bit-identical to ref.nvfp4.dequantize, the decoded forms the
matmuls use, and the engines' activation quantizer bit-identical to ref.nvfp4.quantize_activation.

On CPU XLA flushes subnormal inputs and results to zero. A weight's decoded values can only be
subnormal when its global scale is tiny (tiny_global); then the exact path forms both products in
integers, and hands matmuls the values times 2^EXACT_SHIFT (all normal) to be scaled back after.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ref.nvfp4 import BLOCK_SIZE, E2M1_MAX, E4M3_MAX, TIES_DOWN, TIES_UP


def _mul_exact(a, b, abits: int):
    """float32 a * b rounded to nearest even with IEEE gradual underflow, in integer arithmetic
    (XLA on CPU flushes subnormal inputs and results to zero). `a` has a significand of at most
    `abits` bits (E4M3 / E2M1 values), so the significand product fits in 32 bits. Non-finite
    inputs fall back to the float product."""
    u32, i32 = jnp.uint32, jnp.int32
    ua, ub = lax.bitcast_convert_type(a, u32), lax.bitcast_convert_type(b, u32)
    ea, eb = ((ua >> 23) & 0xFF).astype(i32), ((ub >> 23) & 0xFF).astype(i32)
    implicit = lambda e: jnp.where(e > 0, 1 << 23, 0).astype(u32)
    ma = ((ua & 0x7FFFFF) | implicit(ea)) >> (24 - abits)
    mb = (ub & 0x7FFFFF) | implicit(eb)
    prod = ma * mb                                                       # exact: a * b = prod * 2^e
    e = jnp.maximum(ea, 1) + jnp.maximum(eb, 1) - 276 - abits
    drop = jnp.maximum(32 - lax.clz(prod).astype(i32) - 24, -149 - e)   # bits to round away
    d = jnp.clip(drop, 1, 31).astype(u32)
    q = prod >> d
    rem, half = prod & ((jnp.uint32(1) << d) - 1), jnp.uint32(1) << (d - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).astype(u32)
    q = jnp.where(drop > 0, q, prod << jnp.clip(-drop, 0, 31).astype(u32))
    mag = (jnp.clip(e + drop + 149, 0, 256).astype(u32) << 23) + q      # carries into the exponent
    mag = jnp.where(prod == 0, 0, jnp.minimum(mag, jnp.uint32(0x7F800000))).astype(u32)
    out = lax.bitcast_convert_type(((ua ^ ub) & jnp.uint32(0x80000000)) | mag, jnp.float32)
    finite = ((ea < 255) & (eb < 255))
    return jnp.where(finite, out, a * b)


TINY_GLOBAL_BITS = 0x08000000  # float32 bit pattern of 2^-111


def tiny_global(s2):
    """Whether some global scale s2 is nonzero with |s2| < 2^-111 (subnormals included): only then can a
    block factor f32(scale * s2) fall below 2^-120 (E4M3's smallest nonzero scale is 2^-9), so only then
    can a factor or a decoded value be subnormal. Otherwise both products are normal float32 products."""
    b = lax.bitcast_convert_type(jnp.asarray(s2, jnp.float32), jnp.uint32) & 0x7FFFFFFF
    return jnp.any((b != 0) & (b < TINY_GLOBAL_BITS))


def _broadcast_global(s2, s):
    s2 = jnp.asarray(s2, jnp.float32)
    return jnp.broadcast_to(s2.reshape(s2.shape + (1,) * (s.ndim - s2.ndim)), s.shape)


def _e2m1_values(q, s):
    """Packed codes [..., K/2] -> their E2M1 values [..., K/16, 16] float32, element 2j from the low
    nibble. Built from the bits rather than with a bitcast to float4_e2m1fn, whose nibble order XLA's
    constant folding does not share with its compiled code (weights captured as constants decoded
    wrongly)."""
    c = jnp.repeat(q.astype(jnp.uint32), 2, axis=-1)                     # [..., K]: byte j at 2j and 2j+1
    shift = jnp.tile(jnp.array([0, 4], jnp.uint32), q.shape[-1])          # low nibble first
    return _e2m1_f32((c >> shift) & 15).reshape(*s.shape, 16)


def _dequant_fast(q, s, s2):
    """dequant_nvfp4 with float32 products (exact unless a result is subnormal on CPU)."""
    return (_e2m1_values(q, s) * nvfp4_factors(s, s2)[..., None]).reshape(*q.shape[:-1], 2 * q.shape[-1])


def _dequant_exact(q, s, s2):
    """dequant_nvfp4 with both products formed in integers (gradual underflow kept)."""
    v = _e2m1_values(q, s)
    f = _mul_exact(e4m3_f32(s), s2, 4)                                 # [..., K/16]
    w = _mul_exact(v, jnp.broadcast_to(f[..., None], (*f.shape, 16)), 2)
    return w.reshape(*q.shape[:-1], 2 * q.shape[-1])


def dequant_nvfp4(q, s, s2, flushes_subnormals: bool = True):
    """Packed E2M1 codes [..., K/2] (element 2j in the low nibble), E4M3 block scales [..., K/16],
    float32 global scale (0-d, or one per leading index of s) -> float32 [..., K], bit-identical to
    ref.nvfp4.dequantize: factor = f32(scale * global) per block, value = f32(e2m1 * factor).
    flushes_subnormals (XLA:CPU): both products are formed exactly in integers when a global scale is
    tiny enough for a result to be subnormal (tiny_global, decided at run time); else in float32."""
    s2 = _broadcast_global(s2, s)
    if not flushes_subnormals:
        return _dequant_fast(q, s, s2)
    return lax.cond(tiny_global(s2), _dequant_exact, _dequant_fast, q, s, s2)


def _e2m1_f32(c):
    """E2M1 codes (uint32, 0..15) -> their float32 values, assembled as bit patterns: sign to bit 31,
    exponent e and mantissa m (value 2^(e-1) * (1 + m/2), or m/2 when e = 0) to bits 30..22."""
    mag = c & 7
    bits = jnp.where(mag >= 2, (mag << 22) + jnp.uint32(126 << 23),
                     jnp.where(mag == 1, jnp.uint32(126 << 23), jnp.uint32(0)))   # 0.5 = 2^-1
    return lax.bitcast_convert_type(((c & 8) << 28) | bits, jnp.float32)


def e4m3_f32(s):
    """E4M3 scales (float8_e4m3fn) -> float32, exactly, from their bits: XLA:CPU has no E4M3 arithmetic
    and converts whole E4M3 arrays to float16 first. Normal: 2^(e-7) * (1 + m/8); e = 0: m * 2^-9;
    S.1111.111: NaN."""
    b = lax.bitcast_convert_type(s, jnp.uint8).astype(jnp.uint32)
    e, m = (b >> 3) & 15, b & 7
    mag = jnp.where(e == 0, m.astype(jnp.float32) * 2.0 ** -9,
                    lax.bitcast_convert_type(((e + 120) << 23) | (m << 20), jnp.float32))
    mag = jnp.where((b & 0x7F) == 0x7F, jnp.float32(jnp.nan), mag)
    return jnp.where((b & 0x80) != 0, -mag, mag)


EXACT_SHIFT = 64  # the exact path hands matmuls its weights times 2^64 (all normal), and scales back


def _shifted_up(w):
    """float32 weights of magnitude below 2^-99 (any global with tiny_global), subnormals included ->
    the same values times 2^EXACT_SHIFT, exactly, all normal. Subnormals are rebuilt from their bits:
    XLA on CPU reads them as zero, so a matmul would drop them."""
    b = lax.bitcast_convert_type(w, jnp.uint32)
    sub = (b & 0x7FFFFF).astype(jnp.float32) * 2.0 ** (EXACT_SHIFT - 149)   # subnormal = m * 2^-149
    sub = jnp.where(b >> 31 == 1, -sub, sub)
    return jnp.where(b & 0x7F800000 == 0, sub, w * 2.0 ** EXACT_SHIFT)


def nvfp4_factors(s, s2):
    """The block factors f32(scale * global) [..., out, K/16] of E4M3 scales s [..., out, K/16] and
    globals s2 broadcastable to [..., out] (the fast path: no global is tiny)."""
    return e4m3_f32(s) * _broadcast_global(s2, s)


def factor_planes(q, f):
    """Packed codes q [..., out, K/2] and block factors f [..., out, K/16] -> the matrix's even and odd
    column planes (w[..., 0::2], w[..., 1::2]), float32 [..., out, K/2], each value f32(e2m1 * factor),
    built as bit patterns from the bytes' low or high nibbles (no interleaving: XLA vectorises it)."""
    f = jnp.repeat(f, 8, axis=-1)                                        # [..., out, K/2]: byte j is in block j // 8
    c = q.astype(jnp.uint32)
    return _e2m1_f32(c & 15) * f, _e2m1_f32(c >> 4) * f


def nvfp4_planes(q, s, s2, exact: bool):
    """NVFP4 matrices (q [..., out, K/2], s [..., out, K/16], s2 broadcastable to [..., out]) decoded as
    in dequant_nvfp4, for a matmul, split into their even and odd columns (factor_planes). `exact`
    (globals where tiny_global holds) forms the products in integers and returns the values times
    2^EXACT_SHIFT (the caller scales back)."""
    if exact:
        w = _shifted_up(_dequant_exact(q, s, _broadcast_global(s2, s)))
        return w[..., 0::2], w[..., 1::2]
    return factor_planes(q, nvfp4_factors(s, s2))


def nvfp4_matrix(q, s, s2, dt, exact: bool):
    """An NVFP4 matrix decoded for a matmul, in dt: dequant_nvfp4's values, times 2^EXACT_SHIFT when exact."""
    s2 = _broadcast_global(s2, s)
    w = _shifted_up(_dequant_exact(q, s, s2)) if exact else _dequant_fast(q, s, s2)
    return w.astype(dt)


# ------------------------------------------------------------------------------------------------
# Activations (W4A4): the engines' CUDA quantizer

_R6 = np.float32(1) / np.float32(E2M1_MAX)


def quantize_activation(x, input_scale, global_scale=None):
    """The engines' activation quantizer, as ref.nvfp4.quantize_activation(x, input_scale,
    sign="cuda", global_scale): x [..., K] -> (E2M1 codes uint8 [..., K] unpacked, E4M3 block scales
    [..., K/16]). float32 steps in the same order: G = global_scale if given (compressed-tensors'
    stored multiplier), else 1/input_scale, vmax = max|x| over the block (NaN skipped),
    scale = e4m3 saturating(G * (vmax * (1/6))), out = 1/(scale * (1/G)) (0 for a zero scale), codes
    = round-to-nearest-even of x * out with saturation, the sign bit copied (NaN -> 7). On CPU a
    subnormal x reads as zero."""
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    a = jnp.abs(xb)
    nan = jnp.isnan(a)
    vmax = jnp.where(jnp.all(nan, axis=-1), jnp.nan, jnp.max(jnp.where(nan, -jnp.inf, a), axis=-1))
    g = (jnp.float32(1) / jnp.asarray(input_scale, jnp.float32) if global_scale is None
         else jnp.asarray(global_scale, jnp.float32))
    scale = jnp.minimum(g * (vmax * _R6), jnp.float32(E4M3_MAX)).astype(jnp.float8_e4m3fn)  # NaN stays NaN
    s = scale.astype(jnp.float32)
    out = jnp.where(s != 0, jnp.float32(1) / (s * (jnp.float32(1) / g)), jnp.float32(0))
    y = xb * out[..., None]
    mag = jnp.abs(y)
    below = sum((mag <= t).astype(jnp.uint8) for t in TIES_DOWN) + sum((mag < t).astype(jnp.uint8) for t in TIES_UP)
    codes = (jnp.uint8(7) - below) | ((jnp.signbit(y) & ~jnp.isnan(y)).astype(jnp.uint8) << 3)
    return codes.reshape(x.shape), scale


def activation_values(x, input_scale, global_scale=None):
    """x [..., K] quantized by quantize_activation, as float32 block values e2m1 * scale (exact; the
    global input_scale not applied) [..., K]."""
    codes, scale = quantize_activation(x, input_scale, global_scale)
    return block_values(codes, scale)


def block_values(codes, scale):
    """Unpacked E2M1 codes [..., K] and their E4M3 block scales [..., K/16] -> e2m1 * scale, float32
    [..., K] (exact)."""
    v = _e2m1_f32(codes.astype(jnp.uint32)).reshape(scale.shape + (BLOCK_SIZE,))
    return (v * scale.astype(jnp.float32)[..., None]).reshape(codes.shape)


def pack_codes(codes):
    """Unpacked E2M1 codes [..., K] -> bytes [..., K/2], element 2j in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed):
    """Bytes [..., K/2] -> unpacked E2M1 codes [..., K] (low nibble first)."""
    return jnp.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


# ------------------------------------------------------------------------------------------------
# FP8 E4M3 with one scale per tensor (ref.fp8): W8A8 inputs and the FP8 KV cache

def quantize_fp8(x, scale, rule: str = "divide"):
    """x [...] -> float8_e4m3fn [...] with one float32 scale, bit-identical to ref.fp8.quantize_fp8:
    "divide" e4m3_sat(f32(x / scale)) (vLLM's KV store), "reciprocal" e4m3_sat(f32(x * f32(1 / scale)))
    (static scaled_fp8_quant: W8A8 inputs), "sglang" bf16(f32(x) / f32(bf16(scale))) cast without
    saturation (NaN above 464, keeping the sign as torch's cast does; SGLang's KV store). On CPU a
    subnormal float32 input reads as zero."""
    s = jnp.asarray(scale, jnp.float32)
    x = x.astype(jnp.float32)
    if rule == "sglang":
        y = (x / s.astype(jnp.bfloat16).astype(jnp.float32)).astype(jnp.bfloat16).astype(jnp.float32)
        y = jnp.where(jnp.abs(y) > 464, jnp.copysign(jnp.float32(jnp.nan), y), jnp.clip(y, -E4M3_MAX, E4M3_MAX))
        return y.astype(jnp.float8_e4m3fn)
    y = x / s if rule == "divide" else x * (jnp.float32(1) / s)
    return jnp.clip(y, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)   # NaN stays NaN
