"""Pure divergence metrics between the reference and an engine (no I/O, no model).

Conventions: `ref_lp` is a full-vocabulary log-softmax row (float64, [V]); an engine gives either a
full row too or only its top-k as {token_id: logprob}. KL is KL(ref || engine) in nats.
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> [..., V] float64 log-probabilities."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def kl_full(ref_lp: np.ndarray, eng_lp: np.ndarray) -> float:
    """KL(ref || engine) over the whole vocabulary: sum_v p_v (log p_v - log q_v)."""
    p = np.exp(ref_lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (ref_lp - eng_lp), 0.0)
    return max(0.0, float(np.sum(terms)))  # >= 0 exactly; the sum of rounded terms can fall below by an ulp


def kl_topk(ref_lp: np.ndarray, eng_top: dict[int, float]) -> float:
    """KL(ref || engine) over the engine's top-k ids, both sides renormalised over those ids."""
    ids = np.fromiter(eng_top.keys(), dtype=np.int64)
    q = np.fromiter(eng_top.values(), dtype=np.float64)
    p = ref_lp[ids]
    p = p - _logsumexp(p)
    q = q - _logsumexp(q)
    return max(0.0, float(np.sum(np.exp(p) * (p - q))))


def top_ids(lp: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest entries of a row, largest first (ties: lower id first)."""
    k = min(k, lp.shape[-1])
    kth = np.partition(lp, lp.shape[-1] - k)[lp.shape[-1] - k]      # k-th largest value
    cand = np.flatnonzero(lp >= kth)                                # every id that can be in the top k
    return cand[np.lexsort((cand, -lp[cand]))][:k]


def same_top1(ref_lp: np.ndarray, eng_top1: int, eng_lp=None) -> bool:
    """Whether the engine's most likely token is also the reference's: equal ids, or an exact tie
    between the two ids in the reference (or, given the engine's row eng_lp, in the engine)."""
    ref_top1 = int(top_ids(ref_lp, 1)[0])
    return bool(eng_top1 == ref_top1 or ref_lp[eng_top1] == ref_lp[ref_top1]
                or (eng_lp is not None and eng_lp[eng_top1] == eng_lp[ref_top1]))


def topk_overlap(ref_lp: np.ndarray, eng_ids: list[int]) -> float:
    """|engine top-k ∩ reference top-k| / k, with k = len(eng_ids)."""
    k = len(eng_ids)
    return len(set(int(i) for i in top_ids(ref_lp, k)) & set(int(i) for i in eng_ids)) / k


def max_abs_dlogprob(ref_lp: np.ndarray, eng: dict[int, float]) -> float:
    """max |engine logprob - reference logprob| over the ids the engine reported."""
    ids = np.fromiter(eng.keys(), dtype=np.int64)
    q = np.fromiter(eng.values(), dtype=np.float64)
    return float(np.max(np.abs(q - ref_lp[ids])))


def k3(ref_logprob: float, eng_logprob: float) -> float:
    """Sampled-token KL estimator (SGLang's kl_test_utils): exp(r) - 1 - r with r = ref - engine.
    Zero when the two logprobs agree, >= 0 always."""
    r = ref_logprob - eng_logprob
    return float(np.expm1(r) - r)


def first_true(flags: list[bool]) -> int | None:
    """Index of the first True, or None."""
    return next((i for i, f in enumerate(flags) if f), None)


def rel_err(ref: np.ndarray, eng: np.ndarray) -> float:
    """||engine - ref||_2 / ||ref||_2 over the whole tensor (float64); inf when the engine has NaN/inf."""
    r = np.asarray(ref, dtype=np.float64)
    e = np.asarray(eng, dtype=np.float64)
    if not np.all(np.isfinite(e)):
        return float("inf")
    den = np.linalg.norm(r)
    num = np.linalg.norm(e - r)
    return float(num / den) if den > 0 else (0.0 if num == 0 else float("inf"))


def row_rel_err(ref: np.ndarray, eng: np.ndarray) -> np.ndarray:
    """Per row (token) of a [T, ...] tensor: ||eng_t - ref_t||_2 / ||ref_t||_2 -> [T]; inf where the
    engine's row has NaN/inf or the reference row is zero and the engine's is not."""
    r = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    e = np.asarray(eng, dtype=np.float64).reshape(len(eng), -1)
    bad = ~np.all(np.isfinite(e), axis=-1)
    e = np.where(np.isfinite(e), e, 0.0)
    num = np.linalg.norm(e - r, axis=-1)
    den = np.linalg.norm(r, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(den > 0, num / den, np.where(num == 0, 0.0, np.inf))
    return np.where(bad, np.inf, rel)


def max_row_rel_err(ref: np.ndarray, eng: np.ndarray) -> float:
    """Worst row (token): max_t of row_rel_err."""
    rel = row_rel_err(ref, eng)
    return float(np.max(rel)) if rel.size else 0.0


def max_abs(ref: np.ndarray, eng: np.ndarray) -> float:
    d = np.abs(np.asarray(eng, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
    return float(np.max(d)) if d.size else 0.0


def routing_mismatch(ref_ids: np.ndarray, eng_ids: np.ndarray) -> float:
    """Fraction of (token, slot) expert choices not shared: 1 - mean_t |ref_t ∩ eng_t| / k. Order-free."""
    ref_ids, eng_ids = np.asarray(ref_ids), np.asarray(eng_ids)
    k = ref_ids.shape[-1]
    shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ref_ids, eng_ids)]
    return 1.0 - float(np.mean(shared)) / k


def dense_routing(ids: np.ndarray, weights: np.ndarray, num_experts: int) -> np.ndarray:
    """topk ids/weights [T, k] -> [T, E] routing matrix (order-free form for comparing weights)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((ids.shape[0], num_experts), dtype=np.float64)
    np.put_along_axis(out, ids, np.asarray(weights, dtype=np.float64), axis=-1)
    return out
