"""FP8 E4M3 with one float32 scale per tensor: linears (W8A16 / W8A8) and the per-tensor quantizer
that the KV cache and the engines' static activation quantization share — bit-exact, in NumPy.

Normative text: spec/nvfp4.md, sections 10 and 11. The format constants live in ref.nvfp4.

A per-tensor FP8 linear [N, K] (ModelOpt, NVIDIA's "-V2" checkpoint):
  weight        float8_e4m3fn [N, K]
  weight_scale  float32 0-d     dequant direction: w = e4m3 * weight_scale
  input_scale   float32 0-d     static activation scale (W8A8), dequant direction
"""
import ml_dtypes
import numpy as np

from ref.errors import FormatError
from ref.nvfp4 import E4M3, E4M3_MAX, _float_array, _scalar_f32, round_scaled

__all__ = ["FP8_RULES", "TORCH_E4M3_NAN_ABOVE", "quantize_fp8", "dequantize_fp8", "quantize_fp8_weight",
           "fp8_linear", "requantize_with_max_scale"]

# How the value divided by the scale is formed before the E4M3 cast (spec/nvfp4.md section 10):
#   "divide"     fp32(x / scale), then saturating RNE cast: vLLM's KV-cache store
#                (scaled_vec_conversion) and ModelOpt's FP8 weight export
#   "reciprocal" fp32(x * fp32(1 / scale)), then saturating RNE cast: vLLM's static
#                scaled_fp8_quant (W8A8 inputs, FP8 queries)
#   "sglang"     bf16(fp32(x) / fp32(bf16(scale))), then torch's non-saturating cast: SGLang's KV
#                store (MHATokenToKVPool.set_kv_buffer: in-place bf16 div_ by the 0-d scale tensor)
FP8_RULES = ("divide", "reciprocal", "sglang")
TORCH_E4M3_NAN_ABOVE = 464.0  # the non-saturating cast: |y| above this (or inf) becomes NaN


def _check_rule(rule):
    if rule not in FP8_RULES:
        raise FormatError(f"rule: expected one of {FP8_RULES}, got {rule!r}")


def quantize_fp8(x, scale, rule="divide"):
    """x [...] (float16/bfloat16/float32/float64) -> float8_e4m3fn [...] with one per-tensor scale.

    "divide"/"reciprocal": y as the rule says (float64 input is rounded to float32 first), then
    e4m3 round to nearest even, saturating at +-448 (NaN stays NaN). "sglang": y rounded to
    bfloat16, then round to nearest even where |y| <= 464, NaN above (and for +-inf)."""
    _check_rule(rule)
    a = _float_array(x, "x")
    s = _scalar_f32(scale, "scale", positive=True)[()]
    x32 = a.astype(np.float32)                                           # float64: RNE to float32
    with np.errstate(over="ignore", invalid="ignore"):
        if rule == "divide":
            y = x32 / s
        elif rule == "reciprocal":
            y = x32 * (np.float32(1) / s)
        else:
            s16 = np.float32(s.astype(ml_dtypes.bfloat16))
            y = (x32 / s16).astype(ml_dtypes.bfloat16).astype(np.float32)
            return np.asarray(y.astype(E4M3)).reshape(a.shape)          # ml_dtypes: NaN above 464
        y = np.clip(y, np.float32(-E4M3_MAX), np.float32(E4M3_MAX))
    return np.asarray(y.astype(E4M3)).reshape(a.shape)


def dequantize_fp8(q, scale, dtype=np.float64):
    """e4m3 values [...] times a float32 scale: exact (float64, at most 28 significant bits) or
    rounded once to float32."""
    qa = np.asarray(q)
    if qa.dtype == np.uint8:
        qa = qa.view(E4M3)
    elif qa.dtype != np.dtype(E4M3):
        raise FormatError(f"q: expected float8_e4m3fn or uint8, got dtype {qa.dtype}")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise FormatError(f"dtype: expected float32 or float64, got {dtype}")
    s = _scalar_f32(scale, "scale")[()]
    exact = qa.astype(np.float64) * np.float64(s)
    return exact if dtype == np.float64 else exact.astype(np.float32)


def quantize_fp8_weight(w, amax=None):
    """ModelOpt's per-tensor FP8 export: w [..., K] -> (weight float8_e4m3fn, weight_scale float32 0-d).

    weight_scale = fp32(amax / 448) with amax = max|w| unless given (fused pieces share the max);
    weight = quantize_fp8(w, weight_scale, "divide"). amax must be positive and finite."""
    a = _float_array(w, "w")
    if amax is None:
        amax = np.float32(np.max(np.abs(a.astype(np.float32)))) if a.size else np.float32(0)
    m = _scalar_f32(amax, "amax")[()]
    if not (np.isfinite(m) and m > 0):
        raise FormatError(f"amax: expected a positive finite value, got {float(m)!r}")
    scale = np.asarray(np.float32(m / np.float32(E4M3_MAX)), dtype=np.float32)
    return quantize_fp8(a, scale, "divide"), scale


_OUT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))


def fp8_linear(x, weight, weight_scale, input_scale=None, dtype=np.float64):
    """x [..., K] @ W.T for a per-tensor FP8 weight W [N, K] -> [..., N] in dtype (float64,
    float32 or bfloat16), rounded once.

    W8A16 (input_scale None): out = dtype(x @ (e4m3 * weight_scale).T), weights dequantized exactly
      and the matmul in float64.
    W8A8 (input_scale given): a = quantize_fp8(x, input_scale, "reciprocal") (vLLM's static
      scaled_fp8_quant); acc = sum_k a * w over the e4m3 values, exact in float64;
      out = dtype(fp32(input_scale * weight_scale) * acc), rounded once.
    """
    dtype = np.dtype(dtype)
    if dtype not in _OUT_DTYPES:
        raise FormatError(f"dtype: expected float64, float32 or bfloat16, got {dtype}")
    w = np.asarray(weight)
    if w.dtype != np.dtype(E4M3) or w.ndim != 2:
        raise FormatError(f"weight: expected a 2-D float8_e4m3fn array [N, K], got {w.dtype} {w.shape}")
    a = _float_array(x, "x")
    if a.ndim < 1 or a.shape[-1] != w.shape[1]:
        raise FormatError(f"x: expected last dimension K = {w.shape[1]} (weight {w.shape}), got shape {a.shape}")
    ws = _scalar_f32(weight_scale, "weight_scale", positive=True)[()]
    if input_scale is None:
        wd = dequantize_fp8(w, ws)                                               # [N, K] exact
        return round_scaled(a.astype(np.float64) @ wd.T, np.float32(1), dtype)
    s_in = _scalar_f32(input_scale, "input_scale", positive=True)[()]
    qa = quantize_fp8(a, s_in, "reciprocal").astype(np.float64)                  # [..., K]
    acc = qa @ w.astype(np.float64).T                                            # [..., N] exact
    return round_scaled(acc, np.float32(s_in * ws), dtype)


def requantize_with_max_scale(weights, scales):
    """vLLM's requantize_with_max_scale for pieces an engine fuses into one GEMM (q/k/v, gate/up):
    pieces [N_i, K] e4m3 with their own scales -> (weight [sum N_i, K] e4m3, max scale float32 0-d).

    Each piece is dequantized as per_tensor_dequantize does on the GPU (e4m3 to float16, the 0-d
    float32 scale cast to float16, the product rounded to float16), then requantized with the
    largest scale by quantize_fp8(..., "reciprocal") (static scaled_fp8_quant): a second rounding
    for every piece whose scale is not the largest (and a float16 one even for that piece)."""
    ws = [np.asarray(w) for w in weights]
    ss = [_scalar_f32(s, "scale", positive=True)[()] for s in scales]
    if not ws or len(ws) != len(ss):
        raise FormatError(f"weights/scales: expected equally many pieces (at least one), got "
                          f"{len(ws)} and {len(ss)}")
    if any(w.dtype != np.dtype(E4M3) or w.ndim != 2 or w.shape[1] != ws[0].shape[1] for w in ws):
        raise FormatError(f"weights: expected 2-D float8_e4m3fn pieces with one K, got "
                          f"{[(str(w.dtype), w.shape) for w in ws]}")
    top = np.float32(max(ss))
    out = []
    for w, s in zip(ws, ss):
        s16 = np.float16(s).astype(np.float32)                                   # 0-d scale -> fp16
        wdq = (w.astype(np.float32) * s16).astype(np.float16)                    # exact product -> fp16
        out.append(quantize_fp8(wdq, top, "reciprocal"))
    return np.concatenate(out), np.asarray(top, dtype=np.float32)
