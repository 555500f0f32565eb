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


def test_existing_vectors_unchanged_by_appended_keys(vec):
    assert list(vec)[:10] == ["schema", "e2m1_values", "e2m1_encode", "e4m3_values", "e4m3_encode", "weight_blocks",
                              "activation_blocks", "matmul", "swizzle", "fp8_per_tensor"]


def test_fp8_per_tensor(vec):
    from ref import fp8
    from nvfp4_oracle import fp8_per_tensor_byte
    for e in vec["fp8_per_tensor"]:
        x, s = f32(e["input_f32"]), f32([e["scale_f32"]])[0]
        assert fp8.quantize_fp8(x, s, e["rule"]).view(np.uint8).tolist() == e["bytes"], e["name"]
        want = [fp8_per_tensor_byte(float(v), float(s), e["rule"]) for v in x]
        nan = [(b & 0x7F) == 0x7F for b in e["bytes"]]
        assert nan == [(b & 0x7F) == 0x7F for b in want], e["name"]
        assert [b for b, n in zip(e["bytes"], nan) if not n] == [b for b, n in zip(want, nan) if not n], e["name"]


def test_fp8_linear(vec):
    from ref import fp8
    (e,) = vec["fp8_linear"]
    x = _bits(e["x_bf16"], BF16, np.uint16).reshape(e["x_shape"])
    q = u8(e["weight_e4m3"], ml_dtypes.float8_e4m3fn).reshape(e["weight_shape"])
    ws, s_in = f32([e["weight_scale_f32"], e["input_scale_f32"]])
    w = _bits(e["weight_bf16"], BF16, np.uint16).reshape(e["weight_shape"])
    q2, ws2 = fp8.quantize_fp8_weight(w)
    assert q2.view(np.uint8).reshape(-1).tolist() == e["weight_e4m3"] and ws2 == ws
    assert fp8.fp8_linear(x, q, ws, s_in).reshape(-1).tolist() == _bits(e["w8a8_f64"], np.float64, np.uint64).tolist()
    assert fp8.fp8_linear(x, q, ws).reshape(-1).tolist() == _bits(e["w8a16_f64"], np.float64, np.uint64).tolist()
    bf = fp8.fp8_linear(x, q, ws, s_in, dtype=BF16)
    assert bf.view(np.uint16).reshape(-1).tolist() == [int(b, 16) for b in e["w8a8_bf16"]]


def test_fp8_requantize_max_scale(vec):
    from ref import fp8
    (e,) = vec["fp8_requantize_max_scale"]
    pieces = [u8(p, ml_dtypes.float8_e4m3fn).reshape(e["piece_shape"]) for p in e["pieces_e4m3"]]
    w, top = fp8.requantize_with_max_scale(pieces, list(f32(e["scales_f32"])))
    assert w.view(np.uint8).reshape(-1).tolist() == e["weight_e4m3"] and top == f32([e["scale_f32"]])[0]


def test_kv_nvfp4(vec):
    from ref import kvcache
    (e,) = vec["kv_nvfp4"]
    k = _bits(e["input_bf16"], BF16, np.uint16).reshape(e["shape"])
    s = f32([e["scale_f32"]])[0]
    packed, blocks = kvcache.quantize_kv_nvfp4(k, s)
    assert packed.reshape(-1).tolist() == e["packed"]
    assert blocks.view(np.uint8).reshape(-1).tolist() == e["block_scales"]
    codes, sbytes = engine_activation(k.astype(F32).reshape(-1, e["shape"][-1]), float(s), "cuda")
    assert nvfp4.pack_e2m1(codes).reshape(-1).tolist() == e["packed"]
    assert sbytes.reshape(-1).tolist() == e["block_scales"]
    read = kvcache.dequantize_kv_nvfp4(packed, blocks, s)
    assert read.reshape(-1).tolist() == _bits(e["read_f64"], np.float64, np.uint64).tolist()


def test_ct_weight(vec):
    from nvfp4_oracle import ct_weight
    (e,) = vec["ct_weight"]
    w = _bits(e["input_bf16"], BF16, np.uint16).reshape(e["shape"])
    packed, scale, g = nvfp4.quantize_weight_ct(w)
    assert packed.reshape(-1).tolist() == e["packed"] and scale.view(np.uint8).reshape(-1).tolist() == e["weight_scale"]
    assert f32_hex(g[0]) == e["weight_global_scale_f32"]
    assert f32_hex(nvfp4.invert_global_scale(g)) == e["weight_scale_2_f32"]
    codes, sbytes, g_want = ct_weight(w.astype(F32))
    assert nvfp4.pack_e2m1(codes).reshape(-1).tolist() == e["packed"]
    assert f32_hex(g_want) == e["weight_global_scale_f32"]
    dq = nvfp4.dequantize(packed, scale, f32([e["weight_scale_2_f32"]])[0])
    assert np.array_equal(dq.reshape(-1).view(np.uint32), f32(e["dequantized_f32"]).view(np.uint32))


def f32_hex(v):
    return f"0x{int(np.asarray(v, F32).view(np.uint32)):08x}"
