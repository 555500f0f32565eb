"""Which engine profile explains an engine's output (`ref.crosscheck --fit-profiles`).

The reference runs under each candidate profile (ref.profiles: every mode of the engine, its bf16
rounding points included, unless a precision is given) on the engine's tokens, and ref.crosscheck
compares the engine with each run under that profile's thresholds (sized by how far bf16 arithmetic
moves a faithful engine: ref.profiles). Profiles that set the same modes run once and are reported
together. The profile that explains the engine best is, among those whose verdict passes, the one
with the lowest mean KL; when none passes, the closest one (lowest mean KL, or with only layer dumps
the lowest largest step error), whose first divergent step says where the engine goes wrong: an
engine no profile explains is likely a bug, not an engine choice.

`faithful_metrics` is the measurement behind each profile's thresholds (see ref.profiles).
"""
from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from ref.compare import Thresholds
from ref.errors import FormatError
from ref.modes import Modes
from ref.profiles import PROFILES, get_profile


def _groups(names) -> list[tuple[list[str], Modes]]:
    """Profiles by the modes they set, in the order first named: [(names, modes)]."""
    out: list[tuple[list[str], Modes]] = []
    for name in names:
        modes = get_profile(name).modes
        for group, m in out:
            if m == modes:
                group.append(name)
                break
        else:
            out.append(([name], modes))
    return out


def _score(rep: dict) -> float:
    """How far the engine is from one profile's reference: mean KL, else the largest local step error."""
    s = rep["summary"]
    if s.get("mean_kl") is not None:
        return float(s["mean_kl"])
    errs = [r["local_err"] for r in rep["layers"] if "local_err" in r]
    return max(errs) if errs else float("inf")


def fit_profiles(ckpt, token_ids=None, eng=None, eng_logits=None, eng_dumps=None, *, names=None,
                 precision: str | None = None, backend: str = "ref", overrides: dict | None = None,
                 lint: bool = True, lint_block_scales: bool = False, ignored_dumps=()) -> dict:
    """Run ref.crosscheck under each profile in `names` (default all) -> the fit report (JSON-able):
    per profile group its modes, thresholds, summary and verdict; "best" (the profile that explains the
    engine best), "consistent" and the one-line verdict. precision: the reference's, in place of each
    profile's. overrides: Thresholds fields applied to every profile's thresholds."""
    from ref.crosscheck import _lint, crosscheck
    names = list(names or PROFILES)
    if not names:
        raise FormatError("--fit-profiles: no profile given")
    rows = []
    for group, modes in _groups(names):
        th = replace(get_profile(group[0]).thresholds, **(overrides or {}))
        rep = crosscheck(ckpt, token_ids, eng, eng_logits, eng_dumps, backend=backend,
                         modes=replace(modes, precision=precision or modes.precision), thresholds=th, lint=False,
                         ignored_dumps=ignored_dumps)
        rows.append({"profiles": group, "modes": modes.describe(), "thresholds": asdict(th),
                     "summary": rep["summary"], "layers": rep["layers"], "verdict": rep["verdict"],
                     "score": _score(rep), "report": rep})
    passing = sorted((r for r in rows if r["verdict"]["ok"]), key=lambda r: r["score"])
    best = passing[0] if passing else min(rows, key=lambda r: r["score"])
    name = " = ".join(best["profiles"])
    if passing:
        tied = [" = ".join(r["profiles"]) for r in passing[1:] if r["score"] == best["score"]]
        also = [" = ".join(r["profiles"]) for r in passing[1:] if r["score"] != best["score"]]
        line = (f"consistent with {', '.join([name] + tied)}"
                + (" (indistinguishable on this output)" if tied else "") + f": {best['verdict']['line']}"
                + (f"; also within the thresholds of: {', '.join(also)}" if also else ""))
    else:
        first = best["verdict"]["first_divergent"]
        where = (f"first diverging step {first['name']} (layer {first['layer']})" if first is not None
                 else "no layer dumps to say where")
        line = (f"no profile explains this: likely a bug; {where}; closest profile {name}: "
                f"{best['verdict']['line']}")
    first_rep = rows[0]["report"]
    return {"reference": {"model": str(ckpt.directory), "backend": backend, "precision": precision or "profile's"},
            "engine": first_rep["engine"], "token_ids": first_rep["token_ids"],
            "profiles": [{k: v for k, v in r.items() if k != "report"} for r in rows],
            "best": best["profiles"][0], "best_profiles": best["profiles"], "best_report": best["report"],
            "consistent": bool(passing),
            "ignored_dumps": list(ignored_dumps), "lint": _lint(ckpt, lint_block_scales) if lint else [],
            "verdict": {"ok": bool(passing), "line": line,
                        "first_divergent": None if passing else best["verdict"]["first_divergent"]}}


def faithful_metrics(ckpt, modes: Modes, token_ids, reference_precision: str = "f64") -> dict:
    """One faithful run: the "engine" is ref.model in bf16 under `modes`, the reference ref.model at
    reference_precision under the same modes; -> the metrics ref.crosscheck's verdict uses: mean_kl,
    max_kl (worst position), top1, and steps {kind: (largest local step error, worst token)} per kind
    of dumped step (ref.compare.STEP_KINDS)."""
    from ref.crosscheck import crosscheck
    from ref.model import Model
    dumps = {}
    logits, _ = Model(ckpt, **asdict(replace(modes, precision="bf16"))).prefill(list(token_ids), dumps=dumps)
    rep = crosscheck(ckpt, list(token_ids), eng_logits=np.asarray(logits, np.float64), eng_dumps=dumps,
                     modes=replace(modes, precision=reference_precision), lint=False)
    s = rep["summary"]
    out = {"mean_kl": s["mean_kl"], "max_kl": s["max_kl"], "top1": s["top1_agreement"], "steps": {}}
    for r in rep["layers"]:
        if "local_err" in r and r["step"] is not None:
            err, tok = out["steps"].get(r["step"], (0.0, 0.0))
            out["steps"][r["step"]] = (max(err, r["local_err"]), max(tok, r["local_tok_err"]))
    return out


def thresholds_from(metrics: list[dict], margin: float = 1.5, top1_margin: float = 0.1) -> Thresholds:
    """Thresholds that pass every faithful run measured: the worst value times `margin` (top-1
    agreement: the worst minus `top1_margin`), per kind of step for the local errors (layer_rtol /
    token_rtol: the largest over the kinds)."""
    worst = lambda k: max(m[k] for m in metrics) * margin  # noqa: E731
    steps = {}
    for m in metrics:
        for kind, (err, tok) in m["steps"].items():
            e, t = steps.get(kind, (0.0, 0.0))
            steps[kind] = (max(e, err), max(t, tok))
    bounds = tuple((k, *(_round_up(v * margin) for v in steps[k])) for k in sorted(steps))
    return Thresholds(max_kl=_round_up(worst("mean_kl")), max_kl_pos=_round_up(worst("max_kl")),
                      min_top1=max(0.0, _round_down(min(m["top1"] for m in metrics) - top1_margin)),
                      layer_rtol=max(b[1] for b in bounds), token_rtol=max(b[2] for b in bounds), steps=bounds)


def _round_up(x: float) -> float:
    """x rounded up to two significant digits."""
    digits = 1 - int(np.floor(np.log10(x)))
    return round(float(np.ceil(round(x * 10.0 ** digits, 9)) / 10.0 ** digits), digits)


def _round_down(x: float) -> float:
    return float(np.floor(x * 100) / 100)
