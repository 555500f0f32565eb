#!/usr/bin/env bash
# One prepared GPU check for jaxrun (< 8 minutes). Run from the repository root on a machine with
# jax[cuda12] installed:
#
#     bash bench/gpu_check.sh            # 397B shapes, 4-layer slice (3 DeltaNet + 1 attention)
#     bash bench/gpu_check.sh --dry-run  # the same steps on CPU with the tiny shapes (checks the script)
#
# Steps: (1) device-to-device copy bandwidth; (2) NVFP4 decode and the W4A4 activation quantizer,
# bit-identity with ref.nvfp4 on the device (subnormal results, NaN, saturation included); (3) tiny
# synthetic checkpoint: jaxrun f32 logits vs ref f64 (`generate --check`, MTP drafts included), W4A16
# and W4A4; (4) a 397B-shape 4-layer slice with random weights built on the device (NVFP4
# experts packed, bf16 dense, an MTP head), decode-step time at batch 1 and 8, and the bytes one step
# must read over that time, next to the measured copy bandwidth; speculative steps' times at batch 1
# (1 and 3 drafts); (5) every routed-expert form (jaxrun.moe: decode slots with fused or dot products at
# 1 and 8 tokens, the ragged and sorted forms at 256 and 2048) on one layer's experts with the 397B
# shapes: time, the bytes of the experts read per second against the copy bandwidth, FLOP/s.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
export GPU_CHECK_DRY=$DRY
if [[ $DRY == 0 ]]; then
  python -c "import jax; d = jax.devices(); print(d); assert d[0].platform == 'gpu', 'no GPU visible'"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

timeout 120 python - "$tmp" <<'EOF'
import sys, time
import numpy as np, jax, jax.numpy as jnp, ml_dtypes
from ref.nvfp4 import dequantize
from ref.nvfp4 import quantize_activation as ref_quantize
from jaxrun.nvfp4 import dequant_nvfp4, quantize_activation

# (1) copy bandwidth: read + write of a large buffer, best of 10
n = (1 << 28) if jax.default_backend() == "gpu" else (1 << 24)   # bf16 elements: 512 MiB on GPU
x = jnp.ones((n,), jnp.bfloat16)
copy = jax.jit(lambda a: a + jnp.bfloat16(1))
copy(x).block_until_ready()
best = min((lambda t0: (copy(x).block_until_ready(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(10))
bw = 2 * n * 2 / best
print(f"copy bandwidth: {bw / 1e9:.0f} GB/s ({jax.devices()[0].device_kind})")
open(sys.argv[1] + "/bw", "w").write(repr(bw))

# (2) NVFP4 decoding on the device vs ref.nvfp4 (all code bytes, all scale bytes, wide globals)
rng = np.random.default_rng(0)
q = rng.integers(0, 256, (4096, 8), dtype=np.uint8)
s = rng.integers(0, 256, (4096, 1), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
f = jax.jit(dequant_nvfp4)
bad = 0
for g in [1.0, 1e-3, 3e-38, 1e-40, 2.5e-44, 7e30, 4e35]:
    with np.errstate(all="ignore"):
        want = dequantize(q, s, np.float32(g))
    got = np.asarray(f(q, s, np.float32(g)))
    nan = np.isnan(want)
    diff = int((want.view(np.uint32) != got.view(np.uint32))[~nan].sum() + (nan != np.isnan(got)).sum())
    bad += diff
    print(f"nvfp4 decode, global {g:.1e}: {diff} of {want.size} values differ from ref.nvfp4")
print("nvfp4 decode bit-identical:", bad == 0)

# (2b) the engines' activation quantizer on the device vs ref.nvfp4 (cuda sign rule)
x = (rng.standard_normal((512, 64)) * np.exp(rng.uniform(-20, 20, (512, 1)))).astype(np.float32)
x[0, :16], x[1, 3], x[2, 5], x[3, :16] = np.nan, np.nan, np.inf, 0.0
qa = jax.jit(quantize_activation)
for scale in (1e-3, 0.02, 5.0):
    codes, sc = (np.asarray(a) for a in qa(x, np.float32(scale)))
    with np.errstate(all="ignore"):
        wp, ws = ref_quantize(x, np.float32(scale), sign="cuda")
    diff = int(((codes[:, 0::2] | (codes[:, 1::2] << 4)) != wp).sum() + (sc.view(np.uint8) != ws.view(np.uint8)).sum())
    print(f"activation quantizer, input scale {scale:g}: {diff} codes or scales differ from ref.nvfp4")
EOF

timeout 120 python -c "from ref.synth import write_checkpoint; write_checkpoint('$tmp/tiny', preset='tiny')" >/dev/null
echo "== tiny checkpoint: jaxrun f32 vs ref f64 (--check) =="
for act in w4a16 w4a4; do
  timeout 180 python -m jaxrun.generate --model "$tmp/tiny" --token-ids 5,17,300,42,7,99,250,1,3 \
    --max-new-tokens 8 --precision f32 --activations $act --mtp --check --quiet --json 2>&1 | grep -E "check:|tok/s" || true
done

echo "== 4-layer slice of the 397B shapes, random weights =="
timeout 360 python - "$tmp" <<'EOF'
import dataclasses, os, sys, time
import numpy as np, jax, jax.numpy as jnp
from ref.config import FULL, LINEAR, QWEN35_397B
from jaxrun.load import place
from jaxrun.params import Formats, declare, init
from jaxrun.runner import Runner
from jaxrun.sampling import Sampling
from jaxrun.sharding import make_mesh

dry = os.environ.get("GPU_CHECK_DRY") == "1"
if dry:
    from ref.synth import preset_config
    base = preset_config("tiny")
else:
    base = QWEN35_397B
text = dataclasses.replace(base.text, num_hidden_layers=4, layer_types=(LINEAR, LINEAR, LINEAR, FULL))
full = dataclasses.replace(base, text=text)
cfg = full.text
bw = float(open(sys.argv[1] + "/bw").read())
mesh = make_mesh()
dt = jnp.bfloat16
t0 = time.perf_counter()
declared = declare(full, Formats.random(full, mtp=True))
params = jax.block_until_ready(place(init(jax.random.PRNGKey(0), declared, dt), declared, mesh))  # op by op
print(f"random parameters on {mesh.size} device(s): {time.perf_counter() - t0:.1f} s")
runner = Runner(params, cfg, mesh, "bf16")

leaves = [(p, a) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
          if not jax.tree_util.keystr(p).startswith(".mtp")]                  # a decode step does not read the MTP head
nbytes = lambda a: a.size * a.dtype.itemsize
expert_bytes = sum(nbytes(a) for p, a in leaves if ".experts." in jax.tree_util.keystr(p)) // (cfg.num_experts * 4)
embed_bytes = nbytes(params.embed_tokens)
dense_bytes = sum(nbytes(a) for p, a in leaves if ".experts." not in jax.tree_util.keystr(p)) - embed_bytes
row = embed_bytes // cfg.vocab_size
print(f"per layer and expert {expert_bytes / 1e6:.2f} MB (packed codes + scales); dense weights read per step "
      f"{dense_bytes / 1e9:.2f} GB (lm_head included, embedding rows apart)")


def time_steps(state, steps):
    """Median time of `steps` steps (each with its sampling, as generate runs it), after a warm-up."""
    state, out = runner.step(state, ctx)                                 # compile + warm up
    jax.block_until_ready(out.tokens)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = runner.step(state, ctx)
        jax.block_until_ready(out.tokens)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


ctx, steps = 256, 16
for B in (1, 8):
    prompts = [[int(t) for t in np.random.default_rng(b).integers(0, cfg.vocab_size, 32)] for b in range(B)]
    state, _ = runner.start(prompts, ctx, Sampling())
    step = time_steps(state, steps)
    experts = min(B * cfg.num_experts_per_tok, cfg.num_experts)     # distinct per layer: exact at B = 1, at most at B = 8
    read = dense_bytes + B * row + 4 * experts * expert_bytes
    print(f"batch {B}: decode step {step * 1e3:.2f} ms (median of {steps}), {B / step:.1f} tok/s; reads <= "
          f"{read / 1e9:.3f} GB/step -> <= {read / step / 1e9:.0f} GB/s = {100 * read / step / bw:.0f}% of copy "
          f"bandwidth ({bw / 1e9:.0f} GB/s)")
# a speculative step (the token and K MTP drafts through the model, then the MTP head) against a decode step
for K in (1, 3):
    state, _ = runner.start([prompts[0]], ctx, Sampling(), mtp=True, K=K)
    print(f"speculative step with {K} draft(s) ({K + 1} tokens + MTP head), batch 1: {time_steps(state, steps) * 1e3:.2f} "
          f"ms (median of {steps}); it pays when 1 + accepted drafts exceeds its ratio to the batch-1 decode step")
print(f"compile time: {runner.timings.compile_s:.1f} s; traces: {dict(runner.traces)}")
EOF
echo "== routed-expert forms on one layer's experts (397B shapes, random NVFP4) =="
timeout 240 python - "$tmp" <<'EOF'
import os, sys, time
import numpy as np, jax, jax.numpy as jnp
from jaxrun.moe import local_experts
from jaxrun.options import Options
from jaxrun.params import Experts, NVFP4
from jaxrun.sharding import make_mesh
from ref.config import QWEN35_397B
from ref.modes import Modes

dry = os.environ.get("GPU_CHECK_DRY") == "1"
t = QWEN35_397B.text
E, H, I, k = (16, 64, 32, 4) if dry else (t.num_experts, t.hidden_size, t.moe_intermediate_size, t.num_experts_per_tok)
bw = float(open(sys.argv[1] + "/bw").read())
mesh = make_mesh(1)


def proj(key, out, inp):
    a, b = jax.random.split(key)
    q = jax.random.randint(a, (E, out, inp // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    s = jax.lax.bitcast_convert_type(jax.random.randint(b, (E, out, inp // 16), 0x20, 0x48, jnp.int32).astype(jnp.uint8),
                                     jnp.float8_e4m3fn)
    return NVFP4(q, s, jnp.full((E,), 2.0 ** -8, jnp.float32))


ks = jax.random.split(jax.random.PRNGKey(0), 3)
experts = jax.block_until_ready(Experts(proj(ks[0], I, H), proj(ks[1], I, H), proj(ks[2], H, I)))
per_expert = sum(a.nbytes for a in jax.tree.leaves(experts)) / E
base = Options.for_platform(mesh, Modes("bf16"), jax.devices()[0].platform)
forms = [("slots fused", dict(slot_kernel="fused")), ("slots dot", dict(slot_kernel="dot")),
         ("ragged", dict(expert_kernel="ragged")), ("sorted", dict(expert_kernel="sorted"))]
print(f"{E} experts [{I}x{H}], {per_expert / 1e6:.2f} MB packed each; copy bandwidth {bw / 1e9:.0f} GB/s")
rng = np.random.default_rng(0)
for N in (1, 8, 256, 2048):
    ids = jnp.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.int32))
    w = jnp.full((N, k), 1.0 / k, jnp.float32)
    x = jnp.asarray(rng.standard_normal((N, H)), jnp.bfloat16)
    touched = len(np.unique(np.asarray(ids)))                           # experts whose bytes must be read
    for name, change in forms:
        if name.startswith("slots") != (N <= 8):
            continue                                                    # slots for steps, the others for prefill
        opts = base.replace(slot_tokens=8, **change)
        f = jax.jit(lambda x, ids, w, ex: local_experts(x, ids, w, ex, 0, opts, all_local=True))
        t0 = time.perf_counter()
        f(x, ids, w, experts).block_until_ready()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            f(x, ids, w, experts).block_until_ready()
            times.append(time.perf_counter() - t0)
        s = float(np.median(times))
        flops = 2 * N * k * 3 * H * I
        print(f"  {name:11s} N={N:5d}: {s * 1e3:8.3f} ms (median of 5; compile {compile_s:.1f} s), {touched} experts "
              f"read: {touched * per_expert / s / 1e9:7.1f} GB/s = {100 * touched * per_expert / s / bw:5.1f}% of copy "
              f"bandwidth; {flops / s / 1e12:6.3f} TFLOP/s")
EOF
echo "gpu_check done"
