"""How far a faithful bf16 run lands from the float64 reference, per activations mode: the measurement
behind jaxrun.check's bf16 bounds (`jaxrun.generate --check`).

    python bench/check_bounds.py [--model DIR] [--prompts 16] [--new-tokens 12]

For each mode (w4a16; w4a4 with per-expert and layer-max input scales) it generates greedily with
jaxrun in bf16 on random prompts (lengths 4..40) and recomputes each sequence with ref.model in f64 and
in bf16 (the reference's own emulation of a bf16 engine): KL(ref f64 || run) per token, its mean per
sequence, and their maxima over all prompts, for both runs. jaxrun.check's bounds are set above the
largest values seen here with a margin; the output prints them next to the measurements.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=12)
    a = p.parse_args(argv)
    from jaxrun.check import bf16_bounds
    from jaxrun.load import load
    from jaxrun.runner import Runner
    from jaxrun.sharding import make_mesh
    from ref.divergence import kl_full, log_softmax
    from ref.model import Model
    from ref.synth import cached_checkpoint

    model = a.model or str(cached_checkpoint("tiny"))
    mesh = make_mesh(1)
    ckpt, params = load(model, mesh, "bf16", progress=False)
    V = ckpt.config.text.vocab_size
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(0, V - 64, n)] for n in rng.integers(4, 41, a.prompts)]
    print(f"{model}: {a.prompts} prompts, {a.new_tokens} new tokens, KL(ref f64 || run)")
    print(f"{'mode':<20} {'run':<10} {'max mean/seq':>13} {'max token':>10}   bound (mean, token)")
    for act, scale in (("w4a16", "per-expert"), ("w4a4", "per-expert"), ("w4a4", "max")):
        runner = Runner(params, ckpt.config.text, mesh, "bf16", act, scale)
        f64, bf16 = (Model(model, prec, activations=act, act_scale=scale) for prec in ("f64", "bf16"))
        stats = {"jaxrun bf16": ([], []), "ref bf16": ([], [])}
        for prompt in prompts:
            res = runner.generate([prompt], a.new_tokens, keep_logits=True)[0]
            seq = prompt + res.token_ids[:-1]
            want = f64.logits(seq)[len(prompt) - 1:]
            for name, rows in (("jaxrun bf16", res.logits), ("ref bf16", bf16.logits(seq)[len(prompt) - 1:])):
                kls = [kl_full(log_softmax(w), log_softmax(np.asarray(g, np.float64))) for w, g in zip(want, rows)]
                stats[name][0].append(float(np.mean(kls)))
                stats[name][1].extend(kls)
        bound = bf16_bounds(act)
        for name, (means, tokens) in stats.items():
            print(f"{act + ' ' + scale:<20} {name:<10} {max(means):>13.3g} {max(tokens):>10.3g}   {bound}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
