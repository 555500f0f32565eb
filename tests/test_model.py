"""ref.model on the tiny synthetic checkpoints: caches, batches, layouts, precision modes, W4A4,
streaming, dumps, MTP, generation."""
import numpy as np
import pytest

from ref import layers as L
from ref import nvfp4
from ref.checkpoint import open_checkpoint
from ref.model import Model

# Measured bound of bf16 mode against f64 on the tiny checkpoint (spec/model.md, "Precision"):
# relative RMS error of the logits over a 48-token prompt.
BF16_LOGITS_REL_RMS = 0.1
F32_LOGITS_REL_RMS = 1e-5


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return open_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def model(ckpt):
    return Model(ckpt)


def prompt(T, seed=0, vocab=512):
    return np.random.default_rng(seed).integers(0, vocab, T).tolist()


@pytest.fixture(scope="module")
def reference(model):
    """f64 logits and dumps of one 80-token prompt (longer than one DeltaNet chunk)."""
    ids = prompt(80)
    dumps = {}
    logits, cache = model.prefill(ids, dumps=dumps)
    return ids, logits, dumps, cache


def rel_rms(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------
# Caches and batches

@pytest.mark.parametrize("T,k", [(2, 1), (9, 3), (66, 2), (80, 5)])
def test_full_forward_equals_prefill_then_decode(model, reference, T, k):
    ids, full = reference[0][:T], reference[1][:T]
    logits, cache = model.prefill(ids[:T - k])
    rows = [logits]
    for t in ids[T - k:]:
        last, cache = model.decode(t, cache)
        rows.append(last[None])
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=1e-9)
    assert cache.pos == T


def test_prefill_continues_from_a_cache(model, reference):
    ids, full = reference[0], reference[1]
    a, cache = model.prefill(ids[:30])
    b, cache = model.prefill(ids[30:], cache)
    np.testing.assert_allclose(np.concatenate([a, b]), full, rtol=0, atol=1e-9)
    np.testing.assert_allclose(cache.hidden, reference[2]["final_hidden"][-1], rtol=0, atol=1e-12)


def test_batch_of_different_lengths_equals_single(model, reference):
    seqs = [reference[0][:80], prompt(3, seed=1), prompt(65, seed=2), [7]]
    logits, caches = model.prefill_batch(seqs)
    for s, got in zip(seqs, logits):
        np.testing.assert_allclose(got, model.logits(s), rtol=0, atol=1e-12)
    nxt = [1, 2, 3, 4]
    step, _ = model.decode_batch(nxt, caches)
    for j, s in enumerate(seqs):
        np.testing.assert_allclose(step[j], model.logits(s + [nxt[j]])[-1], rtol=0, atol=1e-9)


def test_both_expert_layouts_give_identical_logits(model, tiny_checkpoint_fused, reference):
    fused = Model(open_checkpoint(tiny_checkpoint_fused))
    ids = reference[0][:20]
    np.testing.assert_array_equal(fused.logits(ids), model.logits(ids))


# ------------------------------------------------------------------------------------------------
# Streaming, dumps, generation, MTP

def test_only_routed_experts_are_read(ckpt, monkeypatch):
    seen = {}
    real = ckpt.expert

    def spy(layer, e):
        seen.setdefault(layer, set()).add(e)
        return real(layer, e)

    monkeypatch.setattr(ckpt, "expert", spy)
    dumps = {}
    Model(ckpt).prefill(prompt(5, seed=3), dumps=dumps)
    for i in range(ckpt.config.text.num_hidden_layers):
        assert seen.get(i, set()) == set(np.unique(dumps[f"layers.{i}.topk_ids"]).tolist())


def test_dump_names_shapes_and_consistency(ckpt, reference):
    ids, logits, dumps, _ = reference
    c = ckpt.config.text
    T, H, E, k = len(ids), c.hidden_size, c.num_experts, c.num_experts_per_tok
    want = {"embeddings": (T, H), "final_hidden": (T, H), "logits": (T, c.vocab_size)}
    for i in range(c.num_hidden_layers):
        want.update({f"layers.{i}.after_mixer": (T, H), f"layers.{i}.after_moe": (T, H),
                     f"layers.{i}.router_logits": (T, E), f"layers.{i}.topk_ids": (T, k),
                     f"layers.{i}.topk_weights": (T, k)})
    assert {n: d.shape for n, d in dumps.items()} == want
    assert dumps["layers.0.topk_ids"].dtype == np.int32 and dumps["logits"].dtype == np.float64
    np.testing.assert_array_equal(dumps["logits"], logits)
    emb = np.asarray(ckpt.lm("embed_tokens.weight")[ids], np.float64)
    np.testing.assert_array_equal(dumps["embeddings"], emb)
    last = dumps[f"layers.{c.num_hidden_layers - 1}.after_moe"]
    final = L.rms_norm(last, np.asarray(ckpt.lm("norm.weight"), np.float64), c.rms_norm_eps)
    np.testing.assert_array_equal(dumps["final_hidden"], final)
    probs = L.softmax(dumps["layers.1.router_logits"])
    top = np.take_along_axis(probs, dumps["layers.1.topk_ids"].astype(int), axis=-1)
    np.testing.assert_allclose(dumps["layers.1.topk_weights"], top / top.sum(-1, keepdims=True), rtol=1e-14)


def test_generate_is_greedy_and_stops(model, reference):
    ids = reference[0][:6]
    out = model.generate(ids, 5)
    assert len(out) == 5
    forced = model.logits(ids + out[:-1])
    assert [int(np.argmax(r)) for r in forced[len(ids) - 1:]] == out
    assert model.generate(ids, 5, stop_ids=(out[1],)) == out[:2]
    assert model.generate(ids, 0) == []


def test_mtp_logits_are_causal_and_use_the_main_hidden(model, reference):
    ids, _, dumps, _ = reference
    full = model.mtp_logits(ids[:12], hidden=dumps["final_hidden"][:12])
    assert full.shape == (11, model.cfg.vocab_size)
    np.testing.assert_allclose(model.mtp_logits(ids[:6]), full[:5], rtol=0, atol=1e-12)
    other = model.mtp_logits(ids[:12], hidden=dumps["final_hidden"][:12][::-1])  # (scale would cancel in the norm)
    assert np.abs(other - full).max() > 1e-3


def test_out_of_vocabulary_ids_are_rejected(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([1, 512])
    with pytest.raises(ValueError, match="non-empty"):
        model.logits([])


# ------------------------------------------------------------------------------------------------
# Precision and activation modes

def test_f32_and_bf16_stay_within_their_documented_bounds(ckpt, reference):
    ids, full = reference[0][:48], reference[1][:48]
    f32 = Model(ckpt, precision="f32").logits(ids)
    assert f32.dtype == np.float32 and rel_rms(f32, full) < F32_LOGITS_REL_RMS
    bf16 = Model(ckpt, precision="bf16").logits(ids)
    assert bf16.dtype == np.float32 and rel_rms(bf16, full) < BF16_LOGITS_REL_RMS
    import ml_dtypes
    np.testing.assert_array_equal(bf16, bf16.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("act_scale", ["per-expert", "max"])
def test_w4a4_feeds_exactly_the_codes_quantize_activation_produces(ckpt, reference, monkeypatch, act_scale):
    calls = []
    real_q, real_mm = nvfp4.quantize_activation, nvfp4.nvfp4_matmul

    def matmul(x, *a, input_scale=None, **kw):
        calls.append({"x": np.array(x), "scale": float(input_scale), "weight": a[:3]})
        calls[-1]["out"] = real_mm(x, *a, input_scale=input_scale, **kw)
        return calls[-1]["out"]

    def quantize(x, scale, *a, **kw):  # called by nvfp4_matmul on the GEMM input
        out = real_q(x, scale, *a, **kw)
        np.testing.assert_array_equal(x, calls[-1]["x"])
        assert "codes" not in calls[-1] and float(scale) == calls[-1]["scale"]
        calls[-1]["codes"] = out
        return out

    monkeypatch.setattr(nvfp4, "quantize_activation", quantize)
    monkeypatch.setattr(nvfp4, "nvfp4_matmul", matmul)
    ids = reference[0][:4]
    dumps = {}
    model = Model(ckpt, activations="w4a4", act_scale=act_scale)
    logits = model.prefill(ids, dumps=dumps)[0]
    c = ckpt.config.text
    assert all("codes" in call for call in calls)
    # Layer 0: the gate/up inputs are exactly the post-attention-norm rows routed to each expert.
    post = L.rms_norm(dumps["layers.0.after_mixer"],
                      np.asarray(ckpt.lm("layers.0.post_attention_layernorm.weight"), np.float64), c.rms_norm_eps)
    routed = dumps["layers.0.topk_ids"]
    experts = np.unique(routed)
    scales = ckpt.expert_input_scales(0)
    for n, e in enumerate(experts):
        gate_call, up_call, down_call = calls[3 * n:3 * n + 3]
        rows = post[np.nonzero((routed == e).any(1))[0]]
        for call in (gate_call, up_call):
            np.testing.assert_array_equal(call["x"], rows)
            want = scales[e] if act_scale == "per-expert" else scales.max()
            assert call["scale"] == float(want)
            for got, exp in zip(call["codes"], real_q(rows, want)):
                np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(exp).view(np.uint8))
            # and the GEMM is the exact product of those codes with the weight codes
            xa = nvfp4.dequantize(*call["codes"], np.float32(1), dtype=np.float64)
            packed, ws, ws2 = call["weight"]
            wb = nvfp4.dequantize(packed, ws, np.float32(1), dtype=np.float64)
            np.testing.assert_allclose(call["out"], (xa @ wb.T) * np.float64(np.float32(want * ws2)), rtol=1e-13)
        assert down_call["x"].shape == (len(rows), c.moe_intermediate_size)
        down_scales = [float(ckpt.expert(0, j).down.input_scale) for j in range(c.num_experts)]
        assert down_call["scale"] == (down_scales[e] if act_scale == "per-expert" else max(down_scales))
    assert len(calls) == 3 * sum(len(np.unique(dumps[f"layers.{i}.topk_ids"])) for i in range(c.num_hidden_layers))
    assert rel_rms(logits, reference[1][:4]) < 0.5  # a different (quantized) model, but the same model
