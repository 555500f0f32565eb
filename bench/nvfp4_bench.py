"""NVFP4 codec speed on real expert sizes, as ratios to a plain copy of the output.

python bench/nvfp4_bench.py [--repeat N]
Each line: operation, best time, best time of np.copy of an array of the output's size and dtype
(float32, or float64 for the float64 dequantize the reference uses; timed alternately with the
operation, same run), ratio. "into out" writes a reused buffer (dequantize's out=), as a caller that
converts row blocks does. Targets: dequantize <= 8x, quantize_weight <= 40x.
"""
import argparse
import time

import ml_dtypes
import numpy as np

from ref import nvfp4

SHAPES = {"gate_up": (2048, 4096), "down": (4096, 1024), "rows": (256, 4096)}  # rows: 8 MB of f64,
# the row block ref.layers.linear converts at a time
ACT_ROWS = 16


def best_of_pair(fn, out, repeat):
    """Best times of fn() and of np.copy(out), measured alternately (load changes hit both)."""
    best_fn = best_copy = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best_fn = min(best_fn, time.perf_counter() - t)
        t = time.perf_counter()
        np.copy(out)
        best_copy = min(best_copy, time.perf_counter() - t)
    return best_fn, best_copy


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'matrix':8} {'operation':28} {'time ms':>9} {'copy ms':>8} {'dtype':>7} {'ratio':>7}")
    for name, (n, k) in SHAPES.items():
        w = (rng.standard_normal((n, k)) * 0.02).astype(ml_dtypes.bfloat16)     # [N, K] bf16
        x = rng.standard_normal((ACT_ROWS, k)).astype(ml_dtypes.bfloat16)       # [16, K] bf16
        packed, scale, scale_2 = nvfp4.quantize_weight(w)
        input_scale = np.float32(np.abs(x.astype(np.float32)).max() / nvfp4.GLOBAL_DIVISOR)
        out_w = np.empty((n, k), np.float32)
        out_w64 = np.empty((n, k), np.float64)
        out_x = np.empty((ACT_ROWS, k), np.float32)
        f64 = np.float64
        cases = [
            ("quantize_weight", lambda: nvfp4.quantize_weight(w), out_w),
            ("dequantize", lambda: nvfp4.dequantize(packed, scale, scale_2), out_w),
            ("dequantize f64", lambda: nvfp4.dequantize(packed, scale, scale_2, dtype=f64), out_w64),
            ("dequantize f64 into out", lambda: nvfp4.dequantize(packed, scale, scale_2, dtype=f64,
                                                                 out=out_w64), out_w64),
            ("quantize_activation", lambda: nvfp4.quantize_activation(x, input_scale), out_x),
        ]
        for op, fn, out in cases:
            t_op, t_copy = best_of_pair(fn, out, args.repeat)
            print(f"{name:8} {op:28} {t_op * 1e3:9.2f} {t_copy * 1e3:8.3f} {out.dtype.name:>7} "
                  f"{t_op / t_copy:7.1f}x")


if __name__ == "__main__":
    main()
