"""What a second host costs and what it saves, for the 397B model: the bytes each collective that
crosses hosts moves per decode token and per prefill token at N = 1, 2, 4, 8 hosts (from the config
and jaxrun's sharding rules: tests/test_jax_multiprocess.py checks in the compiled programs that the
routed experts' psum is the only collective crossing processes), the time of the same collectives
measured over gloo between 2 processes on this machine, and the decode-token estimate at a stated
inter-host bandwidth and latency next to the per-GPU HBM read time.

    python bench/comm_model.py [--gpus-per-host 4] [--hbm-tb-s 1.8] [--latency-us 5] [--no-measure]

The model (batch 1 decode; per layer, one all-reduce of the token's hidden state, f32):
- hierarchical all-reduce (reduce-scatter within a host, ring across hosts, all-gather within a
  host): each host sends 2(N-1)/N of the payload per all-reduce, in 2(N-1) latency-bound steps;
- HBM: each GPU reads its dense share (tensor-parallel within the host: dense / G; the dense weights
  do not shrink with more hosts) and its routed experts' share (top-k of E experts, spread over
  N x G GPUs);
- the scheduler's plan broadcast (jaxrun.serve only) is one 1 KiB all-reduce per step, not per token.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HOSTS = (1, 2, 4, 8)
BANDWIDTHS = (25e9, 100e9)  # inter-host bytes/s per host (200G and 800G-class NICs)


def sizes(gpus_per_host: int) -> dict:
    """Byte counts of the 397B model from its declaration: dense (bf16) and routed experts (NVFP4)."""
    import jax.numpy as jnp
    from jaxrun.params import Experts, Formats, declare, leaves, resolve_dtype
    from ref.config import QWEN35_397B

    cfg = QWEN35_397B.text
    declared = declare(QWEN35_397B, Formats.random(QWEN35_397B, mtp=True))
    nbytes = lambda p: int(np.prod(p.shape)) * np.dtype(resolve_dtype(p, jnp.bfloat16)).itemsize
    experts = [e for e in _find(declared, Experts)]
    expert_bytes = sum(nbytes(p) for e in experts[:cfg.num_hidden_layers] for p in leaves(e))   # decoder layers
    all_bytes = sum(nbytes(p) for p in leaves(declared))
    mtp_experts = sum(nbytes(p) for e in experts[cfg.num_hidden_layers:] for p in leaves(e))
    return {"cfg": cfg, "G": gpus_per_host, "dense": all_bytes - expert_bytes - mtp_experts,
            "experts": expert_bytes + mtp_experts, "per_token_experts": expert_bytes * cfg.num_experts_per_tok
            / cfg.num_experts}


def _find(tree, kind):
    if isinstance(tree, kind):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for x in tree:
            yield from _find(x, kind)


def model(s: dict, hbm: float, latency: float) -> list[str]:
    cfg, G = s["cfg"], s["G"]
    L, H, payload = cfg.num_hidden_layers, cfg.hidden_size, 4 * cfg.hidden_size
    lines = [f"397B: {L} MoE layers, hidden {H}; per layer and token the routed experts' psum is an all-reduce "
             f"of {payload / 1024:.0f} KiB (f32 [tokens, {H}]) over every GPU; {G} GPUs per host, dense weights "
             f"tensor-parallel within a host",
             f"  weights {s['dense'] / 1e9:.1f} GB dense (bf16) + {s['experts'] / 1e9:.1f} GB routed experts (NVFP4); "
             f"a decode token reads {s['per_token_experts'] / 1e9:.2f} GB of experts",
             "",
             f"{'hosts':>5} {'GB/GPU':>7} {'cross-host/token':>17} {'steps/token':>11} {'HBM read/GPU':>13} "
             f"{'HBM time':>9} " + " ".join(f"{'comm @' + str(int(b / 1e9)) + 'GB/s':>14}" for b in BANDWIDTHS)
             + f" {'prefill tok/s cap @' + str(int(BANDWIDTHS[0] / 1e9)):>20}"]
    for n in HOSTS:
        cross = L * payload * 2 * (n - 1) / n                      # bytes each host sends per token
        steps = L * 2 * (n - 1)                                   # latency-bound steps per token
        memory = s["dense"] / G + s["experts"] / (n * G)
        read = s["dense"] / G + s["per_token_experts"] / (n * G)
        comm = [steps * latency + cross / b for b in BANDWIDTHS]
        cap = BANDWIDTHS[0] / cross if cross else float("inf")
        lines.append(f"{n:>5} {memory / 1e9:>7.1f} {cross / 1e6:>14.2f} MB {steps:>11} {read / 1e9:>10.2f} GB "
                     f"{read / hbm * 1e3:>6.2f} ms " + " ".join(f"{c * 1e3:>11.3f} ms" for c in comm)
                     + f" {cap:>20,.0f}")
    saved = (s["per_token_experts"] / G - s["per_token_experts"] / (2 * G)) / hbm
    lines += ["", f"A second host saves {saved * 1e6:.0f} us of HBM reading per decode token (only the experts' "
              f"share shrinks) and costs {L * 2 * latency * 1e6:.0f} us of latency ({L} all-reduces x 2 steps x "
              f"{latency * 1e6:g} us) plus the bytes above: it pays for memory (the GB/GPU column), not for "
              f"batch-1 decode speed. HBM at {hbm / 1e12:g} TB/s per GPU."]
    return lines


# ---- measured: the same collectives over gloo, 2 processes x 1 device ---------------------------------

def measure() -> dict:
    """Run by the launcher in each process: time each collective, process 0 prints JSON."""
    from jaxrun.distributed import Cluster, Settings
    cluster = Cluster.start(Settings.resolve(), "comm_model")
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P
    from jaxrun.sharding import expert_axes, make_mesh

    mesh = make_mesh()
    axes = expert_axes(mesh)

    def timed(fn, *args, reps=50):
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / reps

    def collective(kind, shape):
        body = {"psum": lambda x: lax.psum(x, axes), "pmax": lambda x: lax.pmax(x, axes)}[kind]
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
        return timed(f, jnp.ones(shape, jnp.float32))

    out = {"devices": mesh.size, "processes": cluster.count,
           "psum [1, 4096] f32 (decode, per layer)": collective("psum", (1, 4096)),
           "psum [256, 4096] f32 (prefill chunk, per layer)": collective("psum", (256, 4096)),
           "pmax [2] f32 (w4a4 --act-scale max, per layer)": collective("pmax", (2,))}
    t0 = time.perf_counter()
    for _ in range(50):
        cluster.broadcast({"step": True, "request": 1})
    out["plan broadcast 1 KiB (jaxrun.serve, per step)"] = (time.perf_counter() - t0) / 50
    cluster.finish()
    print(json.dumps(out))
    return out


def measured_lines(layers: int) -> list[str]:
    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, "-m", "jaxrun.launch", "-n", "2", "--", str(Path(__file__)), "--worker"],
                       capture_output=True, text=True, timeout=600, cwd=root)
    if r.returncode:
        return [f"measurement failed: {r.stderr.strip().splitlines()[-1:]}"]
    m = json.loads(r.stdout.splitlines()[-1])
    lines = [f"Measured over gloo (TCP on this machine), {m['processes']} processes x 1 device:"]
    for k, v in m.items():
        if isinstance(v, float):
            lines.append(f"  {k:<50} {v * 1e6:9.0f} us")
    decode = m["psum [1, 4096] f32 (decode, per layer)"]
    prefill = m["psum [256, 4096] f32 (prefill chunk, per layer)"]
    lines.append(f"  -> {layers} layers: {layers * decode * 1e3:.1f} ms per decode token, "
                 f"{layers * prefill / 256 * 1e3:.2f} ms per prefill token (256-token chunks): "
                 f"{256 * 4096 * 4 / prefill / 1e9:.2f} GB/s of payload")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus-per-host", type=int, default=4)
    p.add_argument("--hbm-tb-s", type=float, default=1.8, help="HBM bandwidth per GPU (default 1.8, RTX Pro 6000)")
    p.add_argument("--latency-us", type=float, default=5.0, help="inter-host latency per all-reduce step (default 5)")
    p.add_argument("--no-measure", action="store_true", help="skip the gloo measurement")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        measure()
        return 0
    s = sizes(a.gpus_per_host)
    print("\n".join(model(s, a.hbm_tb_s * 1e12, a.latency_us * 1e-6)))
    if not a.no_measure:
        print()
        print("\n".join(measured_lines(s["cfg"].num_hidden_layers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
