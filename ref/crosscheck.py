"""`python -m ref.crosscheck`: is this engine computing the model right, and if not, where does it go wrong?

Runs the reference on the engine's token ids and compares, per position, the engine's logprobs (or
logits) with the reference's, and, per layer, the engine's dumped hidden states with the reference's.

Metrics (all KL in nats, KL(ref || engine); position t is the prediction of token t from tokens < t):
- kl_topk: KL over the engine's top-k ids, both distributions renormalised over those ids.
- kl_full: KL over the whole vocabulary (needs engine logits).
- top1: the engine's most likely token equals the reference's.
- overlap: |engine top-k ∩ reference top-k| / k.
- max_dlp: max |engine logprob - reference logprob| over the ids the engine reported (its top-k and
  the actual token; with logits: both sides' top-k and the actual token).
- k3: exp(r) - 1 - r, r = ref - engine logprob of the actual token (SGLang's sampled-token estimator).
- first greedy divergence: the first t where the two top-1 tokens differ.
- per dumped tensor: rel_err = ||engine - ref|| / ||ref|| against the reference run (cumulative), and
  the local error of the step that produced it: the reference recomputes that step (a layer's mixer,
  its MoE with the engine's expert choice, the final norm, lm_head) from the engine's own input, so
  an error is charged to the step that made it. The first step, in forward order, whose local error
  is past --layer-rtol (whole tensor) or --token-rtol (worst token) is where the engine goes wrong.
  Routing tensors are shown as the share of expert choices not shared.

Verdict: PASS (exit 0) when mean KL <= --max-kl, the worst position's KL <= --max-kl-pos, top-1
agreement >= --min-top1 and no dumped step is past tolerance; DIVERGES (exit 1)
otherwise; bad input exits 2 with one line on stderr. The KL used is kl_full when engine logits are
given, else kl_topk, else (only the actual tokens' logprobs) mean k3.

Defaults are sized for a bf16 engine against the f64 reference; see DEFAULTS below for how they were
measured.

Examples:
  # a live vLLM or SGLang server (prompt logprobs of these tokens, top-10)
  python -m ref.crosscheck --model nvidia/Qwen3.5-397B-A17B-NVFP4 --server http://127.0.0.1:8000 \
      --prompt "The capital of France is" --activations w4a4 --precision bf16
  # a saved response: curl .../v1/completions -d '{"model": ..., "prompt": [ids], "max_tokens": 1,
  #   "prompt_logprobs": 10, "return_token_ids": true}' > resp.json
  python -m ref.crosscheck --model DIR --engine-json resp.json
  # logits and layer dumps of one prefill
  python -m ref.crosscheck --model DIR --token-ids @ids.txt --engine-logits logits.npy \
      --engine-dumps dumps.safetensors --json report.json --plot report.png
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ref import divergence as D
from ref import engine_io as io
from ref.errors import CheckpointError, ConfigError, FormatError

# Thresholds for a bf16 engine checked against the f64 reference, measured as ref bf16 vs ref f64 on
# the tiny synthetic checkpoint (w4a16, random token ids, T = 16..200). 63 runs: mean KL <= 7.7e-3,
# worst position <= 6.4e-2, top-1 agreement >= 0.75 (T = 16; >= 0.89 for T >= 80: a random model's
# distributions are flat, so near-ties flip). 15 runs with dumps: local step error <= 6.5e-3 (whole
# tensor), <= 2.2e-2 (worst token). The injected bugs of tests/test_crosscheck_engines.py were
# flagged, at their layer, in each of 24 runs (T = 16, 80, 150); the weakest by logits alone (DeltaNet
# state not carried) gave mean KL >= 1.6e-2 over 48 runs, the weakest by dumps (max-over-experts
# activation scale) a local step error >= 3e-2. Short sequences are noisy: prefer T >= 64, and dumps.
# W4A4 engines: a bf16 W4A4 engine against the f64 W4A4 reference differs by NVFP4 code flips
# (activations rounded to bf16 before quantizing): mean KL 6e-2, local MoE error 1.1..1.9e-2 on the
# tiny model; check such engines against --precision bf16 --activations w4a4.
DEFAULTS = {"max_kl": 1e-2, "max_kl_pos": 0.25, "min_top1": 0.7, "layer_rtol": 2.5e-2, "token_rtol": 0.1,
            "top_k": 10}


# --------------------------------------------------------------------------- reference side

def run_reference(ckpt, token_ids: list[int], backend: str = "ref", precision: str = "f64",
                  activations: str = "w4a16", act_scale: str = "per-expert", want_dumps: bool = False):
    """-> (logits [T, V] float64, dumps dict or None) from the chosen backend."""
    if backend == "ref":
        from ref.model import Model
        model = Model(ckpt, precision=precision, activations=activations, act_scale=act_scale)
        dumps = {} if want_dumps else None
        logits, _ = model.prefill(list(token_ids), dumps=dumps)
        return np.asarray(logits, np.float64), dumps
    if backend == "jax":
        return _run_jax(ckpt, token_ids, precision, activations, want_dumps)
    raise FormatError(f"--backend: expected 'ref' or 'jax', got {backend!r}")


def _run_jax(ckpt, token_ids, precision, activations, want_dumps):
    """Teacher-forced logits from jaxrun (one prefill over all devices JAX sees). jaxrun computes in
    f32 or bf16 with weights dequantized (w4a16) and writes no layer dumps."""
    if precision not in ("f32", "bf16") or activations != "w4a16":
        raise FormatError(f"--backend jax runs --precision f32|bf16 with --activations w4a16, "
                          f"not {precision} {activations}; use --backend ref")
    if want_dumps:
        raise FormatError("--engine-dumps needs --backend ref (jaxrun writes no layer dumps)")
    try:
        from jaxrun.load import load
        from jaxrun.runner import Runner, bucket
        from jaxrun.sharding import make_mesh
    except ImportError as e:
        raise FormatError(f"--backend jax: jaxrun is unavailable ({e})") from None
    mesh = make_mesh()
    jck, params = load(str(ckpt.directory), mesh, precision, progress=False)
    runner = Runner(params, jck.config.text, mesh, precision)
    T = len(token_ids)
    tokens = np.zeros((1, bucket(T)), np.int32)                     # right-padded to jaxrun's shape bucket
    tokens[0, :T] = token_ids
    logits, _ = runner.prefill(tokens, np.array([T], np.int32), max_len=tokens.shape[1], all_logits=True)
    return np.asarray(logits[0, :T], np.float64), None


def recompute_from_engine(ckpt, eng_dumps: dict, precision: str = "f64", activations: str = "w4a16",
                          act_scale: str = "per-expert") -> dict[str, np.ndarray]:
    """Reference value of each dumped tensor computed from the engine's own input to that step, so
    that an error is charged to the step that made it, not to every later one: layer i's mixer from
    the engine's input to layer i (embeddings or layers.{i-1}.after_moe); its router from the
    engine's layers.{i}.after_mixer (or, when that was not dumped, from the recomputed one, so the
    step is the whole layer); its MoE from that and the engine's expert choice (topk_ids, when
    dumped, so that a near-tie routed the other way is not charged to the expert maths; the weights
    are the reference's router probabilities of those experts, renormalised); the final norm from
    the engine's last after_moe; logits from its final_hidden. Steps whose input was not dumped are
    skipped. Runs ref.model's own steps (Model.layer(i).mixer_step / moe_step, final_norm, lm_head;
    ref backend)."""
    from ref.model import Model
    m = Model(ckpt, precision=precision, activations=activations, act_scale=act_scale)
    out: dict[str, np.ndarray] = {}
    h_in = eng_dumps.get("embeddings")
    for i in range(m.cfg.num_hidden_layers):
        layer = m.layer(i)
        if h_in is not None:
            out[f"layers.{i}.after_mixer"] = layer.mixer_step(h_in)[0]
        a = eng_dumps.get(f"layers.{i}.after_mixer", out.get(f"layers.{i}.after_mixer"))
        if a is not None:
            after_moe, logits, ids, weights = layer.moe_step(a, eng_dumps.get(f"layers.{i}.topk_ids"))
            out.update({f"layers.{i}.after_moe": after_moe, f"layers.{i}.router_logits": logits,
                        f"layers.{i}.topk_ids": ids, f"layers.{i}.topk_weights": weights})
        h_in = eng_dumps.get(f"layers.{i}.after_moe")
    if h_in is not None:
        out["final_hidden"] = m.final_norm(h_in)
    if eng_dumps.get("final_hidden") is not None:
        out["logits"] = m.lm_head(eng_dumps["final_hidden"])
    return out


# --------------------------------------------------------------------------- comparisons

def compare_positions(ref_logits: np.ndarray, token_ids: list[int], eng: io.EngineLogprobs | None = None,
                      eng_logits: np.ndarray | None = None, top_k: int = DEFAULTS["top_k"]) -> list[dict]:
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
            row["top1_agree"] = row["eng_top1"] == row["ref_top1"]
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
    if name == "embeddings":
        return (-1, 0)
    layer = _layer_of(name)
    if layer is not None:
        kind = name.split(".", 2)[2]
        order = ("after_mixer", "router_logits", "topk_ids", "topk_weights", "after_moe")
        return (layer, order.index(kind) if kind in order else len(order))
    return (1 << 30, ("final_hidden", "logits").index(name) if name in ("final_hidden", "logits") else 2)


def compare_layers(ref: dict[str, np.ndarray], eng: dict[str, np.ndarray], local: dict[str, np.ndarray] | None = None,
                   layer_rtol: float = DEFAULTS["layer_rtol"], token_rtol: float = DEFAULTS["token_rtol"],
                   num_experts: int | None = None) -> list[dict]:
    """Per dumped tensor, in forward order.

    Hidden states: rel_err and max_abs against the reference run (errors accumulated from every
    earlier step); local_err (whole tensor) and local_tok_err (worst token, at 0-based sequence
    position local_worst_pos) against `local`, the reference step recomputed from the engine's own
    input (see recompute_from_engine; embeddings against the reference); flagged when
    local_err > layer_rtol or local_tok_err > token_rtol.
    Routing: mismatch / local_mismatch, the share of expert choices not shared; topk_weights as
    rel_err of the [T, E] routing matrices. Routing rows are never flagged: near-ties legitimately
    flip, and real routing bugs show in router_logits and after_moe."""
    local = dict(local or {})
    if "embeddings" in ref:
        local["embeddings"] = ref["embeddings"]
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
                row["flagged"] = not (row["local_err"] <= layer_rtol and row["local_tok_err"] <= token_rtol)
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


def verdict(summary: dict, layers: list[dict], max_kl: float, max_kl_pos: float, min_top1: float) -> dict:
    """-> {"ok", "line" (the one-line verdict), "first_divergent" (first flagged layer row or None)}."""
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


# --------------------------------------------------------------------------- report

def _fmt(x, spec=".2e"):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return format(x, spec)


def format_report(rep: dict, max_rows: int = 40) -> str:
    """Readable terminal report: header, per-position table, per-layer table, lint, verdict."""
    out = [f"crosscheck: {rep['engine']['source']} ({rep['engine']['tokens']} tokens, "
           f"top-{rep['engine']['k']}) vs {rep['reference']['backend']} {rep['reference']['precision']} "
           f"{rep['reference']['activations']}"]
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


def plot_report(rep: dict, path: str | Path) -> None:
    """Per-position KL and per-layer rel_err, log scale, thresholds dashed. Needs matplotlib."""
    _require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    th = rep["thresholds"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    key = "kl_full" if rep["summary"].get("kl_kind") == "full" else "kl_topk"
    pts = [(r["t"], r[key]) for r in rep["positions"] if key in r]
    ax = axes[0]
    if pts:
        ax.semilogy([t for t, _ in pts], [max(v, 1e-12) for _, v in pts], ".-")
        ax.axhline(th["max_kl_pos"], ls="--", c="r")
    ax.set(title=f"{key} per position", xlabel="position t", ylabel="KL(ref || engine), nats")
    ax = axes[1]
    hid = [r for r in rep["layers"] if r["kind"] == "hidden"]
    if hid:
        def clip(v):
            return 1e3 if v is None or not np.isfinite(v) else max(v, 1e-12)
        ax.semilogy(range(len(hid)), [clip(r.get("local_err")) for r in hid], "o-", label="local (this step)")
        ax.semilogy(range(len(hid)), [clip(r["rel_err"]) for r in hid], "x:", label="cumulative")
        ax.set_xticks(range(len(hid)), [r["name"] for r in hid], rotation=90, fontsize=6)
        ax.axhline(th["layer_rtol"], ls="--", c="r")
        ax.legend()
    ax.set(title="dumped hidden states", ylabel="relative error")
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def _atomic_write(path: str | Path, write, binary: bool = False) -> None:
    """Write through a temporary file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _lint(ckpt, block_scales: bool) -> list[str]:
    """ref.checkpoint_check findings (errors and lint warnings) as report lines."""
    from ref.checkpoint_check import findings
    return [f"{f.severity}: {f}" for f in findings(ckpt, block_scales=block_scales)]


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise FormatError("--plot needs matplotlib: pip install 'qwen35-nvfp4-spec[plot]'") from None


# --------------------------------------------------------------------------- driver

def crosscheck(ckpt, token_ids: list[int] | None = None, eng: io.EngineLogprobs | None = None,
               eng_logits: np.ndarray | None = None, eng_dumps: dict | None = None, *, backend: str = "ref",
               precision: str = "f64", activations: str = "w4a16", act_scale: str = "per-expert",
               max_kl: float = DEFAULTS["max_kl"], max_kl_pos: float = DEFAULTS["max_kl_pos"],
               min_top1: float = DEFAULTS["min_top1"], layer_rtol: float = DEFAULTS["layer_rtol"],
               token_rtol: float = DEFAULTS["token_rtol"], top_k: int = DEFAULTS["top_k"], lint: bool = True,
               lint_block_scales: bool = False, ignored_dumps=()) -> dict:
    """Compare what an engine produced with the reference. -> the full report (JSON-able dict)."""
    if token_ids is None:
        if eng is None:
            raise FormatError("no token ids: give --token-ids or --prompt (or an --engine-json that holds them)")
        token_ids = eng.token_ids
    token_ids = [int(t) for t in token_ids]
    if eng is not None and eng.token_ids != token_ids:
        raise FormatError(f"engine JSON covers {len(eng.token_ids)} tokens that differ from the {len(token_ids)} given")
    if eng_logits is None and eng_dumps and "logits" in eng_dumps:
        eng_logits = np.asarray(eng_dumps["logits"], np.float64)
    ref_logits, ref_dumps = run_reference(ckpt, token_ids, backend, precision, activations, act_scale,
                                          want_dumps=bool(eng_dumps))
    positions = compare_positions(ref_logits, token_ids, eng, eng_logits, top_k)
    layers = []
    if eng_dumps:
        ref_dumps = _prefix_of(ref_dumps, eng_dumps, len(token_ids))
        local = recompute_from_engine(ckpt, eng_dumps, precision, activations, act_scale)
        layers = compare_layers(ref_dumps, eng_dumps, local, layer_rtol, token_rtol, ckpt.config.text.num_experts)
    if not positions and not layers:
        raise FormatError("nothing to compare: the engine output holds no logprobs, logits or dump the "
                          "reference also has")
    summary = summarize(positions)
    v = verdict(summary, layers, max_kl, max_kl_pos, min_top1)
    parts = ([eng.source] if eng is not None else []) + (["logits"] if eng_logits is not None else []) + \
        (["layer dumps"] if eng_dumps else [])
    source = "engine " + " + ".join(parts) if eng is None else " + ".join(parts)
    k, dropped = (eng.k, eng.dropped) if eng is not None else (top_k, 0)
    return {
        "reference": {"model": str(ckpt.directory), "backend": backend, "precision": precision,
                      "activations": activations, "act_scale": act_scale},
        "engine": {"source": source, "tokens": len(token_ids), "k": k, "dropped": dropped},
        "token_ids": token_ids,
        "thresholds": {"max_kl": max_kl, "max_kl_pos": max_kl_pos, "min_top1": min_top1, "layer_rtol": layer_rtol,
                       "token_rtol": token_rtol},
        "positions": positions, "summary": summary, "layers": layers, "ignored_dumps": list(ignored_dumps),
        "lint": _lint(ckpt, lint_block_scales) if lint else [], "hints": _hints(v, precision, activations),
        "verdict": v,
    }


def _hints(v: dict, precision: str, activations: str) -> list[str]:
    """Mode mismatches worth ruling out, when the divergence could come from the routed experts."""
    first = v["first_divergent"]
    if v["ok"] or (first is not None and not first["name"].endswith("after_moe")):
        return []
    if activations == "w4a4" and precision != "bf16":
        return [f"a bf16 W4A4 engine differs from the {precision} W4A4 reference by NVFP4 code flips (its "
                f"activations are rounded to bf16 before they are quantized); compare with --precision bf16"]
    if activations == "w4a16":
        return ["Blackwell engines quantize the routed experts' activations (W4A4); if this one does, "
                "compare with --activations w4a4 (and --act-scale max for backends that take one scale per layer)"]
    return []


def _prefix_of(ref_dumps: dict, eng_dumps: dict, T: int) -> dict:
    """The reference dumps cut to the tokens the engine dumped (its prefill may cover only the first
    T' <= T tokens, e.g. the prompt of a response that also holds generated tokens). Checks shapes."""
    lengths = {np.shape(v)[0] if np.ndim(v) else 0 for v in eng_dumps.values()}
    if len(lengths) != 1 or not 0 < min(lengths) <= T:
        raise FormatError(f"engine dumps: token counts {sorted(lengths)}, expected one count <= {T}")
    n = lengths.pop()
    ref_dumps = {k: v[:n] for k, v in ref_dumps.items()}
    for name in sorted(set(eng_dumps) & set(ref_dumps)):
        if np.shape(eng_dumps[name]) != ref_dumps[name].shape:
            raise FormatError(f"engine dump '{name}': shape {tuple(np.shape(eng_dumps[name]))}, expected "
                              f"{tuple(ref_dumps[name].shape)} for its {n} tokens")
    return ref_dumps


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise FormatError(f"--token-ids: expected integers separated by commas or spaces, got {text[:40]!r}") from None
    if not ids:
        raise FormatError("--token-ids: empty")
    return ids


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each option's default."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (through main), not argparse's usage block
        raise FormatError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m ref.crosscheck", description=__doc__,
                                 formatter_class=_Formatter)
    ap.add_argument("--model", required=True, help="checkpoint directory or HF repo id")
    src = ap.add_argument_group("engine outputs (at least one)")
    src.add_argument("--engine-json", help="OpenAI-compatible (vLLM, SGLang) or SGLang /generate response JSON")
    src.add_argument("--engine-logits", help=".npy, .npz or .safetensors logits [T, vocab]")
    src.add_argument("--engine-dumps", help=".safetensors or .npz layer dumps: the names ref.run --dump-layers writes "
                     "(embeddings, layers.{i}.after_mixer|after_moe|router_logits|topk_ids|topk_weights, "
                     "final_hidden, logits) or an alias from ref.engine_io.DUMP_ALIASES (HF hidden_states.{k}, ...)")
    src.add_argument("--server", help="base URL of a live OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    src.add_argument("--server-api", default="openai", choices=("openai", "sglang"))
    src.add_argument("--server-model", help="model name for the server (default: the first in /v1/models)")
    src.add_argument("--choice", type=int, default=0, help="which choice of the JSON response (default 0)")
    ids = ap.add_argument_group("token ids (when the engine output does not hold them)")
    ids.add_argument("--token-ids", help="comma- or space-separated ids, or @FILE holding them")
    ids.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer")
    ref = ap.add_argument_group("reference")
    ref.add_argument("--backend", default="ref", choices=("ref", "jax"))
    ref.add_argument("--precision", default="f64", choices=("f64", "f32", "bf16"))
    ref.add_argument("--activations", default="w4a16", choices=("w4a16", "w4a4"))
    ref.add_argument("--act-scale", default="per-expert", choices=("per-expert", "max"))
    th = ap.add_argument_group("thresholds")
    th.add_argument("--max-kl", type=float, default=DEFAULTS["max_kl"], help="mean KL(ref||engine), nats")
    th.add_argument("--max-kl-pos", type=float, default=DEFAULTS["max_kl_pos"], help="KL at any one position")
    th.add_argument("--min-top1", type=float, default=DEFAULTS["min_top1"], help="top-1 agreement, 0..1")
    th.add_argument("--layer-rtol", type=float, default=DEFAULTS["layer_rtol"],
                    help="relative error of one step (layer mixer, MoE, norm, lm_head), whole tensor")
    th.add_argument("--token-rtol", type=float, default=DEFAULTS["token_rtol"],
                    help="relative error of one step at its worst token")
    th.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="k for logits and --server")
    out = ap.add_argument_group("output")
    out.add_argument("--json", help="write the full report as JSON to this file")
    out.add_argument("--plot", help="write per-position KL and per-layer error to this PNG (needs matplotlib)")
    out.add_argument("--no-lint", action="store_true", help="skip the checkpoint lint (ref.checkpoint_check)")
    out.add_argument("--lint-block-scales", action="store_true",
                     help="let the lint scan every FP8 block scale too (reads ~1/9 of an NVFP4 checkpoint)")
    return ap


def _token_ids_arg(args, ckpt) -> list[int] | None:
    if args.token_ids and args.prompt:
        raise FormatError("give --token-ids or --prompt, not both")
    if args.token_ids:
        text = args.token_ids
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text()
            except OSError as e:
                raise FormatError(f"{text[1:]}: cannot read ({e.strerror})") from None
        return _parse_ids(text)
    if args.prompt:
        return _tokenizer(ckpt).encode(args.prompt)
    return None


def _tokenizer(ckpt):
    from ref.tokenizer import load_tokenizer
    return load_tokenizer(ckpt.directory)


def _lookup(ckpt) -> io.TokenLookup:
    try:
        tok = _tokenizer(ckpt)
    except (OSError, CheckpointError, ConfigError):
        return io.ids_only_lookup
    return io.vocab_lookup(tok.token_id)


def run(args) -> dict:
    from ref.checkpoint import open_checkpoint
    if not (args.engine_json or args.engine_logits or args.engine_dumps or args.server):
        raise FormatError("nothing to compare: give --engine-json, --engine-logits, --engine-dumps or --server")
    if args.engine_json and args.server:
        raise FormatError("give --engine-json or --server, not both")
    for flag, val in (("--max-kl", args.max_kl), ("--max-kl-pos", args.max_kl_pos), ("--layer-rtol", args.layer_rtol),
                      ("--token-rtol", args.token_rtol)):
        if not val > 0:
            raise FormatError(f"{flag}: must be > 0, got {val}")
    if not 0 <= args.min_top1 <= 1 or args.top_k < 1:
        raise FormatError("--min-top1 must be in [0, 1] and --top-k >= 1")
    if args.plot:
        _require_matplotlib()
    for out in (args.json, args.plot):
        if out and not Path(out).resolve().parent.is_dir():
            raise FormatError(f"{out}: no such directory to write into")
    ckpt = open_checkpoint(args.model)
    token_ids = _token_ids_arg(args, ckpt)
    eng = None
    if args.engine_json:
        eng = io.read_engine_json(io.load_json_file(args.engine_json), _lookup(ckpt), token_ids, args.choice,
                                  where=args.engine_json)
    elif args.server:
        if token_ids is None:
            raise FormatError("--server needs --token-ids or --prompt")
        raw = io.query_server(args.server, token_ids, args.top_k, args.server_api, args.server_model)
        eng = io.read_engine_json(raw, _lookup(ckpt), token_ids, where=args.server)
    if eng is not None:
        token_ids = eng.token_ids
    eng_logits = io.read_logits(args.engine_logits) if args.engine_logits else None
    dumps, ignored = (io.read_dumps(args.engine_dumps, ckpt.config.text.num_hidden_layers)
                      if args.engine_dumps else (None, []))
    return crosscheck(ckpt, token_ids, eng, eng_logits, dumps, backend=args.backend, precision=args.precision,
                      activations=args.activations, act_scale=args.act_scale, max_kl=args.max_kl,
                      max_kl_pos=args.max_kl_pos, min_top1=args.min_top1, layer_rtol=args.layer_rtol,
                      token_rtol=args.token_rtol,
                      top_k=args.top_k, lint=not args.no_lint, lint_block_scales=args.lint_block_scales,
                      ignored_dumps=ignored)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else str(float(x))
    return x


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        rep = run(args)
        if args.plot:
            plot_report(rep, args.plot)
        if args.json:
            _atomic_write(args.json, lambda f: json.dump(_jsonable(rep), f, indent=1))
    except ValueError as e:  # FormatError, CheckpointError, ConfigError, and the model's input checks
        print(f"crosscheck: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"crosscheck: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crosscheck: interrupted", file=sys.stderr)
        return 130
    print(format_report(rep))
    return 0 if rep["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
