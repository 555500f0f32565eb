"""Checkpoint reader cost on a 397B-shaped slice, next to plain reads of the same bytes.

    python bench/checkpoint_bench.py [--dir /tmp/qwen397b-slice] [--layers 4] [--expert-layout per-expert]
                                     [--experts 10] [--seed 0] [--keep]

Writes `python -m ref.synth DIR --preset 397b --layers N --fast` (in a subprocess, so this process's
peak RSS is the reader's) unless DIR already holds a checkpoint, then measures in one run:
  open      open_checkpoint (config + every safetensors header) vs reading those header bytes and
            json-parsing them directly;
  experts   fetching K random experts of one layer and copying out all their bytes vs os.pread of
            exactly the same byte ranges — cold (ranges evicted from the page cache with
            posix_fadvise(DONTNEED) first) and warm;
  RSS       peak resident set of this process.
Prints times and the ratios reader / plain read (1.0 = no overhead).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ref.checkpoint import INDEX, Checkpoint, open_checkpoint  # noqa: E402
from ref.safetensors_io import SafetensorsFile  # noqa: E402


def shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def plain_headers(d: Path) -> float:
    """Read and parse the index and every header without validation: the floor for opening."""
    t0 = time.perf_counter()
    if (d / INDEX).exists():
        json.loads((d / INDEX).read_text())
    for p in shards(d):
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            json.loads(f.read(n))
    return time.perf_counter() - t0


def expert_ranges(ckpt: Checkpoint, layer: int, e: int) -> list[tuple[Path, int, int]]:
    """(file, begin, end) of every byte expert e of `layer` consists of, recorded through the reader
    (views only: nothing is read, so the page cache and RSS stay as they were)."""
    seen: list[tuple[Path, int, int]] = []
    real = SafetensorsFile.view_bytes

    def spy(self, begin, end, prefetch=False):
        seen.append((self.path, begin, end))
        return real(self, begin, end, False)

    SafetensorsFile.view_bytes = spy
    try:
        ckpt.expert(layer, e)
    finally:
        SafetensorsFile.view_bytes = real
    return seen


def fetch(ckpt: Checkpoint, layer: int, experts: list[int]) -> int:
    """Fetch experts through the reader and copy out every byte (so the pages are really read)."""
    total = 0
    for e in experts:
        ex = ckpt.expert(layer, e)
        for w in (ex.gate, ex.up, ex.down):
            for a in (w.packed, w.weight_scale, w.weight_scale_2, w.input_scale):
                total += np.array(a).nbytes
    return total


def plain_read(ranges: list[tuple[Path, int, int]]) -> int:
    total = 0
    fds: dict[Path, int] = {}
    try:
        for path, begin, end in ranges:
            fd = fds.setdefault(path, os.open(path, os.O_RDONLY))
            total += len(os.pread(fd, end - begin, begin))
    finally:
        for fd in fds.values():
            os.close(fd)
    return total


def evict(ranges: list[tuple[Path, int, int]]) -> None:
    for path, begin, end in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, *args) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qwen397b-slice"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--expert-layout", default="per-expert", choices=["per-expert", "fused"])
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep a checkpoint this run wrote")
    a = ap.parse_args()

    wrote = False
    if not (a.dir / "config.json").exists():
        free = shutil.disk_usage(a.dir.parent).free
        print(f"writing 397b --layers {a.layers} --fast ({a.expert_layout}) to {a.dir}; {free / 1e9:.0f} GB free")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ref.synth", str(a.dir), "--preset", "397b", "--layers", str(a.layers),
                        "--fast", "--expert-layout", a.expert_layout], check=True, stdout=subprocess.DEVNULL)
        print(f"  written in {time.perf_counter() - t0:.1f} s")
        wrote = True
    size = sum(p.stat().st_size for p in shards(a.dir))
    try:
        t_plain_open = min(plain_headers(a.dir) for _ in range(3))
        t_open = min(timed(open_checkpoint, a.dir)[0] for _ in range(3))
        ckpt = open_checkpoint(a.dir)
        n_tensors = len(ckpt.names())
        print(f"checkpoint: {size / 1e9:.1f} GB in {len(shards(a.dir))} shards, {n_tensors} tensors, "
              f"{ckpt.expert_layout(0)} experts")
        print(f"open:   {t_open * 1e3:8.1f} ms   plain index+header read+parse {t_plain_open * 1e3:8.1f} ms   "
              f"ratio {t_open / t_plain_open:.2f}")

        layer, k, rounds = 0, a.experts, 3
        order = np.random.default_rng(a.seed).permutation(ckpt.config.text.num_experts).tolist()
        sets = [sorted(order[i * k:(i + 1) * k]) for i in range(2 * rounds)]  # disjoint expert sets
        ranges = [[r for e in s for r in expert_ranges(ckpt, layer, e)] for s in sets]
        del ckpt
        gc.collect()
        nbytes = sum(end - begin for _, begin, end in ranges[0])
        print(f"experts: layer {layer}, {k} random experts per fetch, {nbytes / 1e6:.1f} MB in {len(ranges[0])} "
              f"byte ranges, e.g. {sets[0]}")

        def fresh_fetch(s) -> tuple[float, int]:  # a fresh reader, nothing mapped yet; opening timed above
            ckpt = open_checkpoint(a.dir)
            t, n = timed(fetch, ckpt, layer, s)
            del ckpt
            gc.collect()
            return t, n

        # cold: every measurement reads a set of experts nobody has read yet in this run (so neither the
        # guest's nor a host's cache favours one side), after evicting it from the page cache
        cold_fetch, cold_read = [], []
        for r in range(rounds):
            s_fetch, s_read = 2 * r, 2 * r + 1
            evict(ranges[s_fetch] + ranges[s_read])
            t, got = fresh_fetch(sets[s_fetch])
            cold_fetch.append(t)
            t, got2 = timed(plain_read, ranges[s_read])
            cold_read.append(t)
            assert got2 == nbytes and abs(got - nbytes) <= 64 * k, (got, got2, nbytes)  # fused: shared scalars
        gc.collect()
        warm_fetch = min(fresh_fetch(sets[0])[0] for _ in range(5))
        warm_read = min(timed(plain_read, ranges[0])[0] for _ in range(5))
        for mode, f, r in (("cold", float(np.median(cold_fetch)), float(np.median(cold_read))),
                           ("warm", warm_fetch, warm_read)):
            print(f"  {mode}: reader {f * 1e3:8.2f} ms ({nbytes / f / 1e9:6.2f} GB/s)   "
                  f"plain pread {r * 1e3:8.2f} ms ({nbytes / r / 1e9:6.2f} GB/s)   ratio {f / r:.2f}"
                  + ("   (median of %d rounds)" % rounds if mode == "cold" else "   (best of 5)"))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"peak RSS: {rss / 1e6:.0f} MB ({rss / size * 100:.2f}% of the checkpoint; counts the mapped pages of "
              f"the experts being read)")
    finally:
        if wrote and not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
