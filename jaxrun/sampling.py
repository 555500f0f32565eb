"""Token choice inside jit: greedy, temperature / top-k / top-p sampling, and the acceptance rule of
speculative decoding with one draft token, which keeps the sampled distribution exactly.

Per-row settings are arrays [B] (temperature 0 = greedy), so one compiled step serves any values.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0


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


def _draw(key, order, scaled):
    """One id per row from the filtered distribution (order, scaled) of _filtered."""
    pick = jax.random.categorical(key, scaled, axis=-1)
    return jnp.take_along_axis(order, pick[:, None], -1)[:, 0]


def sample(logits, key, temperature, top_p, top_k):
    """logits [B, V] f32 -> tokens [B] int32: argmax (lowest id on ties) where temperature == 0, else
    a draw from the filtered softmax(logits / temperature). An all-greedy batch skips the sort."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        return jnp.where(temperature == 0, greedy, _draw(key, *_filtered(logits, temperature, top_p, top_k)))

    return jax.lax.cond(jnp.all(temperature == 0), lambda: greedy, draw).astype(jnp.int32)


def speculative_choice(logits, drafts, key, temperature, top_p, top_k):
    """The tokens of one speculative step. logits [B, 2, V]: after the last token and after the draft
    [B]. -> (tokens [B, 2], accepted [B]); emitted: tokens[:, 0], and tokens[:, 1] where accepted.

    Greedy rows: the argmaxes, the draft accepted where it equals the first. Sampled rows (the
    draft a single token d, i.e. a draft distribution q = one-hot(d)): d is accepted with probability
    p(d) under the filtered distribution p after the last token, and is then the first token, the
    second drawn from the distribution after the draft; otherwise the first token is drawn from p
    with d removed (renormalised: max(p - q, 0)). The first token is then distributed as p, and the
    pair as two sequential draws."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)               # [B, 2]

    def draw():
        k_accept, k_other, k_next = jax.random.split(key, 3)
        order, scaled = _filtered(logits[:, 0], temperature, top_p, top_k)
        p_draft = jnp.sum(jnp.where(order == drafts[:, None], jax.nn.softmax(scaled, axis=-1), 0.0), axis=-1)
        accepted = jax.random.uniform(k_accept, drafts.shape) < p_draft
        other = _draw(k_other, order, jnp.where(order == drafts[:, None], -jnp.inf, scaled))
        second = _draw(k_next, *_filtered(logits[:, 1], temperature, top_p, top_k))
        tokens = jnp.stack([jnp.where(accepted, drafts, other), second], axis=1)
        is_greedy = (temperature == 0)[:, None]
        return jnp.where(is_greedy, greedy, tokens), jnp.where(is_greedy[:, 0], greedy[:, 0] == drafts, accepted)

    tokens, accepted = jax.lax.cond(jnp.all(temperature == 0), lambda: (greedy, greedy[:, 0] == drafts), draw)
    return tokens.astype(jnp.int32), accepted
