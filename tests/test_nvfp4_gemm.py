"""nvfp4_matmul (W4A4 and W4A16) against float64 dequantize-then-matmul; CUTLASS scale swizzle."""
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from ref import nvfp4
from nvfp4_oracle import round_binary

F32 = np.float32


@st.composite
def gemm_case(draw):
    m, n, kb = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    x = (rng.standard_normal((m, 16 * kb)) * 2.0 ** draw(st.integers(-8, 8))).astype(ml_dtypes.bfloat16)
    w = (rng.standard_normal((n, 16 * kb)) * 2.0 ** draw(st.integers(-8, 8))).astype(ml_dtypes.bfloat16)
    amax_x = float(np.max(np.abs(x.astype(F32))))
    input_scale = F32(max(amax_x, 1e-30) / 2688 * draw(st.sampled_from([0.5, 1.0, 4.0])))
    return x, w, input_scale


@given(case=gemm_case(), dtype=st.sampled_from([np.float64, np.float32, ml_dtypes.bfloat16]))
def test_w4a4_equals_float64_dequantized_matmul(case, dtype):
    x, w, input_scale = case
    packed, scale, g = nvfp4.quantize_weight(w)
    pa, sa = nvfp4.quantize_activation(x, input_scale)
    # independent: decode both operands without their globals, multiply in float64, apply alpha
    xa = nvfp4.dequantize(pa, sa, F32(1), dtype=np.float64)
    wd = nvfp4.dequantize(packed, scale, F32(1), dtype=np.float64)
    acc = xa @ wd.T
    alpha = F32(input_scale * g)
    want = acc * float(alpha)
    got = nvfp4.nvfp4_matmul(x, packed, scale, g, input_scale=input_scale, dtype=dtype)
    assert got.dtype == np.dtype(dtype) and got.shape == (x.shape[0], w.shape[0])
    if dtype == np.float64:
        assert np.array_equal(got, want)        # small K: every partial sum is exact in float64
    else:                                       # one rounding of the exact alpha * acc
        bits = 8 if dtype == ml_dtypes.bfloat16 else 24
        exact = [round_binary(Fraction(float(v)) * Fraction(float(alpha)), bits) for v in acc.flat]
        assert got.astype(np.float64).reshape(-1).tolist() == exact


@given(case=gemm_case())
def test_w4a16_equals_float64_dequantized_matmul(case):
    x, w, _ = case
    packed, scale, g = nvfp4.quantize_weight(w)
    want = x.astype(np.float64) @ nvfp4.dequantize(packed, scale, g, dtype=np.float64).T
    got = nvfp4.nvfp4_matmul(x, packed, scale, g)
    assert np.array_equal(got, want)
    assert np.array_equal(nvfp4.nvfp4_matmul(x, packed, scale, g, dtype=np.float32),
                          want.astype(np.float32))


def test_w4a4_leading_dims():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    packed, scale, g = nvfp4.quantize_weight(rng.standard_normal((5, 32)).astype(np.float32))
    out = nvfp4.nvfp4_matmul(x, packed, scale, g, input_scale=F32(1 / 2688))
    assert out.shape == (2, 3, 5)
    assert np.array_equal(out[1], nvfp4.nvfp4_matmul(x[1], packed, scale, g, input_scale=F32(1 / 2688)))


def _offset(m, kb, kp):
    return (m // 128) * (kp // 4) * 512 + (kb // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + kb % 4


@given(s=hnp.arrays(np.uint8, st.tuples(st.integers(1, 300), st.integers(1, 11))),
       lead=st.sampled_from([(), (2,)]))
def test_swizzle_offsets_and_inverse(s, lead):
    s = np.broadcast_to(s, lead + s.shape).copy()
    if lead:
        s[1] ^= 0x5A
    z = nvfp4.swizzle_scales(s.view(ml_dtypes.float8_e4m3fn))
    m, kb = s.shape[-2:]
    mp, kp = -(-m // 128) * 128, -(-kb // 4) * 4
    assert z.shape == lead + (mp, kp) and z.dtype == ml_dtypes.float8_e4m3fn
    mm, kk = np.meshgrid(np.arange(m), np.arange(kb), indexing="ij")
    flat = z.view(np.uint8).reshape(lead + (-1,))
    assert np.array_equal(flat[..., _offset(mm, kk, kp)], s)
    mask = np.ones(mp * kp, bool)
    mask[_offset(mm, kk, kp).ravel()] = False
    assert np.all(flat[..., mask] == 0)                 # padding is zero
    assert np.array_equal(nvfp4.unswizzle_scales(z, m, kb).view(np.uint8), s)


def test_swizzle_small_example():
    s = np.arange(2 * 5, dtype=np.uint8).reshape(2, 5) + 1
    z = nvfp4.swizzle_scales(s).ravel()
    assert z.shape == (128 * 8,)
    assert z[[0, 1, 2, 3, 512, 16, 17, 528]].tolist() == [1, 2, 3, 4, 5, 6, 7, 10]


def test_unswizzle_rejects_wrong_padding():
    with pytest.raises(nvfp4.FormatError, match="padded shape"):
        nvfp4.unswizzle_scales(np.zeros((128, 4), np.uint8), 129, 4)


@given(acc=st.floats(min_value=-1e30, max_value=1e30),
       alpha=st.floats(min_value=2.0 ** -100, max_value=2.0 ** 33, width=32), bf16=st.booleans())
def test_scaled_accumulator_is_rounded_once(acc, alpha, bf16):
    # the last step of nvfp4_matmul: dtype(alpha * acc) for float64 acc, float32 alpha
    dtype = np.dtype(ml_dtypes.bfloat16 if bf16 else np.float32)
    got = nvfp4.round_scaled(np.array([acc]), F32(alpha), dtype)
    want = round_binary(Fraction(acc) * Fraction(alpha), 8 if bf16 else 24)
    assert float(got[0]) == want
