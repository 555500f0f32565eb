"""ref.fp8: per-tensor FP8 quantizers bit-exact against exact rational arithmetic; FP8 linears
(W8A16, W8A8) against float64 recomputations; requantize_with_max_scale step by step."""
import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ref import fp8
from ref.errors import FormatError
from nvfp4_oracle import e4m3_byte_torch, e4m3_value, fp8_per_tensor_byte, round_binary

F32, E4M3 = np.float32, ml_dtypes.float8_e4m3fn

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-2.0 ** 60,
                       max_value=2.0 ** 60)
scales = st.floats(width=32, min_value=2.0 ** -40, max_value=2.0 ** 40)


def _bytes(q):
    return np.asarray(q).view(np.uint8).reshape(-1).tolist()


@given(xs=st.lists(finite_f32, min_size=1, max_size=24), scale=scales,
       rule=st.sampled_from(fp8.FP8_RULES))
def test_quantize_fp8_matches_exact_rationals(xs, scale, rule):
    x = np.array(xs, F32)
    got = _bytes(fp8.quantize_fp8(x, F32(scale), rule))
    want = [fp8_per_tensor_byte(float(v), float(F32(scale)), rule) for v in x]
    nan = [(b & 0x7F) == 0x7F for b in want]
    assert [g & 0x7F == 0x7F for g in got] == nan               # NaN where the oracle says NaN
    assert [g for g, n in zip(got, nan) if not n] == [w for w, n in zip(want, nan) if not n]


@settings(max_examples=60)   # 380 values per example
@given(scale=scales)
def test_every_e4m3_value_and_midpoint_divides_back(scale):
    # values v * scale land on the grid or midpoints after division (rule "divide"): saturating RNE
    grid = np.arange(0x7F, dtype=np.uint8).view(E4M3).astype(np.float64)
    mids = (grid[:-1] + grid[1:]) / 2
    x = (np.concatenate([grid, mids, -grid]) * np.float64(F32(scale))).astype(F32)
    got = _bytes(fp8.quantize_fp8(x, F32(scale), "divide"))
    assert got == [fp8_per_tensor_byte(float(v), float(F32(scale)), "divide") for v in x]


def test_saturation_nan_and_specials():
    x = np.array([448, 449, 464, 466, 480, 1e30, np.inf, -np.inf, np.nan, -0.0, 0.0], F32)
    divide = fp8.quantize_fp8(x, F32(1), "divide").astype(np.float64)
    assert divide[:8].tolist() == [448, 448, 448, 448, 448, 448, 448, -448] and math.isnan(divide[8])
    assert np.signbit(divide[9]) and not np.signbit(divide[10])
    sg = fp8.quantize_fp8(x, F32(1), "sglang").astype(np.float64)
    assert sg[:3].tolist() == [448, 448, 448] and np.isnan(sg[3:9]).all()    # bf16 466 > 464: NaN; inf -> NaN
    # the scale is rounded to bf16 before SGLang divides: 1 + 2^-9 acts as 1.0
    y = np.array([300.0], F32)
    rounded = fp8.quantize_fp8(y, F32(1 + 2 ** -9), "sglang").astype(F32)[0]
    assert rounded == fp8.quantize_fp8(y, F32(1), "divide").astype(F32)[0]


@given(b=st.integers(0, 255).filter(lambda b: b & 0x7F != 0x7F), scale=scales)
def test_dequantize_fp8_exact(b, scale):
    q = np.array([b], np.uint8)
    exact = Fraction(e4m3_value(b)) * Fraction(float(F32(scale)))
    assert Fraction(float(fp8.dequantize_fp8(q, F32(scale))[0])) == exact
    assert float(fp8.dequantize_fp8(q, F32(scale), np.float32)[0]) == round_binary(exact, 24)


def test_torch_cast_oracle_agrees_with_ml_dtypes_on_bf16():
    # the "sglang" rule casts bfloat16 values with ml_dtypes: it must behave as torch's classic cast
    v = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    got = v.astype(E4M3).view(np.uint8)
    want = np.array([e4m3_byte_torch(float(t)) for t in v])
    nan = (want & 0x7F) == 0x7F
    assert np.array_equal((got & 0x7F) == 0x7F, nan) and np.array_equal(got[~nan], want[~nan])


@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(1, 5), k=st.integers(1, 40), tie=st.booleans())
def test_quantize_fp8_weight(seed, n, k, tie):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(ml_dtypes.bfloat16)
    amax = F32(np.abs(w.astype(F32)).max() * (2.0 if tie else 1.0) + 1e-30)
    q, s = fp8.quantize_fp8_weight(w, amax if tie else None)
    assert s.shape == () and s.dtype == F32 and float(s) == float(F32(amax / F32(448)))
    assert _bytes(q) == [fp8_per_tensor_byte(float(v), float(s), "divide") for v in w.astype(F32).reshape(-1)]
    assert np.all(np.abs(fp8.dequantize_fp8(q, s)) <= 448 * float(s))


@st.composite
def linear_case(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    m, n, k = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 48))
    x = (rng.standard_normal((m, k)) * 2.0 ** draw(st.integers(-6, 6))).astype(ml_dtypes.bfloat16)
    w = (rng.standard_normal((n, k)) * 0.05).astype(ml_dtypes.bfloat16)
    q, ws = fp8.quantize_fp8_weight(w)
    amax_x = float(np.abs(x.astype(F32)).max()) or 1.0
    s_in = F32(amax_x / 448 * draw(st.sampled_from([0.25, 1.0, 3.0])))     # 0.25: inputs saturate
    return x, q, ws, s_in


@given(case=linear_case(), dtype=st.sampled_from([np.float64, np.float32, ml_dtypes.bfloat16]))
def test_fp8_linear_w8a8(case, dtype):
    x, q, ws, s_in = case
    got = fp8.fp8_linear(x, q, ws, s_in, dtype=dtype)
    qa = [[fp8_per_tensor_byte(float(v), float(s_in), "reciprocal") for v in row] for row in x.astype(F32)]
    alpha = Fraction(float(F32(s_in * ws)))
    bits = {np.dtype(np.float64): 53, np.dtype(np.float32): 24, np.dtype(ml_dtypes.bfloat16): 8}[np.dtype(dtype)]
    for i, row in enumerate(qa):
        for j in range(q.shape[0]):
            acc = sum(Fraction(e4m3_value(a)) * Fraction(e4m3_value(int(b)))
                      for a, b in zip(row, q[j].view(np.uint8)))
            want = round_binary(alpha * acc, bits, emin=-1022, emax=1023) if bits == 53 else \
                round_binary(alpha * acc, bits)
            assert float(got[i, j]) == want


@given(case=linear_case())
def test_fp8_linear_w8a16(case):
    x, q, ws, _ = case
    wd = np.array([[e4m3_value(int(b)) for b in row] for row in q.view(np.uint8)]) * float(ws)
    want = x.astype(np.float64) @ wd.T
    assert np.array_equal(fp8.fp8_linear(x, q, ws), want)
    assert np.array_equal(fp8.fp8_linear(x, q, ws, dtype=np.float32), want.astype(F32))


def test_requantize_with_max_scale_steps():
    rng = np.random.default_rng(5)
    pieces = [(rng.standard_normal((3, 8)) * a).astype(F32) for a in (0.02, 0.05, 0.01)]
    qs = [fp8.quantize_fp8_weight(p) for p in pieces]
    w, top = fp8.requantize_with_max_scale([q for q, _ in qs], [s for _, s in qs])
    assert float(top) == max(float(s) for _, s in qs) and w.shape == (9, 8)
    rows = []
    for q, s in qs:
        s16 = float(np.float16(s))                                            # the 0-d scale in fp16
        for b in q.view(np.uint8).reshape(-1):
            dq = float(np.float16(e4m3_value(int(b)) * s16))                 # exact product, then fp16
            rows.append(fp8_per_tensor_byte(dq, float(top), "reciprocal"))
    assert _bytes(w) == rows
    biggest = int(np.argmax([float(s) for _, s in qs]))
    others = [i for i in range(3) if i != biggest]
    changed = [not np.array_equal(w[3 * i:3 * i + 3].view(np.uint8), qs[i][0].view(np.uint8)) for i in others]
    assert any(changed)                                                       # a real second rounding


BAD = {
    "rule": lambda: fp8.quantize_fp8(np.ones(2, F32), F32(1), "floor"),
    "scale zero": lambda: fp8.quantize_fp8(np.ones(2, F32), F32(0)),
    "scale shape": lambda: fp8.quantize_fp8(np.ones(2, F32), np.ones(2, F32)),
    "int input": lambda: fp8.quantize_fp8(np.ones(2, np.int32), F32(1)),
    "dequant dtype": lambda: fp8.dequantize_fp8(np.zeros(2, np.uint8), F32(1), np.float16),
    "weight dtype": lambda: fp8.fp8_linear(np.ones((1, 4), F32), np.ones((2, 4), F32), F32(1)),
    "K mismatch": lambda: fp8.fp8_linear(np.ones((1, 3), F32), np.zeros((2, 4), E4M3), F32(1)),
    "amax zero": lambda: fp8.quantize_fp8_weight(np.zeros((2, 4), F32)),
    "pieces": lambda: fp8.requantize_with_max_scale([np.zeros((2, 4), E4M3)], []),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_format_error(case):
    with pytest.raises(FormatError) as e:
        BAD[case]()
    assert "\n" not in str(e.value)
