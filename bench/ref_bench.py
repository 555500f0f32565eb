"""Cost of the NumPy reference at real shapes, next to the cost of reading the weights it touches.

    python -m ref.synth /tmp/q397b4 --preset 397b --layers 4 --fast     # 3 DeltaNet + 1 attention layer
    python bench/ref_bench.py --model /tmp/q397b4 [--precision f64] [--prefill-tokens 512]

For one decode token (after a short prompt) and for one teacher-forced prefill, per layer: wall time,
bytes of weights touched (the layer's dense tensors plus the routed experts' packed bytes and
scales), and the time to copy exactly those bytes out of the page-cache-backed memory map, measured
in the same run right after the model step (the read bound). Reports peak anonymous and total RSS,
and extrapolates to the 60-layer model (45 DeltaNet + 15 attention layers).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ref.parallel import configure_blas, workers  # noqa: E402

configure_blas()  # as python -m ref.run (spec/model.md §7)

import numpy as np  # noqa: E402

from ref.checkpoint import open_checkpoint  # noqa: E402
from ref.config import FULL, LINEAR  # noqa: E402
from ref.model import Model  # noqa: E402

FULL_MODEL = {LINEAR: 45, FULL: 15}


class MemorySampler:
    """Peak RssAnon / RssFile of this process, sampled every 20 ms from /proc/self/status."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def touched_arrays(ckpt, layer: int, routed: np.ndarray) -> list[np.ndarray]:
    """Memory-mapped arrays one layer reads: dense tensors and the routed experts' tensors."""
    prefix = f"{ckpt.config.text_prefix}layers.{layer}."
    out = [ckpt.tensor(n) for n in ckpt.names() if n.startswith(prefix) and ".mlp.experts" not in n]
    for e in np.unique(routed):
        ex = ckpt.expert(layer, int(e))
        for w in (ex.gate, ex.up, ex.down):
            out += [w.packed, w.weight_scale] if hasattr(w, "packed") else [w.weight]
    return out


def read_seconds(arrays: list[np.ndarray], piece: int = 1 << 24) -> float:
    """Time to copy the arrays' bytes, 16 MB at a time, into one reused buffer (best of two)."""
    flat = [np.asarray(a).reshape(-1).view(np.uint8) for a in arrays]
    buf = np.empty(piece, np.uint8)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        for f in flat:
            for lo in range(0, f.size, piece):
                chunk = f[lo:lo + piece]
                np.copyto(buf[:chunk.size], chunk)
        best = min(best, time.perf_counter() - t0)
    return best


def timed_step(model: Model, ids, cache):
    """One prefill call with per-layer wall times (from the model's progress callback)."""
    marks = []
    model.progress = lambda msg: marks.append(time.perf_counter())
    dumps: dict = {}
    c0, t0 = time.process_time(), time.perf_counter()
    _, new = model.prefill(ids, cache, dumps=dumps)
    t1, c1 = time.perf_counter(), time.process_time()
    model.progress = None
    per_layer = np.diff([t0] + marks).tolist()  # layer 0 includes the embedding lookup
    return per_layer, t1 - marks[-1], t1 - t0, c1 - c0, dumps, new


def phase(ckpt, model, name, ids, cache) -> dict:
    c = ckpt.config.text
    load = os.getloadavg()[0]
    per_layer, head_s, total_s, cpu_s, dumps, _ = timed_step(model, ids, cache)
    rows = []
    for i, kind in enumerate(c.layer_types):
        arrays = touched_arrays(ckpt, i, dumps[f"layers.{i}.topk_ids"])
        nbytes = sum(a.nbytes for a in arrays)
        rows.append({"layer": i, "kind": kind, "seconds": per_layer[i], "bytes": nbytes,
                     "read_seconds": read_seconds(arrays),
                     "experts": int(np.unique(dumps[f"layers.{i}.topk_ids"]).size)})
    head = [ckpt.tensor("lm_head.weight"), ckpt.lm("norm.weight")]
    head_bytes = sum(a.nbytes for a in head) + len(ids) * c.hidden_size * 2
    head_read = read_seconds(head)
    est = {"seconds": head_s, "bytes": head_bytes, "read_seconds": head_read}
    for key in ("seconds", "bytes", "read_seconds"):
        for kind, n in FULL_MODEL.items():
            vals = [r[key] for r in rows if r["kind"] == kind]
            est[key] += n * float(np.mean(vals)) if vals else 0.0
    return {"phase": name, "tokens": len(ids), "total_seconds": total_s, "cpu_seconds": cpu_s,
            "load_average_before": load, "head_seconds": head_s,
            "head_bytes": head_bytes, "head_read_seconds": head_read, "layers": rows, "model_60_layers": est}


def report(res: dict) -> None:
    print(f"\n== {res['phase']}: {res['tokens']} token(s), {res['total_seconds']:.2f} s for this slice "
          f"({res['cpu_seconds']:.2f} s of CPU time in this process; load average before "
          f"{res['load_average_before']:.2f})")
    print(f"{'layer':>5} {'kind':<17} {'experts':>7} {'time s':>8} {'MB touched':>10} {'read s':>8} {'time/read':>9}")
    for r in res["layers"]:
        print(f"{r['layer']:>5} {r['kind']:<17} {r['experts']:>7} {r['seconds']:>8.3f} {r['bytes'] / 1e6:>10.1f} "
              f"{r['read_seconds']:>8.3f} {r['seconds'] / r['read_seconds']:>9.1f}")
    print(f"{'head':>5} {'norm + lm_head':<17} {'':>7} {res['head_seconds']:>8.3f} {res['head_bytes'] / 1e6:>10.1f} "
          f"{res['head_read_seconds']:>8.3f} {res['head_seconds'] / res['head_read_seconds']:>9.1f}")
    e = res["model_60_layers"]
    print(f"60-layer estimate: {e['seconds']:.1f} s, {e['bytes'] / 1e9:.2f} GB touched, read bound "
          f"{e['read_seconds']:.1f} s -> {e['seconds'] / e['read_seconds']:.1f}x the read bound")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--precision", choices=("f64", "f32", "bf16"), default="f64")
    ap.add_argument("--prompt-tokens", type=int, default=8, help="prompt before the measured decode token")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="teacher-forced prefill length (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    ckpt = open_checkpoint(args.model)
    c = ckpt.config.text
    print(f"{args.model}: {c.num_hidden_layers} layers {list(c.layer_types)}, hidden {c.hidden_size}, "
          f"{c.num_experts} experts top-{c.num_experts_per_tok}, precision {args.precision}", flush=True)
    print(f"{workers()} worker thread(s), OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(OpenBLAS picks)')}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    model = Model(ckpt, precision=args.precision)
    rng = np.random.default_rng(0)
    results = {"precision": args.precision, "workers": workers(), "load_before": os.getloadavg()[0]}
    with MemorySampler() as mem:
        prompt = rng.integers(0, c.vocab_size, args.prompt_tokens).tolist()
        _, cache = model.prefill(prompt)
        model.prefill([int(rng.integers(c.vocab_size))], cache)  # warm the page cache for the decode path
        results["decode"] = phase(ckpt, model, "decode", [int(rng.integers(c.vocab_size))], cache)
        report(results["decode"])
        results["peak_after_decode"] = dict(mem.peak)
        if args.prefill_tokens:
            ids = rng.integers(0, c.vocab_size, args.prefill_tokens).tolist()
            results["prefill"] = phase(ckpt, model, "teacher-forced prefill", ids, None)
            report(results["prefill"])
        results["peak"] = dict(mem.peak)
    results["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\npeak RSS: anonymous {mem.peak['RssAnon'] / 1e9:.2f} GB, file-backed (page cache of the mapped "
          f"checkpoint) {mem.peak['RssFile'] / 1e9:.2f} GB, ru_maxrss {results['ru_maxrss_bytes'] / 1e9:.2f} GB "
          f"(decode phase anonymous {results['peak_after_decode']['RssAnon'] / 1e9:.2f} GB)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
