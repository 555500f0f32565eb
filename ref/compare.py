"""Engine output vs the reference: per-position metrics, per-layer errors, the summary and the verdict.

Metrics (all KL in nats, KL(ref || engine); position t is the prediction of token t from tokens < t):
- kl_topk: KL over the engine's top-k ids, both distributions renormalised over those ids.
- kl_full: KL over the whole vocabulary (needs engine logits).
- top1: the engine's most likely token equals the reference's (an exact tie between the two counts as
  agreement: bf16 logits tie often).
- overlap: |engine top-k ∩ reference top-k| / k.
- max_dlp: max |engine logprob - reference logprob| over the ids the engine reported (its top-k and
  the actual token; with logits: both sides' top-k and the actual token).
- k3: exp(r) - 1 - r, r = ref - engine logprob of the actual token (SGLang's sampled-token estimator).
- first greedy divergence: the first t where the two top-1 tokens differ.
- per dumped tensor: rel_err = ||engine - ref|| / ||ref|| against the reference run (cumulative), and
  the local error of the step that produced it against the reference step recomputed from the
  engine's own input (ref.crosscheck.recompute_from_engine), so an error is charged to the step that
  made it. Routing tensors are shown as the share of expert choices not shared.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ref import divergence as D
from ref import engine_io as io
from ref.errors import FormatError


@dataclass(frozen=True)
class Thresholds:
    """When an engine passes. The defaults are sized for a bf16 engine checked against the f64 reference,
    measured as ref bf16 vs ref f64 on the tiny synthetic checkpoint (w4a16, random token ids,
    T = 16..200). 63 runs: mean KL <= 7.7e-3, worst position <= 6.4e-2, top-1 agreement >= 0.75 (T = 16;
    >= 0.89 for T >= 80: a random model's distributions are flat, so near-ties flip). 15 runs with
    dumps: local step error <= 6.5e-3 (whole tensor), <= 2.2e-2 (worst token). The injected bugs of
    tests/test_crosscheck_engines.py were flagged, at their layer, in each of 24 runs (T = 16, 80, 150);
    the weakest by logits alone (DeltaNet state not carried) gave mean KL >= 1.6e-2 over 48 runs, the
    weakest by dumps (max-over-experts activation scale) a local step error >= 3e-2. Short sequences
    are noisy: prefer T >= 64, and dumps. A bf16 W4A4 engine against the f64 W4A4 reference differs
    by NVFP4 code flips (activations rounded to bf16 before quantizing): mean KL 6e-2, local MoE error
    1.1..1.9e-2 on the tiny model; check such engines against --precision bf16 --activations w4a4."""
    max_kl: float = 1e-2        # mean KL(ref || engine) over positions, nats
    max_kl_pos: float = 0.25    # KL at any one position
    min_top1: float = 0.7       # top-1 agreement, 0..1
    layer_rtol: float = 2.5e-2  # local relative error of one step (whole tensor)
    token_rtol: float = 0.1     # local relative error of one step at its worst token
    top_k: int = 10             # k of the top-k metrics (engine logits, --server)
    # Bounds of the local error of one kind of step (STEP_KINDS), in place of layer_rtol / token_rtol:
    # ((kind, whole tensor, worst token), ...). Engine profiles measure them (ref.profiles).
    steps: tuple = ()

    def __post_init__(self):
        for name in ("max_kl", "max_kl_pos", "layer_rtol", "token_rtol"):
            if not getattr(self, name) > 0:
                raise FormatError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if not 0 <= self.min_top1 <= 1 or self.top_k < 1:
            raise FormatError("--min-top1 must be in [0, 1] and --top-k >= 1")
        for kind, rtol, token_rtol in self.steps:
            if kind not in STEP_KINDS or not (rtol > 0 and token_rtol > 0):
                raise FormatError(f"step bounds {(kind, rtol, token_rtol)}: expected a kind of {list(STEP_KINDS)} "
                                  f"and two bounds > 0")

    def step_bounds(self, kind: str | None) -> tuple[float, float]:
        """(whole tensor, worst token) bounds of the local error of a step of this kind."""
        return next(((r, t) for k, r, t in self.steps if k == kind), (self.layer_rtol, self.token_rtol))


# The kinds of dumped step (ref.crosscheck.step_kinds): a full-attention or DeltaNet mixer, a MoE block,
# the final norm and lm_head, and any step whose GEMMs quantize their inputs (W4A4 experts, W8A8 / W4A4
# dense linears: a bf16 engine and a float64 reference round the same input differently, so codes flip).
STEP_KINDS = ("attention", "deltanet", "moe", "head", "quantized")


def compare_positions(ref_logits: np.ndarray, token_ids: list[int], eng: io.EngineLogprobs | None = None,
                      eng_logits: np.ndarray | None = None, top_k: int = Thresholds.top_k) -> list[dict]:
    """Per-position metrics. ref_logits [T, V] (row r predicts token r+1); eng_logits [T' <= T, V] (the
    rows of the first T' tokens).
    -> one dict per position t (1..T, t = T being the prediction after the last token)."""
    T = len(token_ids)
    ref_lp = D.log_softmax(ref_logits)
    eng_lp = None
    if eng_logits is not None:
        if not 0 < eng_logits.shape[0] <= T or eng_logits.shape[1] != ref_logits.shape[1]:
            raise FormatError(f"engine logits: shape {tuple(eng_logits.shape)}, expected [<= {T}, "
                              f"{ref_logits.shape[1]}] for {T} tokens")
        eng_lp = D.log_softmax(eng_logits)
    rows = []
    for t in range(1, T + 1):
        r = t - 1
        full = eng_lp[r] if eng_lp is not None and r < eng_lp.shape[0] else None
        top = eng.top[t] if eng is not None and t < T and eng.top[t] else None
        tok_lp = eng.logprob[t] if eng is not None and t < T else None
        if full is None and top is None and tok_lp is None:
            continue
        row: dict[str, Any] = {"t": t, "token": token_ids[t] if t < T else None,
                               "ref_top1": int(D.top_ids(ref_lp[r], 1)[0])}
        if top is None and full is not None:
            top = {int(i): float(full[i]) for i in D.top_ids(full, top_k)}
        if full is not None:
            row["kl_full"] = D.kl_full(ref_lp[r], full)
        if top:
            row["eng_top1"] = max(top, key=top.get)
            row["top1_agree"] = D.same_top1(ref_lp[r], row["eng_top1"], full)    # exact ties agree
            row["kl_topk"] = D.kl_topk(ref_lp[r], top)
            row["overlap"] = D.topk_overlap(ref_lp[r], list(top))
        if tok_lp is None and full is not None and t < T:
            tok_lp = float(full[token_ids[t]])
        reported = dict(top or {})
        if t < T and tok_lp is not None:
            reported[token_ids[t]] = tok_lp
            row["k3"] = D.k3(float(ref_lp[r][token_ids[t]]), tok_lp)
        if full is not None:
            ids = set(reported) | {int(i) for i in D.top_ids(ref_lp[r], top_k)}
            reported = {i: float(full[i]) for i in ids}
        if reported:
            row["max_dlp"] = D.max_abs_dlogprob(ref_lp[r], reported)
        rows.append(row)
    return rows


def _layer_of(name: str) -> int | None:
    m = re.match(r"^layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _forward_order(name: str) -> tuple:
    if name.startswith("vision."):                  # the encoder runs before the embeddings take its rows
        _, stage, *block = name.split(".")
        order = ("patch_embed", "pos_embed", "blocks", "merger")
        return (-2, order.index(stage) if stage in order else len(order), int(block[0]) if block else 0)
    if name == "embeddings":
        return (-1, 0)
    layer = _layer_of(name)
    if layer is not None:
        kind = name.split(".", 2)[2]
        order = ("after_mixer", "router_logits", "topk_ids", "topk_weights", "after_moe")
        return (layer, order.index(kind) if kind in order else len(order))
    return (1 << 30, ("final_hidden", "logits").index(name) if name in ("final_hidden", "logits") else 2)


def compare_layers(ref: dict[str, np.ndarray], eng: dict[str, np.ndarray], local: dict[str, np.ndarray] | None = None,
                   thresholds: Thresholds = Thresholds(), num_experts: int | None = None,
                   kinds: dict[str, str] | None = None) -> list[dict]:
    """Per dumped tensor, in forward order.

    Hidden states: rel_err and max_abs against the reference run (errors accumulated from every
    earlier step); local_err (whole tensor) and local_tok_err (worst token, at 0-based sequence
    position local_worst_pos) against `local`, the reference step recomputed from the engine's own
    input (see recompute_from_engine; embeddings and the vision patch and position embeddings against
    the reference unless `local` has them); flagged when
    local_err > thresholds.layer_rtol or local_tok_err > thresholds.token_rtol, or the bounds of the
    step's kind (`kinds`: name -> one of STEP_KINDS; Thresholds.steps).
    Routing: mismatch / local_mismatch, the share of expert choices not shared; topk_weights as
    rel_err of the [T, E] routing matrices. Routing rows are never flagged: near-ties legitimately
    flip, and real routing bugs show in router_logits and after_moe."""
    local = dict(local or {})
    for name in ("embeddings", "vision.patch_embed", "vision.pos_embed"):   # computed from the inputs alone
        if name in ref:
            local.setdefault(name, ref[name])
    rows = []
    for name in sorted(set(ref) & set(eng), key=_forward_order):
        r, e = np.asarray(ref[name]), np.asarray(eng[name])
        if r.shape != e.shape:
            raise FormatError(f"engine dump '{name}': shape {tuple(e.shape)}, reference {tuple(r.shape)}")
        kind = name.rsplit(".", 1)[-1]
        row = {"name": name, "layer": _layer_of(name)}
        if kind == "topk_ids":
            row["kind"], row["mismatch"] = "routing", D.routing_mismatch(r, e)
            if name in local:
                row["local_mismatch"] = D.routing_mismatch(local[name], e)
        elif kind == "topk_weights":
            ids = name[:-len("weights")] + "ids"
            if ids not in ref or ids not in eng or num_experts is None:
                continue
            row["kind"] = "routing"
            row["rel_err"] = D.rel_err(D.dense_routing(ref[ids], r, num_experts),
                                       D.dense_routing(eng[ids], e, num_experts))
        else:
            row["kind"] = "hidden"
            row["rel_err"], row["max_abs"] = D.rel_err(r, e), D.max_abs(r, e)
            if name in local:
                row["local_err"] = D.rel_err(local[name], e)
                per_token = D.row_rel_err(local[name], e)
                row["local_tok_err"], row["local_worst_pos"] = float(per_token.max()), int(per_token.argmax())
                row["step"] = (kinds or {}).get(name)
                rtol, token_rtol = thresholds.step_bounds(row["step"])
                row["flagged"] = not (row["local_err"] <= rtol and row["local_tok_err"] <= token_rtol)
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per-position rows -> summary numbers (None where nothing was measured)."""
    def col(key):
        return [(r["t"], r[key]) for r in rows if key in r]
    s: dict[str, Any] = {"positions": len(rows)}
    kl = col("kl_full") or col("kl_topk")
    s["kl_kind"] = "full" if col("kl_full") else ("topk" if kl else ("k3" if col("k3") else None))
    if not kl:
        kl = col("k3")
    if kl:
        vals = np.array([v for _, v in kl])
        s["mean_kl"] = float(np.mean(vals))
        i = int(np.argmax(vals))
        s["max_kl"], s["max_kl_t"] = float(vals[i]), kl[i][0]
    for key, out in (("top1_agree", "top1_agreement"), ("overlap", "mean_overlap"), ("k3", "mean_k3")):
        v = col(key)
        s[out] = float(np.mean([x for _, x in v])) if v else None
    v = col("max_dlp")
    s["max_dlp"] = max(x for _, x in v) if v else None
    i = D.first_true([r.get("top1_agree") is False for r in rows])
    s["first_greedy_divergence"] = None if i is None else rows[i]["t"]
    return s


def verdict(summary: dict, layers: list[dict], thresholds: Thresholds = Thresholds()) -> dict:
    """-> {"ok", "line" (the one-line verdict), "first_divergent" (first flagged layer row or None)}."""
    max_kl, max_kl_pos, min_top1 = thresholds.max_kl, thresholds.max_kl_pos, thresholds.min_top1
    fails, notes = [], []
    if "mean_kl" in summary:
        kind = {"full": "KL", "topk": "top-k KL", "k3": "k3"}[summary["kl_kind"]]
        (fails if not summary["mean_kl"] <= max_kl else notes).append(
            f"mean {kind} {summary['mean_kl']:.3g} {'>' if not summary['mean_kl'] <= max_kl else '<='} {max_kl:g}")
        if not summary["max_kl"] <= max_kl_pos:
            fails.append(f"{kind} {summary['max_kl']:.3g} at t={summary['max_kl_t']} > {max_kl_pos:g}")
    if summary.get("top1_agreement") is not None:
        a = summary["top1_agreement"]
        (fails if a < min_top1 else notes).append(f"top-1 {100 * a:.1f}% {'<' if a < min_top1 else '>='} "
                                                  f"{100 * min_top1:g}%")
    i = D.first_true([bool(row.get("flagged")) for row in layers])
    first = None if i is None else layers[i]
    if first is not None:
        fails.append(f"first divergent step {first['name']} (local error {first['local_err']:.3g}, "
                     f"worst token {first['local_tok_err']:.3g} at position {first['local_worst_pos']})")
    elif layers:
        notes.append("every dumped step within tolerance")
    ok = not fails
    g = summary.get("first_greedy_divergence")
    tail = f"; first greedy divergence at t={g}" if g is not None else ""
    line = ("PASS: " + ", ".join(notes) if ok else "DIVERGES: " + ", ".join(fails)) + tail
    return {"ok": ok, "line": line, "first_divergent": first}
