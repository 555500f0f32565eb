"""ModelOpt weight export (both recipes) and exact dequantization, against scalar-loop oracles."""
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st
from hypothesis.extra import numpy as hnp

from ref import nvfp4
from nvfp4_oracle import e2m1_value, e4m3_value, modelopt_weight

F32 = np.float32
DTYPES = {"bf16": ml_dtypes.bfloat16, "f32": np.float32}


@st.composite
def weights(draw, dtype=np.float32, max_rows=3, max_kb=3, exp_range=(-40, 8)):
    """[R, 16*kb] matrices with per-block magnitudes 2^e (underflowing blocks), zero blocks,
    and exact E2M1 grid multiples (ties)."""
    rows, kb = draw(st.integers(1, max_rows)), draw(st.integers(1, max_kb))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    exps = draw(hnp.arrays(np.int32, (rows, kb), elements=st.integers(*exp_range)))
    kind = draw(hnp.arrays(np.int8, (rows, kb), elements=st.sampled_from([0, 0, 0, 1, 2])))
    w = rng.standard_normal((rows, kb, 16))
    grid = rng.choice(nvfp4.E2M1_VALUES, (rows, kb, 16)) * rng.choice([0.5, 1, 1.75], (rows, kb, 1))
    w = np.where((kind == 2)[..., None], grid, w) * 2.0 ** exps[..., None]
    w[kind == 1] = 0
    w = w.reshape(rows, kb * 16).astype(dtype)
    assume(np.any(w != 0))
    return w


def _bytes(a):
    return np.asarray(a).view(np.uint8)


@given(recipe=st.sampled_from(nvfp4.RECIPES), dtype=st.sampled_from(list(DTYPES.values())),
       data=st.data())
def test_quantize_weight_matches_modelopt_oracle(recipe, dtype, data):
    w = data.draw(weights(dtype))
    tie = data.draw(st.sampled_from([None, 1.0, 1.5, 37.0]))
    amax = F32(np.max(np.abs(w.astype(F32))))
    gs = None if tie is None else F32(amax * F32(tie))
    packed, scale, scale_2 = nvfp4.quantize_weight(w, recipe=recipe, global_scale=gs)
    codes, sbytes, g = modelopt_weight(w.astype(F32), recipe, gs)
    assert packed.dtype == np.uint8 and packed.shape == (w.shape[0], w.shape[1] // 2)
    assert scale.dtype == ml_dtypes.float8_e4m3fn and scale.shape == (w.shape[0], w.shape[1] // 16)
    assert scale_2.dtype == np.float32 and scale_2.shape == ()
    assert scale_2 == g
    assert np.array_equal(_bytes(scale), sbytes)
    assert np.array_equal(nvfp4.unpack_e2m1(packed), codes)


def _exact_dequant(packed, sbytes, g):
    codes = nvfp4.unpack_e2m1(packed)
    out = np.zeros(codes.shape, np.float64)
    for idx in np.ndindex(codes.shape):
        factor = F32(F32(e4m3_value(int(sbytes[idx[:-1] + (idx[-1] // 16,)]))) * g)
        out[idx] = float(Fraction(e2m1_value(int(codes[idx]))) * Fraction(float(factor)))
    return out


@given(packed=hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.sampled_from([8, 16, 24]))),
       data=st.data())
def test_dequantize_exact(packed, data):
    sbytes = data.draw(hnp.arrays(np.uint8, (packed.shape[0], packed.shape[1] // 8),
                                  elements=st.integers(0, 0x7E)))
    g = F32(data.draw(st.floats(min_value=2.0 ** -100, max_value=2.0 ** 33, width=32)))
    want = _exact_dequant(packed, sbytes, g)
    got64 = nvfp4.dequantize(packed, sbytes.view(ml_dtypes.float8_e4m3fn), g, dtype=np.float64)
    got32 = nvfp4.dequantize(packed, sbytes.view(ml_dtypes.float8_e4m3fn), np.array(g))
    assert got64.dtype == np.float64 and got32.dtype == np.float32
    assert np.array_equal(got64, want) and np.array_equal(got32, want.astype(np.float32))


def _half_step(v):
    """Half the gap between neighbouring E2M1 magnitudes around |v| (in code units)."""
    a = np.abs(v)
    return np.where(a <= 2, 0.25, np.where(a <= 4, 0.5, 1.0))


@given(recipe=st.sampled_from(nvfp4.RECIPES), w=weights(ml_dtypes.bfloat16, exp_range=(-30, 30)))
def test_dequantize_error_within_half_step(recipe, w):
    packed, scale, g = nvfp4.quantize_weight(w, recipe=recipe)
    dq = nvfp4.dequantize(packed, scale, g, dtype=np.float64)
    w64 = w.astype(np.float64)
    factor = np.repeat((scale.astype(np.float64) * g).astype(np.float32).astype(np.float64), 16, -1)
    ok = factor > 0
    hs = np.maximum(_half_step(w64 / np.where(ok, factor, 1)), _half_step(dq / np.where(ok, factor, 1)))
    # rounding of the float32 division w / factor adds at most one float32 ulp of 6.
    bound = (hs + 6 * 2.0 ** -23) * factor
    # A subnormal block scale can round far below the block's need: those elements saturate.
    sat = np.abs(w64) > 7 * factor
    assert np.all(np.repeat(scale.astype(np.float32) < 2.0 ** -6, 16, -1)[sat & ok])
    assert np.all(np.abs(dq[sat & ok]) == 6 * factor[sat & ok])
    inside = ok & ~sat
    assert np.all(np.abs(w64 - dq)[inside] <= bound[inside])
    # blocks whose scale underflowed (0.37 only) hold values below 2^-10 of the scale unit.
    tiny = ~ok
    assert np.all(np.abs(w64[tiny]) <= 6 * float(g) * 2.0 ** -10 * (1 + 2.0 ** -20))
    assert np.all(dq[tiny] == 0)


@given(recipe=st.sampled_from(nvfp4.RECIPES), w=weights(ml_dtypes.bfloat16))
def test_requantize_dequantized_reproduces_bytes(recipe, w):
    packed, scale, g = nvfp4.quantize_weight(w, recipe=recipe)
    amax = F32(np.max(np.abs(w.astype(F32))))
    dq = nvfp4.dequantize(packed, scale, g)
    packed2, scale2, g2 = nvfp4.quantize_weight(dq, recipe=recipe, global_scale=amax)
    assert g2 == g
    # Holds for normal block scales (>= 2^-6): the block max is then always code 6.
    normal = scale.astype(np.float32) >= 2.0 ** -6
    assert np.array_equal(_bytes(scale2)[normal], _bytes(scale)[normal])
    c1, c2 = nvfp4.unpack_e2m1(packed), nvfp4.unpack_e2m1(packed2)
    c1 = np.where(c1 == 8, 0, c1)                   # -0.0 dequantizes to -0.0 -> re-encodes as 0x0
    rows = np.repeat(normal, 16, -1)
    assert np.array_equal(c2[rows], c1[rows])


@given(recipe=st.sampled_from(nvfp4.RECIPES), w=weights(ml_dtypes.bfloat16, exp_range=(-20, 8)),
       k=st.integers(-60, 60))
def test_power_of_two_scaling_moves_only_global(recipe, w, k):
    packed, scale, g = nvfp4.quantize_weight(w, recipe=recipe)
    assume(float(g) * 2.0 ** k >= 2.0 ** -126 and float(g) >= 2.0 ** -126)   # global stays normal
    ws = (w.astype(np.float64) * 2.0 ** k).astype(ml_dtypes.bfloat16)
    assume(np.all(np.isfinite(ws.astype(np.float32))))
    assume(np.all((ws.astype(np.float64) == 0) == (w.astype(np.float64) == 0)))  # no bf16 underflow
    assume(np.array_equal(ws.astype(np.float64), w.astype(np.float64) * 2.0 ** k))
    packed2, scale2, g2 = nvfp4.quantize_weight(ws, recipe=recipe)
    assert float(g2) == float(g) * 2.0 ** k
    assert np.array_equal(packed2, packed) and np.array_equal(_bytes(scale2), _bytes(scale))


@given(w=weights(np.float32, exp_range=(-40, 8)), tie=st.sampled_from([None, 1.0, 3.0]))
def test_recipes_differ_only_on_underflowing_blocks(w, tie):
    gs = None if tie is None else F32(np.max(np.abs(w)) * F32(tie))
    p37, s37, g37 = nvfp4.quantize_weight(w, "modelopt-0.37", gs)
    p45, s45, g45 = nvfp4.quantize_weight(w, "modelopt-0.45", gs)
    assert g37 == g45
    same = _bytes(s37) == _bytes(s45)
    assert np.all(_bytes(s37)[~same] == 0x00) and np.all(_bytes(s45)[~same] == 0x01)
    b37, b45 = p37.reshape(same.shape + (8,)), p45.reshape(same.shape + (8,))
    assert np.array_equal(b37[same], b45[same])


def test_zero_and_underflowing_blocks():
    w = np.zeros((1, 48), np.float32)
    w[0, 16:32] = 1e-9                              # far below 2^-10 of the scale unit
    w[0, 32] = 448.0
    w[0, 33] = -0.0
    p37, s37, g37 = nvfp4.quantize_weight(w, "modelopt-0.37")
    p45, s45, g45 = nvfp4.quantize_weight(w, "modelopt-0.45")
    assert g37 == F32(F32(448) / F32(2688))
    assert _bytes(s37).tolist() == [[0x38, 0x00, 0x7E]] and _bytes(s45).tolist() == [[0x38, 0x01, 0x7E]]
    assert np.all(p37[0, :8] == 0) and np.all(p37[0, 8:16] == 0x77)        # 1e-9 / 0 = inf -> 6
    assert p37[0, 16] == 0x07 and p45[0, 16] == 0x07                       # +6, then -0.0 -> 0
    assert np.all(nvfp4.dequantize(p37, s37, g37)[0, :32] == 0)
    assert np.all(p45[0, 8:16] == 0x00)                                    # 1e-9 -> 0 at 2^-9


def test_zero_tensor_follows_modelopt_arithmetic():
    p, s, g = nvfp4.quantize_weight(np.zeros((2, 16), np.float32))
    assert g == 0 and np.all(np.isnan(s.astype(np.float32))) and np.all(p == 0x77)
    p, s, g = nvfp4.quantize_weight(np.zeros((2, 16), np.float32), global_scale=2688.0)
    assert g == 1 and np.all(_bytes(s) == 0x38) and np.all(p == 0)


def test_dequantize_leading_dims_and_float64():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 3, 64)).astype(np.float32)
    p, s, g = nvfp4.quantize_weight(w)
    assert p.shape == (2, 3, 32) and s.shape == (2, 3, 4)
    d = nvfp4.dequantize(p, s, g)
    assert d.shape == w.shape
    for i in range(2):
        assert np.array_equal(d[i], nvfp4.dequantize(p[i], s[i], g))


def test_dequantize_large_table_path_equals_per_block_path():
    # >= 4096 blocks use the [scale byte, packed byte] table; single rows use the per-block multiply,
    # which test_dequantize_exact checks against exact rationals.
    rng = np.random.default_rng(3)
    packed = rng.integers(0, 256, (70, 512), dtype=np.uint8)
    sbytes = rng.integers(0, 256, (70, 64), dtype=np.uint8)          # includes NaN bytes 0x7F/0xFF
    for dtype in (np.float32, np.float64):
        whole = nvfp4.dequantize(packed, sbytes, F32(0.0123), dtype=dtype)
        rows = np.stack([nvfp4.dequantize(packed[r], sbytes[r], F32(0.0123), dtype=dtype)
                         for r in range(70)])
        assert whole.dtype == dtype
        assert np.array_equal(whole.view(np.uint8), rows.view(np.uint8))


def test_dequantize_into_out_buffer():
    # both paths (per-block multiply, cached [scale byte, packed byte] table, in one and in two
    # row chunks), several globals
    rng = np.random.default_rng(4)
    for rows in (3, 70, 600):
        packed = rng.integers(0, 256, (2, rows, 256), dtype=np.uint8)
        sbytes = rng.integers(0, 256, (2, rows, 32), dtype=np.uint8)
        for g in (F32(0.0123), F32(3.5e-7), F32(0.0123)):
            for dtype in (np.float32, np.float64):
                want = nvfp4.dequantize(packed, sbytes, g, dtype=dtype)
                buf = np.full((2, rows, 512), np.nan, dtype)
                got = nvfp4.dequantize(packed, sbytes, g, dtype=dtype, out=buf)
                assert got is buf
                assert np.array_equal(buf.view(np.uint8), want.view(np.uint8))
                rows_only = np.stack([nvfp4.dequantize(packed[i, r], sbytes[i, r], g, dtype=dtype)
                                      for i in range(2) for r in range(rows)])
                assert np.array_equal(want.reshape(-1, 512).view(np.uint8), rows_only.view(np.uint8))


def test_dequantize_rejects_bad_out():
    p, s = np.zeros((2, 8), np.uint8), np.zeros((2, 1), np.uint8)
    read_only = np.zeros((2, 16), np.float32)
    read_only.flags.writeable = False
    for out in (np.zeros((2, 16), np.float64), np.zeros((2, 32), np.float32),
                np.zeros((16, 2), np.float32).T, read_only, [[0.0] * 16] * 2):
        with pytest.raises(nvfp4.FormatError, match="out: expected"):
            nvfp4.dequantize(p, s, F32(1), out=out)
