"""ref.divergence against hand-computed values, plus the properties that define them."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ref import divergence as D
from ref.compare import Thresholds, compare_layers, compare_positions, summarize, verdict

LN = math.log
P4 = np.log([0.4, 0.3, 0.2, 0.1])  # reference distribution over a 4-token vocabulary


def test_kl_full_hand_computed():
    # KL([.5,.5] || [.25,.75]) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5*0.693147 - .5*0.405465
    assert D.kl_full(np.log([0.5, 0.5]), np.log([0.25, 0.75])) == pytest.approx(0.143841, abs=1e-6)
    assert D.kl_full(P4, P4) == 0.0


def test_kl_full_zero_probability_terms():
    ref = np.array([0.0, -np.inf])   # p = [1, 0]: the p=0 term contributes nothing, not nan
    assert D.kl_full(ref, np.log([0.5, 0.5])) == pytest.approx(LN(2))


def test_kl_topk_hand_computed():
    # engine top-2 {0: ln .5, 1: ln .25}; renormalised: ref [4/7, 3/7], engine [2/3, 1/3]
    # KL = 4/7 ln(6/7) + 3/7 ln(9/7) = -0.088086 + 0.107706
    assert D.kl_topk(P4, {0: LN(0.5), 1: LN(0.25)}) == pytest.approx(0.019620, abs=1e-6)
    assert D.kl_topk(P4, {0: P4[0] - 3.0, 2: P4[2] - 3.0}) == pytest.approx(0.0, abs=1e-15)  # shift-free


def test_topk_overlap_and_ids():
    assert list(D.top_ids(P4, 2)) == [0, 1]
    assert list(D.top_ids(np.array([1.0, 2.0, 2.0]), 2)) == [1, 2]  # ties: lower id first
    assert D.topk_overlap(P4, [1, 3]) == 0.5
    assert D.topk_overlap(P4, [1, 0, 2]) == 1.0


def test_max_abs_dlogprob_and_k3():
    # |ln .5 - ln .4| = ln 1.25 = 0.223144
    assert D.max_abs_dlogprob(P4, {0: LN(0.5), 1: P4[1]}) == pytest.approx(0.223144, abs=1e-6)
    # r = ln 2: e^r - 1 - r = 1 - 0.693147
    assert D.k3(LN(0.2), LN(0.1)) == pytest.approx(0.306853, abs=1e-6)
    assert D.k3(-1.0, -1.0) == 0.0


def test_rel_err_routing_and_first_true():
    assert D.rel_err(np.array([3.0, 4.0]), np.array([3.0, 5.0])) == pytest.approx(0.2)
    assert D.rel_err(np.array([3.0, 4.0]), np.array([3.0, np.nan])) == math.inf
    assert D.max_abs(np.array([3.0, 4.0]), np.array([2.5, 5.0])) == 1.0
    # token 0 shares both experts (order ignored), token 1 shares one of two -> 1 - 1.5/2
    assert D.routing_mismatch(np.array([[0, 1], [2, 3]]), np.array([[1, 0], [2, 4]])) == 0.25
    dense = D.dense_routing(np.array([[2, 0]]), np.array([[0.75, 0.25]]), 3)
    assert dense.tolist() == [[0.25, 0.0, 0.75]]
    assert D.first_true([False, False, True, True]) == 2 and D.first_true([False]) is None


rows = arrays(np.float64, st.integers(2, 12), elements=st.floats(-20, 20))


@given(rows, st.randoms(use_true_random=False))
def test_kl_properties(logits, rnd):
    """KL >= 0, zero against itself; top-k KL over the whole vocabulary equals the full KL."""
    p = D.log_softmax(logits)
    q = D.log_softmax(logits[::-1].copy())
    assert D.kl_full(p, q) >= -1e-12 and D.kl_full(p, p) == 0.0
    full = {i: float(q[i]) for i in range(len(q))}
    assert D.kl_topk(p, full) == pytest.approx(D.kl_full(p, q), abs=1e-9)
    ids = rnd.sample(range(len(q)), rnd.randint(1, len(q)))
    assert D.kl_topk(p, {i: float(q[i]) for i in ids}) >= -1e-12


@given(arrays(np.float64, st.integers(1, 30), elements=st.sampled_from([-1.0, 0.0, 0.5, 2.0])), st.integers(1, 35))
def test_top_ids_is_a_stable_descending_sort(lp, k):
    """Many ties by construction: the partition shortcut must agree with the full stable sort."""
    assert D.top_ids(lp, k).tolist() == np.lexsort((np.arange(len(lp)), -lp))[:k].tolist()


def test_compare_positions_and_summary():
    """Two positions: engine equal to ref at t=1, engine top-1 flipped at t=2."""
    ref_logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    eng = ref_logits.copy()
    eng[1] = np.log([0.1, 0.2, 0.4, 0.3])
    rows = compare_positions(ref_logits, [0, 1], eng_logits=eng, top_k=2)
    assert [r["t"] for r in rows] == [1, 2]
    assert rows[0]["kl_full"] == 0.0 and rows[0]["top1_agree"] and rows[0]["overlap"] == 1.0
    # t=2: KL = .3 ln(.3/.4) + .4 ln(.4/.3) = .1 ln(4/3) = 0.028768
    assert rows[1]["kl_full"] == pytest.approx(0.028768, abs=1e-6)
    assert rows[1]["eng_top1"] == 2 and rows[1]["ref_top1"] == 3 and not rows[1]["top1_agree"]
    assert rows[0]["k3"] == 0.0 and "k3" not in rows[1]  # t=2 is the prediction after the last token
    s = summarize(rows)
    assert s["kl_kind"] == "full" and s["mean_kl"] == pytest.approx(0.028768 / 2, abs=1e-6)
    assert s["max_kl_t"] == 2 and s["top1_agreement"] == 0.5 and s["first_greedy_divergence"] == 2
    v = verdict(s, [], Thresholds(max_kl=0.1, max_kl_pos=0.1, min_top1=0.4))
    assert v["ok"] and v["line"].startswith("PASS")
    v = verdict(s, [], Thresholds(max_kl=0.1, max_kl_pos=0.01, min_top1=0.4))
    assert not v["ok"] and "at t=2" in v["line"]


def test_compare_layers_first_flagged():
    x = np.ones((2, 4))
    ref = {"embeddings": x, "layers.0.after_mixer": x, "layers.0.after_moe": x, "layers.1.after_mixer": x,
           "layers.1.after_moe": x, "layers.0.topk_ids": np.array([[0, 1], [1, 2]]),
           "layers.0.topk_weights": np.array([[0.5, 0.5], [0.7, 0.3]])}
    eng = dict(ref, **{"layers.1.after_mixer": 1.2 * x, "layers.1.after_moe": 1.3 * x,
                       "layers.0.topk_ids": np.array([[1, 0], [1, 3]])})
    local = {"layers.1.after_mixer": x, "layers.1.after_moe": 1.2 * x}  # the step recomputed from engine inputs
    rows = compare_layers(ref, eng, local, Thresholds(layer_rtol=0.1, token_rtol=0.5), num_experts=4)
    names = [r["name"] for r in rows]
    assert names == ["embeddings", "layers.0.after_mixer", "layers.0.topk_ids", "layers.0.topk_weights",
                     "layers.0.after_moe", "layers.1.after_mixer", "layers.1.after_moe"]
    assert rows[2]["mismatch"] == 0.25
    assert rows[6]["rel_err"] == pytest.approx(0.3) and rows[6]["local_err"] == pytest.approx(0.1 / 1.2)
    assert rows[6]["local_tok_err"] == pytest.approx(0.1 / 1.2) and rows[6]["local_worst_pos"] == 0
    assert not rows[6]["flagged"] and "flagged" not in rows[1]   # no local value, no flag
    v = verdict({}, rows, Thresholds(max_kl=1.0, max_kl_pos=1.0, min_top1=0.0))
    assert not v["ok"] and v["first_divergent"]["name"] == "layers.1.after_mixer"
    assert v["first_divergent"]["local_err"] == pytest.approx(0.2)


def test_max_row_rel_err():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    assert D.max_row_rel_err(ref, np.array([[3.0, 4.5], [1.0, 0.5]])) == pytest.approx(0.5)  # row 1: .5/1
    assert D.max_row_rel_err(np.zeros((1, 2)), np.zeros((1, 2))) == 0.0
    ref, eng = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]), np.array([[3.0, 4.0], [np.nan, 0.0], [0.0, 1.0]])
    rows = D.row_rel_err(ref, eng)
    assert rows.tolist() == [0.0, math.inf, math.inf]


@given(arrays(np.float64, 64, elements=st.floats(-30, 30)), st.integers(0, 2 ** 32 - 1))
def test_kl_is_never_negative(logits, seed):
    """Rows equal up to rounding (an engine's bf16 logits of the same values) give KL >= 0, never -1e-16."""
    ref = D.log_softmax(logits)
    noise = np.random.default_rng(seed).normal(0, 1e-15, logits.shape)
    eng = D.log_softmax(logits + noise)
    assert D.kl_full(ref, eng) >= 0 and D.kl_topk(ref, {i: float(eng[i]) for i in range(5)}) >= 0


def test_exact_logit_ties_are_not_top1_disagreements():
    """The engine picks the other of two exactly tied tokens: top-1 agrees, no greedy divergence."""
    ref_logits = np.array([[0.0, 2.0, 1.0, 2.0], [3.0, 0.0, 0.0, 0.0]])     # row 0: ids 1 and 3 tie
    eng = np.array([[0.0, 1.99, 1.0, 2.0], [3.0, 0.0, 0.0, 0.0]])           # the engine prefers 3
    rows = compare_positions(ref_logits, [0, 1], eng_logits=eng, top_k=2)
    assert rows[0]["eng_top1"] == 3 and rows[0]["ref_top1"] == 1 and rows[0]["top1_agree"]
    assert summarize(rows)["first_greedy_divergence"] is None
    eng[0, 1] = 1.0                                                         # now 1 is clearly second
    ref_logits[0, 3] = 1.5
    assert not compare_positions(ref_logits, [0, 1], eng_logits=eng, top_k=2)[0]["top1_agree"]


def test_plot_without_dumps_has_one_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from ref.report import plot_report
    rep = {"thresholds": {"max_kl_pos": 0.25, "layer_rtol": 0.025}, "summary": {"kl_kind": "full"},
           "positions": [{"t": 1, "kl_full": 1e-3}, {"t": 2, "kl_full": 2e-3}], "layers": []}
    plot_report(rep, tmp_path / "p.png")
    png = (tmp_path / "p.png").read_bytes()
    width = int.from_bytes(png[16:20], "big")
    assert png[:4] == b"\x89PNG" and width == 6 * 120                       # one 6-inch panel at 120 dpi
