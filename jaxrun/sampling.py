"""Token choice inside jit: greedy, temperature / top-k / top-p sampling, and the acceptance rule of
speculative decoding with K draft tokens, which keeps the sampled distribution exactly.

Per-row settings are arrays [B] (temperature 0 = greedy), so one compiled step serves any values, and
each row draws from its own PRNG key, so a row's tokens depend only on its own key and logits (not on
what else runs in the batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0


def seed_key(seed: int) -> np.ndarray:
    """The PRNG key [2] uint32 of a seed, any int64 (negative ones by their two's complement): its high
    and low 32 bits, as jax.random.PRNGKey makes it for seeds below 2^32."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([s >> 32, s & 0xFFFFFFFF], np.uint32)


def _filtered(logits, temperature, top_p, top_k):
    """logits [B, V] -> (order [B, V] the ids by descending logit (stable), the logits in that order
    divided by the temperature, -inf outside the kept set: the first top_k (if > 0), then the
    shortest prefix whose probability reaches top_p, at least one)."""
    order = jnp.argsort(-logits, axis=-1, stable=True)
    scaled = jnp.take_along_axis(logits, order, -1) / jnp.maximum(temperature, 1e-6)[:, None]
    rank = jnp.arange(logits.shape[-1])[None]
    scaled = jnp.where((top_k[:, None] > 0) & (rank >= top_k[:, None]), -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) | (rank == 0)
    return order, jnp.where(keep, scaled, -jnp.inf)


def row_keys(keys, B: int):
    """One PRNG key per row [B, 2]: keys as given, or one key for the batch split into B."""
    return jax.random.split(keys, B) if keys.ndim == 1 else keys


def _draw(keys, order, scaled):
    """One id per row from the filtered distribution (order, scaled) of _filtered, row b with keys[b]."""
    pick = jax.vmap(lambda k, s: jax.random.categorical(k, s))(keys, scaled)
    return jnp.take_along_axis(order, pick[:, None], -1)[:, 0]


def sample(logits, keys, temperature, top_p, top_k):
    """logits [B, V] f32, keys [B, 2] (row_keys) -> tokens [B] int32: argmax (lowest id on ties) where
    temperature == 0, else a draw from the filtered softmax(logits / temperature). An all-greedy batch
    skips the sort."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = row_keys(keys, logits.shape[0])

    def draw():
        return jnp.where(temperature == 0, greedy, _draw(keys, *_filtered(logits, temperature, top_p, top_k)))

    return jax.lax.cond(jnp.all(temperature == 0), lambda: greedy, draw).astype(jnp.int32)


def speculative_choice(logits, drafts, keys, temperature, top_p, top_k):
    """The tokens of one speculative step. logits [B, K+1, V]: after the last token and after each of
    the K drafts [B, K]; keys [B, 2] (row_keys). -> (chosen [B, K+1], n [B] drafts accepted); emitted:
    chosen[:, :n+1].

    Greedy rows: the argmaxes, n the number of leading drafts equal to them. Sampled rows (each draft
    a single token d_i, i.e. a draft distribution q_i = one-hot(d_i)): d_i is accepted with
    probability p_i(d_i) under the filtered distribution p_i after the tokens before it, while all
    before it were; at the first rejection the token is drawn from p_i with d_i removed
    (renormalised max(p_i - q_i, 0)); when all K are accepted, one more is drawn from p_K. The
    emitted tokens are then distributed as sequential draws from the model."""
    B, K = drafts.shape
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)               # [B, K+1]
    leading = lambda ok: jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    greedy_n = leading(greedy[:, :K] == drafts)

    def draw():
        sub = jax.vmap(lambda k: jax.random.split(k, 2 * K + 1))(row_keys(keys, B))   # [B, 2K+1, 2]
        tokens, accepts = [], []
        for i in range(K):
            order, scaled = _filtered(logits[:, i], temperature, top_p, top_k)
            is_draft = order == drafts[:, i:i + 1]
            p_draft = jnp.sum(jnp.where(is_draft, jax.nn.softmax(scaled, axis=-1), 0.0), axis=-1)
            accepts.append(jax.vmap(jax.random.uniform)(sub[:, 2 * i]) < p_draft)
            other = _draw(sub[:, 2 * i + 1], order, jnp.where(is_draft, -jnp.inf, scaled))
            tokens.append(jnp.where(accepts[-1], drafts[:, i], other))
        tokens.append(_draw(sub[:, 2 * K], *_filtered(logits[:, K], temperature, top_p, top_k)))
        sampled, n = jnp.stack(tokens, axis=1), leading(jnp.stack(accepts, axis=1))
        is_greedy = temperature == 0
        return jnp.where(is_greedy[:, None], greedy, sampled), jnp.where(is_greedy, greedy_n, n)

    chosen, n = jax.lax.cond(jnp.all(temperature == 0), lambda: (greedy, greedy_n), draw)
    return chosen.astype(jnp.int32), n.astype(jnp.int32)
