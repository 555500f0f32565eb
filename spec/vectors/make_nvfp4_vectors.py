"""Write spec/vectors/nvfp4.json: NVFP4 conformance vectors computed by ref.nvfp4.

python spec/vectors/make_nvfp4_vectors.py [--out PATH]   (default: next to this script)
Schema: spec/nvfp4.md, section 0. tests/test_nvfp4_vectors.py checks the file equals build().
Entries after "swizzle" (FP8, KV cache, compressed-tensors) were appended later; the earlier ones
are unchanged byte for byte.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ref import fp8, kvcache, nvfp4  # noqa: E402

F32 = np.float32
BF16 = ml_dtypes.bfloat16


def f32_bits(a):
    """float32 values -> list of "0x%08x" bit strings (any shape, flattened row-major)."""
    return [f"0x{int(b):08x}" for b in np.asarray(a, F32).reshape(-1).view(np.uint32)]


def bf16_bits(a):
    return [f"0x{int(b):04x}" for b in np.asarray(a, BF16).reshape(-1).view(np.uint16)]


def f64_bits(a):
    return [f"0x{int(b):016x}" for b in np.asarray(a, np.float64).reshape(-1).view(np.uint64)]


def ints(a):
    return [int(v) for v in np.asarray(a).reshape(-1).view(np.uint8)]


class _Values:
    """Deterministic test values independent of NumPy's random streams: a 64-bit multiplicative
    hash of a counter, 24 bits of it scaled to [-3, 3) exactly (dyadic rationals)."""

    def __init__(self, seed):
        with np.errstate(over="ignore"):
            self.next = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)

    def __call__(self, shape):
        n = int(np.prod(shape))
        with np.errstate(over="ignore"):
            i = np.arange(n, dtype=np.uint64) + self.next
            self.next = self.next + np.uint64(n)
            h = (i * np.uint64(0xD1B54A32D192ED03)) ^ (i >> np.uint64(29))
            h = h * np.uint64(0x94D049BB133111EB)
        u = (h >> np.uint64(40)).astype(np.float64)                     # 0 .. 2^24 - 1
        return ((u - 2.0 ** 23) * (3 * 2.0 ** -23)).reshape(shape)


def e2m1_encode_inputs():
    """All code values, every midpoint and its float32 neighbours, saturation, specials."""
    xs = [float(v) for v in nvfp4.E2M1_VALUES]
    for t in nvfp4.TIES_DOWN + nvfp4.TIES_UP + (6.0,):
        xs += [t, float(np.nextafter(F32(t), F32(0))), float(np.nextafter(F32(t), F32(9)))]
    xs += [7.0, 1e30, float(np.finfo(F32).max), 2.0 ** -149, 0.1]
    vals = np.array(xs + [-x for x in xs], F32)
    specials = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001],
                        np.uint32).view(F32)
    return np.concatenate([vals, specials])


def e4m3_encode_inputs():
    """All finite E4M3 values, every midpoint between neighbours, overflow and specials."""
    vals = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    mids = (vals[:-1] + vals[1:]) / 2                         # exact in float32 (<= 5 bits)
    extra = [2.0 ** -11, 2.0 ** -10 + 2.0 ** -30, 449.0, 464.0, 465.0, 480.0, 1e6,
             float(np.finfo(F32).max)]
    x = np.concatenate([vals, mids, extra]).astype(F32)
    specials = np.array([0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000], np.uint32).view(F32)
    return np.concatenate([x, -x[1:], specials])


def weight_cases():
    rng = _Values(20261128)
    grid = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5,
                     -3.5, -5, -6], np.float32)
    under = np.zeros((1, 32), np.float32)
    under[0, :16] = rng(16)
    under[0, 16:] = rng(16) * 1e-9
    zero = np.zeros((1, 32), np.float32)
    zero[0, 16:] = rng(16)
    special = rng((1, 16)).astype(np.float32)
    special[0, 1:4] = [-0.0, -1e-9, 0.0]
    cases = [
        ("random bf16 [2, 32]", rng((2, 32)).astype(BF16), None),
        ("random float32 [1, 32]", (rng((1, 32)) * 1e-3).astype(F32), None),
        ("zero block -> scale 1.0", zero.astype(BF16), None),
        ("underflowing block", under.astype(BF16), None),
        ("every tie at scale 128, global 2^-10", (grid * 0.125).reshape(1, 16).astype(BF16),
         F32(2.625)),
        ("tied global (gate/up): global_scale above own amax", special.astype(BF16), F32(9.5)),
        ("-0.0 and tiny negatives", special.astype(BF16), None),
    ]
    out = []
    for name, w, gs in cases:
        for recipe in nvfp4.RECIPES:
            packed, scale, scale_2 = nvfp4.quantize_weight(w, recipe=recipe, global_scale=gs)
            dq = nvfp4.dequantize(packed, scale, scale_2)
            entry = {"name": name, "recipe": recipe, "shape": list(w.shape)}
            if w.dtype == BF16:
                entry["input_bf16"] = bf16_bits(w)
            else:
                entry["input_f32"] = f32_bits(w)
            entry.update({"global_scale_f32": None if gs is None else f32_bits(gs)[0],
                          "packed": ints(packed), "weight_scale": ints(scale),
                          "weight_scale_2_f32": f32_bits(scale_2)[0],
                          "dequantized_f32": f32_bits(dq)})
            out.append(entry)
    return out


def activation_cases():
    rng = _Values(7)
    rand = rng((2, 32))
    amax = float(np.abs(rand).max())
    zero = np.concatenate([np.zeros(16), rng(16)]).reshape(1, 32)
    zero[0, 3] = -0.0
    ties = (np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5] * 2, np.float64)
            * np.repeat([1, -1], 8)).reshape(1, 16)
    special = rng((1, 32))
    special[0, [0, 5, 17, 20]] = [np.nan, -0.0, np.inf, -1.0]
    cases = [
        ("random, calibrated scale", rand, amax / 2688, "cuda"),
        ("zero block and -0.0 (cuda keeps the sign)", zero, 1 / 2688, "cuda"),
        ("zero block and -0.0 (modelopt drops it)", zero, 1 / 2688, "modelopt"),
        ("saturating block scale (448)", rand * 100, amax / 2688, "cuda"),
        ("underflowing block scale (0)", rand * 1e-6, amax / 2688, "cuda"),
        ("every tie: power-of-two scales", ties, 2.0 ** -8, "cuda"),
        ("NaN and inf inputs", special, 1 / 2688, "cuda"),
    ]
    out = []
    for name, x, s_in, sign in cases:
        xb = np.asarray(x).astype(BF16)
        s_in = F32(s_in)
        packed, scales = nvfp4.quantize_activation(xb, s_in, sign=sign)
        out.append({"name": name, "shape": list(xb.shape), "sign": sign,
                    "input_bf16": bf16_bits(xb), "input_scale_f32": f32_bits(s_in)[0],
                    "packed": ints(packed), "scales": ints(scales)})
    return out


def matmul_case():
    rng = _Values(11)
    x = rng((2, 32)).astype(BF16)
    w = rng((3, 32)).astype(BF16)
    packed, scale, scale_2 = nvfp4.quantize_weight(w)
    s_in = F32(float(np.abs(x.astype(F32)).max()) / 2688)
    w4a4 = nvfp4.nvfp4_matmul(x, packed, scale, scale_2, input_scale=s_in)
    w4a16 = nvfp4.nvfp4_matmul(x, packed, scale, scale_2)
    w4a4_bf16 = nvfp4.nvfp4_matmul(x, packed, scale, scale_2, input_scale=s_in, dtype=BF16)
    return {"x_shape": [2, 32], "x_bf16": bf16_bits(x), "weight_shape": [3, 32],
            "packed": ints(packed), "weight_scale": ints(scale),
            "weight_scale_2_f32": f32_bits(scale_2)[0], "input_scale_f32": f32_bits(s_in)[0],
            "w4a4_f64": f64_bits(w4a4), "w4a4_bf16": bf16_bits(w4a4_bf16),
            "w4a16_f64": f64_bits(w4a16)}


def swizzle_case():
    """Byte offset of every (row, scale column) of a 130 x 6 scale matrix in the 128x4 layout."""
    rows, cols = 130, 6
    ids = np.arange(1, rows * cols + 1).reshape(rows, cols)             # unique, 0 = padding
    lo = nvfp4.swizzle_scales((ids & 0xFF).astype(np.uint8)).reshape(-1).astype(np.int64)
    hi = nvfp4.swizzle_scales((ids >> 8).astype(np.uint8)).reshape(-1).astype(np.int64)
    where = np.zeros(rows * cols + 1, np.int64)
    where[lo | (hi << 8)] = np.arange(lo.size)
    return {"rows": rows, "cols": cols,
            "padded_shape": list(nvfp4.swizzle_scales(ids.astype(np.uint8)).shape),
            "offsets": where[1:].reshape(rows, cols).tolist()}


def fp8_cases():
    """Per-tensor FP8 under each rule (spec/nvfp4.md section 10): the E4M3 grid and its midpoints
    times the scale, random values, saturation, NaN, a scale that rounds in bf16."""
    rng = _Values(8)
    grid = np.arange(0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    mids = (grid[:-1] + grid[1:]) / 2
    specials = np.array([449, 464, 466, 480, 1e30, -0.0], np.float64)
    cases = [
        ("grid and midpoints, power-of-two scale", np.concatenate([grid, mids, -grid[1:]]) * 0.25, 0.25),
        ("random, calibrated scale", rng(64) * 40, 120 / 448),
        ("saturation and the torch NaN threshold", specials, 1.0),
        ("scale that bf16 rounds (1 + 2^-9)", rng(32) * 100, 1 + 2 ** -9),
    ]
    out = []
    for name, x, scale in cases:
        x32, s32 = np.asarray(x).astype(F32), F32(scale)
        for rule in fp8.FP8_RULES:
            out.append({"name": name, "rule": rule, "input_f32": f32_bits(x32), "scale_f32": f32_bits(s32)[0],
                        "bytes": ints(fp8.quantize_fp8(x32, s32, rule))})
    return out


def fp8_linear_case():
    rng = _Values(13)
    x = (rng((2, 48)) * 4).astype(BF16)
    w = (rng((3, 48)) * 0.05).astype(BF16)
    q, ws = fp8.quantize_fp8_weight(w)
    s_in = F32(float(np.abs(x.astype(F32)).max()) / 448 * 0.5)        # half: some inputs saturate
    return {"x_shape": [2, 48], "x_bf16": bf16_bits(x), "weight_shape": [3, 48], "weight_bf16": bf16_bits(w),
            "weight_e4m3": ints(q), "weight_scale_f32": f32_bits(ws)[0], "input_scale_f32": f32_bits(s_in)[0],
            "w8a8_f64": f64_bits(fp8.fp8_linear(x, q, ws, s_in)), "w8a16_f64": f64_bits(fp8.fp8_linear(x, q, ws)),
            "w8a8_bf16": bf16_bits(fp8.fp8_linear(x, q, ws, s_in, dtype=BF16))}


def requantize_case():
    rng = _Values(17)
    pieces = [(rng((2, 16)) * a).astype(F32) for a in (0.02, 0.05, 0.01)]
    qs = [fp8.quantize_fp8_weight(p) for p in pieces]
    w, top = fp8.requantize_with_max_scale([q for q, _ in qs], [s for _, s in qs])
    return {"pieces_e4m3": [ints(q) for q, _ in qs], "piece_shape": [2, 16],
            "scales_f32": [f32_bits(s)[0] for _, s in qs], "weight_e4m3": ints(w), "scale_f32": f32_bits(top)[0]}


def kv_nvfp4_case():
    """vLLM's NVFP4 KV store of a [T=2, H=2, D=32] key and what attention reads back."""
    rng = _Values(19)
    k = (rng((2, 2, 32)) * 3).astype(BF16)
    scale = F32(0.0625)
    packed, blocks = kvcache.quantize_kv_nvfp4(k, scale)
    return {"shape": [2, 2, 32], "input_bf16": bf16_bits(k), "scale_f32": f32_bits(scale)[0], "packed": ints(packed),
            "block_scales": ints(blocks), "read_f64": f64_bits(kvcache.dequantize_kv_nvfp4(packed, blocks, scale))}


def ct_weight_case():
    """A compressed-tensors NVFP4 weight and its vLLM decode through fp32(1 / weight_global_scale)."""
    rng = _Values(23)
    w = (rng((2, 32)) * 0.05).astype(BF16)
    packed, scale, g = nvfp4.quantize_weight_ct(w)
    inv = nvfp4.invert_global_scale(g)
    return {"shape": [2, 32], "input_bf16": bf16_bits(w), "packed": ints(packed), "weight_scale": ints(scale),
            "weight_global_scale_f32": f32_bits(g)[0], "weight_scale_2_f32": f32_bits(inv)[0],
            "dequantized_f32": f32_bits(nvfp4.dequantize(packed, scale, inv))}


def build():
    e2 = e2m1_encode_inputs()
    e4 = e4m3_encode_inputs()
    return {
        "schema": "nvfp4-vectors/1 (spec/nvfp4.md, section 0)",
        "e2m1_values": [{"code": c, "value_f32": f32_bits(v)[0]}
                        for c, v in enumerate(nvfp4.decode_e2m1(np.arange(16, dtype=np.uint8)))],
        "e2m1_encode": [{"input_f32": b, "modelopt": int(m), "cuda": int(c)} for b, m, c in
                        zip(f32_bits(e2), nvfp4.encode_e2m1(e2, "modelopt"),
                            nvfp4.encode_e2m1(e2, "cuda"))],
        "e4m3_values": [{"byte": b, "value_f32": f32_bits(v)[0]} for b, v in
                        enumerate(nvfp4.decode_e4m3(np.arange(256, dtype=np.uint8)))],
        "e4m3_encode": [{"input_f32": b, "byte": v} for b, v in
                        zip(f32_bits(e4), ints(nvfp4.encode_e4m3(e4)))],
        "weight_blocks": weight_cases(),
        "activation_blocks": activation_cases(),
        "matmul": [matmul_case()],
        "swizzle": [swizzle_case()],
        "fp8_per_tensor": fp8_cases(),
        "fp8_linear": [fp8_linear_case()],
        "fp8_requantize_max_scale": [requantize_case()],
        "kv_nvfp4": [kv_nvfp4_case()],
        "ct_weight": [ct_weight_case()],
    }


def dumps(obj):
    """JSON with one list entry per line (diff-friendly, still plain JSON)."""
    parts = []
    for key, val in obj.items():
        if isinstance(val, list):
            body = ",\n".join("  " + json.dumps(e, separators=(", ", ": ")) for e in val)
            parts.append(f"{json.dumps(key)}: [\n{body}\n]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(val)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("nvfp4.json")))
    args = ap.parse_args()
    text = dumps(build())
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(text)} bytes)")


if __name__ == "__main__":
    main()
