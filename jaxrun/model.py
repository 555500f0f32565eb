"""The Qwen3.5-MoE text decoder in JAX: pure functions over the typed parameters (jaxrun.params) and
caches (jaxrun.layers), spec/model.md.

- `prefill`: T tokens per sequence continuing from a cache (a fresh one, or an earlier chunk's), the
  chunked DeltaNet rule; `step`: T tokens one at a time (decode T = 1; a speculative step T = K + 1);
  `verify`: one speculative step with its token choice; the MTP head (`mtp_*`).
- `cfg` is ref.config.TextConfig (frozen, hashable); `opts` (jaxrun.options) the compute dtype and
  the platform's choices; `rope` the cos/sin table of jaxrun.layers.rope_table.
- Image prompts (spec/model.md §9.10): a prefill chunk takes its tokens' 3-D positions [B, 3, T] and
  the image rows that replace the image-pad embeddings; every step after the prompt takes `delta`
  [B], the mRoPE offset: the token in cache slot s sits at position s + delta (all three rows). `pos`
  is always the cache slot.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxrun.layers import attention, gdn_prefill, gdn_step, mrope_axes, rms_norm, rope_at_positions
from jaxrun.matmul import linear
from jaxrun.moe import sparse_moe
from jaxrun.options import Options
from jaxrun.params import DecoderLayer, Params
from jaxrun.sharding import replicated_across_hosts
from ref.config import FULL, TextConfig


def rope_at(rope, pos, T: int, delta=None):
    """cos/sin of positions pos .. pos+T-1 per sequence (+ delta [B], the mRoPE offset after an image
    prompt): rope [S, 2, rd], pos [B] -> [B, T, 2, rd]."""
    return rope[(pos if delta is None else pos + delta)[:, None] + jnp.arange(T)]


def _cos_sin(rope, pos, T: int, cfg: TextConfig, positions=None, delta=None):
    """The RoPE of T tokens after `pos` cached ones: 3-D positions [B, 3, T] when given, else text
    positions pos (+ delta) onwards -> [B, T, 2, rd]."""
    if positions is None:
        return rope_at(rope, pos, T, delta)
    return rope_at_positions(rope, positions, mrope_axes(cfg))


def _embed(params: Params, tokens, opts: Options, image_rows=None):
    """Token embeddings [B, T, H]; image_rows (rows [B, T, H], is_image [B, T]) replace the image pads'."""
    h = params.embed_tokens[tokens].astype(opts.dtype)
    if image_rows is None:
        return h
    rows, is_image = image_rows
    return jnp.where(is_image[..., None], rows.astype(opts.dtype), h)


def _lm_head(h, params: Params, opts: Options):
    """Final-normed hidden [..., H] -> logits [..., V] float32 (the lm_head the MTP head shares)."""
    return replicated_across_hosts(linear(h, params.lm_head, opts).astype(jnp.float32), opts.mesh)


def _residual_layer(h, lp: DecoderLayer, mixer: Callable, cfg: TextConfig, opts: Options):
    """One decoder layer over h [B, T, H]: h + mixer(norm(h)), then + MoE(norm(h)). mixer(u) ->
    (out [B, T, H], cache) -> (h, cache)."""
    B, T, _ = h.shape
    dt = opts.dtype
    u, c = mixer(rms_norm(h, lp.input_layernorm, cfg.rms_norm_eps))
    h = (h + u).astype(dt)
    u = rms_norm(h, lp.post_attention_layernorm, cfg.rms_norm_eps).reshape(B * T, -1)
    return (h + sparse_moe(u, lp.mlp, cfg, opts).reshape(B, T, -1)).astype(dt), c


def _layer_prefill(h, lp: DecoderLayer, cache, pos, lengths, cs, cfg: TextConfig, opts: Options):
    """One decoder layer over the next T tokens of each prompt (after `pos` cached ones; RoPE cs
    [B, T, 2, rd]) -> (h, cache)."""
    if lp.self_attn is not None:
        mixer = lambda u: attention(u, pos, cs, lp.self_attn, cache, cfg, opts, fresh=opts.kv_prefill == "fresh")
    else:
        mixer = lambda u: gdn_prefill(u, lengths, lp.linear_attn, cache, cfg, opts)
    return _residual_layer(h, lp, mixer, cfg, opts)


def _layer_step(h, lp: DecoderLayer, cache, pos, cs, cfg: TextConfig, opts: Options):
    """One decoder layer for T new tokens per sequence in cache slots pos .. pos+T-1 (RoPE cs
    [B, T, 2, rd]), h [B, T, H] -> (h, the layer's cache after each of the T tokens)."""
    T = h.shape[1]
    if lp.self_attn is not None:
        def mixer(u):  # one cache serves every t: keys past the kept tokens are masked, then rewritten
            out, kv = attention(u, pos, cs, lp.self_attn, cache, cfg, opts)
            return out, [kv] * T
    else:
        mixer = lambda u: gdn_step(u, lp.linear_attn, cache, cfg, opts)
    return _residual_layer(h, lp, mixer, cfg, opts)


class Prefilled(NamedTuple):
    logits: jax.Array              # [B, T, V] (all_logits) or [B, V] at each sequence's last token
    cache: tuple                   # per layer, after the chunk
    hidden: jax.Array | None       # final-normed hidden [B, T, H] (with_hidden, for the MTP head)


def prefill(params: Params, cache, tokens, pos, lengths, rope, *, cfg: TextConfig, opts: Options,
            all_logits: bool = False, with_hidden: bool = False, positions=None, image_rows=None) -> Prefilled:
    """tokens [B, T] (right-padded; row b's first lengths[b] are real) at positions pos[b] .. after the
    cached ones (pos 0 and a zero cache for a fresh prompt) -> Prefilled. Image prompts: positions
    [B, 3, T] the tokens' mRoPE positions, image_rows (rows [B, T, H], is_image [B, T]) the encoder's
    rows in place of the image pads' embeddings."""
    B, T = tokens.shape
    h = _embed(params, tokens, opts, image_rows)                        # [B, T, H]
    cs = _cos_sin(rope, pos, T, cfg, positions)
    caches = []
    for lp, c in zip(params.layers, cache):
        h, c = _layer_prefill(h, lp, c, pos, lengths, cs, cfg, opts)
        caches.append(c)
    h = rms_norm(h, params.norm, cfg.rms_norm_eps)
    last = h if all_logits else h[jnp.arange(B), lengths - 1]           # [B, T, H] or [B, H]
    return Prefilled(_lm_head(last, params, opts), tuple(caches), h if with_hidden else None)


def step(params: Params, cache, tokens, pos, rope, *, cfg: TextConfig, opts: Options, delta=None):
    """tokens [B, T] in cache slots pos .. pos+T-1 (positions + delta [B]) -> (final-normed hidden
    [B, T, H], per layer its cache after each of the T tokens)."""
    h = params.embed_tokens[tokens].astype(opts.dtype)                  # [B, T, H]
    cs = rope_at(rope, pos, tokens.shape[1], delta)
    out = []
    for lp, c in zip(params.layers, cache):
        h, c = _layer_step(h, lp, c, pos, cs, cfg, opts)
        out.append(c)
    return rms_norm(h, params.norm, cfg.rms_norm_eps), out


def decode(params: Params, cache, tokens, pos, rope, *, cfg: TextConfig, opts: Options, delta=None):
    """tokens [B] in cache slots pos [B] (positions + delta) -> (logits [B, V] f32, caches, final-normed
    hidden [B, H])."""
    h, out = step(params, cache, tokens[:, None], pos, rope, cfg=cfg, opts=opts, delta=delta)
    h = h[:, 0]
    return _lm_head(h, params, opts), tuple(c[0] for c in out), h


class Verified(NamedTuple):
    logits: jax.Array              # [B, K+1, V] after the last token and after each draft
    chosen: jax.Array              # [B, K+1] the chosen tokens; emitted: chosen[:, :n+1]
    accepted: jax.Array            # [B] n, drafts accepted
    cache: tuple                   # DeltaNet states after token n; attention keys past it masked until rewritten
    mtp_cache: tuple
    drafts: jax.Array              # [B, K] the next step's drafts


def verify(params: Params, cache, mtp_cache, tokens, drafts, pos, rope, *, cfg: TextConfig, opts: Options,
           choose, delta=None) -> Verified:
    """One speculative step. tokens [B] (the last chosen token, at pos [B]) and the MTP head's K drafts
    [B, K] of the tokens after it run through the model together (positions pos .. pos+K);
    choose(logits [B, K+1, V], drafts) -> (chosen [B, K+1], n [B] drafts accepted) picks the tokens
    (sampling.speculative_choice). The MTP head runs on every (chosen token, hidden) row; the next
    drafts start from its row n and go on by mtp_chain. delta [B]: the mRoPE offset (image prompts)."""
    B, K = drafts.shape
    h, per_layer = step(params, cache, jnp.concatenate([tokens[:, None], drafts], axis=1), pos, rope,
                        cfg=cfg, opts=opts, delta=delta)                 # [B, K+1, H]
    logits = _lm_head(h, params, opts)                                   # [B, K+1, V]
    chosen, n = choose(logits, drafts)
    rows = jnp.arange(B)
    after_n = lambda per_token: jax.tree.map(lambda *a: jnp.stack(a, axis=1)[rows, n], *per_token)
    cache = tuple(c[0] if kind == FULL else after_n(c) for kind, c in zip(cfg.layer_types, per_layer))
    hm, mtp_cache = _mtp_step(params, mtp_cache, chosen, h, pos, rope_at(rope, pos, K + 1, delta), cfg, opts)
    hm = hm[rows, n]                                                     # the MTP row after the last kept token
    first = jnp.argmax(_lm_head(hm, params, opts), axis=-1).astype(jnp.int32)
    nxt, mtp_cache = mtp_chain(params, mtp_cache, first, hm, pos + n, rope, cfg=cfg, opts=opts, count=K, delta=delta)
    return Verified(logits, chosen, n, cache, mtp_cache, nxt)


# ------------------------------------------------------------------------------------------------
# MTP head: one more full-attention MoE layer drafting token t+2 from the main model's final-normed
# hidden at t and the embedding of token t+1, at RoPE position t, with its own KV cache

def _mtp_input(params: Params, next_tokens, hidden, cfg: TextConfig, opts: Options, image_rows=None):
    """fc([norm(embedding of the next tokens) | norm(main final hidden)]): [..., H] -> [..., H]. An
    image pad's embedding is its image row (image_rows, as _embed; vLLM's multimodal MTP embeds so)."""
    m, eps, dt = params.mtp, cfg.rms_norm_eps, opts.dtype
    e = _embed(params, next_tokens, opts, image_rows)
    c = jnp.concatenate([rms_norm(e, m.pre_fc_norm_embedding, eps), rms_norm(hidden.astype(dt), m.pre_fc_norm_hidden, eps)],
                        -1)
    return linear(c, m.fc, opts)


def mtp_prefill(params: Params, mtp_cache, next_tokens, hidden, pos, lengths, rope, *, cfg: TextConfig,
                opts: Options, positions=None, next_rows=None):
    """The MTP layer over the first lengths[b] rows of a chunk after `pos` cached ones: next_tokens
    [B, T] (token t+1 at row t; right-padded), hidden [B, T, H] (the main model's final hidden at t)
    -> the MTP cache. (The row whose next token is the one sampled after the prompt runs as
    mtp_decode once it is known.) Image prompts: row t at the main model's position of token t
    (positions [B, 3, T]); next_rows (rows, is_image) the image rows of the next tokens."""
    m = params.mtp
    cs = _cos_sin(rope, pos, next_tokens.shape[1], cfg, positions)
    _, c = _layer_prefill(_mtp_input(params, next_tokens, hidden, cfg, opts, next_rows), m.layers[0], mtp_cache[0],
                          pos, lengths, cs, cfg, opts)
    return (c,)


def _mtp_step(params: Params, mtp_cache, next_tokens, hidden, pos, cs, cfg: TextConfig, opts: Options):
    """The MTP layer on T rows per sequence in cache slots pos .. pos+T-1 (RoPE cs [B, T, 2, rd]):
    next_tokens [B, T] (token pos+t+1), hidden [B, T, H] (at pos+t) -> (its normed hidden [B, T, H],
    whose logits draft token pos+t+2, the cache)."""
    m = params.mtp
    h, c = _layer_step(_mtp_input(params, next_tokens, hidden, cfg, opts), m.layers[0], mtp_cache[0], pos, cs,
                       cfg, opts)
    return rms_norm(h, m.norm, cfg.rms_norm_eps), (c[0],)


def mtp_decode(params: Params, mtp_cache, next_tokens, hidden, pos, rope, *, cfg: TextConfig, opts: Options,
               delta=None, positions=None):
    """next_tokens [B] (token pos + 1), hidden [B, H] (main final hidden at pos), pos [B] -> (draft
    logits [B, V] for token pos + 2, cache, the MTP head's normed hidden [B, H] that made them). The
    row sits at position pos + delta, or at positions [B, 3, 1] (a prompt's last token's, after an image)."""
    cs = _cos_sin(rope, pos, 1, cfg, positions, delta)
    h, mtp_cache = _mtp_step(params, mtp_cache, next_tokens[:, None], hidden[:, None], pos, cs, cfg, opts)
    return _lm_head(h[:, 0], params, opts), mtp_cache, h[:, 0]


def mtp_chain(params: Params, mtp_cache, first, hidden, pos, rope, *, cfg: TextConfig, opts: Options, count: int,
              delta=None):
    """count greedy drafts [B, count]: first [B] (drafted by the MTP row at pos [B], whose normed hidden
    is hidden [B, H]), then each next one from the MTP layer run on the previous draft and the normed
    hidden that drafted it, one position on (the engines' chaining of a one-layer MTP head; positions
    + delta [B]). -> (drafts, cache)."""
    drafts = [first]
    for j in range(1, count):
        h, mtp_cache = _mtp_step(params, mtp_cache, drafts[-1][:, None], hidden[:, None], pos + j,
                                 rope_at(rope, pos + j, 1, delta), cfg, opts)
        hidden = h[:, 0]
        drafts.append(jnp.argmax(_lm_head(hidden, params, opts), axis=-1).astype(jnp.int32))
    return jnp.stack(drafts, axis=1), mtp_cache
