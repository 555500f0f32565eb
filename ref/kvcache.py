"""What the serving engines store in a KV cache and in a DeltaNet state, and what attention reads back.

Normative text: spec/nvfp4.md section 12. Only the full-attention layers have a KV cache; K is the
key after q/k-norm and RoPE, V the v_proj output, both [..., head_dim] with any leading shape
(tokens, kv heads). Scales come from Checkpoint.kv_scales (1.0 when the checkpoint has none).

  "auto"      stored as computed (the model dtype)
  "fp8_e4m3"  stored = e4m3(x / scale) per tensor (ref.fp8 rules "divide" = vLLM, "sglang" =
              SGLang); read = stored * scale
  "nvfp4"     vLLM: blocks of 16 along head_dim, E4M3 block scales, global G = fp32(1 / scale),
              i.e. exactly the engines' activation quantizer (ref.nvfp4.quantize_activation);
              read = e2m1 * block scale * scale

The DeltaNet recurrent state (SGLang --mamba-ssm-dtype) is rounded to its storage dtype each time
the engine writes it back (store_state).
"""
import numpy as np

from ref import fp8, nvfp4
from ref.errors import FormatError
from ref.modes import KV_CACHE_DTYPES, KV_ENGINES, STATE_DTYPES

__all__ = ["KV_CACHE_DTYPES", "KV_FP8_RULES", "STATE_DTYPES", "quantize_kv_fp8", "dequantize_kv_fp8",
           "quantize_kv_nvfp4", "dequantize_kv_nvfp4", "kv_read", "store_state"]

KV_FP8_RULES = {"vllm": "divide", "sglang": "sglang"}    # engine (KV_ENGINES) -> ref.fp8 rule of its KV store


def quantize_kv_fp8(x, scale, engine="vllm"):
    """K or V [..., D] -> float8_e4m3fn [..., D]: vLLM's reshape_and_cache store (fp32 divide,
    saturating) or SGLang's set_kv_buffer (bf16 divide, NaN above 464). Engines store bf16 K/V:
    round x with nvfp4.round_to_bf16 first to emulate them."""
    if engine not in KV_ENGINES:
        raise FormatError(f"engine: expected one of {list(KV_ENGINES)}, got {engine!r}")
    return fp8.quantize_fp8(x, scale, KV_FP8_RULES[engine])


def dequantize_kv_fp8(stored, scale, dtype=np.float64):
    """What attention reads from an FP8 cache: stored * scale (exact in float64; the engines fold
    the scale into the softmax scale and the output, so no per-element rounding happens)."""
    return fp8.dequantize_fp8(stored, scale, dtype)


def quantize_kv_nvfp4(x, scale):
    """K or V [..., D] (D a multiple of 16) -> (packed uint8 [..., D/2], block scales e4m3
    [..., D/16]): vLLM's reshape_and_cache_nvfp4_kernel (DEFAULT scale search), which is
    cvt_warp_fp16_to_fp4 with SFScaleVal = fp32(1 / scale) on each row of 16."""
    return nvfp4.quantize_activation(x, scale, sign="cuda")


def dequantize_kv_nvfp4(packed, block_scales, scale, dtype=np.float64):
    """What attention reads from an NVFP4 cache: e2m1 * block scale * scale, exact in float64
    (e2m1 * e4m3 has at most 7 significant bits, times a float32 scale) or rounded once to float32."""
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise FormatError(f"dtype: expected float32 or float64, got {dtype}")
    s = nvfp4._scalar_f32(scale, "scale", positive=True)[()]
    blocks = nvfp4.dequantize(packed, block_scales, np.float32(1), dtype=np.float64)  # exact
    exact = blocks * np.float64(s)
    return exact if dtype == np.float64 else exact.astype(np.float32)


def kv_read(x, scale, kv_cache_dtype, engine="vllm"):
    """The values attention reads for K or V x [..., D] after a store/load round trip, float64.
    "auto" returns x as float64 unchanged; "nvfp4" exists in vLLM only."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise FormatError(f"kv_cache_dtype: expected one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return np.asarray(nvfp4._float_array(x, "x"), dtype=np.float64)
    if kv_cache_dtype == "fp8_e4m3":
        return dequantize_kv_fp8(quantize_kv_fp8(x, scale, engine), scale)
    if engine != "vllm":
        raise FormatError(f"kv_cache_dtype 'nvfp4': implemented as vLLM stores it, got engine {engine!r}")
    return dequantize_kv_nvfp4(*quantize_kv_nvfp4(x, scale), scale)


def store_state(state, state_dtype):
    """A DeltaNet recurrent state as the engine stores it between forward calls, same dtype as
    given: "float32" rounds to float32, "bfloat16" to bfloat16 (nearest even; float64 input is
    rounded once, float32 input exactly as the engine's float32 -> bf16 cast)."""
    if state_dtype not in STATE_DTYPES:
        raise FormatError(f"state_dtype: expected one of {STATE_DTYPES}, got {state_dtype!r}")
    a = nvfp4._float_array(state, "state")
    if state_dtype == "bfloat16":
        return nvfp4.round_to_bf16(a).astype(a.dtype)
    return a.astype(np.float32).astype(a.dtype)
