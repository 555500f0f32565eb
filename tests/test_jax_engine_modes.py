"""jaxrun under the engine-emulation modes: the FP8 quantizer and the KV store / read bit-identical to
ref's, and jaxrun (f32) against ref under engine profiles on each checkpoint variant: a prompt
prefilled in two chunks (the second reads the first one's stored K/V and stored DeltaNet state), then
decode steps, every logit row compared."""
from dataclasses import asdict, replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxrun.layers import kv_read, kv_store
from jaxrun.load import load
from jaxrun.nvfp4 import quantize_fp8
from jaxrun.options import Options
from jaxrun.params import FP8, NVFP4
from jaxrun.runner import Prefill, Runner
from jaxrun.sharding import make_mesh
from ref import fp8, kvcache
from ref.model import Model
from ref.modes import Modes
from ref.profiles import get_profile

CONTEXT, CHUNK, STEPS = 64, 16, 2
PROMPT = np.random.default_rng(11).integers(0, 512, 24).tolist()

_f32 = st.one_of(st.floats(-1e4, 1e4, width=32).filter(lambda v: v == 0 or abs(v) >= 2.0 ** -126),
                 st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 448.0, 464.0, -472.0]))


_all_rules = jax.jit(lambda x, s: [quantize_fp8(x, s, rule) for rule in fp8.FP8_RULES])


@given(x=st.lists(_f32, min_size=16, max_size=16), scale=st.floats(2.0 ** -12, 2.0 ** 8, width=32))
def test_fp8_quantizer_bit_identical_to_ref(x, scale):
    """Every rule (vLLM's KV store and static W8A8 input quantizer, SGLang's KV store): the same bytes
    as ref.fp8.quantize_fp8, NaN (with its sign), infinities, saturation and the non-saturating cast."""
    a = np.array(x, np.float32)
    for rule, got in zip(fp8.FP8_RULES, _all_rules(a, np.float32(scale))):
        with np.errstate(all="ignore"):
            want = fp8.quantize_fp8(a, np.float32(scale), rule)
        assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8)), rule


@pytest.mark.parametrize("dtype, engine", [("fp8_e4m3", "vllm"), ("fp8_e4m3", "sglang"), ("nvfp4", "vllm")])
def test_kv_store_and_read_bit_identical_to_ref(dtype, engine):
    """What attention reads back from jaxrun's stored cache equals ref.kvcache.kv_read rounded once to
    float32, for K/V held in float32 and in bfloat16; the stored leaves have the declared dtypes."""
    opts = Options(make_mesh(1), kv_cache_dtype=dtype, kv_engine=engine)
    rng = np.random.default_rng(5)
    scale = np.float32(0.37)
    for held in (np.float32, jnp.bfloat16):
        x = np.asarray(jnp.asarray(rng.standard_normal((1, 2, 8, 32)) * 40, held))   # [B, nKV, T, D]
        stored, blocks = jax.jit(kv_store, static_argnums=2)(x, scale, opts)
        got = np.asarray(jax.jit(kv_read, static_argnums=3)(stored, blocks, scale, opts))
        want = kvcache.kv_read(np.asarray(x, np.float32), scale, dtype, engine).astype(np.float32)
        assert np.array_equal(got, want, equal_nan=True)
        assert stored.dtype == (jnp.float8_e4m3fn if dtype == "fp8_e4m3" else jnp.uint8)
        assert stored.shape == (1, 2, 8, 32 if dtype == "fp8_e4m3" else 16)
        assert blocks is None if dtype == "fp8_e4m3" else blocks.shape == (1, 2, 8, 2)


# ---- jaxrun == ref under profiles, on every variant -----------------------------------------------

CASES = [  # (checkpoint, profile, overrides, the ref precision compared with)
    ("tiny_checkpoint_mixed", "vllm-blackwell-fp8kv", {}, "f64"),        # FP8 W8A8 dense, W4A4 experts (max), FP8 KV
    ("tiny_checkpoint_ct", "hf-bf16", {"kv_cache_dtype": "fp8_e4m3", "kv_engine": "sglang", "kv_prefill": "fresh"},
     "f64"),                                                             # NVFP4 dense, SGLang's store, fresh prefill
    ("tiny_checkpoint", "hf-bf16", {"kv_cache_dtype": "nvfp4", "state_dtype": "bfloat16"}, "f32"),
]


def ref_rows(m: Model, tokens: list[int]) -> np.ndarray:
    """ref's logits as the runner computed them: PROMPT in chunks of CHUNK (rows predicting each next
    token), then a decode step per generated token but the last."""
    rows, cache = [], None
    for lo in range(0, len(PROMPT), CHUNK):
        logits, cache = m.prefill(PROMPT[lo:lo + CHUNK], cache)
        rows.append(logits)
    for t in tokens[:-1]:
        last, cache = m.decode(t, cache)
        rows.append(last[None])
    return np.concatenate(rows)


@pytest.mark.parametrize("fixture, profile, overrides, ref_precision", CASES)
def test_jaxrun_equals_ref_under_profiles(fixture, profile, overrides, ref_precision, request):
    """jaxrun runs each checkpoint variant under an engine profile's modes: every logit row of a prompt
    prefilled in two chunks (the second reads the first's stored K/V and DeltaNet state) within the f32
    bound of ref under the same modes, the stored leaves in their dtypes. (A state rounded to bf16
    amplifies f32-vs-f64 differences, so that case is compared with ref at f32.) The decode step's
    forms are checked layer by layer below; bench/jax_profiles.py runs every profile on every variant,
    decode steps included."""
    mesh = make_mesh(1)
    ckpt, params = load(str(request.getfixturevalue(fixture)), mesh, "f32", progress=False)
    modes = Modes(**{**asdict(get_profile(profile).modes), **overrides, "precision": "f32"})
    runner = Runner(params, ckpt.config.text, mesh, **asdict(modes))
    job = Prefill(runner, [PROMPT], CONTEXT, chunk=CHUNK, all_logits=True)
    while not job.advance():
        pass
    got = np.concatenate(job.prompt_logits, axis=1)[0]                   # [24, V]
    want = ref_rows(Model(ckpt, **asdict(replace(modes, precision=ref_precision))), [])
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
    stored = {"fp8_e4m3": jnp.float8_e4m3fn, "nvfp4": jnp.uint8}[modes.kv_cache_dtype]
    assert job.cache[3].k.dtype == stored and job.cache[0].state.dtype == jnp.dtype(modes.state_dtype)
    kinds = {type(p) for layer in params.layers for p in jax.tree.leaves(
        layer, is_leaf=lambda x: isinstance(x, (FP8, NVFP4)))}
    assert (FP8 in kinds) == (fixture == "tiny_checkpoint_mixed")


# ---- the forms one layer computes, decode steps included ----------------------------------------

@pytest.fixture(scope="module")
def loaded(tiny_checkpoint_mixed, tiny_checkpoint_ct):
    mesh = make_mesh(1)
    return {name: load(str(d), mesh, "f32", progress=False) for name, d in
            (("mixed", tiny_checkpoint_mixed), ("ct", tiny_checkpoint_ct))}


@pytest.mark.parametrize("which, module, path", [
    ("mixed", "layers.0.linear_attn.in_proj_qkv", ("linear_attn", "in_proj_qkv")),
    ("mixed", "layers.3.self_attn.o_proj", ("self_attn", "o_proj")),
    ("ct", "layers.0.linear_attn.in_proj_z", ("linear_attn", "in_proj_z")),
    ("ct", "layers.3.self_attn.q_proj", ("self_attn", "q_proj"))])
def test_quantized_dense_linears_match_ref(loaded, which, module, path):
    """matmul.linear on the loaded FP8 / compressed-tensors NVFP4 containers: W8A16 / W4A16, and W8A8 /
    W4A4 under "w4a4" (the stored global for compressed-tensors), within float32 of ref's float64."""
    from jaxrun.matmul import linear
    from ref.fp8 import fp8_linear
    from ref.nvfp4 import nvfp4_matmul
    ckpt, params = loaded[which]
    p = getattr(getattr(params.layers[int(module.split(".")[1])], path[0]), path[1])
    w = ckpt.linear(ckpt.config.text_prefix + module)
    x = np.random.default_rng(4).standard_normal((6, w.shape[1])).astype(np.float32) * 2
    for activations in ("w4a16", "w4a4"):
        opts = Options(make_mesh(1), activations=activations)
        got = np.asarray(jax.jit(linear, static_argnums=2)(x, p, opts))
        q = activations == "w4a4"
        if isinstance(p, FP8):
            want = fp8_linear(x, w.weight_e4m3, w.weight_scale, w.input_scale if q else None)
        else:
            want = nvfp4_matmul(x, w.packed, w.weight_scale, w.weight_scale_2, w.input_scale if q else None,
                                global_scale=w.input_global_scale)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_decode_step_reads_the_stored_cache_and_rounds_the_state(loaded):
    """One decode step of attention (reading FP8 K/V written by a prefill, fresh only for a prefill) and
    of a DeltaNet layer whose state is stored in bf16 after each token, against ref.layers."""
    from jaxrun.layers import attention, gdn_prefill, gdn_step, rope_table
    from jaxrun.params import declare_cache, abstract
    from ref import layers as L
    from ref.weights import Weights
    ckpt, params = loaded["mixed"]
    cfg, t = ckpt.config.text, 9
    x = np.random.default_rng(6).standard_normal((1, t + 1, cfg.hidden_size)).astype(np.float32)
    opts = Options(make_mesh(1), kv_cache_dtype="fp8_e4m3", kv_prefill="fresh", state_dtype="bfloat16")
    zeros = lambda kinds: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract(  # noqa: E731
        declare_cache(cfg, 1, 16, kinds, opts.kv_cache_dtype, opts.state_dtype), jnp.float32))
    w = Weights(ckpt, L.Precision("f64"), kv_cache_dtype="fp8_e4m3")
    rope = rope_table(cfg, 16, jnp.float32)
    at = lambda lo, n: jnp.asarray(rope[lo:lo + n])[None]  # noqa: E731
    # attention: a fresh prefill of t tokens, then a decode step reading the stored cache
    lp = params.layers[3].self_attn
    _, kv = jax.jit(attention, static_argnums=(5, 6, 7))(x[:, :t], jnp.zeros(1, jnp.int32), at(0, t), lp,
                                                          zeros(("full_attention",))[0], cfg, opts, True)
    got, _ = jax.jit(attention, static_argnums=(5, 6, 7))(x[:, t:], jnp.full(1, t, jnp.int32), at(t, 1), lp, kv,
                                                           cfg, opts, False)
    prm, store = w.attention(w.layer_tables(3)["self_attn"]), w.kv_store(3)
    args = (cfg.num_attention_heads, cfg.num_key_value_heads)
    rope_ref = L.Rope(cfg.rotary_dim, cfg.rope_theta, tuple(cfg.mrope_section), cfg.mrope_interleaved)
    _, cache = L.gated_attention(x[0, :t], prm, *args, L.text_positions(0, t), rope_ref, cfg.rms_norm_eps,
                                 kv_store=store, fresh=True)
    want, _ = L.gated_attention(x[0, t:], prm, *args, L.text_positions(t, 1), rope_ref, cfg.rms_norm_eps, cache,
                                kv_store=store)
    assert np.abs(np.asarray(got)[0] - want).max() <= 1e-4 * np.abs(want).max()
    # DeltaNet: a prefill, then a decode step, the state stored in bf16 after each
    lp = params.layers[0].linear_attn
    _, c = jax.jit(gdn_prefill, static_argnums=(4, 5))(x[:, :t], jnp.full(1, t, jnp.int32), lp,
                                                        zeros(("linear_attention",))[0], cfg, opts)
    got, caches = jax.jit(gdn_step, static_argnums=(3, 4))(x[:, t:], lp, c, cfg, opts)
    dprm = w.deltanet(w.layer_tables(0)["linear_attn"])
    _, st = L.gated_deltanet(x[0, :t].astype(np.float64), dprm, cfg.linear_num_key_heads, cfg.rms_norm_eps)
    st = st._replace(recurrent=kvcache.store_state(st.recurrent, "bfloat16"))
    want, st = L.gated_deltanet(x[0, t:].astype(np.float64), dprm, cfg.linear_num_key_heads, cfg.rms_norm_eps, st)
    assert caches[0].state.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got)[0] - want).max() <= 1e-3 * np.abs(want).max()
    close = np.isclose(np.asarray(caches[0].state[0], np.float64), kvcache.store_state(st.recurrent, "bfloat16"),
                       rtol=2 ** -7, atol=0)
    assert close.mean() > 0.999


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3", "nvfp4"])
def test_full_prefill_equals_prefill_then_decode_per_kv_dtype(loaded, kv_cache_dtype):
    """Teacher-forced, with the prefill's tokens attending to their stored K/V ("cache"): one prefill of
    T tokens gives, row by row, the logits of a prefill of T - 3 tokens followed by 3 decode steps fed
    the prompt's next tokens, in every KV-cache dtype (the stored form is the same either way)."""
    from jaxrun.sampling import Sampling
    ckpt, params = loaded["mixed"]
    T, k = 16, 3
    r = Runner(params, ckpt.config, make_mesh(1), kv_cache_dtype=kv_cache_dtype)
    tokens = np.asarray([PROMPT[:T]], np.int32)
    full, _ = r.prefill(tokens, np.array([T], np.int32), CONTEXT, all_logits=True)
    full = np.asarray(full[0, :T], np.float64)
    state, first = r.start([PROMPT[:T - k]], CONTEXT, Sampling())
    rows = [np.asarray(first.logits[0], np.float64)]
    for t in range(T - k, T - 1):
        state, out = r.step(state._replace(tokens=jnp.asarray([PROMPT[t]], jnp.int32)), CONTEXT)
        rows.append(np.asarray(out.logits[0], np.float64))
    scale = max(1.0, np.abs(full).max())
    assert np.abs(np.stack(rows) - full[T - k - 1:T - 1]).max() <= 1e-4 * scale
