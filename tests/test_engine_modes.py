"""ref.model under the engine-emulation modes (spec/model.md §10): the KV cache stored and read in each
dtype, which K/V a prefill attends to, the DeltaNet state dtype, FP8 and NVFP4 dense linears with
quantized inputs, and the three checkpoint variants."""
import dataclasses
from dataclasses import asdict

import numpy as np
import pytest

from ref import kvcache
from ref.checkpoint import FP8Weight, NVFP4Weight, open_checkpoint
from ref.fp8 import fp8_linear
from ref.layers import Precision
from ref.model import Model
from ref.modes import Modes
from ref.nvfp4 import nvfp4_matmul, round_to_bf16
from ref.weights import Weights

T = 70  # > one DeltaNet chunk
L0, L3 = "model.language_model.layers.0", "model.language_model.layers.3"


@pytest.fixture(scope="module")
def mixed(tiny_checkpoint_mixed):
    return open_checkpoint(tiny_checkpoint_mixed)


@pytest.fixture(scope="module")
def ct(tiny_checkpoint_ct):
    return open_checkpoint(tiny_checkpoint_ct)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(3).integers(0, 512, T).tolist()


def split_run(model, ids, k):
    """prefill of all but k tokens, then k decode steps -> logits [T, V]."""
    logits, cache = model.prefill(ids[:-k])
    rows = [logits]
    for t in ids[-k:]:
        last, cache = model.decode(t, cache)
        rows.append(last[None])
    return np.concatenate(rows), cache


# ---- KV cache -----------------------------------------------------------------------------------

# The mixed variant's KV scales are amax / 448 of one calibration prompt; other prompts' values can
# exceed them a little, which SGLang's non-saturating store turns into NaN (spec/nvfp4.md §10): its
# rule is run on the default checkpoint (scale 1.0).
KV_CASES = [("fp8_e4m3", "vllm", "mixed"), ("fp8_e4m3", "sglang", "tiny"), ("nvfp4", "vllm", "mixed")]


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint, mixed):
    return {"tiny": open_checkpoint(tiny_checkpoint), "mixed": mixed}


@pytest.mark.parametrize("kv, engine, which", KV_CASES)
def test_full_forward_equals_prefill_then_decode_under_each_kv_dtype(ckpts, ids, kv, engine, which):
    """Each token's K/V is stored once, and every later token (and itself) reads the stored values,
    so a one-shot prefill and prefill + decode agree; the KV dtype changes the logits."""
    ckpt = ckpts[which]
    m = Model(ckpt, "f64", kv_cache_dtype=kv, kv_engine=engine)
    full, cache = m.prefill(ids)
    split, split_cache = split_run(m, ids, 4)
    np.testing.assert_allclose(split, full, rtol=0, atol=1e-9)
    assert np.array_equal(split_cache.layers[3].k, cache.layers[3].k)
    assert np.abs(full - Model(ckpt, "f64").logits(ids)).max() > 1e-3


@pytest.mark.parametrize("kv, engine, which", KV_CASES)
def test_cache_holds_what_the_store_reads_back(ckpts, ids, kv, engine, which):
    """The attention layer's cache is exactly kvcache.kv_read of the key after norm and RoPE (the
    auto run's cache) and of the value, with the checkpoint's scales of that layer."""
    ckpt = ckpts[which]
    k_scale, v_scale, source = ckpt.kv_scales(3)
    assert source == ("checkpoint" if which == "mixed" else "default 1.0")
    plain = Model(ckpt, "f64").prefill(ids)[1].layers[3]
    stored = Model(ckpt, "f64", kv_cache_dtype=kv, kv_engine=engine).prefill(ids)[1].layers[3]
    assert np.array_equal(stored.k, kvcache.kv_read(plain.k, k_scale, kv, engine))
    assert np.array_equal(stored.v, kvcache.kv_read(plain.v, v_scale, kv, engine))


def test_fresh_prefill_attends_to_the_computed_values(mixed, ids):
    """kv_prefill fresh (SGLang's ragged prefill): a one-shot prefill equals the unquantized one (its
    tokens attend to their own K/V as computed) but stores the quantized K/V; a decode step reads the
    cache (as in cache mode), a one-token prefill its own K/V as computed."""
    auto = Model(mixed, "f64")
    fresh = Model(mixed, "f64", kv_cache_dtype="fp8_e4m3", kv_prefill="fresh")
    cached = Model(mixed, "f64", kv_cache_dtype="fp8_e4m3")
    logits, cache = fresh.prefill(ids)
    assert np.array_equal(logits, auto.logits(ids))
    assert np.array_equal(cache.layers[3].k, cached.prefill(ids)[1].layers[3].k)
    a, ca = fresh.prefill(ids[:-1])
    b, cb = cached.prefill(ids[:-1])
    assert np.array_equal(fresh.decode(ids[-1], ca)[0], cached.decode(ids[-1], cb)[0])  # attention is the last layer
    one_token = fresh.prefill(ids[-1:], ca)[0][0]               # a one-token prefill attends to its fresh K/V
    assert not np.array_equal(one_token, fresh.decode(ids[-1], ca)[0])


def test_default_scales_and_mtp_layer(tiny_checkpoint, ids):
    """Without KV scales the engines use 1.0; the MTP layer has a KV cache too."""
    ckpt = open_checkpoint(tiny_checkpoint)
    assert ckpt.kv_scales(3)[2] == "default 1.0"
    m = Model(ckpt, "f64", kv_cache_dtype="fp8_e4m3")
    plain = Model(ckpt, "f64").prefill(ids)[1].layers[3]
    assert np.array_equal(m.prefill(ids)[1].layers[3].k, kvcache.kv_read(plain.k, 1.0, "fp8_e4m3"))
    assert np.all(np.isfinite(m.mtp_logits(ids[:10])))


# ---- DeltaNet state dtype -----------------------------------------------------------------------

def test_bf16_state_is_rounded_after_each_forward_call(mixed, ids):
    """state_dtype bfloat16: the state is rounded once per forward call (not inside one): a one-shot
    prefill is unchanged; its stored state is the float32 run's rounded to bf16; a decode step
    continues from that rounded state."""
    f32 = Model(mixed, "f32")
    b16 = Model(mixed, "f32", state_dtype="bfloat16")
    (la, ca), (lb, cb) = f32.prefill(ids[:-1]), b16.prefill(ids[:-1])
    assert np.array_equal(la, lb)
    for i in range(3):
        assert np.array_equal(cb.layers[i].recurrent, round_to_bf16(ca.layers[i].recurrent).astype(np.float32))
    rounded = dataclasses.replace(ca, layers=tuple(layer._replace(recurrent=cb.layers[i].recurrent) if i < 3 else layer
                                       for i, layer in enumerate(ca.layers)))
    assert np.array_equal(b16.decode(ids[-1], cb)[0], f32.decode(ids[-1], rounded)[0])
    assert not np.array_equal(b16.decode(ids[-1], cb)[0], f32.decode(ids[-1], ca)[0])
    full = Model(mixed, "f64", state_dtype="bfloat16")
    assert full.prefill(ids)[1].layers[0].recurrent.dtype == np.float64


# ---- quantized dense linears ---------------------------------------------------------------------

@pytest.mark.parametrize("module", [f"{L0}.linear_attn.in_proj_qkv", f"{L3}.self_attn.o_proj",
                                    f"{L0}.mlp.shared_expert.down_proj"])
def test_fp8_linears_are_fp8_linear(mixed, module):
    """The streamed FP8 weight computes ref.fp8.fp8_linear exactly: W8A16 under w4a16, W8A8 with the
    static input scale under w4a4 (float64)."""
    w = mixed.linear(module)
    assert isinstance(w, FP8Weight) and w.input_scale is not None
    x = np.random.default_rng(1).standard_normal((5, w.shape[1])) * 3
    for activations, scale in (("w4a16", None), ("w4a4", w.input_scale)):
        got = x @ Weights(mixed, Precision("f64"), activations).weight(w).T
        assert np.array_equal(got, fp8_linear(x, w.weight_e4m3, w.weight_scale, scale))


@pytest.mark.parametrize("module", [f"{L0}.linear_attn.in_proj_z", f"{L3}.self_attn.q_proj"])
def test_ct_linears_are_nvfp4_matmul_with_the_stored_global(ct, module):
    """compressed-tensors dense linears (the DeltaNet projections included): W4A16 exact, W4A4 with the
    stored input_global_scale as the quantizer's G (vLLM's dense path), alpha from the inverted globals."""
    w = ct.linear(module)
    assert isinstance(w, NVFP4Weight) and w.input_global_scale is not None
    x = np.random.default_rng(2).standard_normal((5, w.shape[1])) * 2
    got = x @ Weights(ct, Precision("f64"), "w4a4").weight(w).T
    want = nvfp4_matmul(x, w.packed, w.weight_scale, w.weight_scale_2, w.input_scale,
                        global_scale=w.input_global_scale)
    assert np.array_equal(got, want)
    got = x @ Weights(ct, Precision("f64"), "w4a16").weight(w).T
    assert np.array_equal(got, nvfp4_matmul(x, w.packed, w.weight_scale, w.weight_scale_2))
    with pytest.raises(TypeError, match="no matrix"):
        np.asarray(Weights(ct, Precision("f64"), "w4a4").weight(w))


# ---- every checkpoint variant ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tiny_checkpoint", "tiny_checkpoint_mixed", "tiny_checkpoint_ct"])
@pytest.mark.parametrize("profile", ["hf-bf16", "vllm-blackwell-fp8kv"])
def test_every_variant_runs_under_profiles(variant, profile, ids, request):
    """ref.model runs the three checkpoint variants under a W4A16 and a W4A4 + FP8 KV profile (f64):
    full == prefill + decode; the profile's modes reach the maths (W4A4 + FP8 KV differ from W4A16)."""
    from ref.profiles import get_profile
    ckpt = open_checkpoint(request.getfixturevalue(variant))
    modes = get_profile(profile).modes
    m = Model(ckpt, **asdict(Modes(**{**asdict(modes), "precision": "f64"})))
    full = m.logits(ids)
    np.testing.assert_allclose(split_run(m, ids, 2)[0], full, rtol=0, atol=1e-9)
    assert np.all(np.isfinite(full))
    assert np.array_equal(full, Model(ckpt, "f64").logits(ids)) == (profile == "hf-bf16")
    assert np.all(np.isfinite(Model(ckpt, **asdict(modes)).logits(ids[:20])))
