"""jaxrun.serve under load: N concurrent streaming clients against a real server, next to batch-1
jaxrun.generate on the same model in the same run.

    python bench/serve_bench.py [--model DIR] [--slots 8] [--clients 1,4,8] [--prompt-tokens 64]
                                [--new-tokens 32] [--requests-per-client 2]

Starts `python -m jaxrun.serve` on a free 127.0.0.1 port (the `small` synthetic checkpoint by default,
written once under $XDG_CACHE_HOME/qwen35-nvfp4-spec/small), then for each client count runs that many
clients at once, each sending its requests one after another (random prompts, greedy, ignore_eos) and
reading the stream, after a warm-up request (the server compiles each prompt bucket on first use). Prints
output tokens/s in aggregate, time to first token and inter-token latency
(p50 / p90 / p99 over every token seen), and the ratio of the aggregate rate to batch-1
jaxrun.generate's decode rate measured in the same run (the batching gain).
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, slots: int, context: int):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxrun.serve", "--model", model, "--port", str(port),
                             "--max-running-requests", str(slots), "--max-context", str(context),
                             "--log-level", "warning"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("server did not become healthy in 15 minutes")


def generate_rate(model: str, prompt: list[int], new: int) -> float:
    """Batch-1 decode tokens/s of jaxrun.generate's runner (best of 3, compile apart)."""
    from jaxrun.load import load
    from jaxrun.runner import Runner
    from jaxrun.sharding import make_mesh
    mesh = make_mesh(1)
    ckpt, params = load(model, mesh, "f32", progress=False)
    runner = Runner(params, ckpt.config.text, mesh, "f32")
    runner.generate([prompt], new)
    best = 0.0
    for _ in range(3):
        runner.timings = type(runner.timings)()
        runner.generate([prompt], new)
        best = max(best, runner.timings.decode_tokens / runner.timings.decode_s)
    return best


def run_clients(url: str, model: str, n: int, per_client: int, prompts, new: int) -> dict:
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    ttft, itl, tokens = [], [], 0
    lock = threading.Lock()

    def one(i):
        nonlocal tokens
        for j in range(per_client):
            t0 = last = time.perf_counter()
            first, count = None, 0
            stream = client.completions.create(model=model, prompt=prompts[(i * per_client + j) % len(prompts)],
                                               max_tokens=new, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            gaps = []
            for chunk in stream:
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].text is not None:
                    count += 1
                    if first is None:
                        first = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
            with lock:
                ttft.append(first)
                itl.extend(gaps)
                tokens += count

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")
    return {"clients": n, "tok_s": tokens / wall, "ttft": [pct(ttft, q) for q in (50, 90, 99)],
            "itl": [pct(itl, q) for q in (50, 90, 99)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=2)
    a = p.parse_args(argv)
    from ref.synth import cached_checkpoint
    model = a.model or str(cached_checkpoint("small"))
    from ref.checkpoint import open_checkpoint
    V = open_checkpoint(model).config.text.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, V - 64, a.prompt_tokens)] for _ in range(16)]
    base = generate_rate(model, prompts[0], a.new_tokens)
    proc, url = start_server(model, a.slots, 4 * (a.prompt_tokens + a.new_tokens))
    try:
        run_clients(url, model, 2, 1, prompts, a.new_tokens)           # warm-up: compiles the prompts' bucket
        rows = [run_clients(url, model, n, a.requests_per_client, prompts, a.new_tokens)
                for n in map(int, a.clients.split(","))]
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"jaxrun.serve, {model}, {a.slots} slots, prompts of {a.prompt_tokens} tokens, {a.new_tokens} new tokens")
    print(f"batch-1 jaxrun.generate decode: {base:.1f} tok/s (the same run)")
    print(f"{'clients':>7} {'out tok/s':>10} {'gain':>6}   {'TTFT ms p50/p90/p99':>22}   {'ITL ms p50/p90/p99':>22}")
    for r in rows:
        print(f"{r['clients']:>7} {r['tok_s']:>10.1f} {r['tok_s'] / base:>5.2f}x   "
              f"{'/'.join(f'{x:.0f}' for x in r['ttft']):>22}   {'/'.join(f'{x:.1f}' for x in r['itl']):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
