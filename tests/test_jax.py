"""jaxrun on one CPU device against ref: NVFP4 decoding, logits, greedy tokens, batching, compiles, CLI.

One Runner (f32, one device, cache of CONTEXT positions) is shared by the module so each shape is
compiled once; the fused-layout checkpoint reuses its compiled functions.
"""
import json
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

from ckpt_edit import copy_checkpoint, edit_tensors

from jaxrun.generate import main as cli_main
from jaxrun.load import load
from jaxrun.nvfp4 import dequant_nvfp4, quantize_activation
from jaxrun.runner import Runner, speculative_stats
from jaxrun.sampling import Sampling
from jaxrun.sharding import make_mesh
from ref.model import Model
from ref.modes import Modes
from ref.nvfp4 import dequantize, quantize_activation as ref_quantize_activation
from ref.tokenizer import load_tokenizer

CONTEXT = 256
PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 1, 3], [64, 2, 11, 400]]
STEPS = 8
TOL = 1e-4  # f32 runner vs f64 reference, max |Δ logit|


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    mesh = make_mesh(1)
    ckpt, params = load(str(tiny_checkpoint), mesh, "f32", progress=False)
    return Runner(params, ckpt.config.text, mesh, "f32")


@pytest.fixture(scope="module")
def ref_model(tiny_checkpoint):
    return Model(str(tiny_checkpoint), "f64")


@pytest.fixture(scope="module")
def single(runner):
    """Greedy generation of each prompt alone, logits kept."""
    return [runner.generate([p], STEPS, max_context=CONTEXT, keep_logits=True)[0] for p in PROMPTS]


# ---- NVFP4 decoding ----------------------------------------------------------------------------

_dequant = jax.jit(dequant_nvfp4)
_finite_f32 = st.integers(0, 2 ** 32 - 1).map(lambda b: np.uint32(b).view(np.float32)).filter(np.isfinite)


@given(packed=st.binary(min_size=32, max_size=32), scales=st.binary(min_size=4, max_size=4), g=_finite_f32)
def test_nvfp4_decode_bit_identical_to_ref(packed, scales, g):
    """Every code byte, every E4M3 byte (NaN included), every finite float32 global (subnormals too)."""
    q = np.frombuffer(packed, np.uint8).reshape(2, 16)                  # K = 32
    s = np.frombuffer(scales, np.uint8).reshape(2, 2).view(ml_dtypes.float8_e4m3fn)
    with np.errstate(all="ignore"):
        want = dequantize(q, s, np.float32(g))
    got = np.asarray(_dequant(q, s, np.float32(g)))
    nan = np.isnan(want)
    assert np.array_equal(nan, np.isnan(got))
    assert np.array_equal(want.view(np.uint32)[~nan], got.view(np.uint32)[~nan])


_quantize = jax.jit(quantize_activation)
_normal_or_special = st.one_of(
    st.floats(-1e6, 1e6, width=32).filter(lambda v: v == 0 or abs(v) >= 2.0 ** -126),   # CPU reads subnormals as 0
    st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 6.0, -5.0, 2.5, 1e30]))


@given(x=st.lists(_normal_or_special, min_size=32, max_size=32),
       scale=st.floats(2.0 ** -20, 2.0 ** 20, width=32), gain=st.sampled_from([1.0, 1e-3, 1e3, 2.0 ** -40]))
def test_activation_quantizer_bit_identical_to_ref(x, scale, gain):
    """Codes and E4M3 block scales of the engines' quantizer equal ref.nvfp4.quantize_activation's
    (cuda sign rule): NaN, infinities, signed zeros, saturating blocks, ties."""
    a = (np.array(x, np.float32) * np.float32(gain)).reshape(2, 16)
    a[np.abs(a) < 2.0 ** -126] = 0                                            # no subnormals after the gain
    codes, scales = _quantize(a, np.float32(scale))
    codes = np.asarray(codes)
    with np.errstate(all="ignore"):
        want_packed, want_scales = ref_quantize_activation(a, np.float32(scale), sign="cuda")
    assert np.array_equal(codes[..., 0::2] | (codes[..., 1::2] << 4), want_packed)
    assert np.array_equal(np.asarray(scales).view(np.uint8), want_scales.view(np.uint8))


# ---- logits and tokens against ref -------------------------------------------------------------

def _check_logits(runner, ref_model, results):
    for r in results:
        seq = r.prompt_token_ids + r.token_ids
        full = ref_model.logits(seq)
        n = len(r.prompt_token_ids)
        jx = np.stack(r.logits)                                           # prefill's last row, then each decode step
        assert np.abs(jx - full[n - 1:n - 1 + len(r.token_ids)]).max() <= TOL
        tokens = np.zeros((1, 16), np.int32)
        tokens[0, :n] = r.prompt_token_ids
        lg, _ = runner.prefill(tokens, np.array([n]), CONTEXT, all_logits=True)
        assert np.abs(np.asarray(lg)[0, :n] - full[:n]).max() <= TOL


def test_logits_match_ref_per_expert_layout(runner, ref_model, single):
    _check_logits(runner, ref_model, single)


def test_logits_match_ref_fused_layout(runner, ref_model, tiny_checkpoint, tiny_checkpoint_fused):
    _, fused = load(str(tiny_checkpoint_fused), runner.mesh, "f32", progress=False)
    runner.set_params(fused)
    try:
        results = [runner.generate([p], STEPS, max_context=CONTEXT, keep_logits=True)[0] for p in PROMPTS]
        _check_logits(runner, ref_model, results)
    finally:
        runner.set_params(load(str(tiny_checkpoint), runner.mesh, "f32", progress=False)[1])


def test_greedy_tokens_equal_ref(ref_model, single):
    for p, r in zip(PROMPTS, single):
        assert r.token_ids == ref_model.generate(p, STEPS)


def test_w4a4_matches_ref_w4a4(runner, tiny_checkpoint):
    """Routed-expert GEMM inputs quantized as the engines do: logits within the f32 bound of ref's
    float64 W4A4 forward, greedy tokens equal; a checkpoint without input scales is refused."""
    w4a4 = Runner(runner.params, runner.cfg, runner.mesh, "f32", activations="w4a4")
    ref = Model(str(tiny_checkpoint), "f64", activations="w4a4")
    for p in PROMPTS:
        r = w4a4.generate([p], STEPS, max_context=CONTEXT, keep_logits=True)[0]
        assert r.token_ids == ref.generate(p, STEPS)
        full = ref.logits(p + r.token_ids)[len(p) - 1:len(p) - 1 + STEPS]
        assert np.abs(np.stack(r.logits) - full).max() <= 1e-3 * max(1.0, np.abs(full).max())
    no_scales = lambda layer: layer._replace(mlp=layer.mlp._replace(experts=layer.mlp.experts._replace(input_scale=None)))
    bare = runner.params._replace(layers=tuple(no_scales(layer) for layer in runner.params.layers))
    with pytest.raises(ValueError, match="input scales"):
        Runner(bare, runner.cfg, runner.mesh, "f32", activations="w4a4")


def test_mtp_drafts_match_ref(runner, ref_model, single):
    """The MTP head beside the model: the tokens do not change, each draft's logits are ref's
    teacher-forced MTP logits (row t drafts token t + 2) within the f32 bound, the draft ids their argmax."""
    for p, plain in zip(PROMPTS, single):
        r = runner.generate([p], STEPS, max_context=CONTEXT, keep_logits=True, mtp=True)[0]
        assert r.token_ids == plain.token_ids
        want = ref_model.mtp_logits(p + r.token_ids)[len(p) - 1:]
        got = np.stack(r.mtp_logits)
        assert got.shape == want.shape and np.abs(got - want).max() <= TOL
        assert r.mtp_draft_ids == [int(np.argmax(g)) for g in got]
        assert r.mtp_accepted() == (sum(d == t for d, t in zip(r.mtp_draft_ids, r.token_ids[1:])), STEPS - 1)


class _OracleDrafts(Runner):
    """A runner whose speculative steps get the plain greedy continuation as drafts, wrong where the
    drafted position is a multiple of 3: accepted, partly accepted and rejected steps all run."""
    seqs: list = []

    def verify(self, state, *args):
        pos = np.asarray(state.pos)[:, None] + 1 + np.arange(np.shape(state.drafts)[1])   # [B, K]
        want = np.array([[seq[min(int(p), len(seq) - 1)] for p in row] for seq, row in zip(self.seqs, pos)])
        return super().verify(state._replace(drafts=np.where(pos % 3 == 0, (want + 1) % self.cfg.vocab_size, want)),
                              *args)


def _oracle(runner, single, prompts=PROMPTS):
    oracle = _OracleDrafts(runner.params, runner.cfg, runner.mesh, "f32")
    oracle.seqs = [p + s.token_ids for p, s in zip(prompts, single)]
    return oracle


@pytest.mark.parametrize("K", [1, 3])
def test_speculative_greedy_equals_plain_greedy(runner, single, K):
    """MTP speculative decoding with K drafts emits exactly plain greedy decoding's tokens, with its
    logits (f32 rounding of the other shapes apart), whether the drafts are the MTP head's (all
    rejected on random weights) or mostly right, and so does sampling with top-k 1 at any temperature."""
    r = runner.generate([PROMPTS[0]], STEPS, max_context=CONTEXT, keep_logits=True, speculative=K)[0]
    assert r.token_ids == single[0].token_ids and r.drafts_proposed == K * (STEPS - 1)
    oracle = _oracle(runner, single)
    batch = oracle.generate(PROMPTS, STEPS, max_context=CONTEXT, keep_logits=True, speculative=K)
    for b, s in zip(batch, single):
        assert b.token_ids == s.token_ids
        assert np.abs(np.stack(b.logits) - np.stack(s.logits)).max() <= TOL
        assert 0 < b.drafts_accepted < b.drafts_proposed                    # some steps emitted several tokens
        stats = speculative_stats([b])
        rates = stats["acceptance_per_position"]
        assert len(rates) == K and rates == sorted(rates, reverse=True) and rates[0] > 0
        assert stats["steps"] * K == b.drafts_proposed and sum(b.accepted_at) == b.drafts_accepted
        assert stats["mean_acceptance_length"] == pytest.approx(1 + sum(rates))
    top1 = oracle.generate(PROMPTS, STEPS, Sampling(temperature=2.0, top_k=1, seed=4), max_context=CONTEXT,
                           speculative=K)
    assert [t.token_ids for t in top1] == [b.token_ids for b in batch]
    assert [t.drafts_accepted for t in top1] == [b.drafts_accepted for b in batch]
    with pytest.raises(ValueError, match="exceed the context of 16"):                # no room for the drafts
        runner.generate([PROMPTS[0]], 16 - len(PROMPTS[0]), max_context=16, speculative=K)


@pytest.mark.parametrize("K", [1, 2])
def test_speculative_sampling_follows_the_model(runner, ref_model, single, K):
    """Sampled speculative decoding (drafts kept by chance, others redrawn): each emitted token's
    logits are ref's teacher-forced logits of the produced sequence, so the caches follow the kept
    tokens on every path; a seed fixes the result."""
    oracle = _oracle(runner, single)
    sampling = Sampling(temperature=0.3, top_k=2, seed=1)
    got = oracle.generate(PROMPTS, STEPS, sampling, max_context=CONTEXT, keep_logits=True, speculative=K)
    assert sum(r.drafts_accepted for r in got) > 0 and any(r.drafts_accepted < r.drafts_proposed for r in got)
    for p, r in zip(PROMPTS, got):
        assert len(r.token_ids) == STEPS
        want = ref_model.logits(p + r.token_ids)[len(p) - 1:len(p) - 1 + STEPS]
        assert np.abs(np.stack(r.logits) - want).max() <= TOL
    again = oracle.generate(PROMPTS, STEPS, sampling, max_context=CONTEXT, speculative=K)
    assert [a.token_ids for a in again] == [r.token_ids for r in got]


def test_batch_equals_single(runner, single):
    batch = runner.generate(PROMPTS, STEPS, max_context=CONTEXT, keep_logits=True)
    for b, s in zip(batch, single):
        assert b.token_ids == s.token_ids
        assert np.abs(np.stack(b.logits) - np.stack(s.logits)).max() <= TOL  # f32 rounding of other shapes


@pytest.mark.parametrize("speculative", [0, 2])
def test_stops_end_sequences_of_a_batch(runner, single, speculative):
    """A stop id ends its sequences (kept as the last token, also inside a step that kept several
    drafts) and on_step can end another after a step, while the next step is already queued;
    decode_tokens counts what the decode steps appended."""
    stop = single[0].token_ids[2]
    assert stop not in single[1].token_ids[:2]                           # sequence 1 is ended by on_step only
    on_step = lambda results, done: np.array([False, len(results[1].token_ids) >= 2, False])
    prompts = PROMPTS + [PROMPTS[0]]
    gen = _oracle(runner, single + [single[0]], prompts) if speculative else runner
    gen.timings = type(gen.timings)()
    got = gen.generate(prompts, STEPS, max_context=CONTEXT, stop_ids={stop}, on_step=on_step, speculative=speculative)
    first = single[0].token_ids[:single[0].token_ids.index(stop) + 1]
    assert got[0].token_ids == got[2].token_ids == first
    n = len(got[1].token_ids)                                            # a step may have kept several tokens
    assert got[1].token_ids == single[1].token_ids[:n] and (n == 2 if not speculative else 2 <= n <= 4)
    assert gen.timings.decode_tokens == sum(len(r.token_ids) - 1 for r in got)


def test_sampling(runner, single):
    """top-k 1 is greedy at any temperature; a seed fixes the sample; no recompiling for new values."""
    before = dict(runner.traces)
    top1 = runner.generate([PROMPTS[0]], STEPS, Sampling(temperature=2.0, top_k=1, seed=3), max_context=CONTEXT)
    assert top1[0].token_ids == single[0].token_ids
    hot = [runner.generate([PROMPTS[0]], STEPS, Sampling(temperature=1.5, top_p=0.95, seed=s), max_context=CONTEXT)[0]
           for s in (7, 7, 8)]
    assert hot[0].token_ids == hot[1].token_ids != hot[2].token_ids
    assert runner.traces == before


def test_decode_compiles_once(runner, single):
    """Generating more tokens or other prompt lengths of the same bucket compiles nothing new."""
    before = dict(runner.traces)
    runner.generate([PROMPTS[0]], 2 * STEPS, max_context=CONTEXT)
    runner.generate([PROMPTS[0][:5]], 3, max_context=CONTEXT)
    assert runner.traces == before
    assert runner.traces["decode"] == sum(k[0] == "decode" for k in runner._compiled)  # once per (B, S)


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_json_contract_and_check(tiny_checkpoint, single):
    ids = ",".join(map(str, PROMPTS[0]))
    out = subprocess.run([sys.executable, "-m", "jaxrun.generate", "--model", str(tiny_checkpoint), "--token-ids", ids,
                          "--max-new-tokens", str(STEPS), "--json", "--check", "--mtp", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["prompt_token_ids"] == PROMPTS[0]
    want = single[0].token_ids
    eos = set(Model(str(tiny_checkpoint)).cfg.eos_token_ids) | set(load_tokenizer(tiny_checkpoint).eos_token_ids)
    cut = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
    assert obj["token_ids"] == want[:cut]
    assert isinstance(obj["text"], str) and obj["finish_reason"] in ("stop", "length")
    assert len(obj["mtp_draft_ids"]) == len(obj["token_ids"]) and obj["mtp_accepted"][1] == len(obj["token_ids"]) - 1
    for k in ("compile_s", "prefill_tok_s", "decode_tok_s"):
        assert k in obj["timings"]
    assert "tok/s" in out.stderr and "check: PASS" in out.stderr and "mtp draft 0" in out.stderr


def test_cli_speculative_sampling_checks_against_ref(tiny_checkpoint, capsys):
    ids = ",".join(map(str, PROMPTS[1]))
    argv = ["--model", str(tiny_checkpoint), "--token-ids", ids, "--max-new-tokens", "6", "--speculative", "2",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--json", "--check", "--quiet"]
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    obj = json.loads(out.strip().splitlines()[-1])
    spec = obj["speculative"]
    assert 1 <= len(obj["token_ids"]) <= 6 and spec["drafts_proposed"] == 2 * spec["steps"] >= 2
    assert len(spec["acceptance_per_position"]) == 2 and spec["mean_acceptance_length"] >= 1
    assert "check: PASS" in err and "mean acceptance length" in err


def test_cli_compile_cache_is_reused(tiny_checkpoint, tmp_path):
    """The default cache is under $XDG_CACHE_HOME; a second run of the same shapes loads every
    compiled step from it (writes no new entry) and generates the same tokens; off writes nothing."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}

    def run(*flags, home):
        out = subprocess.run([sys.executable, "-m", "jaxrun.generate", "--model", str(tiny_checkpoint), "--token-ids",
                              "5,17,300", "--max-new-tokens", "4", "--json", "--quiet", *flags],
                             capture_output=True, text=True, timeout=300, env={**env, "XDG_CACHE_HOME": str(home)})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])["token_ids"]

    cache = tmp_path / "home" / "qwen35-nvfp4-spec" / "xla"
    first = run(home=tmp_path / "home")
    entries = sorted(p.name for p in cache.iterdir())
    assert entries and run(home=tmp_path / "home") == first and sorted(p.name for p in cache.iterdir()) == entries
    assert run("--compile-cache", "off", home=tmp_path / "off") == first and not (tmp_path / "off").exists()


def test_cli_mtp_without_head_exits_2(tiny_checkpoint, tmp_path, capsys):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "no_mtp")
    edit_tensors(d, {"mtp.fc.weight": lambda a: None})
    assert cli_main(["--model", str(d), "--token-ids", "1,2", "--mtp", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxrun.generate: error: --mtp") and "mtp.fc.weight" in err[0]


@pytest.mark.parametrize("args, words", [
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--devices", "8"], "--devices 8"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--token-ids", "1,x"], "--token-ids"),
    (["--token-ids", "1,99999"], "99999"),
    (["--token-ids", "1,2", "--max-context", "8", "--max-new-tokens", "7"], "exceeds the context"),
    (["--token-ids", "1,2", "--speculative", "0"], "--speculative"),
    (["--token-ids", "1,2", "--max-context", "16", "--max-new-tokens", "12", "--speculative", "2"], "2 speculative drafts"),
])
def test_cli_bad_input_exits_2(tiny_checkpoint, capsys, args, words):
    argv = args if args[0] == "--model" else ["--model", str(tiny_checkpoint), *args]
    assert cli_main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxrun.generate: error:") and words in err[0]


@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("activations, act_scale", [("w4a16", "per-expert"), ("w4a4", "per-expert"), ("w4a4", "max")])
def test_cli_check_passes_in_every_mode(tiny_checkpoint, capsys, precision, activations, act_scale):
    """--check in every supported mode combination: a faithful run is within its mode's bound."""
    argv = ["--model", str(tiny_checkpoint), "--token-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens", "6",
            "--precision", precision, "--activations", activations, "--act-scale", act_scale, "--check", "--quiet",
            "--json"]
    assert cli_main(argv) == 0, capsys.readouterr().err[-2000:]
    assert f"check: PASS ({Modes(precision, activations, act_scale).describe()} vs ref f64)" in capsys.readouterr().err


def test_caches_grow_with_the_sequence(runner, single):
    """A cache that starts small and doubles as the sequence grows gives the tokens and logits of one
    sized for the whole run at once."""
    runner.initial_new_tokens = 4
    try:
        grown = runner.generate([PROMPTS[0]], 300, max_context=512, keep_logits=True)[0]
    finally:
        runner.initial_new_tokens = 256
    assert runner.traces["grow"] >= 1
    whole = runner.generate([PROMPTS[0]], 300, max_context=512, keep_logits=True)[0]
    assert grown.token_ids == whole.token_ids and grown.token_ids[:STEPS] == single[0].token_ids
    diff = np.abs(np.stack(grown.logits) - np.stack(whole.logits)).max(axis=-1)       # per step
    assert diff[:200].max() <= TOL   # later, f32 rounding of the two cache lengths drifts apart (a chaotic model)
