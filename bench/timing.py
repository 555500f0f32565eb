"""Timing helpers shared by the benches (run as scripts: `python bench/X.py` puts this folder on sys.path)."""
from __future__ import annotations

import time


def best_of(fn, repeat: int = 5) -> float:
    """Best of `repeat` timed calls, in seconds, after one warm-up call (shared machines are noisy)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
