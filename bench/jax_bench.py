"""jaxrun vs ref.model on the `small` synthetic checkpoint (CPU), and the 397B per-device footprint.

    python bench/jax_bench.py [--model DIR] [--prompt-tokens 128] [--new-tokens 32] [--devices N]

Prints, from one run: prefill and decode tokens/s of jaxrun (f32, compiled; compile time apart)
and of ref.model (f32) on the same prompt, as ratios (target >= 10x); the machine's bounds measured
in the same run (an XLA float32 1024^3 matmul for prefill FLOPs, a 256 MB read for decode bytes)
turned into tokens/s from the model's FLOPs and bytes per token, with each side as a fraction of
them; then the parameter bytes one device holds for the published 397B configuration on 4 devices,
from the shardings alone (jax.eval_shape of the parameter tree, no weights). Without --model, the
small checkpoint is written once under $XDG_CACHE_HOME/qwen35-nvfp4-spec/small.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from typing import NamedTuple

import numpy as np

from timing import best_of


def bench_speed(model: str, n_prompt: int, n_new: int, devices: int | None) -> None:
    from jaxrun.load import load
    from jaxrun.runner import Runner
    from jaxrun.sharding import make_mesh
    from ref.model import Model

    mesh = make_mesh(devices)
    ckpt, params = load(model, mesh, "f32", progress=False)
    cfg = ckpt.config.text
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, cfg.vocab_size - 64, n_prompt)]
    runner = Runner(params, cfg, mesh, "f32")
    runner.generate([prompt], n_new)                                     # compile + warm up
    compile_s = runner.timings.compile_s
    best = {}
    for _ in range(3):                                                   # best of 3 (shared machines are noisy)
        runner.timings = type(runner.timings)()
        res = runner.generate([prompt], n_new)[0]
        t = runner.timings
        for k, v in (("p", t.prefill_tokens / t.prefill_s), ("d", t.decode_tokens / t.decode_s),
                     ("pc", t.prefill_tokens / t.prefill_cpu_s), ("dc", t.decode_tokens / t.decode_cpu_s)):
            best[k] = max(best.get(k, 0.0), v)

    ref = Model(ckpt, "f32")
    ref.prefill(prompt[:4])                                              # page in the checkpoint
    t0, c0 = time.perf_counter(), time.process_time()
    logits, cache = ref.prefill(prompt)
    rp, rpc = n_prompt / (time.perf_counter() - t0), n_prompt / (time.process_time() - c0)
    steps = min(n_new - 1, 8)
    tok = int(np.argmax(logits[-1]))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        last, cache = ref.decode(tok, cache)
        tok = int(np.argmax(last))
    rd, rdc = steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)
    same = ref.generate(prompt, 4) == res.token_ids[:4]
    print(f"small model ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts top-"
          f"{cfg.num_experts_per_tok}), prompt {n_prompt} tokens, {mesh.size} {mesh.devices.flat[0].platform} device(s)")
    print("                 wall clock                          per CPU second (all threads)")
    print(f"  jaxrun f32 : prefill {best['p']:8.1f} tok/s  decode {best['d']:7.1f} tok/s   prefill {best['pc']:8.1f}"
          f"  decode {best['dc']:7.1f}   compile {compile_s:.1f} s")
    print(f"  ref f32    : prefill {rp:8.1f} tok/s  decode {rd:7.1f} tok/s   prefill {rpc:8.1f}  decode {rdc:7.1f}")
    print(f"  ratio      : prefill {best['p'] / rp:8.1f}x       decode {best['d'] / rd:7.1f}x         prefill "
          f"{best['pc'] / rpc:7.1f}x  decode {best['dc'] / rdc:6.1f}x")
    print(f"  first 4 greedy tokens equal to ref: {same}")
    bench_bounds(cfg, runner.params, best["p"], best["d"], rp, rd)
    bench_traffic(runner.params, cfg, mesh, "f32", "small model, float32")
    bench_traffic(*slice_397b(), "bf16", "397B shapes, 4-layer slice (3 DeltaNet + 1 attention), bf16, 512 experts on one device")


class Work(NamedTuple):
    flops: float         # prefill FLOPs per token: 2 per weight of the layers' dense matrices and of k experts
                         # (the lm_head only for the last token; attention scores and the DeltaNet recurrence
                         # left out): a lower bound
    dense_bytes: int     # the dense matrices a decode step reads once, as held (the embedding table apart:
                         # a step reads one row per token)
    expert_bytes: int    # one routed expert's packed bytes (codes, scales, globals) summed over the layers


def model_work(cfg, params) -> Work:
    import jax
    layer_weights, dense_bytes, expert_bytes = 0, 0, 0
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if name.startswith((".mtp", ".embed_tokens")):                  # not read whole by a plain decode step
            continue
        nbytes = int(np.prod(a.shape)) * a.dtype.itemsize
        if ".experts." in name:
            expert_bytes += nbytes
        elif name.endswith(".weight") and a.ndim == 2:                   # dense or NVFP4-packed matrices
            dense_bytes += nbytes
            if name.startswith(".layers"):
                layer_weights += int(np.prod(a.shape)) * (2 if a.dtype == np.uint8 else 1)
    routed = cfg.num_hidden_layers * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return Work(2.0 * (layer_weights + routed), dense_bytes, expert_bytes // cfg.num_experts)


def step_bytes(work: Work, cfg, tokens: int) -> float:
    """The bytes a decode step of `tokens` tokens must read: the dense weights once, and each layer's
    distinct experts picked (k for one token; for more, the expected number under uniform routing)."""
    k, E = cfg.num_experts_per_tok, cfg.num_experts
    return work.dense_bytes + work.expert_bytes * E * (1 - (1 - k / E) ** tokens)


def machine_bounds() -> tuple[float, float]:
    """(float32 FLOP/s of an XLA 1024^3 matmul, bytes/s of an XLA sum over 256 MB), best of 5 each."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
    peak = 2 * 1024 ** 3 / best_of(lambda: mm(a).block_until_ready())
    big = jnp.ones((64, 1 << 20), jnp.float32)                            # 256 MB, far beyond the caches
    total = jax.jit(lambda b: jnp.sum(b))
    return peak, big.nbytes / best_of(lambda: total(big).block_until_ready())


def bench_bounds(cfg, params, jp: float, jd: float, rp: float, rd: float) -> None:
    """The machine's limits, measured now, as tokens/s bounds; each side as a fraction of them."""
    peak, read = machine_bounds()
    work = model_work(cfg, params)
    flops, nbytes = work.flops, step_bytes(work, cfg, 1)
    pb, db = peak / flops, read / nbytes
    print(f"  bounds     : f32 matmul {peak / 1e9:.0f} GFLOP/s -> prefill <= {pb:.0f} tok/s ({flops / 1e6:.0f} MFLOP/token); "
          f"read {read / 1e9:.1f} GB/s -> decode <= {db:.0f} tok/s ({nbytes / 1e6:.1f} MB/token)")
    print(f"  of bound   : jaxrun prefill {jp / pb:.0%} decode {jd / db:.0%}; ref prefill {rp / pb:.0%} decode {rd / db:.0%}")


GROWN = {"experts": lambda name: ".experts." in name or name.endswith(".mlp.gate.weight"),
         "embedding": lambda name: name == ".embed_tokens"}


class Traffic(NamedTuple):
    bytes: float         # XLA's cost analysis of the compiled step: bytes accessed
    widened: float       # of which XLA:CPU's widening of bf16 weights for its dots (widened_weight_bytes)


def step_traffic(params, cfg, mesh, precision: str, options, B: int, max_len: int = 256,
                 grow: str | None = None) -> Traffic:
    """XLA's cost analysis of the compiled decode step (batch B, no MTP). Compiled from abstract
    parameters (shapes and shardings of `params`) with the given options; grow "experts" holds twice
    the experts (router rows too), "embedding" twice the embedding rows, the rest unchanged, to see how
    the step's charge grows with what it holds but reads only in part."""
    import jax
    from jaxrun.runner import Runner

    def spec(path, a):
        big = grow is not None and a.ndim and GROWN[grow](jax.tree_util.keystr(path))
        shape = (2 * a.shape[0],) + a.shape[1:] if big else a.shape
        return jax.ShapeDtypeStruct(shape, a.dtype, sharding=a.sharding)

    abstract = jax.tree_util.tree_map_with_path(spec, params)
    fn = Runner(abstract, cfg, mesh, precision, options=options).decode_fn(B, max_len)
    ca = fn.cost_analysis()
    return Traffic(float((ca[0] if isinstance(ca, list) else ca)["bytes accessed"]), widened_weight_bytes(fn.as_text()))


_HLO_ARRAY = re.compile(r"\b(bf16|f32)\[([0-9,]*)\]")
_HLO_LINE = re.compile(r"^\s+(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\w[\w-]*)\(([^)]*)\)(.*)$")


def widened_weight_bytes(hlo: str) -> float:
    """What XLA's cost analysis charges, in the optimized HLO text of a step, for XLA:CPU widening bf16
    weights (parameters) to float32 before its dots (where it has no bf16 product; a GPU dot reads the
    bf16 weight): the copy's read and write (fusions that only convert a bf16 parameter to f32) and
    the half of each consuming dot's read of the copy beyond the bf16 bytes."""
    comps, cur, entry = {}, None, None
    for line in hlo.splitlines():
        if line.endswith("{") and line.startswith(("%", "ENTRY %")):
            cur = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[cur] = []
            entry = cur if line.startswith("ENTRY") else entry
        elif cur is not None and (m := _HLO_LINE.match(line)):
            comps[cur].append(m.groups())                                # (name, type, opcode, operands, attrs)
    nbytes = lambda t: sum(np.prod([int(d) for d in dims.split(",") if d]) * (2 if dt == "bf16" else 4)
                           for dt, dims in _HLO_ARRAY.findall(t))
    ops = comps.get(entry, [])
    params = {name: t for name, t, op, _, _ in ops if op == "parameter" and t.startswith("bf16[")}
    total = 0.0
    for name, t, op, args, attrs in ops:
        called = re.search(r"calls=%([\w.\-]+)", attrs)
        arg = args.strip().lstrip("%")
        if op != "fusion" or not called or arg not in params or not t.startswith("f32["):
            continue
        body = [o for _, _, o, _, _ in comps.get(called.group(1), [])]
        if sorted(body) != ["convert", "parameter"] or t.split("[")[1] != params[arg].split("[")[1]:
            continue
        users = [o for _, _, o, a, _ in ops if re.search(rf"%{re.escape(name)}(,|$)", a.replace(" ", ""))]
        if users and all(o == "dot" for o in users):
            total += nbytes(params[arg]) + nbytes(t) * (1 + len(users) / 2)
    return total


def bench_traffic(params, cfg, mesh, precision: str, label: str) -> None:
    """The decode step's memory traffic as XLA's cost analysis counts it, next to the ideal (the dense
    weights read once and the packed bytes of the experts picked, step_bytes), with the CPU's options
    and with the accelerators' (both compiled here, on this CPU), then the fair count for a GPU. XLA's
    cost model charges a gather or dynamic slice fused into a computation its whole operand, so a step
    that reads the picked experts and the tokens' embedding rows in place is charged every expert and
    row held: measured by compiling the step with twice the experts, then twice the embedding rows,
    and charged for the picked experts and the B rows only. With the accelerators' options (bf16
    products), XLA:CPU's widening of bf16 weights for its matrix-vector dots is left out too
    (widened_weight_bytes; on the CPU options the model widens them itself, a real cost there)."""
    from jaxrun.options import Options
    from ref.modes import Modes
    work = model_work(cfg, params)
    V = cfg.vocab_size
    print(f"decode step memory traffic, {label}: XLA cost analysis (bytes accessed) vs ideal (dense once + the "
          f"experts picked):")
    for platform in ("cpu", "gpu"):
        opts = Options.for_platform(mesh, Modes(precision), platform)
        kinds = f"{opts.slot_kernel} slots up to {opts.slot_tokens} tokens, {opts.expert_kernel} beyond"
        for B in (1, 8):
            ideal = step_bytes(work, cfg, B)
            got = step_traffic(params, cfg, mesh, precision, opts, B)
            per_expert = (step_traffic(params, cfg, mesh, precision, opts, B, grow="experts").bytes - got.bytes) / cfg.num_experts
            per_row = (step_traffic(params, cfg, mesh, precision, opts, B, grow="embedding").bytes - got.bytes) / V
            picked = (ideal - work.dense_bytes) / work.expert_bytes          # distinct experts a step reads
            held = (cfg.num_experts - picked) * per_expert + (V - B) * per_row
            widened = 0.0 if opts.widen_bf16_dots else got.widened
            fair = got.bytes - held - widened
            print(f"  {platform} options ({kinds}), batch {B}: {got.bytes / 1e6:8.1f} MB = {got.bytes / ideal:5.2f}x the "
                  f"ideal {ideal / 1e6:.1f} MB (target <= 1.5x)")
            print(f"      charged for what is held, not read: {per_expert / 1e3:.0f} kB per expert (packed "
                  f"{work.expert_bytes / 1e3:.0f} kB), {per_row / 1e3:.1f} kB per embedding row; XLA:CPU widening "
                  f"bf16 weights for its dots (no bf16 matrix-vector dot; a GPU reads the bf16): "
                  f"{widened / 1e6:.1f} MB; without these: {fair / 1e6:.1f} MB = {fair / ideal:4.2f}x")


def slice_397b(layers: int = 4):
    """(abstract parameters on one CPU device, TextConfig) of a 397B-shape slice: `layers` decoder layers
    (DeltaNet, then one attention layer last), bfloat16 dense (as a bf16 run holds it), NVFP4 experts, no weights."""
    import dataclasses
    import jax
    import jax.numpy as jnp
    from jaxrun.params import Formats, abstract, declare
    from jaxrun.sharding import make_mesh, param_specs, shardings
    from ref.config import FULL, LINEAR, QWEN35_397B
    text = dataclasses.replace(QWEN35_397B.text, num_hidden_layers=layers, layer_types=(LINEAR,) * (layers - 1) + (FULL,))
    full = dataclasses.replace(QWEN35_397B, text=text)
    mesh = make_mesh(1)
    declared = declare(full, Formats.random(full))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract(declared, jnp.bfloat16), shardings(param_specs(declared, 1), mesh))
    return params, text, mesh


def bench_footprint(n: int = 4) -> None:
    import jax.numpy as jnp
    from jaxrun.params import Formats, declare, leaves, resolve_dtype
    from jaxrun.sharding import bytes_per_device, param_specs
    from ref.config import QWEN35_397B

    declared = declare(QWEN35_397B, Formats.random(QWEN35_397B))
    total = sum(int(np.prod(p.shape)) * np.dtype(resolve_dtype(p, jnp.bfloat16)).itemsize for p in leaves(declared))
    gb = 1e9
    print(f"397B parameters (bf16 dense, NVFP4 routed experts, no MTP/vision): {total / gb:.1f} GB in all")
    for mode in ("replicated", "sharded"):
        per = bytes_per_device(declared, param_specs(declared, n, mode), n, jnp.bfloat16)
        print(f"  N = {n}, dense {mode:10s}: {per / gb:6.1f} GB per device")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--devices", type=int)
    a = p.parse_args(argv)
    from ref.synth import cached_checkpoint
    bench_speed(a.model or str(cached_checkpoint("small")), a.prompt_tokens, a.new_tokens, a.devices)
    bench_footprint()
    return 0


if __name__ == "__main__":
    sys.exit(main())
