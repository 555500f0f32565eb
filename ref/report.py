"""The crosscheck report as text (terminal) and as a plot (PNG, needs matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ref.cli import atomic_write
from ref.errors import FormatError


def _fmt(x, spec=".2e"):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return format(x, spec)


def format_report(rep: dict, max_rows: int = 40) -> str:
    """Readable terminal report: header, per-position table, per-layer table, lint, verdict."""
    out = [f"crosscheck: {rep['engine']['source']} ({rep['engine']['tokens']} tokens, "
           f"top-{rep['engine']['k']}) vs {rep['reference']['backend']} {rep['reference']['modes']}"]
    rows = rep["positions"]
    if rows:
        shown = rows
        if len(rows) > max_rows:
            key = "kl_full" if rep["summary"]["kl_kind"] == "full" else "kl_topk"
            worst = sorted(rows, key=lambda r: -r.get(key, r.get("k3", 0.0)))[:max_rows]
            shown = sorted(worst, key=lambda r: r["t"])
            out.append(f"(showing the {max_rows} worst of {len(rows)} positions)")
        out.append(f"{'t':>5} {'token':>7} {'KL top-k':>9} {'KL full':>9} {'top1 ref':>8} {'top1 eng':>8} "
                   f"{'agree':>5} {'overlap':>7} {'max|dlp|':>9} {'k3':>9}")
        for r in shown:
            out.append(f"{r['t']:>5} {_fmt(r['token'], 'd'):>7} {_fmt(r.get('kl_topk')):>9} "
                       f"{_fmt(r.get('kl_full')):>9} {r['ref_top1']:>8} {_fmt(r.get('eng_top1'), 'd'):>8} "
                       f"{_fmt(r.get('top1_agree')):>5} {_fmt(r.get('overlap'), '.2f'):>7} "
                       f"{_fmt(r.get('max_dlp')):>9} {_fmt(r.get('k3')):>9}")
        s = rep["summary"]
        out.append(f"summary: mean KL({s['kl_kind']}) {_fmt(s.get('mean_kl'))}, worst {_fmt(s.get('max_kl'))} "
                   f"at t={s.get('max_kl_t', '-')}, top-1 agreement "
                   f"{_fmt(None if s['top1_agreement'] is None else 100 * s['top1_agreement'], '.1f')}%, "
                   f"mean overlap {_fmt(s['mean_overlap'], '.3f')}, max|dlogprob| {_fmt(s['max_dlp'])}, "
                   f"first greedy divergence t={s['first_greedy_divergence'] or '-'}")
    if rep["layers"]:
        first = (rep["verdict"]["first_divergent"] or {}).get("name")
        out.append(f"{'dumped tensor':<28} {'step err':>9} {'worst token':>14} {'cumul.':>9} {'max_abs':>9} "
                   f"{'experts':>8}")
        out.append(f"{'':<28} {'(local)':>9} {'(local) @pos':>14} {'rel_err':>9} {'(cumul.)':>9} {'differ':>8}")
        for r in rep["layers"]:
            mark = "  <-- first step past tolerance" if r["name"] == first else ("  !" if r.get("flagged") else "")
            worst = f"{_fmt(r['local_tok_err'])} @{r['local_worst_pos']:<4}" if "local_tok_err" in r else "-"
            out.append(f"{r['name']:<28} {_fmt(r.get('local_err')):>9} {worst:>14} "
                       f"{_fmt(r.get('rel_err')):>9} {_fmt(r.get('max_abs')):>9} "
                       f"{_fmt(r.get('local_mismatch', r.get('mismatch')), '.1%'):>8}{mark}")
    if rep.get("ignored_dumps"):
        out.append(f"dump tensors not compared: {', '.join(rep['ignored_dumps'][:8])}")
    if rep["engine"].get("dropped"):
        out.append(f"note: {rep['engine']['dropped']} top-k entries named tokens not in the vocabulary (dropped)")
    for line in rep.get("lint") or []:
        out.append(f"lint: {line}")
    for line in rep.get("hints") or []:
        out.append(f"hint: {line}")
    out.append(rep["verdict"]["line"])
    return "\n".join(out)


def format_fit(rep: dict) -> str:
    """The --fit-profiles report: one row per profile (group), the lint lines and the verdict."""
    out = [f"crosscheck --fit-profiles: {rep['engine']['source']} ({rep['engine']['tokens']} tokens) vs "
           f"{rep['reference']['backend']}, reference precision {rep['reference']['precision']}",
           f"{'profile':<34} {'mean KL':>9} {'worst KL':>9} {'top-1':>6} {'worst step':>10}  verdict"]
    for r in rep["profiles"]:
        s = r["summary"]
        errs = [x["local_err"] for x in r["layers"] if "local_err" in x]
        first = (r["verdict"]["first_divergent"] or {}).get("name")
        mark = "  <-- best" if rep["best"] in r["profiles"] else ""
        top1 = s.get("top1_agreement")
        out.append(f"{' = '.join(r['profiles']):<34} {_fmt(s.get('mean_kl')):>9} {_fmt(s.get('max_kl')):>9} "
                   f"{_fmt(None if top1 is None else 100 * top1, '.1f'):>6} {_fmt(max(errs) if errs else None):>10}  "
                   f"{'PASS' if r['verdict']['ok'] else 'DIVERGES at ' + first if first else 'DIVERGES'}{mark}")
        out.append(f"{'':<4}{r['modes']}")
    for line in rep.get("lint") or []:
        out.append(f"lint: {line}")
    out.append(rep["verdict"]["line"])
    return "\n".join(out)


def plot_report(rep: dict, path: str | Path) -> None:
    """Per-position KL and, when the engine dumped layers, per-layer rel_err; log scale, thresholds
    dashed. Needs matplotlib."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    th = rep["thresholds"]
    key = "kl_full" if rep["summary"].get("kl_kind") == "full" else "kl_topk"
    pts = [(r["t"], r[key]) for r in rep["positions"] if key in r]
    hid = [r for r in rep["layers"] if r["kind"] == "hidden"]
    panels = [p for p, data in (("positions", pts), ("layers", hid)) if data]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "positions":
            ax.semilogy([t for t, _ in pts], [max(v, 1e-12) for _, v in pts], ".-")
            ax.axhline(th["max_kl_pos"], ls="--", c="r")
            ax.set(title=f"{key} per position", xlabel="position t", ylabel="KL(ref || engine), nats")
        else:
            clip = lambda v: 1e3 if v is None or not np.isfinite(v) else max(v, 1e-12)
            ax.semilogy(range(len(hid)), [clip(r.get("local_err")) for r in hid], "o-", label="local (this step)")
            ax.semilogy(range(len(hid)), [clip(r["rel_err"]) for r in hid], "x:", label="cumulative")
            ax.set_xticks(range(len(hid)), [r["name"] for r in hid], rotation=90, fontsize=6)
            ax.axhline(th["layer_rtol"], ls="--", c="r")
            ax.legend()
            ax.set(title="dumped hidden states", ylabel="relative error")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FormatError("--plot needs matplotlib: pip install 'qwen35-nvfp4-spec[plot]'") from None


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else str(float(x))
    return x
