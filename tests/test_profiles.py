"""Engine profiles (ref.profiles): the mode flags of every CLI (a profile, the flags given overriding
its fields, defaults never overriding it), --list-profiles, bad names, and each profile's thresholds
against a re-measured subset of the faithful runs they come from."""
import subprocess
import sys
from dataclasses import asdict, fields, replace

import numpy as np
import pytest

from ref.checkpoint import open_checkpoint
from ref.modes import Modes, modes_from_args
from ref.profile_fit import faithful_metrics
from ref.profiles import PROFILES, get_profile


def _parsers():
    from jaxrun import generate, serve
    from ref import crosscheck, run
    return {"ref.run": (lambda argv: run._parser().parse_args(["--model", "m", "--token-ids", "1"] + argv), "f64"),
            "ref.crosscheck": (lambda argv: crosscheck.build_parser().parse_args(["--model", "m"] + argv), "f64"),
            "jaxrun.generate": (generate.parse_args, "f32"), "jaxrun.serve": (serve.parse_args, "f32")}


@pytest.mark.parametrize("cli", ["ref.run", "ref.crosscheck", "jaxrun.generate", "jaxrun.serve"])
def test_profile_then_explicit_flags(cli):
    parse, default = _parsers()[cli]
    modes = lambda argv: modes_from_args(parse(argv), default)  # noqa: E731
    assert modes([]) == Modes(default)
    assert modes(["--engine-profile", "sglang-fp8kv-bf16state"]) == get_profile("sglang-fp8kv-bf16state").modes
    got = modes(["--engine-profile", "sglang-fp8kv-bf16state", "--kv-prefill", "cache", "--precision", "f32",
                 "--state-dtype", "float32"])   # a flag given equal to its default still overrides the profile
    assert got == replace(get_profile("sglang-fp8kv-bf16state").modes, kv_prefill="cache", precision="f32",
                          state_dtype="float32")
    assert modes(["--kv-cache-dtype", "nvfp4", "--activations", "w4a4", "--act-scale", "max"]) == \
        Modes(default, "w4a4", "max", "nvfp4")


def test_every_profile_is_complete_and_distinct():
    """Each profile sets every mode, says where it comes from, carries measured per-kind step bounds;
    profiles with the same modes are only those meant to (HF transformers and Marlin run alike)."""
    seen = {}
    for p in PROFILES.values():
        assert isinstance(p.modes, Modes) and p.modes.precision == "bf16" and p.source and p.engine
        assert {k for k, _, _ in p.thresholds.steps} >= {"attention", "deltanet", "head"}
        seen.setdefault(p.modes, []).append(p.name)
    assert sorted(v for v in seen.values() if len(v) > 1) == [["hf-bf16", "marlin-w4a16"]]


@pytest.mark.parametrize("module", ["ref.run", "ref.crosscheck", "jaxrun.generate", "jaxrun.serve"])
def test_list_profiles(module):
    out = subprocess.run([sys.executable, "-m", module, "--list-profiles"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == ""
    for p in PROFILES.values():
        assert f"\n{p.name}\n" in f"\n{out.stdout}" and p.source in out.stdout
    assert out.stdout.count("  sets:") == len(PROFILES)
    for f in fields(Modes):
        assert f"{f.name}=" in out.stdout


@pytest.mark.parametrize("module, argv, words", [
    ("ref.run", ["--model", "M", "--token-ids", "1", "--engine-profile", "nope"], "invalid choice: 'nope'"),
    ("ref.run", ["--model", "M", "--token-ids", "1", "--engine-profile", "sglang-fp8kv", "--kv-cache-dtype", "nvfp4"],
     "only vLLM's NVFP4 KV cache"),
    ("ref.crosscheck", ["--model", "M", "--engine-logits", "x.npy", "--fit-profiles", "hf-bf16", "nope"],
     "engine profile 'nope'"),
    ("ref.crosscheck", ["--model", "M", "--engine-logits", "x.npy", "--fit-profiles", "--engine-profile", "hf-bf16"],
     "not both"),
    ("jaxrun.generate", ["--engine-profile", "nope"], "invalid choice: 'nope'"),
    ("jaxrun.serve", ["--engine-profile", "vllm", "--port", "1"], "invalid choice: 'vllm'"),
])
def test_bad_profile_names_exit_2_with_one_line(module, argv, words, capsys):
    import importlib
    main = importlib.import_module(module).main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{module}: error:") and words in err[0]


@pytest.mark.parametrize("variant, profile, T, seed", [("tiny_checkpoint", "hf-bf16", 48, 0),
                                                       ("tiny_checkpoint_mixed", "vllm-blackwell-nvfp4kv", 16, 1),
                                                       ("tiny_checkpoint", "sglang-fp8kv", 80, 2)])
def test_thresholds_hold_their_margins(variant, profile, T, seed, request):
    """Runs of bench/profile_thresholds.py (same checkpoints, prompts and seeds) stay inside each bound
    with its margin: every metric at most bound / 1.5 (top-1 at least the bound + 0.1)."""
    ckpt = open_checkpoint(request.getfixturevalue(variant))
    th = get_profile(profile).thresholds
    ids = np.random.default_rng([seed, T]).integers(0, ckpt.config.text.vocab_size, T).tolist()
    m = faithful_metrics(ckpt, get_profile(profile).modes, ids)
    assert m["mean_kl"] <= th.max_kl / 1.5 and m["max_kl"] <= th.max_kl_pos / 1.5, (m, th)
    assert m["top1"] >= th.min_top1 + 0.1 - 1e-9, (m, th)
    bounds = {kind: (r, t) for kind, r, t in th.steps}
    for kind, (err, tok) in m["steps"].items():
        assert err <= bounds[kind][0] / 1.5 and tok <= bounds[kind][1] / 1.5, (kind, m, th)
    assert asdict(get_profile(profile).modes)["precision"] == "bf16"
