"""Qwen3.5-MoE text decoder in JAX: pure functions over a parameter pytree (reference/model.md).

Config: `ref.config.TextConfig` (frozen, hashable, passed as a static argument). Parameters:

    params = {"embed": [V, H], "norm": [H], "lm_head": lin, "layers": [layer, ...][, "mtp": mtp]}
    layer  = {"input_norm": [H], "post_norm": [H], "attn": gdn | attn, "mlp": moe}
    gdn    = {"qkv": lin, "z": lin, "b": lin, "a": lin, "conv": [C, K], "dt_bias": [Hv], "A_log": [Hv],
              "norm": [dv], "out": lin}
    attn   = {"q": lin, "k": lin, "v": lin, "o": lin, "q_norm": [D], "k_norm": [D]}
    moe    = {"router": lin, "experts": {"gate": xlin, "up": xlin, "down": xlin[, "in_s": [E, 2]]},
              "shared": {"gate": lin, "up": lin, "down": lin}, "shared_gate": lin}
    mtp    = {"fc": lin, "norm_embedding": [H], "norm_hidden": [H], "norm": [H], "layer": layer (full attention)}
    lin    = {"w": [out, in]}  or NVFP4 {"q": uint8 [out, in/2], "s": e4m3 [out, in/16], "s2": f32 []}
    xlin   = the same with a leading expert axis E (NVFP4 "s2" is [E]).

Norm weights, A_log and dt_bias are float32; other dense weights are stored in the compute dtype
(float32 or bfloat16). NVFP4 weights stay packed and are decoded inside the matmul that uses them
(jaxrun.nvfp4). Activations stay in the compute dtype (W4A16), except that the routed experts can
quantize their GEMM inputs as the engines do (W4A4, jaxrun.moe; experts then carry "in_s" [E, 2],
the gate/up and down input scales). The MoE block lives in jaxrun.moe.

Caches (one dict per layer, batch of B slots, S = max context):
    linear layer: {"conv": [B, K-1, C] (last pre-conv inputs), "state": f32 [B, Hv, dk, dv]}
    full layer:   {"k": [B, nKV, S, D], "v": [B, nKV, S, D]} (post-norm, post-RoPE)
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrun.matmul import HIGHEST, dot, linear
from jaxrun.moe import moe
from ref.config import FULL, TextConfig

CHUNK = 64  # DeltaNet chunk length in prefill


# ------------------------------------------------------------------------------------------------
# Norms, RoPE

def rms_norm(x, w, eps):
    """Zero-centred RMSNorm (weight used as 1 + w), float32 inside, result in x.dtype."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def gated_rms_norm(x, z, w, eps):
    """DeltaNet output norm: plain weight, norm before the SiLU(z) gate."""
    xf = x.astype(jnp.float32)
    y = (xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    y = (w.astype(x.dtype) * y).astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(x.dtype)


def rope_table(cfg: TextConfig, max_len: int, dt) -> np.ndarray:
    """cos ‖ sin for positions 0..max_len-1: [max_len, 2, rotary_dim]. Text-only positions make the
    interleaved MRoPE an ordinary NeoX RoPE. f32: angles in float64, rounded once; bf16: HF's float32
    angles, cos/sin rounded to bf16."""
    rd = cfg.rotary_dim
    if dt == jnp.float32:
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
        ang = np.arange(max_len, dtype=np.float64)[:, None] * inv[None]
    else:
        inv = (1.0 / cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd))).astype(np.float32)
        ang = (np.arange(max_len, dtype=np.float32)[:, None] * inv[None]).astype(np.float32)
    emb = np.concatenate([ang, ang], axis=-1)                              # [S, rd]
    return np.stack([np.cos(emb), np.sin(emb)], axis=1).astype(np.float32)  # [S, 2, rd]


def apply_rope(x, cs):
    """x [..., T, heads, D], cs [..., T, 2, rd] -> rotate pairs (j, j + rd/2) of the first rd dims."""
    rd = cs.shape[-1]
    cos, sin = cs[..., 0, None, :].astype(x.dtype), cs[..., 1, None, :].astype(x.dtype)
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    return jnp.concatenate([(xr * cos + rot * sin).astype(x.dtype), xp], axis=-1)


# ------------------------------------------------------------------------------------------------
# Gated DeltaNet

def _l2norm(x):
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def _softplus(x):  # torch's softplus: beta 1, threshold 20
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _gdn_inputs(conv_out, b, a, p, cfg: TextConfig):
    """Post-conv channels [..., C] and gates -> float32 q, k (repeated to Hv heads, l2-normed, q
    scaled), v [..., Hv, d], beta, g [..., Hv]."""
    kd, hk, hv = cfg.linear_key_dim, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    x = conv_out.astype(jnp.float32)
    lead = x.shape[:-1]
    q = x[..., :kd].reshape(*lead, hk, cfg.linear_key_head_dim)
    k = x[..., kd:2 * kd].reshape(*lead, hk, cfg.linear_key_head_dim)
    v = x[..., 2 * kd:].reshape(*lead, hv, cfg.linear_value_head_dim)
    q = _l2norm(q) * cfg.linear_key_head_dim ** -0.5
    k = _l2norm(k)
    r = hv // hk
    q, k = jnp.repeat(q, r, axis=-2), jnp.repeat(k, r, axis=-2)
    beta = jax.nn.sigmoid(b.astype(jnp.float32))
    g = -jnp.exp(p["A_log"]) * _softplus(a.astype(jnp.float32) + p["dt_bias"])
    return q, k, v, beta, g


def chunked_delta_rule(q, k, v, beta, g, chunk):
    """Chunked gated delta rule from a zero state. q, k [B, T, H, dk], v [B, T, H, dv], beta, g [B, T, H]
    (T a multiple of chunk; padded steps have beta = g = 0 and are no-ops) -> o [B, T, H, dv] f32,
    final state [B, H, dk, dv] f32. Intra-chunk terms for all chunks at once, `lax.scan` over chunks."""
    B, T, H, dk = q.shape
    n = T // chunk

    def split(x):  # [B, T, H, ...] -> [n, B, H, chunk, ...]
        x = x.reshape(B, n, chunk, H, *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)

    q, k, v, beta, g = (split(t) for t in (q, k, v, beta, g))
    mm = partial(jnp.einsum, precision=HIGHEST)
    gam = jnp.cumsum(g, axis=-1)                                         # [n, B, H, c]
    i = jnp.arange(chunk)
    lower = i[:, None] >= i[None, :]
    decay = jnp.exp(jnp.where(lower, gam[..., :, None] - gam[..., None, :], -jnp.inf))  # Γ [.., c, c]
    a = jnp.where(i[:, None] > i[None, :], beta[..., :, None] * mm("...cd,...sd->...cs", k, k) * decay, 0.0)
    m = a + jnp.eye(chunk, dtype=a.dtype)
    solve = partial(jax.scipy.linalg.solve_triangular, lower=True, unit_diagonal=True)
    u = solve(m, beta[..., None] * v)                                    # [n, B, H, c, dv]
    w = solve(m, (beta * jnp.exp(gam))[..., None] * k)                   # [n, B, H, c, dk]
    qk = mm("...cd,...sd->...cs", q, k) * decay
    qg = q * jnp.exp(gam)[..., None]
    last = gam[..., -1:]
    kd = k * jnp.exp(last - gam)[..., None]

    def step(s, xs):  # s [B, H, dk, dv]
        u_c, w_c, qk_c, qg_c, kd_c, last_c = xs
        vn = u_c - mm("...cd,...dv->...cv", w_c, s)
        o = mm("...cd,...dv->...cv", qg_c, s) + mm("...cs,...sv->...cv", qk_c, vn)
        s = jnp.exp(last_c)[..., None] * s + mm("...cd,...cv->...dv", kd_c, vn)
        return s, o

    s0 = jnp.zeros((B, H, dk, v.shape[-1]), jnp.float32)
    s, o = lax.scan(step, s0, (u, w, qk, qg, kd, last))                  # o [n, B, H, c, dv]
    o = jnp.moveaxis(o, 0, 1)                                            # [B, n, H, c, dv]
    return jnp.swapaxes(o, 2, 3).reshape(B, T, H, -1), s


def recurrent_delta_rule(q, k, v, beta, g, s):
    """One step: q, k [B, H, dk], v [B, H, dv], beta, g [B, H], state s [B, H, dk, dv] -> (o, s)."""
    mm = partial(jnp.einsum, precision=HIGHEST)
    s = s * jnp.exp(g)[..., None, None]
    delta = (v - mm("bhkv,bhk->bhv", s, k)) * beta[..., None]
    s = s + k[..., :, None] * delta[..., None, :]
    return mm("bhkv,bhk->bhv", s, q), s


def gdn_prefill(x, lengths, p, cfg: TextConfig, dt):
    """x [B, T, H] (normed), lengths [B] -> (out [B, T, H], cache). T % min(T, CHUNK) == 0."""
    B, T, _ = x.shape
    K = cfg.linear_conv_kernel_dim
    qkv = linear(x, p["qkv"], dt)                                        # [B, T, C]
    z = linear(x, p["z"], dt).reshape(B, T, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
    b, a = linear(x, p["b"], dt), linear(x, p["a"], dt)                  # [B, T, Hv]
    xp = jnp.concatenate([jnp.zeros((B, K - 1, qkv.shape[-1]), dt), qkv], axis=1)  # [B, T+K-1, C]
    w = p["conv"].astype(jnp.float32)                                    # [C, K]
    conv = sum(xp[:, j:j + T].astype(jnp.float32) * w[:, j] for j in range(K))
    conv = jax.nn.silu(conv.astype(dt))
    conv_state = jax.vmap(lambda r, n: lax.dynamic_slice_in_dim(r, n, K - 1, axis=0))(xp, lengths)
    q, k, v, beta, g = _gdn_inputs(conv, b, a, p, cfg)
    live = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]       # [B, T, 1]
    beta, g = jnp.where(live, beta, 0.0), jnp.where(live, g, 0.0)
    o, state = chunked_delta_rule(q, k, v, beta, g, min(T, CHUNK))
    y = gated_rms_norm(o.astype(dt), z, p["norm"], cfg.rms_norm_eps).reshape(B, T, -1)
    return linear(y, p["out"], dt), {"conv": conv_state, "state": state}


def gdn_step(x, p, cache, cfg: TextConfig, dt):
    """T new tokens after the cached ones, one at a time: x [B, T, H] (normed) -> (out [B, T, H], the
    cache after each of the T tokens)."""
    B, T, _ = x.shape
    K = cfg.linear_conv_kernel_dim
    qkv = linear(x, p["qkv"], dt)                                        # [B, T, C]
    z = linear(x, p["z"], dt).reshape(B, T, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
    b, a = linear(x, p["b"], dt), linear(x, p["a"], dt)
    window = jnp.concatenate([cache["conv"], qkv], axis=1)               # [B, K-1+T, C]
    w = p["conv"].astype(jnp.float32)
    conv = jnp.stack([jnp.einsum("bkc,ck->bc", window[:, t:t + K].astype(jnp.float32), w, precision=HIGHEST)
                      for t in range(T)], axis=1)                        # [B, T, C]
    q, k, v, beta, g = _gdn_inputs(jax.nn.silu(conv.astype(dt)), b, a, p, cfg)
    state, outs, caches = cache["state"], [], []
    for t in range(T):
        o, state = recurrent_delta_rule(q[:, t], k[:, t], v[:, t], beta[:, t], g[:, t], state)
        outs.append(o)
        caches.append({"conv": window[:, t + 1:t + K], "state": state})
    y = gated_rms_norm(jnp.stack(outs, axis=1).astype(dt), z, p["norm"], cfg.rms_norm_eps).reshape(B, T, -1)
    return linear(y, p["out"], dt), caches


# ------------------------------------------------------------------------------------------------
# Gated softmax attention

def _attn_qkv(x, p, cfg: TextConfig, dt):
    """x [..., H] -> q [..., nH, D], gate [..., nH*D], k, v [..., nKV, D] (q, k normed)."""
    lead, D = x.shape[:-1], cfg.head_dim
    qg = linear(x, p["q"], dt).reshape(*lead, cfg.num_attention_heads, 2 * D)
    q, gate = qg[..., :D], qg[..., D:].reshape(*lead, -1)
    k = linear(x, p["k"], dt).reshape(*lead, cfg.num_key_value_heads, D)
    v = linear(x, p["v"], dt).reshape(*lead, cfg.num_key_value_heads, D)
    return rms_norm(q, p["q_norm"], cfg.rms_norm_eps), gate, rms_norm(k, p["k_norm"], cfg.rms_norm_eps), v


def _attend(q, k, v, mask, dt):
    """q [B, Tq, nKV, G, D], k, v [B, nKV, S, D], mask [B, Tq, S] -> [B, Tq, nKV*G*D]."""
    sc = dot("btngd,bnsd->bngts", q, k) * q.shape[-1] ** -0.5
    sc = jnp.where(mask[:, None, None], sc, -jnp.inf)
    pr = jax.nn.softmax(sc, axis=-1).astype(dt)
    o = dot("bngts,bnsd->btngd", pr, v).astype(dt)
    return o.reshape(*o.shape[:2], -1)


def attn_prefill(x, rope, p, cfg: TextConfig, dt, max_len):
    """x [B, T, H] (normed), rope [T, 2, rd] -> (out [B, T, H], cache with S = max_len)."""
    B, T, _ = x.shape
    q, gate, k, v = _attn_qkv(x, p, cfg, dt)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    kc, vc = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                # [B, nKV, T, D]
    nkv = cfg.num_key_value_heads
    q = q.reshape(B, T, nkv, -1, cfg.head_dim)
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    o = _attend(q, kc, vc, causal, dt) * jax.nn.sigmoid(gate)
    pad = ((0, 0), (0, 0), (0, max_len - T), (0, 0))
    return linear(o, p["o"], dt), {"k": jnp.pad(kc, pad), "v": jnp.pad(vc, pad)}


def attn_step(x, pos, rope, p, cache, cfg: TextConfig, dt):
    """T new tokens at positions pos .. pos+T-1 after the cached ones: x [B, T, H] (normed), pos [B],
    rope [S, 2, rd] -> (out [B, T, H], cache with their keys and values written)."""
    B, T, _ = x.shape
    q, gate, k, v = _attn_qkv(x, p, cfg, dt)                             # [B, T, heads, D]
    at = pos[:, None] + jnp.arange(T)                                    # [B, T]
    q, k = apply_rope(q, rope[at]), apply_rope(k, rope[at])
    put = jax.vmap(lambda c, new, i: lax.dynamic_update_slice_in_dim(c, new, i, axis=1))
    kc = put(cache["k"], jnp.swapaxes(k, 1, 2), pos)                     # [B, nKV, S, D]
    vc = put(cache["v"], jnp.swapaxes(v, 1, 2), pos)
    q = q.reshape(B, T, cfg.num_key_value_heads, -1, cfg.head_dim)
    mask = jnp.arange(kc.shape[2])[None, None, :] <= at[:, :, None]     # [B, T, S]
    o = _attend(q, kc, vc, mask, dt) * jax.nn.sigmoid(gate)
    return linear(o, p["o"], dt), {"k": kc, "v": vc}


# ------------------------------------------------------------------------------------------------
# Model

def _lm_head(h, params, dt):
    """Final-normed hidden [..., H] -> logits [..., V] float32 (the lm_head the MTP head shares)."""
    return linear(h, params["lm_head"], dt).astype(jnp.float32)


def cache_shapes(cfg: TextConfig, B: int, max_len: int, dt, kinds=None) -> list[dict]:
    """The per-layer cache that prefill returns, as ShapeDtypeStructs (kinds: the layers' types,
    default the main model's; the MTP head's cache is cache_shapes(..., kinds=(FULL,)))."""
    sd = jax.ShapeDtypeStruct
    out = []
    for kind in kinds or cfg.layer_types:
        if kind == FULL:
            kv = sd((B, cfg.num_key_value_heads, max_len, cfg.head_dim), dt)
            out.append({"k": kv, "v": kv})
        else:
            out.append({"conv": sd((B, cfg.linear_conv_kernel_dim - 1, cfg.linear_conv_dim), dt),
                        "state": sd((B, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                     cfg.linear_value_head_dim), jnp.float32)})
    return out


def _layer(h, lp, mixer, cfg: TextConfig, dt, routed):
    """One decoder layer over h [B, T, H]: h + mixer(norm(h)), then + MoE(norm(h)). mixer(u) ->
    (out [B, T, H], cache) -> (h, cache)."""
    B, T, _ = h.shape
    u, c = mixer(rms_norm(h, lp["input_norm"], cfg.rms_norm_eps))
    h = (h + u).astype(dt)
    u = rms_norm(h, lp["post_norm"], cfg.rms_norm_eps).reshape(B * T, -1)
    return (h + moe(u, lp["mlp"], cfg, dt, routed).reshape(B, T, -1)).astype(dt), c


def _layer_prefill(h, lp, kind, lengths, rope, cfg: TextConfig, dt, routed, max_len):
    """One decoder layer over a whole prompt h [B, T, H] -> (h, cache)."""
    T = h.shape[1]
    if kind == FULL:
        mixer = lambda u: attn_prefill(u, rope[:T], lp["attn"], cfg, dt, max_len)
    else:
        mixer = lambda u: gdn_prefill(u, lengths, lp["attn"], cfg, dt)
    return _layer(h, lp, mixer, cfg, dt, routed)


def _layer_step(h, lp, kind, c, pos, rope, cfg: TextConfig, dt, routed):
    """One decoder layer for T new tokens per sequence at positions pos .. pos+T-1, h [B, T, H] ->
    (h, the layer's cache after each of the T tokens)."""
    T = h.shape[1]
    if kind == FULL:
        def mixer(u):  # one cache serves every t: keys past the kept tokens are masked, then rewritten
            out, kv = attn_step(u, pos, rope, lp["attn"], c, cfg, dt)
            return out, [kv] * T
    else:
        mixer = lambda u: gdn_step(u, lp["attn"], c, cfg, dt)
    return _layer(h, lp, mixer, cfg, dt, routed)


def prefill(params, tokens, lengths, rope, *, cfg: TextConfig, dt, routed, max_len: int, all_logits: bool,
            with_hidden: bool = False):
    """tokens [B, T] (right-padded), lengths [B] -> (logits [B, T, V] or [B, V] at each last token,
    cache for max_len positions[, final-normed hidden [B, T, H] (with_hidden, for the MTP head)])."""
    B, T = tokens.shape
    h = params["embed"][tokens].astype(dt)                              # [B, T, H]
    caches = []
    for kind, lp in zip(cfg.layer_types, params["layers"]):
        h, c = _layer_prefill(h, lp, kind, lengths, rope, cfg, dt, routed, max_len)
        caches.append(c)
    h = rms_norm(h, params["norm"], cfg.rms_norm_eps)
    last = h if all_logits else h[jnp.arange(B), lengths - 1]           # [B, T, H] or [B, H]
    out = (_lm_head(last, params, dt), caches)
    return out + (h,) if with_hidden else out


def decode(params, caches, tokens, pos, rope, *, cfg: TextConfig, dt, routed, with_hidden: bool = False):
    """tokens [B] at positions pos [B] -> (logits [B, V] f32, caches[, final-normed hidden [B, H]])."""
    h, out = _step(params, caches, tokens[:, None], pos, rope, cfg, dt, routed)
    h = h[:, 0]
    out = [c[0] for c in out]
    return (_lm_head(h, params, dt), out, h) if with_hidden else (_lm_head(h, params, dt), out)


def _step(params, caches, tokens, pos, rope, cfg: TextConfig, dt, routed):
    """tokens [B, T] at positions pos .. pos+T-1 -> (final-normed hidden [B, T, H], per layer its
    cache after each of the T tokens)."""
    h = params["embed"][tokens].astype(dt)                              # [B, T, H]
    out = []
    for kind, lp, c in zip(cfg.layer_types, params["layers"], caches):
        h, c = _layer_step(h, lp, kind, c, pos, rope, cfg, dt, routed)
        out.append(c)
    return rms_norm(h, params["norm"], cfg.rms_norm_eps), out


def verify(params, caches, mtp_cache, tokens, drafts, pos, rope, *, cfg: TextConfig, dt, routed, choose):
    """One speculative step. tokens [B] (the last chosen token, at pos [B]) and the MTP head's K drafts
    [B, K] of the tokens after it run through the model together (positions pos .. pos+K);
    choose(logits [B, K+1, V], drafts) -> (chosen [B, K+1], n [B] drafts accepted) picks the tokens
    (sampling.speculative_choice); emitted: chosen[:, :n+1]. -> (logits, chosen, n, caches (DeltaNet
    states after token n; attention keys past the kept tokens are masked until rewritten), the MTP
    cache, the next K drafts [B, K]). The MTP head runs on every (chosen token, hidden) row; the next
    drafts start from its row n and go on by mtp_chain."""
    B, K = drafts.shape
    h, per_layer = _step(params, caches, jnp.concatenate([tokens[:, None], drafts], axis=1), pos, rope, cfg, dt,
                         routed)                                         # [B, K+1, H]
    logits = _lm_head(h, params, dt)                                     # [B, K+1, V]
    chosen, n = choose(logits, drafts)
    rows = jnp.arange(B)
    after_n = lambda per_token: jax.tree.map(lambda *a: jnp.stack(a, axis=1)[rows, n], *per_token)
    caches = [c[0] if kind == FULL else after_n(c) for kind, c in zip(cfg.layer_types, per_layer)]
    hm, mtp_cache = _mtp_step(params, mtp_cache, chosen, h, pos, rope, cfg, dt, routed)
    hm = hm[rows, n]                                                     # the MTP row after the last kept token
    first = jnp.argmax(_lm_head(hm, params, dt), axis=-1).astype(jnp.int32)
    nxt, mtp_cache = mtp_chain(params, mtp_cache, first, hm, pos + n, rope, cfg=cfg, dt=dt, routed=routed, count=K)
    return logits, chosen, n, caches, mtp_cache, nxt


# ------------------------------------------------------------------------------------------------
# MTP head: one more full-attention MoE layer drafting token t+2 from the main model's final-normed
# hidden at t and the embedding of token t+1, at RoPE position t, with its own KV cache

def _mtp_input(params, next_tokens, hidden, cfg: TextConfig, dt):
    """fc([norm(embedding of the next tokens) | norm(main final hidden)]): [..., H] -> [..., H]."""
    m, eps = params["mtp"], cfg.rms_norm_eps
    e = params["embed"][next_tokens].astype(dt)
    c = jnp.concatenate([rms_norm(e, m["norm_embedding"], eps), rms_norm(hidden.astype(dt), m["norm_hidden"], eps)], -1)
    return linear(c, m["fc"], dt)


def mtp_prefill(params, next_tokens, hidden, lengths, rope, *, cfg: TextConfig, dt, routed, max_len: int):
    """next_tokens [B, T] (token t+1 at row t; right-padded), hidden [B, T, H] (the main model's final
    hidden at t), lengths [B] -> (draft logits [B, V] for token lengths + 1, the MTP cache, the MTP
    head's normed hidden [B, H] that made them)."""
    m = params["mtp"]
    h, c = _layer_prefill(_mtp_input(params, next_tokens, hidden, cfg, dt), m["layer"], FULL, lengths, rope,
                          cfg, dt, routed, max_len)
    h = rms_norm(h[jnp.arange(h.shape[0]), lengths - 1], m["norm"], cfg.rms_norm_eps)
    return _lm_head(h, params, dt), [c], h


def _mtp_step(params, cache, next_tokens, hidden, pos, rope, cfg: TextConfig, dt, routed):
    """The MTP layer on T rows per sequence: next_tokens [B, T] (token pos+t+1), hidden [B, T, H] (at
    pos+t) -> (its normed hidden [B, T, H], whose logits draft token pos+t+2, the cache)."""
    m = params["mtp"]
    h, c = _layer_step(_mtp_input(params, next_tokens, hidden, cfg, dt), m["layer"], FULL, cache[0], pos, rope,
                       cfg, dt, routed)
    return rms_norm(h, m["norm"], cfg.rms_norm_eps), [c[0]]


def mtp_decode(params, cache, next_tokens, hidden, pos, rope, *, cfg: TextConfig, dt, routed):
    """next_tokens [B] (token pos + 1), hidden [B, H] (main final hidden at pos), pos [B] -> (draft
    logits [B, V] for token pos + 2, cache)."""
    h, cache = _mtp_step(params, cache, next_tokens[:, None], hidden[:, None], pos, rope, cfg, dt, routed)
    return _lm_head(h[:, 0], params, dt), cache


def mtp_chain(params, cache, first, hidden, pos, rope, *, cfg: TextConfig, dt, routed, count: int):
    """count greedy drafts [B, count]: first [B] (drafted by the MTP row at pos [B], whose normed hidden
    is hidden [B, H]), then each next one from the MTP layer run on the previous draft and the normed
    hidden that drafted it, one position on (the engines' chaining of a one-layer MTP head). -> (drafts,
    cache)."""
    drafts = [first]
    for j in range(1, count):
        h, cache = _mtp_step(params, cache, drafts[-1][:, None], hidden[:, None], pos + j, rope, cfg, dt, routed)
        hidden = h[:, 0]
        drafts.append(jnp.argmax(_lm_head(hidden, params, dt), axis=-1).astype(jnp.int32))
    return jnp.stack(drafts, axis=1), cache


# ------------------------------------------------------------------------------------------------
# Random parameters (tests before a checkpoint exists, the 397B-shape GPU check, eval_shape sizing)

def init_params(key, cfg: TextConfig, dt, mtp: bool = False):
    """Random parameters of cfg's shapes: routed experts NVFP4, everything else dense in dt; with mtp
    an MTP head too."""
    H, E, I, Is = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    keys = (jax.random.fold_in(key, i) for i in range(1 << 30))

    def dense(out, inp):
        return {"w": (jax.random.normal(next(keys), (out, inp), jnp.float32) * inp ** -0.5).astype(dt)}

    def nvfp4(e, out, inp):
        q = jax.random.randint(next(keys), (e, out, inp // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        s = jax.random.uniform(next(keys), (e, out, inp // 16), jnp.float32, 0.5, 2.0).astype(jnp.float8_e4m3fn)
        return {"q": q, "s": s, "s2": jnp.full((e,), 0.25 * inp ** -0.5 / 6, jnp.float32)}

    def vec(n, scale=0.1):
        return jax.random.normal(next(keys), (n,), jnp.float32) * scale

    def layer(kind):
        if kind == FULL:
            D, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
            attn = {"q": dense(2 * nh * D, H), "k": dense(nkv * D, H), "v": dense(nkv * D, H),
                    "o": dense(H, nh * D), "q_norm": vec(D), "k_norm": vec(D)}
        else:
            hv, C = cfg.linear_num_value_heads, cfg.linear_conv_dim
            attn = {"qkv": dense(C, H), "z": dense(cfg.linear_value_dim, H), "b": dense(hv, H), "a": dense(hv, H),
                    "conv": (jax.random.normal(next(keys), (C, cfg.linear_conv_kernel_dim)) * 0.5).astype(dt),
                    "dt_bias": 1.0 + vec(hv), "A_log": jnp.log(jax.random.uniform(next(keys), (hv,), minval=1, maxval=16)),
                    "norm": 1.0 + vec(cfg.linear_value_head_dim), "out": dense(H, cfg.linear_value_dim)}
        mlp = {"router": dense(E, H),
               "experts": {"gate": nvfp4(E, I, H), "up": nvfp4(E, I, H), "down": nvfp4(E, H, I)},
               "shared": {"gate": dense(Is, H), "up": dense(Is, H), "down": dense(H, Is)},
               "shared_gate": dense(1, H)}
        return {"input_norm": vec(H), "post_norm": vec(H), "attn": attn, "mlp": mlp}

    params = {"embed": (jax.random.normal(next(keys), (cfg.vocab_size, H)) * 0.5).astype(dt), "norm": vec(H),
              "lm_head": dense(cfg.vocab_size, H), "layers": [layer(t) for t in cfg.layer_types]}
    if mtp:
        params["mtp"] = {"fc": dense(H, 2 * H), "norm_embedding": vec(H), "norm_hidden": vec(H), "norm": vec(H),
                         "layer": layer(FULL)}
    return params
