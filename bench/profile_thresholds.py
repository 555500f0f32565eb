"""Measure each engine profile's crosscheck thresholds from faithful runs (ref.profiles says how).

For every profile (profiles that set the same modes once), on the tiny synthetic checkpoints (the
default ModelOpt one and the modelopt-mixed variant, written to a temporary folder): random prompts of
T tokens, a few seeds each; the "engine" is ref.model in bf16 under the profile, the reference ref.model
in float64 under the same profile (ref.profile_fit.faithful_metrics). Prints, per profile, the worst
value of every verdict metric and the thresholds they give (ref.profile_fit.thresholds_from), next to
the thresholds ref.profiles holds. Takes a few minutes on one core.

    python bench/profile_thresholds.py [--lengths 16 48 80 150] [--seeds 3] [--profiles NAME ...]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ref.checkpoint import open_checkpoint
from ref.profile_fit import _groups, faithful_metrics, thresholds_from
from ref.profiles import PROFILES, get_profile
from ref.synth import write_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 48, 80, 150])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = [open_checkpoint(write_checkpoint(Path(tmp) / v, "tiny", seed=0, variant=v))
                 for v in ("modelopt", "modelopt-mixed")]
        t0 = time.perf_counter()
        for names, modes in _groups(a.profiles):
            runs = []
            for ckpt in ckpts:
                vocab = ckpt.config.text.vocab_size
                for T in a.lengths:
                    for seed in range(a.seeds):
                        ids = np.random.default_rng([seed, T]).integers(0, vocab, T).tolist()
                        runs.append(faithful_metrics(ckpt, modes, ids))
            print(f"{' = '.join(names)} ({modes.describe()}), {len(runs)} runs")
            for label, th in (("measured", thresholds_from(runs)), ("held", get_profile(names[0]).thresholds)):
                print(f"  {label:<9} {th!r}")
        print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
