"""The layers of the Qwen3.5-MoE text decoder in JAX (spec/model.md): norms, RoPE, the gated DeltaNet
and gated softmax attention, each continuing from its cache.

Written apart from ref.layers on purpose: tests compare the two. Shapes: B sequences, T new tokens,
S cache positions, H hidden; `opts` (jaxrun.options) carries the compute dtype and platform choices.
"""
from __future__ import annotations

from functools import partial
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrun.matmul import HIGHEST, dot, linear
from jaxrun.nvfp4 import block_values, pack_codes, quantize_activation, quantize_fp8, unpack_codes
from jaxrun.options import Options
from jaxrun.params import DeltaNetCache, GatedAttention, GatedDeltaNet, KVCache
from ref.config import TextConfig
from ref.kvcache import KV_FP8_RULES

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
    interleaved MRoPE an ordinary NeoX RoPE; 3-D positions read it per dim (rope_at_positions).
    f32: angles in float64, rounded once; bf16: HF's float32 angles, cos/sin rounded to bf16."""
    rd = cfg.rotary_dim
    if dt == jnp.float32:
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd)
        ang = np.arange(max_len, dtype=np.float64)[:, None] * inv[None]
    else:
        inv = (1.0 / cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd))).astype(np.float32)
        ang = (np.arange(max_len, dtype=np.float32)[:, None] * inv[None]).astype(np.float32)
    emb = np.concatenate([ang, ang], axis=-1)                              # [S, rd]
    return np.stack([np.cos(emb), np.sin(emb)], axis=1).astype(np.float32)  # [S, 2, rd]


def mrope_axes(cfg: TextConfig) -> np.ndarray:
    """Which position row (0 temporal, 1 height, 2 width) drives each of the rotary_dim dims [rd]:
    with the interleaved layout frequency j takes the height row when j % 3 == 1 and j < 3 *
    mrope_section[1], the width row when j % 3 == 2 and j < 3 * mrope_section[2], else the temporal
    row; without it, sections t | h | w in order. The two halves of the head share their frequencies."""
    half, sec = cfg.rotary_dim // 2, cfg.mrope_section
    j = np.arange(half)
    if cfg.mrope_interleaved:
        axis = np.where((j % 3 == 1) & (j < 3 * sec[1]), 1, np.where((j % 3 == 2) & (j < 3 * sec[2]), 2, 0))
    else:
        axis = np.where(j < sec[0], 0, np.where(j < sec[0] + sec[1], 1, 2))
    return np.concatenate([axis, axis]).astype(np.int32)


def rope_at_positions(rope, positions, axes: np.ndarray):
    """cos/sin of 3-D (mRoPE) positions: rope [S, 2, rd] (rope_table), positions [B, 3, T] int, axes
    [rd] (mrope_axes) -> [B, T, 2, rd]: dim d reads the table at the position of row axes[d]. Three
    equal rows give exactly the table's rows."""
    sel = positions[:, axes, :]                                          # [B, rd, T]
    cs = rope[sel, :, np.arange(len(axes))[None, :, None]]               # [B, rd, T, 2]
    return jnp.transpose(cs, (0, 2, 3, 1))


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


def _projections(x, p: GatedDeltaNet, cfg: TextConfig, opts: Options):
    """x [B, T, H] (normed) -> mixed qkv [B, T, C], z [B, T, Hv, dv], b, a [B, T, Hv]."""
    B, T, _ = x.shape
    z = linear(x, p.in_proj_z, opts).reshape(B, T, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
    return linear(x, p.in_proj_qkv, opts), z, linear(x, p.in_proj_b, opts), linear(x, p.in_proj_a, opts)


def _gdn_inputs(conv_out, b, a, p: GatedDeltaNet, cfg: TextConfig):
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
    g = -jnp.exp(p.A_log) * _softplus(a.astype(jnp.float32) + p.dt_bias)
    return q, k, v, beta, g


def _output(o, z, p: GatedDeltaNet, cfg: TextConfig, opts: Options):
    """Delta-rule outputs o [B, T, Hv, dv] f32 -> gated norm -> out_proj -> [B, T, H]."""
    B, T = o.shape[:2]
    y = gated_rms_norm(o.astype(opts.dtype), z, p.norm, cfg.rms_norm_eps).reshape(B, T, -1)
    return linear(y, p.out_proj, opts)


def unit_lower_solve(a, b):
    """X with (I + a) X = b: a [..., c, c] strictly lower triangular, b [..., c, d] -> [..., c, d], by
    forward substitution in plain XLA ops (row i = b_i - a_i X; the rows of X from i on still hold b,
    where a_i is zero). Options.triangular_solve "substitution" (CPU): jaxlib's batched LAPACK solve
    (0.10) splits a large batch into tasks on XLA's intra-op thread pool and blocks its own pool thread
    until they finish, so once every pool thread is blocked in such a solve or a collective (several
    devices on few cores) nothing runs the tasks and the step deadlocks. This loop never waits on the pool."""
    def row(r, x):
        ar = lax.dynamic_index_in_dim(a, r, axis=-2, keepdims=False)      # [..., c]
        br = lax.dynamic_index_in_dim(b, r, axis=-2, keepdims=False)      # [..., d]
        return lax.dynamic_update_index_in_dim(x, br - jnp.einsum("...c,...cd->...d", ar, x, precision=HIGHEST),
                                               r, axis=-2)

    return lax.fori_loop(1, b.shape[-2], row, b)


def _unit_lower_lapack(a, b):
    """unit_lower_solve by the platform's triangular solve (a's zero diagonal taken as the unit one)."""
    return jax.scipy.linalg.solve_triangular(a, b, lower=True, unit_diagonal=True)


def chunked_delta_rule(q, k, v, beta, g, s0, chunk, solve=unit_lower_solve):
    """Chunked gated delta rule from state s0 [B, H, dk, dv] f32. q, k [B, T, H, dk], v [B, T, H, dv],
    beta, g [B, T, H] (T a multiple of chunk; padded steps have beta = g = 0 and are no-ops) -> o
    [B, T, H, dv] f32, final state. Intra-chunk terms for all chunks at once, `lax.scan` over chunks;
    solve(a, b): X with (I + a) X = b (unit_lower_solve, or the platform's solver)."""
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
    u = solve(a, beta[..., None] * v)                                    # [n, B, H, c, dv]: (I + a) u = beta v
    w = solve(a, (beta * jnp.exp(gam))[..., None] * k)                   # [n, B, H, c, dk]
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


def gdn_prefill(x, lengths, p: GatedDeltaNet, cache: DeltaNetCache, cfg: TextConfig, opts: Options):
    """T tokens per sequence after the cached ones, the chunked rule: x [B, T, H] (normed; row b's
    first lengths[b] are real, the rest padding) -> (out [B, T, H], the cache after lengths[b] tokens).
    T % min(T, CHUNK) == 0."""
    B, T, _ = x.shape
    K = cfg.linear_conv_kernel_dim
    qkv, z, b, a = _projections(x, p, cfg, opts)
    window = jnp.concatenate([cache.conv.astype(opts.dtype), qkv], axis=1)   # [B, K-1+T, C]
    w = p.conv1d.astype(jnp.float32)                                     # [C, K]
    conv = sum(window[:, j:j + T].astype(jnp.float32) * w[:, j] for j in range(K))
    conv = jax.nn.silu(conv.astype(opts.dtype))
    conv_state = jax.vmap(lambda r, n: lax.dynamic_slice_in_dim(r, n, K - 1, axis=0))(window, lengths)
    q, k, v, beta, g = _gdn_inputs(conv, b, a, p, cfg)
    live = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]       # [B, T, 1]
    beta, g = jnp.where(live, beta, 0.0), jnp.where(live, g, 0.0)
    solve = unit_lower_solve if opts.triangular_solve == "substitution" else _unit_lower_lapack
    o, state = chunked_delta_rule(q, k, v, beta, g, cache.state.astype(jnp.float32), min(T, CHUNK), solve)
    return _output(o, z, p, cfg, opts), DeltaNetCache(conv_state, state.astype(cache.state.dtype))


def gdn_step(x, p: GatedDeltaNet, cache: DeltaNetCache, cfg: TextConfig, opts: Options):
    """T new tokens after the cached ones, one at a time (the recurrent rule): x [B, T, H] (normed)
    -> (out [B, T, H], the cache after each of the T tokens)."""
    B, T, _ = x.shape
    K = cfg.linear_conv_kernel_dim
    qkv, z, b, a = _projections(x, p, cfg, opts)
    window = jnp.concatenate([cache.conv, qkv], axis=1)                 # [B, K-1+T, C]
    w = p.conv1d.astype(jnp.float32)
    conv = jnp.stack([jnp.einsum("bkc,ck->bc", window[:, t:t + K].astype(jnp.float32), w, precision=HIGHEST)
                      for t in range(T)], axis=1)                        # [B, T, C]
    q, k, v, beta, g = _gdn_inputs(jax.nn.silu(conv.astype(opts.dtype)), b, a, p, cfg)
    state, outs, caches = cache.state.astype(jnp.float32), [], []
    for t in range(T):      # the state carried in float32 within the call; each token's stored in its dtype
        o, state = recurrent_delta_rule(q[:, t], k[:, t], v[:, t], beta[:, t], g[:, t], state)
        outs.append(o)
        caches.append(DeltaNetCache(window[:, t + 1:t + K], state.astype(cache.state.dtype)))
    return _output(jnp.stack(outs, axis=1), z, p, cfg, opts), caches


# ------------------------------------------------------------------------------------------------
# Gated softmax attention

def _attend(q, k, v, mask, opts: Options):
    """q [B, Tq, nKV, G, D], k, v [B, nKV, S, D], mask [B, Tq, S] -> [B, Tq, nKV*G*D]."""
    sc = dot("btngd,bnsd->bngts", q, k, opts) * q.shape[-1] ** -0.5
    sc = jnp.where(mask[:, None, None], sc, -jnp.inf)
    pr = jax.nn.softmax(sc, axis=-1).astype(opts.dtype)
    o = dot("bngts,bnsd->btngd", pr, v, opts).astype(opts.dtype)
    return o.reshape(*o.shape[:2], -1)


def kv_store(x, scale, opts: Options):
    """K or V [B, nKV, T, D] -> its stored form in opts.kv_cache_dtype (ref.kvcache): (values or codes,
    block scales or None)."""
    if opts.kv_cache_dtype == "auto":
        return x, None
    if opts.kv_cache_dtype == "fp8_e4m3":
        return quantize_fp8(x, scale, KV_FP8_RULES[opts.kv_engine]), None
    codes, scales = quantize_activation(x, scale)                        # vLLM: the engines' quantizer
    return pack_codes(codes), scales


def kv_read(stored, block_scales, scale, opts: Options):
    """A stored K or V [B, nKV, S, ...] -> what attention reads: the values themselves ("auto"), or
    float32 e4m3 * scale / e2m1 * block scale * scale, each rounded once (ref.kvcache)."""
    if opts.kv_cache_dtype == "auto":
        return stored
    if opts.kv_cache_dtype == "fp8_e4m3":
        return stored.astype(jnp.float32) * scale
    return block_values(unpack_codes(stored), block_scales) * scale


def attention(x, pos, cs, p: GatedAttention, cache: KVCache, cfg: TextConfig, opts: Options, fresh: bool = False):
    """T new tokens at positions pos .. pos+T-1 after the cached ones: x [B, T, H] (normed), pos [B],
    cs [B, T, 2, rd] their RoPE -> (out [B, T, H], the cache with their keys and values written in its
    stored form). Each token attends to the cache up to its own position (causal; the cache beyond is
    masked), read back as stored; fresh (SGLang's ragged prefill): the new tokens' own K/V as computed."""
    B, T, _ = x.shape
    D, eps = cfg.head_dim, cfg.rms_norm_eps
    qg = linear(x, p.q_proj, opts).reshape(B, T, cfg.num_attention_heads, 2 * D)
    q, gate = rms_norm(qg[..., :D], p.q_norm, eps), qg[..., D:].reshape(B, T, -1)
    k = rms_norm(linear(x, p.k_proj, opts).reshape(B, T, cfg.num_key_value_heads, D), p.k_norm, eps)
    v = linear(x, p.v_proj, opts).reshape(B, T, cfg.num_key_value_heads, D)
    q, k = apply_rope(q, cs), apply_rope(k, cs)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                  # [B, nKV, T, D]
    put = jax.vmap(lambda c, new, i: lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), i, axis=1))
    (k_stored, k_blocks), (v_stored, v_blocks) = kv_store(k, p.k_scale, opts), kv_store(v, p.v_scale, opts)
    cache = KVCache(put(cache.k, k_stored, pos), put(cache.v, v_stored, pos),
                    None if k_blocks is None else put(cache.k_block_scales, k_blocks, pos),
                    None if v_blocks is None else put(cache.v_block_scales, v_blocks, pos))
    k_all = kv_read(cache.k, cache.k_block_scales, p.k_scale, opts)     # [B, nKV, S, D]
    v_all = kv_read(cache.v, cache.v_block_scales, p.v_scale, opts)
    if fresh and opts.kv_cache_dtype != "auto":
        k_all, v_all = put(k_all, k, pos), put(v_all, v, pos)
    at = pos[:, None] + jnp.arange(T)                                    # [B, T]
    mask = jnp.arange(k_all.shape[2])[None, None, :] <= at[:, :, None]  # [B, T, S]
    o = _attend(q.reshape(B, T, cfg.num_key_value_heads, -1, D), k_all, v_all, mask, opts)
    return linear(o * jax.nn.sigmoid(gate), p.o_proj, opts), cache
