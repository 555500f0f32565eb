"""E2M1 / E4M3 / bf16 element codecs against exact rational arithmetic and bit formulas."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from ref import nvfp4
from nvfp4_oracle import bf16_round, e2m1_code, e2m1_value, e4m3_byte, e4m3_value

F32 = np.float32
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
floats64 = st.floats(allow_nan=True, allow_infinity=True)
near_grid = st.floats(min_value=-8, max_value=8, width=32)


def test_e2m1_code_table():
    want = np.array([e2m1_value(c) for c in range(16)], np.float32)
    got = nvfp4.decode_e2m1(np.arange(16, dtype=np.uint8))
    assert got.dtype == np.float32
    assert np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want))
    assert np.array_equal(nvfp4.E2M1_VALUES, want)


@pytest.mark.parametrize("sign", nvfp4.SIGN_RULES)
@given(x=st.one_of(floats32, near_grid))
def test_encode_e2m1_float32_exact_rounding(sign, x):
    assert nvfp4.encode_e2m1(np.array(x, np.float32), sign=sign) == e2m1_code(x, sign)


@pytest.mark.parametrize("sign", nvfp4.SIGN_RULES)
@given(x=st.one_of(floats64, st.floats(min_value=-8, max_value=8)))
def test_encode_e2m1_float64_exact_rounding(sign, x):
    assert nvfp4.encode_e2m1(np.array(x, np.float64), sign=sign) == e2m1_code(x, sign)


@pytest.mark.parametrize("sign", nvfp4.SIGN_RULES)
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_encode_e2m1_every_midpoint_and_neighbours(sign, dtype):
    pts = []
    for m in MIDPOINTS + (6.0,):
        c = np.array(m, dtype)
        pts += [c, np.nextafter(c.astype(np.float64), 0).astype(dtype),
                np.nextafter(c.astype(np.float64), 9).astype(dtype)]
        for d in (np.float32, np.float64):
            pts += [np.nextafter(d(m), d(0)), np.nextafter(d(m), d(9))]
    x = np.array([float(p) for p in pts])
    x = np.concatenate([x, -x]).astype(dtype)
    got = nvfp4.encode_e2m1(x, sign=sign)
    assert got.tolist() == [e2m1_code(float(v), sign) for v in x]


def test_encode_e2m1_midpoint_results():
    x = np.array(MIDPOINTS, np.float32)
    assert nvfp4.decode_e2m1(nvfp4.encode_e2m1(x)).tolist() == [0, 1, 1, 2, 2, 4, 4]


def test_encode_e2m1_special_values():
    x = np.array([0.0, -0.0, -0.1, np.inf, -np.inf, np.nan, -np.nan, 1e30, -1e30], np.float32)
    assert nvfp4.encode_e2m1(x, "modelopt").tolist() == [0, 0, 8, 7, 15, 7, 7, 7, 15]
    assert nvfp4.encode_e2m1(x, "cuda").tolist() == [0, 8, 8, 7, 15, 7, 7, 7, 15]


@given(x=hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=6),
                    elements=st.floats(width=32, allow_nan=False)))
def test_encode_e2m1_agrees_with_ml_dtypes(x):
    # ml_dtypes keeps the sign bit (like "cuda"); "modelopt" differs only on -0.0.
    md = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    assert np.array_equal(nvfp4.encode_e2m1(x, "cuda"), md)
    mo = nvfp4.encode_e2m1(x, "modelopt")
    negzero = (x == 0) & np.signbit(x)
    assert np.array_equal(mo[~negzero], md[~negzero]) and np.all(mo[negzero] == 0)


@given(a=st.one_of(floats32.filter(lambda v: not math.isnan(v)), near_grid),
       b=st.one_of(floats32.filter(lambda v: not math.isnan(v)), near_grid))
def test_encode_e2m1_monotone(a, b):
    lo, hi = sorted((a, b))
    v = nvfp4.decode_e2m1(nvfp4.encode_e2m1(np.array([lo, hi], np.float32)))
    assert v[0] <= v[1]


def test_encode_decode_roundtrip():
    codes = np.arange(16, dtype=np.uint8)
    vals = nvfp4.decode_e2m1(codes)
    assert np.array_equal(nvfp4.encode_e2m1(vals, "cuda"), codes)
    assert np.array_equal(nvfp4.encode_e2m1(vals, "modelopt"), np.where(codes == 8, 0, codes))


@given(c=hnp.arrays(np.uint8, hnp.array_shapes(max_dims=3, max_side=8).map(
    lambda s: s[:-1] + (2 * s[-1],)), elements=st.integers(0, 15)))
def test_pack_unpack_inverse(c):
    p = nvfp4.pack_e2m1(c)
    assert p.shape == c.shape[:-1] + (c.shape[-1] // 2,) and p.dtype == np.uint8
    assert np.array_equal(p & 15, c[..., 0::2]) and np.array_equal(p >> 4, c[..., 1::2])
    assert np.array_equal(nvfp4.unpack_e2m1(p), c)
    assert np.array_equal(nvfp4.pack_e2m1(nvfp4.unpack_e2m1(p)), p)


def test_pack_nibble_order():
    assert nvfp4.pack_e2m1(np.array([1, 2, 0xF, 0x8], np.uint8)).tolist() == [0x21, 0x8F]
    assert nvfp4.unpack_e2m1(np.array([0x21], np.uint8)).tolist() == [1, 2]


def test_e4m3_all_bytes_decode():
    got = nvfp4.decode_e4m3(np.arange(256, dtype=np.uint8))
    want = np.array([e4m3_value(b) for b in range(256)], np.float32)
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(want[~np.isnan(want)]))


@given(x=st.one_of(floats32, st.floats(min_value=-500, max_value=500, width=32),
                   st.floats(min_value=-0.015625, max_value=0.015625, width=32)))
def test_encode_e4m3_float32_saturating_exact(x):
    got = int(nvfp4.encode_e4m3(np.array(x, np.float32)).view(np.uint8))
    assert got == e4m3_byte(x, saturate=True)


@given(x=st.one_of(floats64, st.floats(min_value=-500, max_value=500)))
def test_encode_e4m3_float64_saturating_exact(x):
    got = int(nvfp4.encode_e4m3(np.array(x, np.float64)).view(np.uint8))
    assert got == e4m3_byte(x, saturate=True)


def test_encode_e4m3_never_nan_from_finite():
    x = np.array([448, 449, 464, 465, 1e6, 3.4e38, -1e6, np.inf, -np.inf], np.float32)
    assert nvfp4.encode_e4m3(x).view(np.uint8).tolist() == [0x7E] * 6 + [0xFE, 0x7E, 0xFE]
    assert nvfp4.encode_e4m3(np.array([np.nan], np.float32)).view(np.uint8)[0] & 0x7F == 0x7F


@given(x=st.one_of(floats32, floats64, st.floats(min_value=-1e-38, max_value=1e-38)))
def test_round_to_bf16_exact(x):
    for dt in (np.float32, np.float64):
        with np.errstate(over="ignore"):  # a float64 beyond the float32 range becomes inf
            v = np.array(x, dt)
        got = nvfp4.round_to_bf16(v)
        assert got.dtype == dt and got.shape == ()
        want = bf16_round(float(v))
        if math.isnan(want):
            assert np.isnan(got)
        else:
            assert float(got) == want and bool(np.signbit(got)) == (math.copysign(1, want) < 0)


def test_round_to_bf16_double_rounding_case():
    x = np.array([1 + 2.0 ** -8 + 2.0 ** -40, -(1 + 2.0 ** -8 + 2.0 ** -40), 1 + 2.0 ** -8])
    assert nvfp4.round_to_bf16(x).tolist() == [1 + 2.0 ** -7, -(1 + 2.0 ** -7), 1.0]
