"""The named numerical modes, in one place: what `ref`, `jaxrun` and every CLI accept (spec/model.md §6).

- precision: "f64" (every operation in float64: the value of the model), "f32", "bf16" (activations
  rounded where Hugging Face's bf16 path rounds). jaxrun runs "f32" and "bf16".
- activations: "w4a16" (routed-expert weights dequantized exactly, activations in the compute dtype)
  or "w4a4" (every routed-expert GEMM input quantized to NVFP4 as the engines' kernels do).
- act_scale (W4A4): "per-expert" (each expert's own input_scale) or "max" (the largest of the layer's
  experts, as backends with one scale per layer do).
- dense (jaxrun): dense weights "replicated" on every device or "sharded" tensor-parallel.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

PRECISIONS = ("f64", "f32", "bf16")
JAX_PRECISIONS = ("f32", "bf16")
ACTIVATIONS = ("w4a16", "w4a4")
ACT_SCALES = ("per-expert", "max")
DENSE_LAYOUTS = ("replicated", "sharded")


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

    def __post_init__(self):
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("activations", self.activations, ACTIVATIONS)
        check_choice("act_scale", self.act_scale, ACT_SCALES)

    def describe(self) -> str:
        """e.g. 'f32 w4a4 (max)'."""
        return f"{self.precision} {self.activations}" + (f" ({self.act_scale})" if self.activations == "w4a4" else "")


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
