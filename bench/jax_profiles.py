"""jaxrun (f32) against ref (f64) under every engine profile on every checkpoint variant.

For each synthetic variant (default ModelOpt, modelopt-mixed, compressed-tensors; tiny preset, written to
a temporary folder) and each profile (ref.profiles) at f32, jaxrun greedily generates a few tokens after
a random prompt; ref recomputes the same sequence under the same modes (jaxrun.check.reference_logits:
one prefill, then a decode step per token where the KV-cache or state modes tell the two apart) and the
largest |Δ logit| relative to max(1, max |ref logit|) is printed with the greedy agreement. SGLang's
non-saturating KV store meets values beyond the mixed variant's calibrated scales on random prompts
(NaN, as the engine would produce); those rows use vLLM's store. A bf16 DeltaNet state can round the
f32 and f64 states apart by one bf16 unit, which W4A4 can amplify on other prompts. About 10 minutes
on two shared CPU cores (each profile compiles its own steps).

    python bench/jax_profiles.py [--tokens 4] [--prompt 20]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from jaxrun.check import reference_logits
from jaxrun.load import load
from jaxrun.runner import Runner
from jaxrun.sharding import make_mesh
from ref.model import Model
from ref.profile_fit import _groups
from ref.profiles import PROFILES
from ref.synth import write_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=20)
    a = ap.parse_args()
    mesh = make_mesh(1)
    ids = np.random.default_rng(3).integers(0, 512, a.prompt).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("modelopt", "modelopt-mixed", "compressed-tensors"):
            ckpt, params = load(str(write_checkpoint(Path(tmp) / variant, "tiny", seed=0, variant=variant)), mesh,
                                "f32", progress=False)
            for names, modes in _groups(PROFILES):
                modes = replace(modes, precision="f32")
                if variant == "modelopt-mixed" and modes.kv_engine == "sglang":
                    modes = replace(modes, kv_engine="vllm")
                t0 = time.perf_counter()
                r = Runner(params, ckpt.config.text, mesh, **asdict(modes))
                res = r.generate([ids], a.tokens, max_context=64, keep_logits=True)[0]
                want = reference_logits(Model(ckpt, **asdict(replace(modes, precision="f64"))), ids, res.token_ids)
                rel = np.abs(np.stack(res.logits) - want).max() / max(1.0, np.abs(want).max())
                agree = res.token_ids == [int(np.argmax(w)) for w in want]
                print(f"{variant:<19} {' = '.join(names):<30} {modes.describe():<52} max|Δ|/max {rel:.2e} "
                      f"greedy {'equal' if agree else 'DIFFER'} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
