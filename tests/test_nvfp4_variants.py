"""ref.nvfp4 for the other conventions: the quantization-direction global (G used as stored), the
compressed-tensors weight recipe, and vLLM's inversion of a compressed-tensors global."""
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ref import nvfp4
from nvfp4_oracle import ct_weight, engine_activation, round_binary

F32 = np.float32


@given(seed=st.integers(0, 2 ** 32 - 1), g=st.floats(2.0 ** -20, 2.0 ** 20, width=32),
       sign=st.sampled_from(nvfp4.SIGN_RULES))
def test_activation_with_stored_global(seed, g, sign):
    x = np.random.default_rng(seed).standard_normal((3, 32)).astype(ml_dtypes.bfloat16)
    packed, scales = nvfp4.quantize_activation(x, None, sign=sign, global_scale=F32(g))
    codes, sbytes = engine_activation(x.astype(F32), 1.0, sign, global_scale=F32(g))
    assert np.array_equal(nvfp4.unpack_e2m1(packed), codes) and np.array_equal(scales.view(np.uint8), sbytes)


def test_stored_global_is_not_the_inverse_of_its_inverse():
    # why global_scale exists: fp32(1 / fp32(1 / G)) != G for many float32 G, so a reader that
    # keeps only the inverted scale cannot always recover the G a dense compressed-tensors linear uses
    g = np.random.default_rng(2).uniform(1, 3000, 1000).astype(F32)
    back = np.array([F32(1) / nvfp4.invert_global_scale(v) for v in g])
    assert 0 < np.count_nonzero(back != g) < g.size


@given(seed=st.integers(0, 2 ** 32 - 1), rows=st.integers(1, 4), kb=st.integers(1, 3), tie=st.booleans())
def test_quantize_weight_ct_matches_scalar_oracle(seed, rows, kb, tie):
    w = (np.random.default_rng(seed).standard_normal((rows, 16 * kb)) * 0.05).astype(ml_dtypes.bfloat16)
    amax = F32(np.abs(w.astype(F32)).max() * 1.5) if tie else None
    packed, scale, g = nvfp4.quantize_weight_ct(w, amax)
    codes, sbytes, g_want = ct_weight(w.astype(F32), amax)
    assert g.shape == (1,) and g.dtype == F32 and g[0] == g_want
    assert np.array_equal(nvfp4.unpack_e2m1(packed), codes) and np.array_equal(scale.view(np.uint8), sbytes)


@given(g=st.floats(2.0 ** -60, 2.0 ** 60, width=32), shape=st.sampled_from([(), (1,)]))
def test_invert_global_scale_is_one_correct_rounding(g, shape):
    inv = nvfp4.invert_global_scale(np.full(shape, g, F32))
    assert inv.shape == () and inv.dtype == F32
    assert float(inv) == round_binary(1 / Fraction(float(F32(g))), 24)


def test_ct_weight_decodes_close_to_source_and_reads_through_inverse():
    w = np.random.default_rng(3).standard_normal((8, 64)).astype(F32) * 0.02
    packed, scale, g = nvfp4.quantize_weight_ct(w)
    dq = nvfp4.dequantize(packed, scale, nvfp4.invert_global_scale(g), dtype=np.float64)
    step = np.abs(w).max() / 6 / 448 * 2 ** 0          # coarse: each element within one E2M1 step
    assert np.all(np.abs(dq - w) <= np.abs(w).max() / 4 + step)
    assert float(np.abs(dq).max()) <= float(np.abs(w).max()) * 1.1


BAD = {
    "ct zero tensor": lambda: nvfp4.quantize_weight_ct(np.zeros((1, 16), F32)),
    "ct K": lambda: nvfp4.quantize_weight_ct(np.ones((1, 8), F32)),
    "invert zero": lambda: nvfp4.invert_global_scale(F32(0)),
    "invert two values": lambda: nvfp4.invert_global_scale(np.ones(2, F32)),
    "act global negative": lambda: nvfp4.quantize_activation(np.ones((1, 16), F32), None, global_scale=F32(-1)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case):
    with pytest.raises(nvfp4.FormatError):
        BAD[case]()
