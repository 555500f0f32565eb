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


MODE_FIELDS = ("precision", "activations", "act_scale", "kv_cache_dtype", "kv_engine", "kv_prefill", "state_dtype")


class _ListProfiles(argparse.Action):
    """--list-profiles: print the engine profiles (what each sets, where it comes from) and exit 0."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from ref.profiles import format_profiles
        print(format_profiles())
        parser.exit(0)


def add_mode_arguments(parser: argparse.ArgumentParser, precisions=PRECISIONS, default_precision: str | None = "f64"):
    """The mode flags, with their help, on any CLI: --engine-profile and --list-profiles, then
    --precision, --activations, --act-scale, --kv-cache-dtype, --kv-engine, --kv-prefill and
    --state-dtype, which override the profile's fields when given (their defaults apply only where
    neither a flag nor the profile sets a field: modes_from_args)."""
    from ref.profiles import PROFILES
    default = f"default {default_precision}" if default_precision else "default f32 on CPU, bf16 on GPU"
    parser.add_argument("--engine-profile", metavar="NAME", choices=list(PROFILES),
                        help="the modes an engine configuration runs (--list-profiles); the flags below override "
                             "its fields")
    parser.add_argument("--list-profiles", action=_ListProfiles,
                        help="print the engine profiles, what each sets and where it comes from, and exit")
    parser.add_argument("--precision", choices=precisions,
                        help=f"compute precision ({default}, or the profile's); bf16 rounds where HF's bf16 path "
                             f"rounds")
    parser.add_argument("--activations", choices=ACTIVATIONS,
                        help="w4a4: quantize the GEMM inputs of every quantized linear (routed experts, NVFP4 "
                             "and FP8 dense linears) as the engines do (default w4a16: activations kept in the "
                             "compute dtype, FP8 linears W8A16)")
    parser.add_argument("--act-scale", choices=ACT_SCALES,
                        help="W4A4 routed-expert input scale: each expert's, or the layer's largest (default "
                             "per-expert)")
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                        help="what the full-attention layers store in their KV cache (default auto: the "
                             "compute dtype)")
    parser.add_argument("--kv-engine", choices=KV_ENGINES,
                        help="whose FP8 KV store rule: vllm (fp32 divide, saturating) or sglang (bf16 divide, "
                             "NaN above 464) (default vllm)")
    parser.add_argument("--kv-prefill", choices=KV_PREFILL,
                        help="what a prefill's tokens attend to for themselves: cache (their stored K/V, as "
                             "decode) or fresh (the computed K/V: SGLang's ragged prefill) (default cache)")
    parser.add_argument("--state-dtype", choices=STATE_DTYPES,
                        help="the DeltaNet recurrent state as stored between forward calls (SGLang "
                             "--mamba-ssm-dtype) (default float32)")
    parser.set_defaults(_mode_default_precision=default_precision)


def modes_from_args(args, default_precision: str | None = None) -> Modes:
    """The Modes of a parsed command line: the fields of --engine-profile, overridden by each mode flag
    given explicitly; a field set by neither takes its default (precision: `default_precision`, else
    the CLI's default)."""
    from ref.profiles import get_profile
    fields = {}
    name = getattr(args, "engine_profile", None)
    if name is not None:
        fields = {f: getattr(get_profile(name).modes, f) for f in MODE_FIELDS}
    fields.update({f: getattr(args, f) for f in MODE_FIELDS if getattr(args, f, None) is not None})
    if "precision" not in fields:
        precision = default_precision or getattr(args, "_mode_default_precision", None)
        if precision is None:
            raise ValueError("no precision: give --precision")
        fields["precision"] = precision
    return Modes(**fields)
