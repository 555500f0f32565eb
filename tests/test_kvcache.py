"""ref.kvcache: FP8 and NVFP4 KV-cache stores bit-exact against exact oracles, exact reads, round
trips on representable values, the DeltaNet state rounding, and the new mode fields."""
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ref import kvcache, nvfp4
from ref.errors import FormatError
from ref.modes import Modes
from nvfp4_oracle import e2m1_value, e4m3_value, engine_activation, fp8_per_tensor_byte, round_binary

F32, BF16 = np.float32, ml_dtypes.bfloat16
kv_scales = st.floats(2.0 ** -12, 2.0 ** 6, width=32)


@st.composite
def kv(draw, d=32):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    t, h = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    return (rng.standard_normal((t, h, d)) * 2.0 ** draw(st.integers(-6, 6))).astype(BF16)


@given(x=kv(), scale=kv_scales, engine=st.sampled_from(["vllm", "sglang"]))
def test_fp8_store_and_read(x, scale, engine):
    s = F32(scale)
    stored = kvcache.quantize_kv_fp8(x, s, engine)
    assert stored.shape == x.shape and stored.dtype == ml_dtypes.float8_e4m3fn
    rule = {"vllm": "divide", "sglang": "sglang"}[engine]
    want = [fp8_per_tensor_byte(float(v), float(s), rule) for v in x.astype(F32).reshape(-1)]
    got = stored.view(np.uint8).reshape(-1).tolist()
    ok = [(w & 0x7F) != 0x7F for w in want]
    assert [g for g, o in zip(got, ok) if o] == [w for w, o in zip(want, ok) if o]
    read = kvcache.dequantize_kv_fp8(stored, s)
    assert all(Fraction(float(r)) == Fraction(e4m3_value(b)) * Fraction(float(s))
               for r, b, o in zip(read.reshape(-1), got, ok) if o)


@given(x=kv(), scale=kv_scales)
def test_nvfp4_store_is_the_engine_quantizer_per_head_row(x, scale):
    s = F32(scale)
    packed, blocks = kvcache.quantize_kv_nvfp4(x, s)
    assert packed.shape == x.shape[:-1] + (16,) and blocks.shape == x.shape[:-1] + (2,)
    codes, sbytes = engine_activation(x.astype(F32).reshape(-1, 32), float(s), "cuda")
    assert np.array_equal(nvfp4.unpack_e2m1(packed).reshape(-1, 32), codes)
    assert np.array_equal(blocks.view(np.uint8).reshape(-1, 2), sbytes)
    read = kvcache.dequantize_kv_nvfp4(packed, blocks, s).reshape(-1, 32)
    for r in range(codes.shape[0]):
        for j in range(32):
            exact = Fraction(e2m1_value(int(codes[r, j]))) * Fraction(e4m3_value(int(sbytes[r, j // 16]))) \
                * Fraction(float(s))
            assert Fraction(float(read[r, j])) == exact
    r32 = kvcache.dequantize_kv_nvfp4(packed, blocks, s, np.float32).reshape(-1)
    assert [float(v) for v in r32] == [round_binary(Fraction(float(v)), 24) for v in read.reshape(-1)]


@given(seed=st.integers(0, 2 ** 32 - 1), k=st.integers(-8, 4))
def test_round_trips_on_representable_values(seed, k):
    rng = np.random.default_rng(seed)
    scale = F32(2.0 ** k)                                   # power of two: every step is exact
    e4 = rng.integers(0, 0x7F, (2, 2, 32)).astype(np.uint8).view(ml_dtypes.float8_e4m3fn)
    x8 = e4.astype(np.float64) * float(scale)
    assert np.array_equal(kvcache.kv_read(x8.astype(F32), scale, "fp8_e4m3"), x8)
    # NVFP4: E2M1 codes under one block scale whose largest element is 6 (so the scale is recovered)
    codes = rng.integers(0, 16, (2, 2, 32)).astype(np.uint8)
    codes[..., 0] = codes[..., 16] = 7
    s8 = (2.0 ** rng.integers(-3, 4, (2, 2, 2))).repeat(16, axis=-1)
    x4 = np.vectorize(e2m1_value)(codes) * s8 * float(scale)
    assert np.array_equal(kvcache.kv_read(x4.astype(F32), scale, "nvfp4"), x4)


def test_auto_and_rejections():
    x = np.arange(32, dtype=F32).reshape(1, 1, 32)
    assert np.array_equal(kvcache.kv_read(x, F32(2), "auto"), x.astype(np.float64))
    with pytest.raises(FormatError, match="vLLM"):
        kvcache.kv_read(x, F32(1), "nvfp4", engine="sglang")
    with pytest.raises(FormatError, match="kv_cache_dtype"):
        kvcache.kv_read(x, F32(1), "int8")
    with pytest.raises(FormatError, match="engine"):
        kvcache.quantize_kv_fp8(x, F32(1), "trtllm")
    with pytest.raises(FormatError, match="multiple of 16"):
        kvcache.quantize_kv_nvfp4(np.ones((1, 8), F32), F32(1))


@given(v=st.floats(allow_nan=False, min_value=-1e38, max_value=1e38), as32=st.booleans())
def test_state_storage_rounding(v, as32):
    a = np.array([v], F32 if as32 else np.float64)
    bf = kvcache.store_state(a, "bfloat16")
    assert bf.dtype == a.dtype
    assert float(bf[0]) == round_binary(Fraction(float(a[0])), 8)        # one rounding to bf16
    f32 = kvcache.store_state(a, "float32")
    assert f32.dtype == a.dtype and float(f32[0]) == float(np.float32(a[0]))


def test_state_specials_and_bad_dtype():
    a = np.array([np.nan, np.inf, -np.inf, -0.0], np.float64)
    out = kvcache.store_state(a, "bfloat16")
    assert np.isnan(out[0]) and out[1] == np.inf and out[2] == -np.inf and np.signbit(out[3])
    with pytest.raises(FormatError, match="state_dtype"):
        kvcache.store_state(a, "float16")


def test_mode_fields():
    m = Modes(kv_cache_dtype="nvfp4", state_dtype="bfloat16")
    assert m.describe() == "f64 w4a16 kv nvfp4 (vllm, cache) state bfloat16"
    assert Modes().describe() == "f64 w4a16"
    for bad in ({"kv_cache_dtype": "fp8"}, {"state_dtype": "float16"}, {"kv_engine": "trtllm"},
                {"kv_prefill": "both"}, {"kv_cache_dtype": "nvfp4", "kv_engine": "sglang"}):
        with pytest.raises(ValueError):
            Modes(**bad)
