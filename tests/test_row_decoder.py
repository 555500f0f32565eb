"""ref.nvfp4.row_decoder (the reference's streamed NVFP4 rows) against exact rationals, for every
(scale byte, packed byte) pair: e2m1 (at most 2 significant bits) times the float32 block factor
(24 bits) needs at most 26 bits, so the float64 decode is the exact value and the float32 decode its
one correct rounding; and the product is what ref.weights multiplies."""
from fractions import Fraction

import numpy as np
import pytest

from nvfp4_oracle import e2m1_value, e4m3_value, round_binary
from ref import layers as L
from ref import nvfp4
from ref import weights as W
from ref.checkpoint import NVFP4Weight

F32 = np.float32
GLOBALS = (F32(0.0123), F32(2.0 ** -100), F32(3e35), F32(1))  # typical, factors subnormal, values past fp32


def exact_table(g: np.float32) -> list:
    """[scale byte][code] -> exact value as a Fraction (None for a NaN factor)."""
    out = []
    for s in range(256):
        sv = e4m3_value(s)
        if np.isnan(sv):
            out.append([None] * 16)
            continue
        factor = Fraction(round_binary(Fraction(sv) * Fraction(float(g)), 24))  # fp32(fp32(scale) * g)
        out.append([Fraction(e2m1_value(c)) * factor for c in range(16)])
    return out


def every_pair() -> tuple[np.ndarray, np.ndarray]:
    """packed [256, 256]: every byte in every row; scales [256, 32]: row r has scale byte r."""
    packed = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 32, axis=1)
    return packed, scales


@pytest.mark.parametrize("g", GLOBALS)
def test_row_decoder_is_exact_for_every_scale_and_packed_byte(g):
    packed, scales = every_pair()
    table = exact_table(g)
    exact64 = np.full((256, 16), np.nan)                       # [scale byte, code]
    exact32 = np.full((256, 16), np.nan, np.float32)
    for s in range(256):
        for c, v in enumerate(table[s]):
            if v is not None:
                exact64[s, c], exact32[s, c] = float(v), round_binary(v, 24)
                assert Fraction(exact64[s, c]) == v                 # the value needs <= 26 bits: exact
    codes = np.array([[b & 15, b >> 4] for b in range(256)]).reshape(512)  # element 2j: low nibble of byte j
    want64, want32 = exact64[:, codes], exact32[:, codes]      # [256, 512]
    for dtype, want in ((np.float64, want64), (np.float32, want32)):
        decode = nvfp4.row_decoder(packed, scales.view(nvfp4.E4M3), g, dtype=dtype)
        for lo, hi in ((0, 256), (0, 1), (37, 101), (255, 256)):            # row ranges, reused buffer
            buf = np.full((hi - lo, 512), 7.0, dtype)
            got = decode(slice(lo, hi), buf)
            assert got is buf and got.dtype == dtype
            np.testing.assert_array_equal(got, want[lo:hi])
        np.testing.assert_array_equal(nvfp4.dequantize(packed, scales, g, dtype=dtype), want)


def test_row_decoder_checks_its_arguments():
    packed, scales = every_pair()
    with pytest.raises(nvfp4.FormatError, match="2-D"):
        nvfp4.row_decoder(packed[None], scales[None], F32(1))
    with pytest.raises(nvfp4.FormatError, match="weight_scale"):
        nvfp4.row_decoder(packed, scales[:, :31], F32(1))
    with pytest.raises(nvfp4.FormatError, match="dtype"):
        nvfp4.row_decoder(packed, scales, F32(1), dtype=np.float16)
    decode = nvfp4.row_decoder(packed, scales, F32(1))
    with pytest.raises(nvfp4.FormatError, match="out: expected"):
        decode(slice(0, 2), np.empty((2, 512), np.float32))
    with pytest.raises(nvfp4.FormatError, match="out: expected"):
        decode(slice(0, 2), np.empty((3, 512)))


@pytest.mark.parametrize("m", [1, 3, 40])
def test_streamed_nvfp4_product_equals_the_exact_weights_product(monkeypatch, m):
    """x @ W.T through ref.weights (blocks of rows on two threads, short last block) against the
    product with the exactly decoded matrix (float64: the same products, up to summation order)."""
    monkeypatch.setenv("REF_NUM_THREADS", "2")
    monkeypatch.setattr(W, "ROW_BLOCK_BYTES", 8 * 512 * 7)    # 7 rows a block: 36 full blocks + 4 rows
    packed, scales = every_pair()
    keep = np.isfinite(nvfp4.decode_e4m3(scales[:, 0]))      # rows with a NaN scale byte dropped
    packed, scales = packed[keep], scales[keep]
    g = F32(0.0123)
    x = np.random.default_rng(2).standard_normal((m, 512))
    dense = nvfp4.dequantize(packed, scales, g, dtype=np.float64)
    got = L.linear(x, W.nvfp4_weight(NVFP4Weight(packed, scales.view(nvfp4.E4M3), g, None), L.F64))
    np.testing.assert_allclose(got, x @ dense.T, rtol=1e-13, atol=1e-13 * np.abs(x).sum(1).max() * np.abs(dense).max())
