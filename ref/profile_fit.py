"""Which engine profile explains an engine's output (`ref.crosscheck --fit-profiles`).

The reference runs under each candidate profile (ref.profiles: the engine's modes; the reference
keeps its own precision, float64 by default) on the engine's tokens, and ref.crosscheck compares the
engine with each run under that profile's thresholds. Profiles that set the same modes run once and
are reported together. The profile that explains the engine best is, among those whose verdict
passes, the one with the lowest mean KL; when none passes, the closest one (lowest mean KL, or with
only layer dumps the lowest largest step error), whose first divergent step says where the engine
goes wrong: an engine no profile explains is likely a bug, not an engine choice.

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
                 precision: str = "f64", backend: str = "ref", overrides: dict | None = None,
                 lint: bool = True, lint_block_scales: bool = False, ignored_dumps=()) -> dict:
    """Run ref.crosscheck under each profile in `names` (default all) -> the fit report (JSON-able):
    per profile group its modes, thresholds, summary and verdict; "best" (the profile that explains the
    engine best), "consistent" and the one-line verdict. precision: the reference's (the profiles'
    precision is the engine's). overrides: Thresholds fields applied to every profile's thresholds."""
    from ref.crosscheck import _lint, crosscheck
    names = list(names or PROFILES)
    if not names:
        raise FormatError("--fit-profiles: no profile given")
    rows = []
    for group, modes in _groups(names):
        th = replace(get_profile(group[0]).thresholds, **(overrides or {}))
        rep = crosscheck(ckpt, token_ids, eng, eng_logits, eng_dumps, backend=backend,
                         modes=replace(modes, precision=precision), thresholds=th, lint=False,
                         ignored_dumps=ignored_dumps)
        rows.append({"profiles": group, "modes": modes.describe(), "thresholds": asdict(th),
                     "summary": rep["summary"], "layers": rep["layers"], "verdict": rep["verdict"],
                     "score": _score(rep), "report": rep})
    passing = [r for r in rows if r["verdict"]["ok"]]
    best = min(passing or rows, key=lambda r: r["score"])
    name = " = ".join(best["profiles"])
    if passing:
        line = f"consistent with {name}: {best['verdict']['line']}"
    else:
        first = best["verdict"]["first_divergent"]
        where = (f"first diverging step {first['name']} (layer {first['layer']})" if first is not None
                 else "no layer dumps to say where")
        line = (f"no profile explains this: likely a bug; {where}; closest profile {name}: "
                f"{best['verdict']['line']}")
    first_rep = rows[0]["report"]
    return {"reference": {"model": str(ckpt.directory), "backend": backend, "precision": precision},
            "engine": first_rep["engine"], "token_ids": first_rep["token_ids"],
            "profiles": [{k: v for k, v in r.items() if k != "report"} for r in rows],
            "best": best["profiles"][0], "best_profiles": best["profiles"], "consistent": bool(passing),
            "ignored_dumps": list(ignored_dumps), "lint": _lint(ckpt, lint_block_scales) if lint else [],
            "verdict": {"ok": bool(passing), "line": line,
                        "first_divergent": None if passing else best["verdict"]["first_divergent"]}}


def faithful_metrics(ckpt, modes: Modes, token_ids, reference_precision: str = "f64") -> dict:
    """One faithful run: the "engine" is ref.model in bf16 under `modes`, the reference ref.model at
    reference_precision under the same modes; -> the metrics ref.crosscheck's verdict uses (mean_kl,
    max_kl, top1, layer_err: largest local step error, token_err: its worst token)."""
    from ref.crosscheck import crosscheck
    from ref.model import Model
    dumps = {}
    logits, _ = Model(ckpt, **asdict(replace(modes, precision="bf16"))).prefill(list(token_ids), dumps=dumps)
    rep = crosscheck(ckpt, list(token_ids), eng_logits=np.asarray(logits, np.float64), eng_dumps=dumps,
                     modes=replace(modes, precision=reference_precision), lint=False)
    s = rep["summary"]
    out = {"mean_kl": s["mean_kl"], "max_kl": s["max_kl"], "top1": s["top1_agreement"]}
    for key, quantized in (("", False), ("quant_", True)):
        rows = [r for r in rep["layers"] if "local_err" in r and r["quantized"] == quantized]
        out[key + "layer_err"] = max((r["local_err"] for r in rows), default=None)
        out[key + "token_err"] = max((r["local_tok_err"] for r in rows), default=None)
    return out


def thresholds_from(metrics: list[dict], margin: float = 1.5, top1_margin: float = 0.1) -> Thresholds:
    """Thresholds that pass every faithful run measured: the worst value times `margin` (top-1
    agreement: the worst minus `top1_margin`; the quantized-input step bounds None when no run had
    such a step)."""
    def worst(k):
        values = [m[k] for m in metrics if m[k] is not None]
        return max(values) * margin if values else None
    return Thresholds(max_kl=worst("mean_kl"), max_kl_pos=worst("max_kl"),
                      min_top1=max(0.0, min(m["top1"] for m in metrics) - top1_margin),
                      layer_rtol=worst("layer_err"), token_rtol=worst("token_err"),
                      quant_rtol=worst("quant_layer_err"), quant_token_rtol=worst("quant_token_err"))
