"""The engines' CUDA activation quantizer (exact-reciprocal model) against a scalar-loop oracle."""
import ml_dtypes
import numpy as np
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from ref import nvfp4
from nvfp4_oracle import engine_activation

F32 = np.float32


@st.composite
def activations(draw):
    """bf16 [R, 16*kb] rows with per-block magnitudes, zero blocks, exact grid values, specials."""
    rows, kb = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    exps = draw(hnp.arrays(np.int32, (rows, kb), elements=st.integers(-30, 6)))
    kind = draw(hnp.arrays(np.int8, (rows, kb), elements=st.sampled_from([0, 0, 0, 1, 2, 3])))
    x = rng.standard_normal((rows, kb, 16))
    grid = rng.choice(nvfp4.E2M1_VALUES, (rows, kb, 16)) * rng.choice([0.25, 1, 1.75], (rows, kb, 1))
    x = np.where((kind == 2)[..., None], grid, x) * 2.0 ** exps[..., None]
    x[kind == 1] = 0
    special = rng.choice([np.nan, np.inf, -np.inf, -0.0], (rows, kb, 16))
    x = np.where((kind == 3)[..., None] & (rng.random((rows, kb, 16)) < 0.3), special, x)
    return x.reshape(rows, kb * 16).astype(ml_dtypes.bfloat16)


@given(x=activations(), sign=st.sampled_from(nvfp4.SIGN_RULES),
       input_scale=st.one_of(st.floats(min_value=2.0 ** -40, max_value=2.0 ** 10, width=32),
                             st.sampled_from([1.0, 2.0 ** -12, 1 / 2688])))
def test_quantize_activation_matches_engine_oracle(x, sign, input_scale):
    packed, scales = nvfp4.quantize_activation(x, F32(input_scale), sign=sign)
    codes, sbytes = engine_activation(x.astype(F32), input_scale, sign)
    assert packed.shape == (x.shape[0], x.shape[1] // 2) and packed.dtype == np.uint8
    assert scales.dtype == ml_dtypes.float8_e4m3fn and scales.shape == sbytes.shape
    assert np.array_equal(scales.view(np.uint8), sbytes)
    assert np.array_equal(nvfp4.unpack_e2m1(packed), codes)


def test_activation_zero_block_and_saturation():
    x = np.zeros((1, 32), np.float32)
    x[0, 1] = -0.0
    x[0, 16] = 1e4                      # SF = 1e4 / 6 / input_scale -> saturates at 448
    x[0, 17] = -1.0
    packed, scales = nvfp4.quantize_activation(x, F32(1.0))
    assert scales.view(np.uint8).tolist() == [[0x00, 0x7E]]
    assert nvfp4.unpack_e2m1(packed)[0, :2].tolist() == [0, 8]          # cuda keeps -0.0
    assert nvfp4.unpack_e2m1(packed)[0, 16:18].tolist() == [7, 8]       # 1e4/448 -> 6; -1/448 -> -0
    packed, _ = nvfp4.quantize_activation(x, F32(1.0), sign="modelopt")
    assert nvfp4.unpack_e2m1(packed)[0, :2].tolist() == [0, 0]


def test_activation_roundtrip_on_grid():
    # amax 6 * 448 * input_scale gives scale 448 exactly and reproduces grid values.
    s_in = F32(2.0 ** -10)
    vals = np.tile(nvfp4.E2M1_VALUES, 2) * F32(448) * s_in
    packed, scales = nvfp4.quantize_activation(vals.reshape(1, 32), s_in)
    assert np.all(scales.astype(np.float32) == 448)
    assert np.array_equal(nvfp4.dequantize(packed, scales, s_in)[0], vals)
