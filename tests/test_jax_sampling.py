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
AFTER_SECOND = np.array([0.4, -2.0, 0.0, 0.1, 1.2, 0.3], np.float32)


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


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("draft", [0, 1, 3, 5])
@pytest.mark.parametrize("temperature, top_p, top_k", CASES)
def test_speculative_choice_keeps_the_distribution(temperature, top_p, top_k, draft, K):
    """K drafts (the first `draft`, the second the likeliest after it): every emitted position is
    distributed as a plain draw after the tokens before it, each draft is kept with its probability
    while those before it were (never when filtered out), and n counts the drafts kept."""
    rows, drafts = [AFTER_TOKEN, AFTER_DRAFT, AFTER_SECOND][:K + 1], [draft, 3][:K]
    logits = jnp.broadcast_to(jnp.asarray(np.stack(rows)), (N, K + 1, len(AFTER_TOKEN)))
    chosen, n = jax.jit(speculative_choice)(logits, jnp.broadcast_to(jnp.asarray(drafts, jnp.int32), (N, K)),
                                            jax.random.PRNGKey(2), *_settings(temperature, top_p, top_k))
    chosen, n = np.asarray(chosen), np.asarray(n)
    for i in range(K + 1):
        reached = n >= i                                                 # rows that emit position i
        if not reached.any():
            break
        p = _probs(rows[i], temperature, top_p, top_k)
        _assert_frequencies(chosen[reached, i], p, int(reached.sum()))
        if i < K:
            kept = n[reached] > i
            assert np.array_equal(kept, chosen[reached, i] == drafts[i])
            assert abs(kept.mean() - p[drafts[i]]) <= 5 * np.sqrt(p[drafts[i]] * (1 - p[drafts[i]]) / reached.sum())


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
        tokens, n = speculative_choice(logits, drafts[:, None], jax.random.PRNGKey(0), jnp.full(4, temperature),
                                       jnp.ones(4), jnp.full(4, top_k, jnp.int32))
        assert np.array_equal(np.asarray(n) == 1, want_accepted)
        kept = np.where(want_accepted[:, None], [True, True], [True, False])
        assert np.array_equal(np.asarray(tokens)[kept], want_tokens[kept])
    mixed_t = jnp.asarray([0.0, 1.0, 0.0, 1.0])
    tokens, n = speculative_choice(logits, drafts[:, None], jax.random.PRNGKey(0), mixed_t, jnp.ones(4),
                                   jnp.zeros(4, jnp.int32))
    assert np.array_equal(np.asarray(n)[[0, 2]] == 1, want_accepted[[0, 2]])
    assert np.array_equal(np.asarray(tokens)[[0, 2]], want_tokens[[0, 2]])


def test_speculative_choice_counts_leading_greedy_matches():
    """With several drafts, greedy rows keep drafts only while each equals the argmax before it."""
    logits = jnp.asarray(np.eye(5, dtype=np.float32)[[[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]]])   # argmaxes 1, 2, 3
    drafts = jnp.asarray([[1, 2], [1, 4], [0, 2], [2, 1]], jnp.int32)
    chosen, n = speculative_choice(logits, drafts, jax.random.PRNGKey(0), jnp.zeros(4), jnp.ones(4),
                                   jnp.zeros(4, jnp.int32))
    assert np.asarray(n).tolist() == [2, 1, 0, 0]
    assert np.asarray(chosen).tolist() == [[1, 2, 3]] * 4
