"""jaxrun's sequences recomputed with the reference, and the bounds they must meet (`generate --check`).
Image prompts are recomputed with ref's own encoder and positions (the same images, preprocessed once).

Each generated token's logits are compared with ref.model's logits of the same sequence (float64, the
same modes otherwise: ref.modes), computed as jaxrun computed them: the prompt as one prefill, then a
decode step per token (which the KV-cache and state modes distinguish from one long prefill); with the
MTP head, its drafts too:
  f32:  max |Δ logit| <= F32_BOUND * max(1, max |ref logit|), and top-1 equal unless the ref's top-2
        gap is below 2 max |Δ| (a near tie);
  bf16: KL(ref || jaxrun) within bf16_bounds(activations) on average over a sequence's tokens and for
        every token (bf16 rounding can flip a near-tied expert choice, a discrete jump at one token,
        and under W4A4 it flips NVFP4 activation codes), and the same top-1 rule.
"""
from __future__ import annotations

import sys

import numpy as np

from ref.divergence import kl_full, log_softmax

F32_BOUND = 1e-3                             # max |Δ logit| / max(1, max |ref logit|)
BF16_MEAN_KL, BF16_MAX_KL = 0.08, 0.8        # W4A16: KL(ref || jaxrun) per sequence (mean) and per token
BF16_W4A4_MEAN_KL, BF16_W4A4_MAX_KL = 0.4, 1.8    # W4A4: bf16 rounding also flips NVFP4 activation codes


def bf16_bounds(activations: str) -> tuple[float, float]:
    """(mean KL per sequence, KL per token) a faithful bf16 run stays within, against ref f64 in the
    same activations mode. bench/check_bounds.py measures them for jaxrun bf16 and for ref bf16 (the
    reference's own bf16 engine) over random prompts; the bounds are 1.5x the largest values seen
    over 64 prompts of the tiny model (one prompt flipping a near-tied expert gives the spikes)."""
    return (BF16_W4A4_MEAN_KL, BF16_W4A4_MAX_KL) if activations == "w4a4" else (BF16_MEAN_KL, BF16_MAX_KL)


def compare(a, b, precision: str, activations: str = "w4a16") -> tuple[float, float, bool]:
    """ref logits a [V] (float64) vs jaxrun's b [V] -> (max |Δ|, KL(ref || jaxrun), within the
    mode's per-token bound)."""
    d = float(np.abs(a - b).max())
    kl = kl_full(log_softmax(a), log_softmax(b))
    within = d <= F32_BOUND * max(1.0, float(np.abs(a).max())) if precision == "f32" else \
        kl <= bf16_bounds(activations)[1]
    return d, kl, within


def reference_logits(ref, prompt: list[int], tokens: list[int], images=None) -> np.ndarray:
    """ref.model's logits predicting each of `tokens` after `prompt` [len(tokens), V]: one teacher-forced
    prefill where that equals prefill + decode, else (a fresh prefill over a quantized KV cache, a
    bf16 DeltaNet state) the prompt's last row of one prefill, then one decode step per token."""
    m = ref.modes
    if not ((m.kv_prefill == "fresh" and m.kv_cache_dtype != "auto") or m.state_dtype != "float32"):
        return ref.logits(prompt + tokens[:-1], images=images)[len(prompt) - 1:]
    logits, cache = ref.prefill(prompt, images=images)
    rows = [logits[-1]]
    for t in tokens[:-1]:
        last, cache = ref.decode(t, cache)
        rows.append(last)
    return np.stack(rows)


def check(ckpt, results, modes, out=None, images=None) -> bool:
    """Recompute each Result's sequence with ref.model (float64, jaxrun's modes otherwise: ref.modes.Modes;
    the MTP head's drafts too when kept); a line per token on `out`; True if within the bounds. images:
    per result the images of its prompt (or None), recomputed by ref's own encoder."""
    from dataclasses import asdict, replace
    from ref.model import Model
    out = out or sys.stderr
    precision, activations = modes.precision, modes.activations
    ref = Model(ckpt, **asdict(replace(modes, precision="f64")))
    images = images or [None] * len(results)
    ok = True
    for n, (r, ims) in enumerate(zip(results, images)):
        kls = []
        rl = reference_logits(ref, r.prompt_token_ids, r.token_ids, ims)   # [steps, V], predicts token_ids
        for i, jl in enumerate(r.logits):
            a, b = rl[i], np.asarray(jl, np.float64)
            d, kl, bound = compare(a, b, precision, activations)
            top = np.sort(a)[-2:]
            agree = int(np.argmax(a)) == int(np.argmax(b))
            near_tie = top[1] - top[0] < 2 * d
            kls.append(kl)
            good = bound and (agree or near_tie)
            ok &= good
            print(f"check [{n}] step {i}: max|dlogit| {d:.3e}  KL {kl:.3e}  top1 {'agree' if agree else 'DIFFER'}"
                  f"{'' if good else '  <-- beyond bound'}", file=out)
        mean_bound = bf16_bounds(activations)[0]
        if precision == "bf16" and kls and np.mean(kls) > mean_bound:
            ok = False
            print(f"check [{n}]: mean KL {np.mean(kls):.3e} > {mean_bound}  <-- beyond bound", file=out)
        if r.mtp_logits:                                                 # ref row t drafts token t + 2
            want = ref.mtp_logits(r.prompt_token_ids + r.token_ids, images=ims)[len(r.prompt_token_ids) - 1:]
            for i, (a, b) in enumerate(zip(want, r.mtp_logits)):
                d, kl, good = compare(a, np.asarray(b, np.float64), precision, activations)
                ok &= good
                print(f"check [{n}] mtp draft {i}: max|dlogit| {d:.3e}  KL {kl:.3e}"
                      f"{'' if good else '  <-- beyond bound'}", file=out)
    print(f"check: {'PASS' if ok else 'FAIL'} ({modes.describe()} vs ref f64)", file=out)
    return ok
