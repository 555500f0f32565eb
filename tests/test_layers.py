"""ref.layers against the committed layer vectors and against independent float64 recomputations
(explicit loops, the closed-form delta rule), plus its self-consistency properties."""
import math

import numpy as np
import pytest

from ref import layer_vectors as V
from ref import layers as L
from ref import nvfp4

VECTOR_FILES = sorted(V.DEFAULT_DIR.glob("*.safetensors"))
TOL = dict(rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Independent float64 recomputations (scalar maths and loops, no shared code with ref.layers)

def sig(x):
    return 1 / (1 + math.exp(-x))


def softplus(x):
    return x if x > 20 else math.log1p(math.exp(x))


def norm_rows(x, eps):  # x / rms(x) over the last axis
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def indep_deltanet(a, n_k_heads, eps):
    x = a["x"]
    T = x.shape[0]
    Hv, dv = len(a["A_log"]), len(a["norm"])
    C, K = a["conv1d"].shape
    kd = (C - Hv * dv) // 2
    dk, r = kd // n_k_heads, Hv // n_k_heads
    mixed = x @ a["in_proj_qkv"].T
    hist = np.concatenate([a.get("conv_state", np.zeros((K - 1, C))), mixed])
    conv = np.zeros((T, C))
    for t in range(T):
        for c in range(C):
            s = sum(a["conv1d"][c, j] * hist[t + j, c] for j in range(K))
            conv[t, c] = s * sig(s)
    z = (x @ a["in_proj_z"].T).reshape(T, Hv, dv)
    bb, aa = x @ a["in_proj_b"].T, x @ a["in_proj_a"].T
    S = a["recurrent_state"].copy() if "recurrent_state" in a else np.zeros((Hv, dk, dv))
    o = np.zeros((T, Hv, dv))
    for h in range(Hv):
        kh = h // r
        for t in range(T):
            q = conv[t, kh * dk:(kh + 1) * dk]
            k = conv[t, kd + kh * dk:kd + (kh + 1) * dk]
            v = conv[t, 2 * kd + h * dv:2 * kd + (h + 1) * dv]
            q = q / math.sqrt(q @ q + 1e-6) / math.sqrt(dk)
            k = k / math.sqrt(k @ k + 1e-6)
            beta = sig(bb[t, h])
            alpha = math.exp(-math.exp(a["A_log"][h]) * softplus(aa[t, h] + a["dt_bias"][h]))
            S[h] = alpha * (np.eye(dk) - beta * np.outer(k, k)) @ S[h] + beta * np.outer(k, v)  # closed form
            o[t, h] = S[h].T @ q
    zz = z * np.vectorize(sig)(z)
    y = (norm_rows(o, eps) * a["norm"] * zz).reshape(T, Hv * dv)
    return y @ a["out_proj"].T, hist[T:], S


def mrope_row(j, sections, interleaved):
    if interleaved:
        if j % 3 == 1 and j < 3 * sections[1]:
            return 1
        if j % 3 == 2 and j < 3 * sections[2]:
            return 2
        return 0
    return 0 if j < sections[0] else (1 if j < sections[0] + sections[1] else 2)


def indep_rope(x, pos, rope):  # x [n, D] of one token, pos [3]
    y, half = x.copy(), rope["rotary_dim"] // 2
    for j in range(half):
        ang = pos[mrope_row(j, rope["mrope_section"], rope["interleaved"])] * rope["theta"] ** (-2 * j / rope["rotary_dim"])
        c, s = math.cos(ang), math.sin(ang)
        y[:, j] = x[:, j] * c - x[:, j + half] * s
        y[:, j + half] = x[:, j + half] * c + x[:, j] * s
    return y


def indep_attention(a, n_heads, n_kv_heads, eps, rope):
    x = a["x"]
    T, D = x.shape[0], len(a["q_norm"])
    qg = (x @ a["q_proj"].T).reshape(T, n_heads, 2 * D)
    k = norm_rows((x @ a["k_proj"].T).reshape(T, n_kv_heads, D), eps) * (1 + a["k_norm"])
    v = (x @ a["v_proj"].T).reshape(T, n_kv_heads, D)
    q = norm_rows(qg[..., :D], eps) * (1 + a["q_norm"])
    q = np.stack([indep_rope(q[t], a["positions"][:, t], rope) for t in range(T)])
    k = np.stack([indep_rope(k[t], a["positions"][:, t], rope) for t in range(T)])
    if "cache_k" in a:
        k, v = np.concatenate([a["cache_k"], k]), np.concatenate([a["cache_v"], v])
    past = k.shape[0] - T
    o = np.zeros((T, n_heads, D))
    for h in range(n_heads):
        kv = h // (n_heads // n_kv_heads)
        for t in range(T):
            s = [q[t, h] @ k[u, kv] / math.sqrt(D) for u in range(past + t + 1)]
            m = max(s)
            w = [math.exp(si - m) for si in s]
            o[t, h] = sum(wi * v[u, kv] for u, wi in enumerate(w)) / sum(w)
    gate = qg[..., D:]
    o = (o / (1 + np.exp(-gate))).reshape(T, n_heads * D)
    return o @ a["o_proj"].T, k, v


def indep_moe(a, k):
    def mlp(x, g, u, d):
        gg = g @ x
        return d @ (gg / (1 + np.exp(-gg)) * (u @ x))

    x = a["x"]
    E = a["router"].shape[0]
    y, ids, ws = np.zeros_like(x), [], []
    for t in range(x.shape[0]):
        logits = [a["router"][e] @ x[t] for e in range(E)]
        m = max(logits)
        p = [math.exp(l - m) for l in logits]
        p = [pi / sum(p) for pi in p]
        top = sorted(range(E), key=lambda e: (-p[e], e))[:k]
        tot = sum(p[e] for e in top)
        for e in sorted(top):
            y[t] += p[e] / tot * mlp(x[t], a["experts_gate"][e], a["experts_up"][e], a["experts_down"][e])
        s = mlp(x[t], a["shared_gate_proj"], a["shared_up_proj"], a["shared_down_proj"])
        y[t] += sig(a["shared_expert_gate"][0] @ x[t]) * s
        ids.append(top)
        ws.append([p[e] / tot for e in top])
    return y, np.array(ids), np.array(ws)


# ------------------------------------------------------------------------------------------------
# Committed vectors

def test_vector_files_cover_every_case():
    assert {p.stem for p in VECTOR_FILES} == set(V.cases())


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_layer_function_matches_committed_vector(path):
    function, inputs, scalars, expected = V.read(path)
    got = V.evaluate(function, inputs, scalars)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, **TOL, err_msg=f"{path.stem}: {name}")


def test_committed_inputs_are_the_generator_inputs():
    for name, (function, inputs, scalars) in V.cases().items():
        f, got, s, _ = V.read(V.DEFAULT_DIR / f"{name}.safetensors")
        assert (f, s) == (function, scalars)
        for k, v in inputs.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{name}: {k}")


def _vector(name):
    return V.read(V.DEFAULT_DIR / f"{name}.safetensors")


@pytest.mark.parametrize("name", ["gated_deltanet_prefill", "gated_deltanet_continue", "gated_deltanet_decode"])
def test_deltanet_vectors_match_closed_form(name):
    _, a, s, out = _vector(name)
    y, conv_state, S = indep_deltanet(a, s["n_k_heads"], s["eps"])
    np.testing.assert_allclose(out["y"], y, rtol=1e-10, atol=1e-11)
    # the conv state holds projections (x @ W.T): equal up to the BLAS kernel's summation order
    np.testing.assert_allclose(out["conv_state"], conv_state, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out["recurrent_state"], S, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", ["gated_attention_prefill", "gated_attention_continue"])
def test_attention_vectors_match_explicit_loops(name):
    _, a, s, out = _vector(name)
    y, k, v = indep_attention(a, s["n_heads"], s["n_kv_heads"], s["eps"], s["rope"])
    np.testing.assert_allclose(out["y"], y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["k"], k, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["v"], v, rtol=1e-13, atol=1e-15)  # a projection: BLAS summation order


def test_rope_vector_matches_explicit_pairs():
    _, a, s, out = _vector("rope")
    y = np.stack([indep_rope(a["x"][t], a["positions"][:, t], s["rope"]) for t in range(a["x"].shape[0])])
    np.testing.assert_allclose(out["y"], y, rtol=1e-12, atol=1e-12)


def test_moe_vector_matches_dense_loop():
    _, a, s, out = _vector("sparse_moe")
    y, ids, ws = indep_moe(a, s["k"])
    np.testing.assert_array_equal(out["topk_ids"], ids)
    np.testing.assert_allclose(out["topk_weights"], ws, rtol=1e-12)
    np.testing.assert_allclose(out["y"], y, rtol=1e-11, atol=1e-12)


def test_small_functions_match_formulas():
    _, a, s, out = _vector("rms_norm")
    np.testing.assert_allclose(out["y"], norm_rows(a["x"], s["eps"]) * (1 + a["w"]), rtol=1e-13)
    _, a, s, out = _vector("gated_rms_norm")
    np.testing.assert_allclose(out["y"], norm_rows(a["x"], s["eps"]) * a["w"] * a["z"] / (1 + np.exp(-a["z"])), rtol=1e-13)
    _, a, s, out = _vector("deltanet_gates")
    g = [[-math.exp(a["A_log"][h]) * softplus(a["a"][t, h] + a["dt_bias"][h]) for h in range(4)] for t in range(6)]
    np.testing.assert_allclose(out["g"], g, rtol=1e-13)
    np.testing.assert_allclose(out["beta"], 1 / (1 + np.exp(-a["b"])), rtol=1e-13)
    _, a, s, out = _vector("mtp_input")
    c = np.concatenate([norm_rows(a["embeds"], s["eps"]) * (1 + a["norm_embedding"]),
                        norm_rows(a["hidden"], s["eps"]) * (1 + a["norm_hidden"])], axis=-1)
    np.testing.assert_allclose(out["y"], c @ a["fc"].T, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Self-consistency

def _rule_inputs(rng, T, Hv=3, dk=8, dv=5):
    return (L.l2norm(rng.normal(size=(T, Hv, dk))) * dk ** -0.5, L.l2norm(rng.normal(size=(T, Hv, dk))),
            rng.normal(size=(T, Hv, dv)), -rng.uniform(0, 3, size=(T, Hv)), rng.uniform(0, 1, size=(T, Hv)),
            rng.normal(size=(Hv, dk, dv)))


def test_chunked_equals_recurrent_for_every_length_1_to_200():
    rng = np.random.default_rng(1)
    for T in range(1, 201):
        q, k, v, g, beta, S0 = _rule_inputs(rng, T)
        o1, S1 = L.delta_rule_recurrent(q, k, v, g, beta, S0)
        o2, S2 = L.delta_rule_chunked(q, k, v, g, beta, S0)
        np.testing.assert_allclose(o2, o1, rtol=0, atol=1e-10, err_msg=f"T={T}")
        np.testing.assert_allclose(S2, S1, rtol=0, atol=1e-10, err_msg=f"T={T}")


def test_chunked_equals_recurrent_with_strong_decay_and_small_chunks():
    rng = np.random.default_rng(2)
    q, k, v, g, beta, S0 = _rule_inputs(rng, 150)
    g = g * 30  # decays down to exp(-90) per step: no overflow, no NaN
    o1, S1 = L.delta_rule_recurrent(q, k, v, g, beta, S0)
    for chunk in (1, 7, 64):
        o2, S2 = L.delta_rule_chunked(q, k, v, g, beta, S0, chunk=chunk)
        np.testing.assert_allclose(o2, o1, rtol=0, atol=1e-10)
        np.testing.assert_allclose(S2, S1, rtol=0, atol=1e-10)


def test_chunked_padding_does_not_touch_the_state():
    """A length that is not a multiple of 64, then the rest token by token, equals one long run."""
    rng = np.random.default_rng(3)
    q, k, v, g, beta, S0 = _rule_inputs(rng, 100)
    o_all, S_all = L.delta_rule_chunked(q, k, v, g, beta, S0)
    o_a, S_a = L.delta_rule_chunked(q[:70], k[:70], v[:70], g[:70], beta[:70], S0)
    o_b, S_b = L.delta_rule_chunked(q[70:], k[70:], v[70:], g[70:], beta[70:], S_a)
    np.testing.assert_allclose(np.concatenate([o_a, o_b]), o_all, atol=1e-12)
    np.testing.assert_allclose(S_b, S_all, atol=1e-12)


def test_deltanet_prefill_then_decode_equals_full():
    _, a, s, _ = _vector("gated_deltanet_continue")
    prm = L.DeltaNetParams(*(a[n] for n in L.DeltaNetParams._fields))
    st0 = L.DeltaNetState(a["conv_state"], a["recurrent_state"])
    y_full, st_full = L.gated_deltanet(a["x"], prm, 2, 1e-6, st0)
    y, st = L.gated_deltanet(a["x"][:60], prm, 2, 1e-6, st0)
    ys = [y]
    for t in range(60, 67):
        y, st = L.gated_deltanet(a["x"][t:t + 1], prm, 2, 1e-6, st)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys), y_full, atol=1e-12)
    np.testing.assert_allclose(st.recurrent, st_full.recurrent, atol=1e-12)
    np.testing.assert_allclose(st.conv, st_full.conv, atol=1e-13)


def test_attention_prefill_then_decode_equals_full():
    _, a, s, _ = _vector("gated_attention_prefill")
    prm = L.AttentionParams(*(a[n] for n in L.AttentionParams._fields))
    rope = V._rope(s["rope"])
    run = lambda x, pos, cache: L.gated_attention(x, prm, 4, 2, pos, rope, 1e-6, cache)
    y_full, kv_full = run(a["x"], a["positions"], None)
    y, kv = run(a["x"][:2], a["positions"][:, :2], None)
    ys = [y]
    for t in range(2, 6):
        y, kv = run(a["x"][t:t + 1], a["positions"][:, t:t + 1], kv)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys), y_full, atol=1e-13)
    np.testing.assert_allclose(kv.k, kv_full.k, atol=1e-13)


def test_text_positions_reduce_mrope_to_1d_neox_rope():
    rope = L.Rope(64, 1e7, (11, 11, 10), True)
    pos = L.text_positions(5, 9)
    cos, sin = L.rope_cos_sin(pos, rope)
    inv = 1e7 ** (-np.arange(0, 64, 2) / 64)
    ang = np.arange(5, 14)[:, None] * inv
    np.testing.assert_allclose(cos, np.cos(np.concatenate([ang, ang], -1)), rtol=0, atol=1e-13)
    np.testing.assert_allclose(sin, np.sin(np.concatenate([ang, ang], -1)), rtol=0, atol=1e-13)


def test_interleaved_mrope_sections_of_the_397b_model():
    rope = L.Rope(64, 1e7, (11, 11, 10), True)
    pos = np.array([[1], [10], [100]])
    cos, _ = L.rope_cos_sin(pos, rope)
    inv = 1e7 ** (-np.arange(0, 64, 2) / 64)
    rows = [mrope_row(j, (11, 11, 10), True) for j in range(32)]
    assert rows.count(0) == 11 and rows.count(1) == 11 and rows.count(2) == 10
    assert rows[:6] == [0, 1, 2, 0, 1, 2] and rows[30:] == [0, 1]
    np.testing.assert_allclose(cos[0, :32], np.cos(pos[rows, 0] * inv), rtol=0, atol=1e-13)


def test_router_ties_go_to_the_lower_expert_id():
    x = np.ones((1, 4))
    w = np.zeros((6, 4))
    w[[1, 3, 4]] = 1.0  # experts 1, 3, 4 tie for the top
    for k, want in ((1, [1]), (2, [1, 3]), (4, [1, 3, 4, 0])):
        _, ids, weights = L.route(x, w, k)
        assert ids[0].tolist() == want
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-15)


def test_router_is_sorted_by_probability():
    rng = np.random.default_rng(4)
    logits, ids, weights = L.route(rng.normal(size=(20, 8)), rng.normal(size=(16, 8)), 5)
    assert np.all(np.diff(weights, axis=-1) <= 0)
    assert all(len(set(r)) == 5 for r in ids.tolist())
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-14)


def test_bf16_mode_rounds_layer_outputs_to_bf16():
    import ml_dtypes
    p = L.Precision("bf16")
    _, a, s, out = _vector("gated_attention_prefill")
    prm = L.AttentionParams(*(p.act(a[n]) for n in L.AttentionParams._fields))
    y, kv = L.gated_attention(p.act(a["x"]), prm, 4, 2, a["positions"], V._rope(s["rope"]), 1e-6, None, p)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, y.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_allclose(y, out["y"], rtol=0.05, atol=0.05)


def test_precision_rejects_unknown_names():
    with pytest.raises(ValueError, match="precision"):
        L.Precision("fp16")


def test_linear_converts_stored_weights_block_by_block(monkeypatch):
    import ml_dtypes
    from ref import weights as W
    rng = np.random.default_rng(5)
    w = rng.normal(size=(37, 16)).astype(ml_dtypes.bfloat16)
    x = rng.normal(size=(3, 16))
    monkeypatch.setattr(W, "ROW_BLOCK_BYTES", 8 * 16 * 5)  # 5 rows per block, the last one short
    for name in ("f64", "f32", "bf16"):
        p = L.Precision(name)
        got = L.linear(p.act(x), W.stored_weight(w, p), p)
        assert got.dtype == p.dtype
        np.testing.assert_allclose(got, L.linear(p.act(x), w.astype(p.dtype), p), rtol=1e-13 if name == "f64" else 1e-6)  # row blocks may take another BLAS kernel: a few ulps


def test_bf16_rows_convert_exactly_for_every_bit_pattern(monkeypatch):
    import ml_dtypes
    from ref import weights as W
    monkeypatch.setattr(W, "BF16_CHUNK", 3 * 256 + 5)  # 3 rows a step, the last one short
    src = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(256, 256)  # every bf16
    for dtype in (np.float32, np.float64):
        with np.errstate(invalid="ignore"):  # signalling NaNs, quieted alike
            got, want = W.bf16_into(src, np.empty(src.shape, dtype)), src.astype(dtype)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan) and nan.sum() == 2 * 127  # +-NaN payloads 1..127
        np.testing.assert_array_equal(got[~nan].view(f"u{got.itemsize}"), want[~nan].view(f"u{want.itemsize}"))


def test_linear_reads_nvfp4_rows_into_its_buffer(monkeypatch):
    from ref import weights as W
    from ref.checkpoint import NVFP4Weight
    rng = np.random.default_rng(6)
    packed, scale, scale2 = nvfp4.quantize_weight(rng.normal(size=(37, 32)).astype(np.float32))
    x = rng.normal(size=(3, 32))
    monkeypatch.setattr(W, "ROW_BLOCK_BYTES", 8 * 32 * 5)  # 5 rows per block, the last one short
    for name in ("f64", "f32", "bf16"):
        p = L.Precision(name)
        rows = W.nvfp4_weight(NVFP4Weight(packed, scale, scale2, None), p)
        dense = p.act(nvfp4.dequantize(packed, scale, scale2, dtype=np.float32 if name == "f32" else np.float64))
        buf = np.full((5, 32), np.nan, p.dtype)
        np.testing.assert_array_equal(rows.read_rows(slice(35, 40), buf[:2]), dense[35:])  # short last block
        np.testing.assert_allclose(L.linear(p.act(x), rows, p), L.linear(p.act(x), dense, p),
                                   rtol=1e-14 if name == "f64" else 1e-6)
