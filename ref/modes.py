"""The named numerical modes, in one place: what `ref`, `jaxrun` and every CLI accept (spec/model.md §6).

- precision: "f64" (every operation in float64: the value of the model), "f32", "bf16" (activations
  rounded where Hugging Face's bf16 path rounds). jaxrun runs "f32" and "bf16".
- activations: "w4a16" (routed-expert weights dequantized exactly, activations in the compute dtype)
  or "w4a4" (every routed-expert GEMM input quantized to NVFP4 as the engines' kernels do).
- act_scale (W4A4): "per-expert" (each expert's own input_scale) or "max" (the largest of the layer's
  experts, as backends with one scale per layer do).
- dense (jaxrun): dense weights "replicated" on every device or "sharded" tensor-parallel.
- kv_cache_dtype: what the full-attention layers keep in their KV cache: "auto" (the compute
  dtype), "fp8_e4m3" or "nvfp4" (ref.kvcache); kv_engine: whose store rule ("vllm" or "sglang");
  kv_prefill: what a prefill attends to for its own tokens, "cache" (the stored, quantized K/V: vLLM,
  SGLang's paged paths) or "fresh" (the unquantized K/V: SGLang's FlashInfer ragged prefill).
- state_dtype: the DeltaNet recurrent state as stored between forward calls (SGLang
  --mamba-ssm-dtype): "float32" or "bfloat16".
FP8 linears follow `activations`: W8A16 under "w4a16", W8A8 (static input_scale) under "w4a4".
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

PRECISIONS = ("f64", "f32", "bf16")
JAX_PRECISIONS = ("f32", "bf16")
ACTIVATIONS = ("w4a16", "w4a4")
ACT_SCALES = ("per-expert", "max")
DENSE_LAYOUTS = ("replicated", "sharded")
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "nvfp4")
KV_ENGINES = ("vllm", "sglang")
KV_PREFILL = ("cache", "fresh")
STATE_DTYPES = ("float32", "bfloat16")


def check_choice(field: str, value, choices) -> None:
    """ValueError naming the field and the accepted values unless value is one of choices."""
    if value not in choices:
        raise ValueError(f"{field} {value!r}: expected one of {list(choices)}")


@dataclass(frozen=True)
class Modes:
    """One run's numerical modes (see the module docstring)."""
    precision: str = "f64"
    activations: str = "w4a16"
    act_scale: str = "per-expert"
    kv_cache_dtype: str = "auto"
    kv_engine: str = "vllm"
    kv_prefill: str = "cache"
    state_dtype: str = "float32"

    def __post_init__(self):
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("activations", self.activations, ACTIVATIONS)
        check_choice("act_scale", self.act_scale, ACT_SCALES)
        check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_choice("kv_engine", self.kv_engine, KV_ENGINES)
        check_choice("kv_prefill", self.kv_prefill, KV_PREFILL)
        check_choice("state_dtype", self.state_dtype, STATE_DTYPES)
        if self.kv_cache_dtype == "nvfp4" and self.kv_engine != "vllm":
            raise ValueError(f"kv_cache_dtype 'nvfp4': only vLLM's NVFP4 KV cache is specified, "
                             f"got kv_engine {self.kv_engine!r}")

    def describe(self) -> str:
        """e.g. 'f32 w4a4 (max)', 'bf16 w4a16 kv fp8_e4m3 (sglang, fresh) state bfloat16'."""
        text = f"{self.precision} {self.activations}" + (f" ({self.act_scale})" if self.activations == "w4a4" else "")
        if self.kv_cache_dtype != "auto":
            text += f" kv {self.kv_cache_dtype} ({self.kv_engine}, {self.kv_prefill})"
        if self.state_dtype != "float32":
            text += f" state {self.state_dtype}"
        return text


def add_mode_arguments(parser: argparse.ArgumentParser, precisions=PRECISIONS, default_precision: str | None = "f64"):
    """--precision, --activations and --act-scale, with their help, on any CLI."""
    default = f"default {default_precision}" if default_precision else "default f32 on CPU, bf16 on GPU"
    parser.add_argument("--precision", choices=precisions, default=default_precision,
                        help=f"compute precision ({default}); bf16 rounds where HF's bf16 path rounds")
    parser.add_argument("--activations", choices=ACTIVATIONS, default="w4a16",
                        help="w4a4: quantize every routed-expert GEMM input to NVFP4 as the engines do "
                             "(default w4a16: activations kept in the compute dtype)")
    parser.add_argument("--act-scale", choices=ACT_SCALES, default="per-expert",
                        help="W4A4 input scale: each expert's own, or the layer's largest (default per-expert)")


def modes_from_args(args, precision: str | None = None) -> Modes:
    """The Modes of parsed --precision/--activations/--act-scale (precision overrides args.precision)."""
    return Modes(precision or args.precision, args.activations, args.act_scale)
