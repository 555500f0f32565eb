"""spec/vectors/nvfp4.json: regenerates identically, agrees with ref.nvfp4 and the exact oracles."""
import importlib.util
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ref import nvfp4
from nvfp4_oracle import e2m1_code, e4m3_byte, engine_activation, modelopt_weight

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "spec" / "vectors" / "nvfp4.json"
F32, BF16 = np.float32, ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def vec():
    return json.loads(VECTORS.read_text())


def _bits(strings, dtype, utype):
    return np.array([int(s, 16) for s in strings], utype).view(dtype)


def f32(strings):
    return _bits(strings, F32, np.uint32)


def u8(values, dtype=np.uint8):
    return np.array(values, np.uint8).view(dtype)


def test_file_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_nvfp4_vectors",
                                                  ROOT / "spec/vectors/make_nvfp4_vectors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert VECTORS.read_text() == gen.dumps(gen.build())


def test_e2m1_values(vec):
    codes = np.array([e["code"] for e in vec["e2m1_values"]], np.uint8)
    assert codes.tolist() == list(range(16))
    want = f32([e["value_f32"] for e in vec["e2m1_values"]])
    assert np.array_equal(nvfp4.decode_e2m1(codes).view(np.uint32), want.view(np.uint32))


def test_e2m1_encode(vec):
    x = f32([e["input_f32"] for e in vec["e2m1_encode"]])
    for rule in nvfp4.SIGN_RULES:
        want = [e[rule] for e in vec["e2m1_encode"]]
        assert nvfp4.encode_e2m1(x, rule).tolist() == want
        assert [e2m1_code(float(v), rule) for v in x] == want


def test_e4m3_values_and_encode(vec):
    got = nvfp4.decode_e4m3(np.array([e["byte"] for e in vec["e4m3_values"]], np.uint8))
    want = f32([e["value_f32"] for e in vec["e4m3_values"]])
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)].view(np.uint32), want[~np.isnan(want)].view(np.uint32))
    x = f32([e["input_f32"] for e in vec["e4m3_encode"]])
    want_b = [e["byte"] for e in vec["e4m3_encode"]]
    assert nvfp4.encode_e4m3(x).view(np.uint8).tolist() == want_b
    assert [e4m3_byte(float(v)) for v in x] == want_b


def test_weight_blocks(vec):
    for e in vec["weight_blocks"]:
        shape = tuple(e["shape"])
        w = (_bits(e["input_bf16"], BF16, np.uint16) if "input_bf16" in e
             else f32(e["input_f32"])).reshape(shape)
        gs = None if e["global_scale_f32"] is None else f32([e["global_scale_f32"]])[0]
        packed, scale, scale_2 = nvfp4.quantize_weight(w, recipe=e["recipe"], global_scale=gs)
        assert packed.reshape(-1).tolist() == e["packed"], e["name"]
        assert scale.view(np.uint8).reshape(-1).tolist() == e["weight_scale"], e["name"]
        assert f"0x{int(scale_2.view(np.uint32)):08x}" == e["weight_scale_2_f32"], e["name"]
        dq = nvfp4.dequantize(u8(e["packed"]).reshape(shape[0], -1),
                              u8(e["weight_scale"], ml_dtypes.float8_e4m3fn).reshape(shape[0], -1),
                              f32([e["weight_scale_2_f32"]])[0])
        assert np.array_equal(dq.reshape(-1).view(np.uint32), f32(e["dequantized_f32"]).view(np.uint32))
        codes, sbytes, _ = modelopt_weight(w.astype(F32), e["recipe"], gs)
        assert nvfp4.pack_e2m1(codes).reshape(-1).tolist() == e["packed"], e["name"]
        assert sbytes.reshape(-1).tolist() == e["weight_scale"], e["name"]


def test_activation_blocks(vec):
    for e in vec["activation_blocks"]:
        x = _bits(e["input_bf16"], BF16, np.uint16).reshape(e["shape"])
        packed, scales = nvfp4.quantize_activation(x, f32([e["input_scale_f32"]])[0], e["sign"])
        assert packed.reshape(-1).tolist() == e["packed"], e["name"]
        assert scales.view(np.uint8).reshape(-1).tolist() == e["scales"], e["name"]
        codes, sbytes = engine_activation(x.astype(F32), float(f32([e["input_scale_f32"]])[0]),
                                          e["sign"])
        assert nvfp4.pack_e2m1(codes).reshape(-1).tolist() == e["packed"], e["name"]
        assert sbytes.reshape(-1).tolist() == e["scales"], e["name"]


def test_matmul(vec):
    (e,) = vec["matmul"]
    x = _bits(e["x_bf16"], BF16, np.uint16).reshape(e["x_shape"])
    n, k = e["weight_shape"]
    packed = u8(e["packed"]).reshape(n, k // 2)
    scale = u8(e["weight_scale"], ml_dtypes.float8_e4m3fn).reshape(n, k // 16)
    g, s_in = f32([e["weight_scale_2_f32"], e["input_scale_f32"]])
    w4a4 = nvfp4.nvfp4_matmul(x, packed, scale, g, input_scale=s_in)
    assert w4a4.reshape(-1).tolist() == _bits(e["w4a4_f64"], np.float64, np.uint64).tolist()
    bf = nvfp4.nvfp4_matmul(x, packed, scale, g, input_scale=s_in, dtype=BF16)
    assert bf.view(np.uint16).reshape(-1).tolist() == [int(b, 16) for b in e["w4a4_bf16"]]
    w4a16 = nvfp4.nvfp4_matmul(x, packed, scale, g)
    assert w4a16.reshape(-1).tolist() == _bits(e["w4a16_f64"], np.float64, np.uint64).tolist()


def test_swizzle_offsets(vec):
    (e,) = vec["swizzle"]
    rows, cols = e["rows"], e["cols"]
    mp, kp = e["padded_shape"]
    assert (mp, kp) == (math.ceil(rows / 128) * 128, math.ceil(cols / 4) * 4)
    s = (np.arange(rows * cols) % 255 + 1).astype(np.uint8).reshape(rows, cols)
    flat = nvfp4.swizzle_scales(s).reshape(-1)
    for m in range(rows):
        for kb in range(cols):
            off = e["offsets"][m][kb]
            assert off == ((m // 128) * (kp // 4) * 512 + (kb // 4) * 512 + (m % 32) * 16
                           + ((m % 128) // 32) * 4 + kb % 4)
            assert flat[off] == s[m, kb]
