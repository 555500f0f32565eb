"""jaxrun against Hugging Face transformers eager on the same weights and the same CPU, in one run.

    python bench/vs_transformers.py [--model DIR] [--tf-python /tmp/tfvenv/bin/python] [--repeat 3]
                                    [--decode-steps 16] [--batches 1,8] [--prompts 128,512]

The model is the `small` synthetic checkpoint (written once under $XDG_CACHE_HOME, or --model DIR from
`python -m ref.synth DIR --preset small`). jaxrun runs it in this process (float32, one CPU device,
the platform's default options); transformers runs it in a worker process (bench/hf_worker.py:
Qwen3_5MoeForCausalLM in float32, eager attention, its grouped_mm experts, the routed experts
dequantized to float32 by ref.nvfp4). torch and transformers are bench-only dependencies, never
installed with this project: the worker runs in a separate virtual environment,

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install torch==2.13.0 transformers ml_dtypes safetensors

with the repository root on its PYTHONPATH (for ref). The two processes never run at the same time.

First the logits are checked equal: all positions of two 128-token prompts and the first decode step
after them (max |difference| within --tolerance of the largest |logit|, same greedy tokens), or the
bench stops. Then, interleaved (each case jaxrun then transformers, the whole list --repeat times):
prefill of B prompts of T tokens (tokens/s = B*T / time; the cache is built, the last logits kept)
and greedy decode after B prompts of 128 tokens (B * steps / time; the host reads every step's
tokens). Printed: each side's best and the spread of its runs (worst / best - 1), the ratio with
the issue's targets (prefill >= 1.5x, decode >= 3x), and the machine's bounds measured in the same
run (bench/jax_bench.machine_bounds: an XLA float32 1024^3 matmul, a 256 MB read) as fractions:
prefill against FLOPs per token (jax_bench.model_work), decode against the bytes one step must
read (the dense weights as jaxrun holds them, once, plus the packed bytes of the distinct experts
the step's tokens pick, expected for uniform routing). The load average before and after is printed:
other work on the machine slows both sides, unevenly.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jax_bench import machine_bounds, model_work, step_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREFILL_TARGET, DECODE_TARGET = 1.5, 3.0


class HFWorker:
    """The transformers side: bench/hf_worker.py in the other environment, one JSON request a line."""

    def __init__(self, python: str, model: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([python, str(ROOT / "bench" / "hf_worker.py"), model], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"vs_transformers: the transformers worker exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class JaxSide:
    """jaxrun in this process: a Runner on one CPU device, float32."""

    def __init__(self, model: str):
        from jaxrun.load import load
        from jaxrun.runner import Runner
        from jaxrun.sharding import make_mesh

        mesh = make_mesh(1)
        ckpt, params = load(model, mesh, "f32", progress=False)
        self.cfg = ckpt.config.text
        self.runner = Runner(params, self.cfg, mesh, "f32")

    def context(self, tokens: np.ndarray, steps: int) -> int:
        return self.runner.context_for([list(t) for t in tokens], steps)

    def logits(self, tokens: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(all positions' logits [B, T, V], the first decode step's logits [B, V])."""
        from jaxrun.sampling import Sampling
        B, T = tokens.shape
        S = self.context(tokens, steps)
        prefilled, _ = self.runner.prefill(tokens, np.full(B, T, np.int32), S, all_logits=True)
        state, _ = self.runner.start([list(t) for t in tokens], S, Sampling())
        _, out = self.runner.step(state, S)
        return np.asarray(prefilled), np.asarray(out.logits)

    def prefill(self, tokens: np.ndarray, steps: int) -> float:
        B, T = tokens.shape
        S, lengths = self.context(tokens, steps), np.full(B, T, np.int32)
        self.runner.prefill(tokens, lengths, S)[0].block_until_ready()       # compiled, warm
        t0 = time.perf_counter()
        logits, _ = self.runner.prefill(tokens, lengths, S)
        np.asarray(logits).argmax(-1)
        return time.perf_counter() - t0

    def decode(self, tokens: np.ndarray, steps: int) -> float:
        from jaxrun.sampling import Sampling
        S = self.context(tokens, steps)
        state, first = self.runner.start([list(t) for t in tokens], S, Sampling())
        np.asarray(first.tokens)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, out = self.runner.step(state, S)
            np.asarray(out.tokens)                                           # the host reads every step's tokens
        return time.perf_counter() - t0


def prompts(rng, B: int, T: int, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab - 64, (B, T)).astype(np.int32)


def check_logits(jx: JaxSide, hf: HFWorker, tokens: np.ndarray, tolerance: float) -> str:
    """Both sides' logits on the same prompts; SystemExit when they differ."""
    steps = 2
    jp, jd = jx.logits(tokens, steps)
    with tempfile.TemporaryDirectory() as tmp:
        hf.ask(op="logits", tokens=tokens.tolist(), out=f"{tmp}/p.npy")
        hf.ask(op="decode", tokens=tokens.tolist(), steps=1, out=f"{tmp}/d.npy")
        hp, hd = np.load(f"{tmp}/p.npy"), np.load(f"{tmp}/d.npy")
    lines = []
    for what, a, b in (("prefill", jp, hp), ("first decode step", jd, hd)):
        diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        same = bool((a.argmax(-1) == b.argmax(-1)).all())
        lines.append(f"{what}: max |jaxrun - transformers| {diff:.2e} (largest |logit| {scale:.1f}), greedy "
                     f"tokens {'equal' if same else 'DIFFER'}")
        if not (diff <= tolerance * scale and same):
            raise SystemExit("vs_transformers: logits differ -- " + lines[-1])
    return "; ".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--tf-python", default="/tmp/tfvenv/bin/python")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompts", default="128,512")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |Δ logit| over the largest |logit|")
    a = p.parse_args(argv)
    from ref.synth import cached_checkpoint
    model = a.model or str(cached_checkpoint("small"))
    load0 = os.getloadavg()
    jx = JaxSide(model)
    hf = HFWorker(a.tf_python, model)
    cfg, rng = jx.cfg, np.random.default_rng(0)
    batches, lengths = [int(b) for b in a.batches.split(",")], [int(t) for t in a.prompts.split(",")]
    print(f"small model ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts top-"
          f"{cfg.num_experts_per_tok}), float32, 1 CPU device; transformers {hf.info['transformers']}, torch "
          f"{hf.info['torch']} ({hf.info['threads']} threads), {os.cpu_count()} CPUs; load average {load0[0]:.1f}")
    print("logits: " + check_logits(jx, hf, prompts(rng, 2, 128, cfg.vocab_size), a.tolerance))

    cases = [("prefill", B, T) for B in batches for T in lengths] + [("decode", B, 128) for B in batches]
    data = {c: prompts(rng, c[1], c[2], cfg.vocab_size) for c in cases}
    for c in cases:                                                      # compile and warm up both sides
        getattr(jx, c[0])(data[c], a.decode_steps)
        hf.ask(op=c[0], tokens=data[c].tolist(), steps=a.decode_steps)
    times = {(c, side): [] for c in cases for side in ("jax", "hf")}
    bounds = []
    for _ in range(a.repeat):
        bounds.append(machine_bounds())
        for c in cases:
            times[c, "jax"].append(getattr(jx, c[0])(data[c], a.decode_steps))
            times[c, "hf"].append(hf.ask(op=c[0], tokens=data[c].tolist(), steps=a.decode_steps)["s"])
    hf.close()
    peak, read = max(b[0] for b in bounds), max(b[1] for b in bounds)
    work = model_work(cfg, jx.runner.params)
    flops = work.flops
    print(f"bounds (best of {a.repeat}): f32 matmul {peak / 1e9:.0f} GFLOP/s, {flops / 1e6:.0f} MFLOP/token -> prefill <= "
          f"{peak / flops:.0f} tok/s; read {read / 1e9:.1f} GB/s")
    print(f"{'case':22s} {'jaxrun tok/s':>14s} {'spread':>7s} {'transformers':>13s} {'spread':>7s} {'ratio':>7s} "
          f"{'target':>7s}  jaxrun / transformers of bound")
    for c in cases:
        kind, B, T = c
        n = B * (T if kind == "prefill" else a.decode_steps)
        j, h = (sorted(times[c, s]) for s in ("jax", "hf"))
        jt, ht = n / j[0], n / h[0]
        target = PREFILL_TARGET if kind == "prefill" else DECODE_TARGET
        if kind == "prefill":
            bound, what = peak / flops, "matmul"
        else:
            bound, what = read / step_bytes(work, cfg, B) * B, "read"
        name = f"{kind} {T}, batch {B}" if kind == "prefill" else f"decode after {T}, batch {B}"
        print(f"{name:22s} {jt:14.1f} {j[-1] / j[0] - 1:7.0%} {ht:13.1f} {h[-1] / h[0] - 1:7.0%} {jt / ht:6.2f}x "
              f"{target:6.1f}x  {jt / bound:.0%} / {ht / bound:.0%} of {what} ({bound:.0f} tok/s)")
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.1f} (1 min), {load1[1]:.1f} (5 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
