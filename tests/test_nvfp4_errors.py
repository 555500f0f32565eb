"""Bad input raises FormatError (a ValueError) naming what was expected and what was found."""
import ml_dtypes
import numpy as np
import pytest

from ref import nvfp4
from ref.errors import FormatError

F32 = np.float32
W = np.ones((2, 32), np.float32)
P, S, G = nvfp4.quantize_weight(W)

BAD = {
    "encode int": lambda: nvfp4.encode_e2m1(np.arange(4)),
    "encode complex": lambda: nvfp4.encode_e2m1(np.ones(4, np.complex64)),
    "encode bool": lambda: nvfp4.encode_e2m1(np.ones(4, bool)),
    "encode sign rule": lambda: nvfp4.encode_e2m1(np.ones(4, F32), sign="torch"),
    "decode code 16": lambda: nvfp4.decode_e2m1(np.array([16])),
    "decode float codes": lambda: nvfp4.decode_e2m1(np.ones(2, F32)),
    "pack odd": lambda: nvfp4.pack_e2m1(np.zeros(3, np.uint8)),
    "pack 0-d": lambda: nvfp4.pack_e2m1(np.uint8(3)),
    "unpack int32": lambda: nvfp4.unpack_e2m1(np.zeros(4, np.int32)),
    "e4m3 int": lambda: nvfp4.encode_e4m3(np.arange(3)),
    "e4m3 decode f32": lambda: nvfp4.decode_e4m3(np.ones(3, F32)),
    "bf16 int": lambda: nvfp4.round_to_bf16(np.arange(3)),
    "weight K=24": lambda: nvfp4.quantize_weight(np.ones((2, 24), F32)),
    "weight 0-d": lambda: nvfp4.quantize_weight(np.float32(1)),
    "weight K=0": lambda: nvfp4.quantize_weight(np.ones((2, 0), F32)),
    "weight int": lambda: nvfp4.quantize_weight(np.ones((2, 16), np.int8)),
    "weight complex": lambda: nvfp4.quantize_weight(np.ones((2, 16), np.complex128)),
    "weight recipe": lambda: nvfp4.quantize_weight(W, recipe="modelopt-0.40"),
    "weight global 0": lambda: nvfp4.quantize_weight(W, global_scale=0.0),
    "weight global array": lambda: nvfp4.quantize_weight(W, global_scale=np.ones(2, F32)),
    "dequant odd width": lambda: nvfp4.dequantize(np.zeros((2, 15), np.uint8), S, G),
    "dequant K=0": lambda: nvfp4.dequantize(np.zeros((2, 0), np.uint8), np.zeros((2, 0), np.uint8), G),
    "dequant packed dtype": lambda: nvfp4.dequantize(P.astype(np.int16), S, G),
    "dequant scale shape": lambda: nvfp4.dequantize(P, S[:, :1], G),
    "dequant scale rows": lambda: nvfp4.dequantize(P, S[:1], G),
    "dequant scale dtype": lambda: nvfp4.dequantize(P, S.astype(F32), G),
    "dequant global shape": lambda: nvfp4.dequantize(P, S, np.ones(1, F32)),
    "dequant global int": lambda: nvfp4.dequantize(P, S, np.array(1)),
    "dequant dtype": lambda: nvfp4.dequantize(P, S, G, dtype=np.float16),
    "act K=8": lambda: nvfp4.quantize_activation(np.ones((1, 8), F32), F32(1)),
    "act sign rule": lambda: nvfp4.quantize_activation(W, F32(1), sign="torch"),
    "act int": lambda: nvfp4.quantize_activation(np.ones((1, 16), np.int32), F32(1)),
    "act scale 0": lambda: nvfp4.quantize_activation(W, F32(0)),
    "act scale inf": lambda: nvfp4.quantize_activation(W, F32(np.inf)),
    "act scale nan": lambda: nvfp4.quantize_activation(W, F32(np.nan)),
    "act scale negative": lambda: nvfp4.quantize_activation(W, F32(-1)),
    "matmul K": lambda: nvfp4.nvfp4_matmul(np.ones((1, 16), F32), P, S, G),
    "matmul 3-d weight": lambda: nvfp4.nvfp4_matmul(W, P[None], S[None], G),
    "matmul dtype": lambda: nvfp4.nvfp4_matmul(W, P, S, G, dtype=np.float16),
    "swizzle 1-d": lambda: nvfp4.swizzle_scales(np.zeros(4, np.uint8)),
    "swizzle f32": lambda: nvfp4.swizzle_scales(np.zeros((4, 4), F32)),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_format_error(case):
    with pytest.raises(FormatError) as err:
        BAD[case]()
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "expected" in msg and "got" in msg and "\n" not in msg


def test_special_values_do_not_raise():
    x = np.array([[np.nan, np.inf, -np.inf, -0.0] * 4], F32)
    nvfp4.encode_e2m1(x), nvfp4.encode_e4m3(x), nvfp4.round_to_bf16(x)
    nvfp4.quantize_activation(x, F32(1))
    nvfp4.quantize_weight(x.astype(ml_dtypes.bfloat16))
    nvfp4.dequantize(P, S, G)
