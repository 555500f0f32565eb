"""jaxrun.sampling against float64 distributions computed here: many independent draws (one row
each) of plain sampling and of the speculative acceptance rule, their frequencies within 5 standard
errors of the exact probabilities, and tokens outside the kept set never drawn."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrun.sampling import sample, speculative_choice

N = 40_000  # draws per case
AFTER_TOKEN = np.array([2.0, 1.5, 0.3, 0.0, -1.0, -3.0], np.float32)
AFTER_DRAFT = np.array([-0.5, 0.0, 1.0, 2.5, 0.2, 0.2], np.float32)


def _probs(logits, temperature, top_p, top_k) -> np.ndarray:
    """The filtered sampling distribution in float64: ids by descending logit (ties to the lower id),
    the first top_k, then the shortest prefix whose probability reaches top_p."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    z = logits[order].astype(np.float64) / temperature
    if top_k:
        z[top_k:] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.cumsum(p) - p < top_p
    keep[0] = True
    p = np.where(keep, p, 0.0)
    out = np.zeros_like(p)
    out[order] = p / p.sum()
    return out


def _assert_frequencies(draws, p, n):
    freq = np.bincount(draws, minlength=len(p)) / n
    bound = 5 * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= bound), (freq, p)
    assert np.all(freq[p == 0] == 0)


def _settings(temperature, top_p, top_k):
    full = lambda v, dt: jnp.full((N,), v, dt)
    return full(temperature, jnp.float32), full(top_p, jnp.float32), full(top_k, jnp.int32)


CASES = [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.3, 0.9, 0), (1.0, 1.0, 3), (2.0, 0.6, 4)]


@pytest.mark.parametrize("temperature, top_p, top_k", CASES)
def test_sample_distribution(temperature, top_p, top_k):
    logits = jnp.broadcast_to(jnp.asarray(AFTER_TOKEN), (N, len(AFTER_TOKEN)))
    draws = np.asarray(jax.jit(sample)(logits, jax.random.PRNGKey(1), *_settings(temperature, top_p, top_k)))
    _assert_frequencies(draws, _probs(AFTER_TOKEN, temperature, top_p, top_k), N)


@pytest.mark.parametrize("draft", [0, 1, 3, 5])
@pytest.mark.parametrize("temperature, top_p, top_k", CASES)
def test_speculative_choice_keeps_the_distribution(temperature, top_p, top_k, draft):
    """The first token is distributed as plain sampling's, the draft accepted with its probability
    (never when filtered out), and the second token, where accepted, as a draw after the draft."""
    logits = jnp.broadcast_to(jnp.asarray(np.stack([AFTER_TOKEN, AFTER_DRAFT])), (N, 2, len(AFTER_TOKEN)))
    drafts = jnp.full((N,), draft, jnp.int32)
    tokens, accepted = jax.jit(speculative_choice)(logits, drafts, jax.random.PRNGKey(2),
                                                   *_settings(temperature, top_p, top_k))
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    p = _probs(AFTER_TOKEN, temperature, top_p, top_k)
    _assert_frequencies(tokens[:, 0], p, N)
    assert np.array_equal(accepted, tokens[:, 0] == draft)
    if p[draft] > 0:
        _assert_frequencies(tokens[accepted, 1], _probs(AFTER_DRAFT, temperature, top_p, top_k), int(accepted.sum()))


def test_speculative_choice_greedy_rows():
    """Temperature 0 rows take the argmaxes (lowest id on ties) and accept the draft where it is the
    first, beside sampled rows in the same batch; top-k 1 at any temperature is the same."""
    after_token = np.array([[0.0, 3.0, 3.0, 1.0], [0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    after_draft = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    logits = jnp.asarray(np.stack([after_token, after_draft], axis=1), jnp.float32)
    drafts = jnp.asarray([1, 2, 0, 3], jnp.int32)
    want_tokens = np.array([[1, 0], [1, 2], [0, 3], [1, 0]])
    want_accepted = np.array([True, False, True, False])
    for temperature, top_k in ((0.0, 0), (1.5, 1)):
        tokens, accepted = speculative_choice(logits, drafts, jax.random.PRNGKey(0), jnp.full(4, temperature),
                                              jnp.ones(4), jnp.full(4, top_k, jnp.int32))
        assert np.array_equal(accepted, want_accepted)
        kept = np.where(want_accepted[:, None], [True, True], [True, False])
        assert np.array_equal(np.asarray(tokens)[kept], want_tokens[kept])
    mixed_t = jnp.asarray([0.0, 1.0, 0.0, 1.0])
    tokens, accepted = speculative_choice(logits, drafts, jax.random.PRNGKey(0), mixed_t, jnp.ones(4),
                                          jnp.zeros(4, jnp.int32))
    assert np.array_equal(np.asarray(accepted)[[0, 2]], want_accepted[[0, 2]])
    assert np.array_equal(np.asarray(tokens)[[0, 2]], want_tokens[[0, 2]])
