"""ref.crosscheck end to end: faithful engines pass; engines with the bugs users hit are flagged, and the
layer dumps point at the layer where the bug was injected.

Engines are the reference itself (bf16, W4A4), with one bug injected either by rewriting tensors of
one layer in a copy of the tiny checkpoint or by wrapping a ref.layers function for one layer.
"""
import contextlib
import json
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine_bodies import completion_response
from ref import crosscheck as X
from ref import layers as L
from ref.checkpoint import open_checkpoint
from ref.model import Model
from ref.errors import FormatError
from ref.modes import Modes
from ref.report import format_fit
from ref.safetensors_io import SafetensorsFile, overwrite_tensor
from ref.tokenizer import load_tokenizer

T = 80  # > one DeltaNet chunk (64), so a state dropped between chunks shows


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return open_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def ids(ckpt):
    return np.random.default_rng(7).integers(0, ckpt.config.text.vocab_size, T).tolist()


def engine(ckpt, ids, **kw):
    """An 'engine' = ref.model in some mode -> (logits [T, V], dumps)."""
    dumps = {}
    logits, _ = Model(ckpt, **kw).prefill(ids, dumps=dumps)
    return np.asarray(logits, np.float64), dumps


def check(ckpt, ids, eng_logits, dumps, **modes):
    return X.crosscheck(ckpt, ids, eng_logits=eng_logits, eng_dumps=dumps, lint=False, modes=Modes(**modes))


# ---------------------------------------------------------------- bug injection

def rewrite_layer(src, dst, edits):
    """Copy checkpoint `src` to `dst`, applying edits {tensor name: fn(array) -> array} in place."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    for name, fn in edits.items():
        shard = dst / index[name]
        overwrite_tensor(shard, name, fn(np.array(SafetensorsFile(shard).tensor(name))))
    return open_checkpoint(dst)


def expert_edits(ckpt, layer, suffix, fn):
    pre = f"{ckpt.config.text_prefix}layers.{layer}.mlp.experts."
    return {n: fn for n in ckpt.names() if n.startswith(pre) and n.endswith(suffix)}


@contextlib.contextmanager
def deltanet_bug(ckpt, layer, bug):
    """Wrap ref.layers.gated_deltanet so that only `layer` (found by its A_log) runs `bug`."""
    target = np.asarray(ckpt.lm(f"layers.{layer}.linear_attn.A_log"), np.float64)
    original = L.gated_deltanet

    def wrapped(x, prm, *args, **kw):
        if np.allclose(np.asarray(prm.A_log, np.float64), target, rtol=1e-2):
            return bug(original, x, prm, *args, **kw)
        return original(x, prm, *args, **kw)

    L.gated_deltanet = wrapped
    try:
        yield
    finally:
        L.gated_deltanet = original


def state_not_carried(original, x, prm, *args, **kw):
    """Each chunk of the chunked rule starts again from the initial state."""
    rule = L.delta_rule_chunked

    def per_chunk(q, k, v, g, beta, state, chunk=L.CHUNK):
        outs, S = [], state
        for s in range(0, q.shape[0], chunk):
            o, S = rule(q[s:s + chunk], k[s:s + chunk], v[s:s + chunk], g[s:s + chunk], beta[s:s + chunk], state, chunk)
            outs.append(o)
        return np.concatenate(outs), S

    L.delta_rule_chunked = per_chunk
    try:
        return original(x, prm, *args, **kw)
    finally:
        L.delta_rule_chunked = rule


def tiled_heads(original, x, prm, n_k_heads, *args, **kw):
    """Value head h paired with key head h % Hk (tiled) instead of h // (Hv/Hk) (consecutive): the same
    as the right pairing on value heads reordered so that heads sharing a key head are adjacent."""
    Hv, dv = prm.A_log.shape[0], prm.norm.shape[0]
    key_dim = (prm.conv1d.shape[0] - Hv * dv) // 2
    perm = [h for kh in range(n_k_heads) for h in range(Hv) if h % n_k_heads == kh]
    vrows = np.concatenate([np.arange(h * dv, (h + 1) * dv) for h in perm])
    rows = np.concatenate([np.arange(2 * key_dim), 2 * key_dim + vrows])
    w = {n: np.asarray(getattr(prm, n)) for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")}
    prm = prm._replace(in_proj_qkv=w["in_proj_qkv"][rows], conv1d=prm.conv1d[rows], in_proj_z=w["in_proj_z"][vrows],
                       in_proj_b=w["in_proj_b"][perm], in_proj_a=w["in_proj_a"][perm], dt_bias=prm.dt_bias[perm],
                       A_log=prm.A_log[perm], out_proj=w["out_proj"][:, vrows])
    return original(x, prm, n_k_heads, *args, **kw)


# ---------------------------------------------------------------- faithful engines pass

@pytest.mark.parametrize("precision, activations", [("bf16", "w4a16"), ("f32", "w4a4")])
def test_faithful_engine_passes(ckpt, ids, precision, activations):
    """Against the f64 reference in the engine's activation mode."""
    logits, dumps = engine(ckpt, ids, precision=precision, activations=activations)
    rep = check(ckpt, ids, logits, dumps, activations=activations)
    assert rep["verdict"]["ok"], X.format_report(rep)
    assert rep["summary"]["kl_kind"] == "full" and len(rep["positions"]) == T
    assert any(r["name"] == "layers.3.after_moe" for r in rep["layers"])


@pytest.mark.parametrize("activations", ["w4a16", "w4a4"])
def test_recompute_reproduces_the_reference_exactly(ckpt, ids, activations):
    """Each step recomputed from the reference's own dumps equals the reference's next dump: the
    recompute wires the layers exactly as ref.model does."""
    _, dumps = engine(ckpt, ids, precision="bf16", activations=activations)
    local = X.recompute_from_engine(ckpt, dumps, Modes("bf16", activations))
    assert set(local) == set(dumps) - {"embeddings"}
    for name, value in local.items():
        assert np.array_equal(value, dumps[name]), name


def test_faithful_engine_topk_json_passes(ckpt, ids):
    """Only an engine's top-5 logprobs, in vLLM's prompt_logprobs shape."""
    from ref import engine_io as io
    logits, _ = engine(ckpt, ids, precision="bf16")
    rec = io.read_engine_json(completion_response(ids, logits, 5))
    rep = X.crosscheck(ckpt, None, rec, lint=False)
    assert rep["verdict"]["ok"] and rep["summary"]["kl_kind"] == "topk" and rep["engine"]["k"] == 5


# ---------------------------------------------------------------- injected bugs are flagged where they are

BUGS = {
    # name: (how to build the engine, layer, first step expected to diverge)
    "rmsnorm without +1": ("ckpt", 1, "after_mixer"),
    "swapped nibble order": ("ckpt", 2, "after_moe"),
    "inverted global scale": ("ckpt", 0, "after_moe"),
    "tiled deltanet heads": ("patch", 2, "after_mixer"),
    "deltanet state not carried across chunks": ("patch", 1, "after_mixer"),
}


def buggy_engine(name, ckpt, ids, tmp_path):
    layer = BUGS[name][1]
    if name == "rmsnorm without +1":  # the engine multiplies by w; ref by (1 + w): store w - 1
        norm = f"{ckpt.config.text_prefix}layers.{layer}.input_layernorm.weight"
        minus_one = lambda w: (w.astype(np.float32) - 1).astype(w.dtype)  # noqa: E731
        bad = rewrite_layer(ckpt.directory, tmp_path / "c", {norm: minus_one})
        return engine(bad, ids, precision="bf16")
    if name == "swapped nibble order":
        swap = lambda b: ((b & 0x0F) << 4 | b >> 4).astype(np.uint8)  # noqa: E731
        return engine(rewrite_layer(ckpt.directory, tmp_path / "c", expert_edits(ckpt, layer, "_proj.weight", swap)),
                      ids, precision="bf16")
    if name == "inverted global scale":  # 1/weight_scale_2 used as the multiplier (divisor convention)
        inv = lambda s: (np.float32(1) / s).astype(np.float32)  # noqa: E731
        return engine(rewrite_layer(ckpt.directory, tmp_path / "c", expert_edits(ckpt, layer, "weight_scale_2", inv)),
                      ids, precision="bf16")
    bug = tiled_heads if name == "tiled deltanet heads" else state_not_carried
    with deltanet_bug(ckpt, layer, bug):
        return engine(ckpt, ids, precision="bf16")


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the inverted scale blows the MoE up to inf
@pytest.mark.parametrize("name", list(BUGS))
def test_injected_bug_is_flagged_at_its_layer(name, ckpt, ids, tmp_path):
    logits, dumps = buggy_engine(name, ckpt, ids, tmp_path)
    rep = check(ckpt, ids, logits, dumps)
    _, layer, step = BUGS[name]
    assert not rep["verdict"]["ok"], X.format_report(rep)
    first = rep["verdict"]["first_divergent"]
    assert (first["name"], first["layer"]) == (f"layers.{layer}.{step}", layer), X.format_report(rep)
    # without dumps, the logprobs alone still say the engine diverges
    assert not check(ckpt, ids, logits, None)["verdict"]["ok"]


def test_w4a4_max_over_experts_scale_is_flagged(ckpt, ids):
    """A bf16 W4A4 engine collapses the per-expert activation scales to their max; checked against the
    reference with the engine's rounding points (bf16, W4A4) and per-expert scales."""
    logits, dumps = engine(ckpt, ids, precision="bf16", activations="w4a4", act_scale="max")
    rep = check(ckpt, ids, logits, dumps, precision="bf16", activations="w4a4")
    assert not rep["verdict"]["ok"], X.format_report(rep)
    assert rep["verdict"]["first_divergent"]["name"] == "layers.0.after_moe", X.format_report(rep)


# ---------------------------------------------------------------- engine profiles: faithful engines are explained,
# bugs seen in the field are not (ref.profile_fit), and are flagged at their layer under the profile that fits

def profile_engine(ckpt, profile, ids, edit=None):
    """ref.model under an engine profile (bf16 and every mode), with `edit(model)` applied -> (logits, dumps)."""
    from dataclasses import asdict
    from ref.profiles import get_profile
    m = Model(ckpt, **asdict(get_profile(profile).modes))
    if edit is not None:
        edit(m)
    dumps = {}
    logits, _ = m.prefill(ids, dumps=dumps)
    return np.asarray(logits, np.float64), dumps


def joined(parts):
    """(logits, dumps) of consecutive forward calls of one sequence, as the engine reports them."""
    return (np.concatenate([np.asarray(lg, np.float64) for lg, _ in parts]),
            {k: np.concatenate([d[k] for _, d in parts]) for k in parts[0][1]})


def kv_store_bug(layer, store):
    """edit: the KV store of attention layer `layer` becomes store(k, v, k_scale, v_scale)."""
    def edit(m):
        right = m.weights.kv_store

        def kv_store(i):
            if i != layer:
                return right(i)
            k_scale, v_scale, _ = m.ckpt.kv_scales(i)
            return lambda k, v: store(k, v, k_scale, v_scale)
        m.weights.kv_store = kv_store
    return edit


def nvfp4_kv_without_global(k, v, k_scale, v_scale):
    """NVFP4 KV whose block scales are computed without the global (SFScaleVal 1 instead of 1 / kv_scale),
    read back with the KV scale as usual."""
    from ref import kvcache
    def read(x, scale):
        return kvcache.dequantize_kv_nvfp4(*kvcache.quantize_kv_nvfp4(x, 1.0), scale).astype(np.float32)
    return read(k, k_scale), read(v, v_scale)


def fp8_k_scale_twice(k, v, k_scale, v_scale):
    """FP8 KV whose keys are dequantized with k_scale and k_scale again (folded into the softmax scale too)."""
    from ref import kvcache
    k_read = kvcache.kv_read(k, k_scale, "fp8_e4m3") * np.float64(k_scale)
    return k_read.astype(np.float32), kvcache.kv_read(v, v_scale, "fp8_e4m3").astype(np.float32)


def gate_half_nvfp4(layer):
    """edit: the sigmoid-gate rows of `layer`'s q_proj quantized to NVFP4 (weights, ModelOpt's recipe)
    while the query rows stay BF16 (NVIDIA/Model-Optimizer#2091)."""
    from ref import nvfp4

    def edit(m):
        attention, t = m.weights.attention, m.cfg

        def wired(a):
            prm = attention(a)
            if not a["q_proj"].name.startswith(f"{m.ckpt.config.text_prefix}layers.{layer}."):
                return prm
            w = np.asarray(prm.q_proj, np.float64)
            D = t.head_dim
            rows = np.concatenate([np.arange(h * 2 * D + D, (h + 1) * 2 * D) for h in range(t.num_attention_heads)])
            w[rows] = nvfp4.dequantize(*nvfp4.quantize_weight(w[rows]), dtype=np.float64)
            return prm._replace(q_proj=m.p.act(w))
        m.weights.attention = wired
    return edit


def stale_state_after_prefix_hit(ckpt, profile, ids, layer, P=48):
    """An engine that serves ids[:P] from its prefix cache: the attention K/V of the prefix are right, but
    DeltaNet layer `layer`'s state is the one left by the earlier request that went on past P
    (modular/modular#6681)."""
    from dataclasses import asdict, replace
    from ref.profiles import get_profile
    m = Model(ckpt, **asdict(get_profile(profile).modes))
    first, second = {}, {}
    head, cache = m.prefill(ids[:P], dumps=first)
    _, later = m.prefill(np.random.default_rng(9).integers(0, 512, 20).tolist(), cache)
    stale = tuple(later.layers[i] if i == layer else c for i, c in enumerate(cache.layers))
    tail, _ = m.prefill(ids[P:], replace(cache, layers=stale), dumps=second)
    return joined([(head, first), (tail, second)])


def one_token_prefill_bug(ckpt, profile, ids, layer):
    """An engine whose one-token prefill (after a cached prefix) runs DeltaNet layer `layer` as a fresh
    sequence, without its state (vllm#42898: a CUDA-graph dispatch mismatch for one-token prefills)."""
    from dataclasses import asdict
    from ref.profiles import get_profile
    m = Model(ckpt, **asdict(get_profile(profile).modes))

    def drop_state(original, x, prm, n_k_heads, eps, state=None, *args, **kw):
        return original(x, prm, n_k_heads, eps, None if x.shape[0] == 1 else state, *args, **kw)
    first, second = {}, {}
    head, cache = m.prefill(ids[:-1], dumps=first)
    with deltanet_bug(ckpt, layer, drop_state):
        tail, _ = m.prefill(ids[-1:], cache, dumps=second)
    return joined([(head, first), (tail, second)])


FIELD_BUGS = {
    # name: (checkpoint fixture, the profile the engine otherwise runs, layer, step)
    "nvfp4 kv block scales without the global": ("tiny_checkpoint_mixed", "vllm-blackwell-nvfp4kv", 3, "after_mixer"),
    "fp8 kv scale applied twice": ("tiny_checkpoint_mixed", "vllm-blackwell-fp8kv", 3, "after_mixer"),
    "sigmoid gate half of q_proj quantized": ("tiny_checkpoint", "hf-bf16", 3, "after_mixer"),
    "tiled deltanet heads": ("tiny_checkpoint", "vllm-blackwell", 2, "after_mixer"),
    "stale deltanet state after a prefix-cache hit": ("tiny_checkpoint", "sglang-fp8kv", 2, "after_mixer"),
    "one-token prefill takes another path": ("tiny_checkpoint", "vllm-blackwell", 1, "after_mixer"),
}


def field_bug_engine(name, ckpt, ids):
    _, profile, layer, _ = FIELD_BUGS[name]
    if name == "nvfp4 kv block scales without the global":
        return profile_engine(ckpt, profile, ids, kv_store_bug(layer, nvfp4_kv_without_global))
    if name == "fp8 kv scale applied twice":
        return profile_engine(ckpt, profile, ids, kv_store_bug(layer, fp8_k_scale_twice))
    if name == "sigmoid gate half of q_proj quantized":
        return profile_engine(ckpt, profile, ids, gate_half_nvfp4(layer))
    if name == "tiled deltanet heads":
        with deltanet_bug(ckpt, layer, tiled_heads):
            return profile_engine(ckpt, profile, ids)
    if name == "stale deltanet state after a prefix-cache hit":
        return stale_state_after_prefix_hit(ckpt, profile, ids, layer)
    return one_token_prefill_bug(ckpt, profile, ids, layer)


_REFERENCE_RUNS: dict = {}


@pytest.fixture
def shared_reference_runs(monkeypatch):
    """The reference run of one (checkpoint, token ids, modes) made once for the module (the profile fits
    of these tests repeat them; the engines' own edits never touch the reference)."""
    run = X.run_reference

    def memo(ckpt, token_ids, backend="ref", modes=Modes(), want_dumps=False, images=()):
        key = (str(ckpt.directory), tuple(token_ids), backend, modes, want_dumps, tuple(map(id, images)))
        if key not in _REFERENCE_RUNS:
            _REFERENCE_RUNS[key] = run(ckpt, token_ids, backend, modes, want_dumps, images)
        logits, dumps = _REFERENCE_RUNS[key]
        return logits.copy(), None if dumps is None else dict(dumps)
    monkeypatch.setattr(X, "run_reference", memo)


@pytest.mark.usefixtures("shared_reference_runs")
@pytest.mark.parametrize("name", list(FIELD_BUGS))
def test_field_bug_is_flagged_at_its_layer_and_explained_by_no_profile(name, ids, request):
    """Under the profile the engine otherwise runs, the bug is the first divergent step, at its layer;
    fitted against every profile, none explains the engine, and the verdict names that step."""
    from ref.profile_fit import fit_profiles
    fixture, profile, layer, step = FIELD_BUGS[name]
    ckpt = open_checkpoint(request.getfixturevalue(fixture))
    logits, dumps = field_bug_engine(name, ckpt, ids)
    rep = fit_profiles(ckpt, ids, eng_logits=logits, eng_dumps=dumps, lint=False)
    row = next(r for r in rep["profiles"] if profile in r["profiles"])
    first = row["verdict"]["first_divergent"]
    assert first is not None and (first["name"], first["layer"]) == (f"layers.{layer}.{step}", layer), \
        format_fit(rep)
    assert not rep["consistent"] and rep["verdict"]["line"].startswith("no profile explains this: likely a bug")
    assert f"first diverging step layers.{layer}.{step}" in rep["verdict"]["line"], format_fit(rep)


@pytest.mark.usefixtures("shared_reference_runs")
@pytest.mark.parametrize("fixture, profile", [("tiny_checkpoint", "hf-bf16"),
                                              ("tiny_checkpoint_mixed", "vllm-blackwell-nvfp4kv"),
                                              ("tiny_checkpoint", "sglang-fp8kv-bf16state")])
def test_faithful_engine_is_explained_by_its_profile(fixture, profile, ids, request):
    """An engine that runs a profile exactly is consistent with it: the best fit (ties: profiles whose
    modes give the same output here, e.g. SGLang's fresh prefill and a bf16 KV cache)."""
    from ref.profile_fit import fit_profiles
    ckpt = open_checkpoint(request.getfixturevalue(fixture))
    logits, dumps = profile_engine(ckpt, profile, ids)
    rep = fit_profiles(ckpt, ids, eng_logits=logits, eng_dumps=dumps, lint=False)
    assert rep["consistent"] and rep["verdict"]["line"].startswith("consistent with"), format_fit(rep)
    best = min(r["score"] for r in rep["profiles"] if r["verdict"]["ok"])
    assert any(profile in r["profiles"] and r["score"] == best for r in rep["profiles"]), format_fit(rep)
    assert profile in rep["verdict"]["line"].split(":")[0]


def test_cli_engine_profile_and_fit(ids, tiny_checkpoint, tmp_path, capsys):
    """--engine-profile checks against the profile's modes and thresholds; --fit-profiles prints the
    table and exits 0 for a faithful engine, 1 (naming the layer) for a bug; the JSON holds the table."""
    ckpt = open_checkpoint(tiny_checkpoint)
    base = ["--model", str(ckpt.directory), "--token-ids", ",".join(map(str, ids)), "--no-lint"]

    def files(logits, dumps, tag):
        np.save(tmp_path / f"{tag}.npy", logits)
        save_file({k: np.ascontiguousarray(v) for k, v in dumps.items()}, str(tmp_path / f"{tag}.safetensors"))
        return ["--engine-logits", str(tmp_path / f"{tag}.npy"), "--engine-dumps", str(tmp_path / f"{tag}.safetensors")]
    good = files(*profile_engine(ckpt, "vllm-blackwell", ids), "good")
    assert X.main(base + good + ["--engine-profile", "vllm-blackwell"]) == 0
    out = capsys.readouterr().out
    assert "bf16 w4a4 (max)" in out.splitlines()[0] and out.splitlines()[-1].startswith("PASS")
    fit = ["--fit-profiles", "hf-bf16", "vllm-blackwell", "--json", str(tmp_path / "f.json")]
    assert X.main(base + good + fit) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("consistent with vllm-blackwell") and any("<-- best" in line for line in out)
    rep = json.loads((tmp_path / "f.json").read_text())
    assert [r["profiles"] for r in rep["profiles"]] == [["hf-bf16"], ["vllm-blackwell"]]
    assert rep["best"] == "vllm-blackwell"
    bad = files(*one_token_prefill_bug(ckpt, "vllm-blackwell", ids, 1), "bad")
    assert X.main(base + bad + ["--fit-profiles"]) == 1
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("no profile explains this") and "layers.1.after_mixer" in line
    assert X.main(base + bad + ["--engine-profile", "vllm-blackwell", "--layer-rtol", "10", "--token-rtol", "10"]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------- CLI: live server, files, exit codes

@pytest.fixture
def server():
    """127.0.0.1 server (ephemeral port) answering /v1/completions with whatever body is set."""
    class Handler(BaseHTTPRequestHandler):
        body: dict = {}

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps(Handler.body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", Handler
    srv.shutdown()
    srv.server_close()


def test_cli_server_pass_and_diverge(ckpt, ids, server, tmp_path, capsys):
    url, handler = server
    argv = ["--model", str(ckpt.directory), "--server", url, "--server-model", "tiny", "--top-k", "5",
            "--token-ids", ",".join(map(str, ids))]
    handler.body = completion_response(ids, engine(ckpt, ids, precision="bf16")[0], 5)
    out = tmp_path / "rep.json"
    assert X.main(argv + ["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text.splitlines()[-1] and "vllm prompt_logprobs" in text
    rep = json.loads(out.read_text())
    assert rep["verdict"]["ok"] and len(rep["positions"]) == T - 1 and rep["engine"]["k"] == 5
    assert isinstance(rep["lint"], list)
    with deltanet_bug(ckpt, 1, state_not_carried):
        handler.body = completion_response(ids, engine(ckpt, ids, precision="bf16")[0], 5)
    assert X.main(argv) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("DIVERGES")


def test_cli_files(ckpt, ids, tmp_path, capsys):
    logits, dumps = buggy_engine("tiled deltanet heads", ckpt, ids, tmp_path)
    np.save(tmp_path / "logits.npy", logits.astype(np.float32))
    save_file({k: np.ascontiguousarray(v) for k, v in dumps.items() if k != "logits"}, str(tmp_path / "d.safetensors"))
    argv = ["--model", str(ckpt.directory), "--engine-logits", str(tmp_path / "logits.npy"),
            "--engine-dumps", str(tmp_path / "d.safetensors"), "--token-ids", ",".join(map(str, ids)), "--no-lint"]
    assert X.main(argv) == 1
    out = capsys.readouterr().out
    assert "layers.2.after_mixer" in out.splitlines()[-1] and "<-- first step past tolerance" in out


@pytest.mark.parametrize("args, message", [
    ([], "nothing to compare"),
    (["--engine-logits", "missing.npy", "--token-ids", "1,2"], "missing.npy: no such file"),
    (["--engine-json", "{json}", "--token-ids", "1,x"], "--token-ids: expected integers"),
    (["--engine-logits", "{npy}", "--token-ids", "1,2"], "engine logits: shape (3, 512)"),
    (["--engine-logits", "{npy}", "--token-ids", "1,2,999999"], "outside the vocabulary"),
    (["--engine-logits", "{npy}", "--token-ids", "1,2,3", "--backend", "jax"], "--backend jax runs"),
    (["--engine-json", "{json}", "--max-kl", "0"], "--max-kl: must be > 0"),
    (["--engine-json", "{json}", "--precision", "f16"], "argument --precision: invalid choice"),
    (["--engine-logits", "{npy}", "--token-ids", "1,2,3", "--json", "/nonexistent/dir/r.json"], "/nonexistent/dir"),
])
def test_cli_bad_input_exits_2(ckpt, tmp_path, capsys, args, message):
    np.save(tmp_path / "l.npy", np.zeros((3, 512), np.float32))
    (tmp_path / "r.json").write_text("{}")
    args = [a.format(npy=tmp_path / "l.npy", json=tmp_path / "r.json") for a in args]
    out = tmp_path / "never.json"
    assert X.main(["--model", str(ckpt.directory), "--json", str(out)] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_prompt_lint_and_plot(ckpt, tmp_path, capsys):
    """--prompt goes through the checkpoint tokenizer; lint findings print next to the verdict; --plot."""
    bad = rewrite_layer(ckpt.directory, tmp_path / "c", {
        f"{ckpt.config.text_prefix}layers.1.mlp.experts.5.up_proj.weight_scale_2": lambda s: (2 * s).astype(s.dtype)})
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = load_tokenizer(bad.directory).encode(prompt)
    np.save(tmp_path / "l.npy", engine(bad, ids, precision="bf16")[0])
    argv = ["--model", str(bad.directory), "--engine-logits", str(tmp_path / "l.npy"), "--prompt", prompt]
    pytest.importorskip("matplotlib")
    assert X.main(argv + ["--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "lint: warning:" in out and "gate/up weight_scale_2 not tied" in out
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_plot_without_matplotlib(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    np.save(tmp_path / "l.npy", np.zeros((3, 512), np.float32))
    argv = ["--model", str(ckpt.directory), "--engine-logits", str(tmp_path / "l.npy"), "--token-ids", "1,2,3",
            "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")]
    assert X.main(argv) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "r.json").exists()


def test_token_strings_through_the_checkpoint_tokenizer(ckpt):
    """SGLang's OpenAI echo answer names tokens by their text; the tiny tokenizer maps them back. Text
    that lost bytes (a partial UTF-8 token decodes to U+FFFD) needs the ids from elsewhere."""
    from ref import engine_io as io
    tok = load_tokenizer(ckpt.directory)

    def body(ids):
        text = [tok.decode([i]) for i in ids]
        top = [None] + [{text[t]: -0.1, text[t - 1]: -2.5} for t in range(1, len(ids))]
        return {"choices": [{"index": 0, "text": "", "logprobs": {
            "text_offset": [-1] * len(ids), "tokens": text, "token_logprobs": [None] + [-0.1] * (len(ids) - 1),
            "top_logprobs": top}}]}

    ids = tok.encode("Hello! How are you today? Two plus two is four.")
    rec = io.read_engine_json(body(ids), X._lookup(ckpt))
    assert rec.token_ids == ids and rec.top[3] == {ids[3]: -0.1, ids[2]: -2.5}
    ids = tok.encode("Le café était très bon.")
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)
    with pytest.raises(FormatError, match="matches no vocabulary id"):
        io.read_engine_json(body(ids), X._lookup(ckpt))
    assert io.read_engine_json(body(ids), X._lookup(ckpt), token_ids=ids).token_ids == ids


def test_jax_backend(ckpt, ids):
    """The reference logits from jaxrun (f32) instead of ref.model."""
    logits, _ = engine(ckpt, ids, precision="bf16")
    rep = X.crosscheck(ckpt, ids, eng_logits=logits, backend="jax", modes=Modes("f32"), lint=False)
    assert rep["verdict"]["ok"] and rep["reference"]["backend"] == "jax"
    with pytest.raises(FormatError, match="--engine-dumps needs --backend ref"):
        X.crosscheck(ckpt, ids, eng_logits=logits, eng_dumps={"logits": logits}, backend="jax", modes=Modes("f32"))


def test_hf_style_hidden_states_dumps(ckpt, ids, tmp_path):
    """Dumps named like HF output_hidden_states (one tensor per layer output): the step checked is
    then the whole layer, and the tiled-heads bug of layer 2 is still found in layer 2."""
    from ref import engine_io as io
    _, dumps = buggy_engine("tiled deltanet heads", ckpt, ids, tmp_path)
    L_ = ckpt.config.text.num_hidden_layers
    hs = {"hidden_states.0": dumps["embeddings"], f"hidden_states.{L_}": dumps["final_hidden"]}
    hs.update({f"hidden_states.{i + 1}": dumps[f"layers.{i}.after_moe"] for i in range(L_ - 1)})
    save_file({k: np.ascontiguousarray(v) for k, v in hs.items()}, str(tmp_path / "hs.safetensors"))
    eng, ignored = io.read_dumps(tmp_path / "hs.safetensors", L_)
    assert not ignored and sorted(eng) == sorted(["embeddings", "final_hidden"] +
                                                 [f"layers.{i}.after_moe" for i in range(L_ - 1)])
    rep = check(ckpt, ids, None, eng)
    assert rep["verdict"]["first_divergent"]["name"] == "layers.2.after_moe", X.format_report(rep)
    bad = dict(eng, embeddings=eng["embeddings"][:-1])
    with pytest.raises(FormatError, match=r"engine dumps: token counts \[79, 80\], expected one count <= 80"):
        check(ckpt, ids, None, bad)
    bad = dict(eng, embeddings=eng["embeddings"][:, :32])
    with pytest.raises(FormatError, match=r"engine dump 'embeddings': shape \(80, 32\), expected \(80, 64\)"):
        check(ckpt, ids, None, bad)


def test_dumps_of_a_prefix(ckpt, ids):
    """An engine that dumped its prefill of the first 70 tokens of a longer scored sequence."""
    logits, dumps = buggy_engine("deltanet state not carried across chunks", ckpt, ids[:70], None)
    rep = check(ckpt, ids, logits, dumps)
    assert len(rep["positions"]) == 70 and rep["layers"][0]["name"] == "embeddings"
    first = rep["verdict"]["first_divergent"]
    assert first["name"] == "layers.1.after_mixer", X.format_report(rep)
    assert first["local_worst_pos"] >= 64  # the state is lost at the chunk boundary, not before
