"""`python -m ref.crosscheck`: is this engine computing the model right, and if not, where does it go wrong?

Runs the reference on the engine's token ids and compares, per position, the engine's logprobs (or
logits) with the reference's, and, per layer, the engine's dumped hidden states with the reference's
(metrics: ref.compare). A dumped step is charged with its local error: the reference recomputes that
step (a layer's mixer, its MoE with the engine's expert choice, the final norm, lm_head) from the
engine's own input, and the first step, in forward order, whose local error is past --layer-rtol
(whole tensor) or --token-rtol (worst token) is where the engine goes wrong.

Verdict: PASS (exit 0) when mean KL <= --max-kl, the worst position's KL <= --max-kl-pos, top-1
agreement >= --min-top1 and no dumped step is past tolerance; DIVERGES (exit 1) otherwise; bad input
exits 2 with one line on stderr. The KL used is kl_full when engine logits are given, else kl_topk,
else (only the actual tokens' logprobs) mean k3. The default thresholds are sized for a bf16 engine
against the f64 reference (ref.compare.Thresholds says how they were measured).

The reference comes from a backend: "ref" (ref.model, NumPy) or one registered by another package
under the entry-point group "qwen35_nvfp4_spec.reference_backends" (jaxrun registers "jax").
`--backend jax` can run over several processes, one per host (--coordinator, --num-processes,
--process-id, or --distributed auto, as jaxrun.generate takes them; or `python -m jaxrun.launch -n N
-- ref.crosscheck ...` on one machine): ref passes them on to the backend through the environment
(ref.distributed_args); process 0 reports, the others end once the logits are computed.

Image prompts: `--image FILE` (repeatable, in prompt order). The token ids (from --token-ids, --prompt,
--prompt --chat, or the engine's JSON) hold one image-pad run per image, a single pad (expanded here)
or already the image's merged-token count (checked: a different count is an error naming the image).
`--server` sends the images as OpenAI-compatible servers take them: one chat turn of image_url parts
(base64 data URLs) and the --prompt text, with prompt logprobs; the server's own template and
expansion give the token ids. Dumps of the vision encoder (vision.patch_embed, vision.pos_embed,
vision.blocks.{i}, vision.merger, or transformers' model.visual.* names) are attributed like layers:
each block and the merger are recomputed from the engine's own input.

Examples:
  # a live vLLM or SGLang server (prompt logprobs of these tokens, top-10)
  python -m ref.crosscheck --model nvidia/Qwen3.5-397B-A17B-NVFP4 --server http://127.0.0.1:8000 \\
      --prompt "The capital of France is" --activations w4a4 --precision bf16
  # a saved response: curl .../v1/completions -d '{"model": ..., "prompt": [ids], "max_tokens": 1,
  #   "prompt_logprobs": 10, "return_token_ids": true}' > resp.json
  python -m ref.crosscheck --model DIR --engine-json resp.json
  # logits and layer dumps of one prefill
  python -m ref.crosscheck --model DIR --token-ids @ids.txt --engine-logits logits.npy \\
      --engine-dumps dumps.safetensors --json report.json --plot report.png
  # an image prompt on a live server (chat with an image_url data URL)
  python -m ref.crosscheck --model DIR --server http://127.0.0.1:8000 --image cat.png --prompt "What is it?"

  # against the modes an engine configuration runs (its profile's thresholds), or: which profile
  # explains this engine, or is it a bug? (ref.profiles; --list-profiles)
  python -m ref.crosscheck --model DIR --engine-json resp.json --engine-profile sglang-fp8kv
  python -m ref.crosscheck --model DIR --engine-logits l.npy --engine-dumps d.safetensors --fit-profiles

--engine-profile NAME sets every mode of the reference to the profile's (the explicit mode flags
override its fields) and uses the profile's measured thresholds (explicit threshold flags override
those). --fit-profiles [NAME ...] runs the reference under each profile (default: all) and reports
the per-profile table, the profile that explains the engine best, and whether even that one leaves
the engine beyond its thresholds (ref.profile_fit): exit 0 when some profile explains the engine, 1
when none does.
"""
from __future__ import annotations

if __name__ == "__main__":  # before any library starts a thread: threads inherit the blocked signals
    from ref.cli import exit_on_interrupt
    exit_on_interrupt("ref.crosscheck")

import json
import os
import sys
from dataclasses import asdict, replace
from importlib.metadata import entry_points

import numpy as np

from ref import engine_io as io
from ref.cli import ArgumentParser, HelpFormatter, atomic_write, check_output_path, \
    parse_token_ids, prompt_images, run_main
from ref.compare import Thresholds, compare_layers, compare_positions, summarize, verdict
from ref.config import FULL
from ref.distributed_args import add_distributed_arguments, distributed_environ
from ref.errors import CheckpointError, ConfigError, FormatError
from ref.modes import Modes, add_mode_arguments, modes_from_args
from ref.report import format_fit, format_report, jsonable, plot_report, require_matplotlib

PROG = "ref.crosscheck"
BACKEND_GROUP = "qwen35_nvfp4_spec.reference_backends"


# --------------------------------------------------------------------------- reference side

def _ref_backend(ckpt, token_ids: list[int], modes: Modes, want_dumps: bool, images=()):
    from ref.model import Model
    model = Model(ckpt, **asdict(modes))
    dumps = {} if want_dumps else None
    logits, _ = model.prefill(list(token_ids), dumps=dumps, images=list(images) or None)
    return np.asarray(logits, np.float64), dumps


def backends() -> list[str]:
    """The reference backends: "ref" and those registered by installed packages."""
    return ["ref"] + sorted(ep.name for ep in entry_points(group=BACKEND_GROUP))


def run_reference(ckpt, token_ids: list[int], backend: str = "ref", modes: Modes = Modes(), want_dumps: bool = False,
                  images=()):
    """-> (logits [T, V] float64, dumps dict or None) from the chosen backend. A backend is a function
    (ckpt, token_ids, modes, want_dumps[, images=]) -> (logits, dumps); images (ref.image
    PreprocessedImage of the prompt's image-pad runs) are passed only when there are some."""
    if backend == "ref":
        return _ref_backend(ckpt, token_ids, modes, want_dumps, images)
    found = [ep for ep in entry_points(group=BACKEND_GROUP) if ep.name == backend]
    if not found:
        raise FormatError(f"--backend {backend!r}: expected one of {backends()}")
    try:
        fn = found[0].load()
    except ImportError as e:
        raise FormatError(f"--backend {backend}: unavailable ({e})") from None
    return fn(ckpt, token_ids, modes, want_dumps, images=list(images)) if images else \
        fn(ckpt, token_ids, modes, want_dumps)


def recompute_from_engine(ckpt, eng_dumps: dict, modes: Modes = Modes(), token_ids=None,
                          images=()) -> dict[str, np.ndarray]:
    """Reference value of each dumped tensor computed from the engine's own input to that step, so
    that an error is charged to the step that made it, not to every later one: layer i's mixer from
    the engine's input to layer i (embeddings or layers.{i-1}.after_moe); its router from the
    engine's layers.{i}.after_mixer (or, when that was not dumped, from the recomputed one, so the
    step is the whole layer); its MoE from that and the engine's expert choice (topk_ids, when
    dumped, so that a near-tie routed the other way is not charged to the expert maths; the weights
    are the reference's router probabilities of those experts, renormalised); the final norm from
    the engine's last after_moe; logits from its final_hidden. Steps whose input was not dumped are
    skipped. Runs ref.model's own steps (Model.layer(i).mixer_step / moe_step, final_norm, lm_head;
    ref backend). Image prompts (token_ids and their images): the vision encoder's blocks from the
    engine's input to each (vision.patch_embed + vision.pos_embed, or vision.blocks.{i-1}), the merger
    from its last block, the embeddings with the engine's merged rows in the image pads; the layers at
    the prompt's 3-D positions."""
    from ref.model import Model
    m = Model(ckpt, **asdict(modes))
    out: dict[str, np.ndarray] = {}
    positions = None
    if images:
        out.update(_recompute_vision(m, eng_dumps, token_ids, images))
        positions = m.prompt_inputs(token_ids, images)[1] if token_ids is not None else None
    h_in = eng_dumps.get("embeddings")
    for i in range(m.cfg.num_hidden_layers):
        layer = m.layer(i)
        if h_in is not None:
            at = None if positions is None else positions[:, :len(h_in)]
            out[f"layers.{i}.after_mixer"] = layer.mixer_step(h_in, positions=at)[0]
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


def _recompute_vision(m, eng_dumps: dict, token_ids, images) -> dict[str, np.ndarray]:
    """The vision steps recomputed from the engine's own inputs to them (see recompute_from_engine)."""
    vm, out = m.vision, {}
    grids = [im.grid for im in images]
    x = None
    if "vision.patch_embed" in eng_dumps and "vision.pos_embed" in eng_dumps:
        x = np.asarray(eng_dumps["vision.patch_embed"]) + np.asarray(eng_dumps["vision.pos_embed"])
    for i in range(vm.cfg.depth):
        if x is not None:
            out[f"vision.blocks.{i}"] = vm.block_step(i, x, grids)
        x = eng_dumps.get(f"vision.blocks.{i}")
    if x is not None:
        out["vision.merger"] = vm.merger_step(np.asarray(x))
    rows, emb = eng_dumps.get("vision.merger"), eng_dumps.get("embeddings")
    if rows is not None and emb is not None and token_ids is not None:
        ids = np.asarray(token_ids)
        if int(np.sum(ids == m.ckpt.config.special_tokens["image_token_id"])) == len(rows):
            out["embeddings"] = m.embed(ids, np.asarray(rows, m.p.dtype))[:len(emb)]
    return out


def step_kinds(ckpt, modes: Modes) -> dict[str, str]:
    """The kind (ref.compare.STEP_KINDS) of each step a dump can hold, under `modes`: "quantized" for the
    steps whose GEMMs quantize their inputs, else "attention" / "deltanet" (after_mixer), "moe"
    (after_moe), "head" (final_hidden, logits)."""
    from ref import layers as L
    from ref.weights import Weights
    w = Weights(ckpt, L.Precision(modes.precision), modes.activations, modes.act_scale)
    out = {"final_hidden": "head", "logits": "head"}
    for i, kind in enumerate(ckpt.config.text.layer_types):
        mixer, moe = w.quantized_input_steps(i)
        out[f"layers.{i}.after_mixer"] = "quantized" if mixer else ("attention" if kind == FULL else "deltanet")
        out[f"layers.{i}.after_moe"] = "quantized" if moe else "moe"
    return out


def _hints(v: dict, modes: Modes) -> list[str]:
    """Mode mismatches worth ruling out, when the divergence could come from the routed experts."""
    precision, activations = modes.precision, modes.activations
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
    lengths = {np.shape(v)[0] if np.ndim(v) else 0 for k, v in eng_dumps.items() if not k.startswith("vision.")}
    if len(lengths) > 1 or (lengths and not 0 < min(lengths) <= T):
        raise FormatError(f"engine dumps: token counts {sorted(lengths)}, expected one count <= {T}")
    n = lengths.pop() if lengths else T
    ref_dumps = {k: v if k.startswith("vision.") else v[:n] for k, v in ref_dumps.items()}
    for name in sorted(set(eng_dumps) & set(ref_dumps)):
        if np.shape(eng_dumps[name]) != ref_dumps[name].shape:
            what = "for the images' patches" if name.startswith("vision.") else f"for its {n} tokens"
            raise FormatError(f"engine dump '{name}': shape {tuple(np.shape(eng_dumps[name]))}, expected "
                              f"{tuple(ref_dumps[name].shape)} {what}")
    return ref_dumps


# --------------------------------------------------------------------------- driver

def crosscheck(ckpt, token_ids: list[int] | None = None, eng: io.EngineLogprobs | None = None,
               eng_logits: np.ndarray | None = None, eng_dumps: dict | None = None, *, backend: str = "ref",
               modes: Modes = Modes(), thresholds: Thresholds = Thresholds(), lint: bool = True,
               lint_block_scales: bool = False, ignored_dumps=(), images=()) -> dict:
    """Compare what an engine produced with the reference. -> the full report (JSON-able dict).
    images: the prompt's images (ref.image.PreprocessedImage, or files), one image-pad run each."""
    if token_ids is None:
        if eng is None:
            raise FormatError("no token ids: give --token-ids or --prompt (or an --engine-json that holds them)")
        token_ids = eng.token_ids
    token_ids = [int(t) for t in token_ids]
    if eng is not None and eng.token_ids != token_ids:
        raise FormatError(f"engine JSON covers {len(eng.token_ids)} tokens that differ from the {len(token_ids)} given")
    if eng_logits is None and eng_dumps and "logits" in eng_dumps:
        eng_logits = np.asarray(eng_dumps["logits"], np.float64)
    token_ids, images = prompt_images(ckpt, token_ids, list(images))
    if eng is not None and eng.token_ids != token_ids:
        raise FormatError(f"engine JSON covers {len(eng.token_ids)} tokens, the prompt with its images "
                          f"{len(token_ids)}")
    ref_logits, ref_dumps = run_reference(ckpt, token_ids, backend, modes, want_dumps=bool(eng_dumps), images=images)
    positions = compare_positions(ref_logits, token_ids, eng, eng_logits, thresholds.top_k)
    layers = []
    if eng_dumps:
        ref_dumps = _prefix_of(ref_dumps, eng_dumps, len(token_ids))
        local = recompute_from_engine(ckpt, eng_dumps, modes, token_ids, images)
        layers = compare_layers(ref_dumps, eng_dumps, local, thresholds, ckpt.config.text.num_experts,
                                step_kinds(ckpt, modes))
    if not positions and not layers:
        raise FormatError("nothing to compare: the engine output holds no logprobs, logits or dump the "
                          "reference also has")
    summary = summarize(positions)
    v = verdict(summary, layers, thresholds)
    parts = ([eng.source] if eng is not None else []) + (["logits"] if eng_logits is not None else []) + \
        (["layer dumps"] if eng_dumps else [])
    source = "engine " + " + ".join(parts) if eng is None else " + ".join(parts)
    k, dropped = (eng.k, eng.dropped) if eng is not None else (thresholds.top_k, 0)
    return {
        "reference": {"model": str(ckpt.directory), "backend": backend, **asdict(modes), "modes": modes.describe()},
        "engine": {"source": source, "tokens": len(token_ids), "k": k, "dropped": dropped,
                   "images": [im.source for im in images]},
        "token_ids": token_ids,
        "thresholds": {k: v for k, v in asdict(thresholds).items() if k != "top_k"},
        "positions": positions, "summary": summary, "layers": layers, "ignored_dumps": list(ignored_dumps),
        "lint": _lint(ckpt, lint_block_scales) if lint else [], "hints": _hints(v, modes), "verdict": v,
    }


def _lint(ckpt, block_scales: bool) -> list[str]:
    """ref.checkpoint_check findings (errors and lint warnings) as report lines."""
    from ref.checkpoint_check import findings
    return [f"{f.severity}: {f}" for f in findings(ckpt, block_scales=block_scales)]


# --------------------------------------------------------------------------- command line

def build_parser() -> ArgumentParser:
    d = Thresholds()
    ap = ArgumentParser(prog=f"python -m {PROG}", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory or HF repo id")
    src = ap.add_argument_group("engine outputs (at least one)")
    src.add_argument("--engine-json", help="OpenAI-compatible (vLLM, SGLang) or SGLang /generate response JSON")
    src.add_argument("--engine-logits", help=".npy, .npz or .safetensors logits [T, vocab]")
    src.add_argument("--engine-dumps", help=".safetensors or .npz layer dumps: the names ref.run --dump-layers writes "
                     "(embeddings, layers.{i}.after_mixer|after_moe|router_logits|topk_ids|topk_weights, "
                     "final_hidden, logits) or an alias from ref.engine_io.DUMP_ALIASES (HF hidden_states.{k}, ...)")
    src.add_argument("--server", help="base URL of a live OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    src.add_argument("--server-api", default="openai", choices=("openai", "sglang"),
                     help="the server's API (default openai)")
    src.add_argument("--server-model", help="model name for the server (default: the first in /v1/models)")
    src.add_argument("--choice", type=int, default=0, help="which choice of the JSON response (default 0)")
    ids = ap.add_argument_group("token ids (when the engine output does not hold them)")
    ids.add_argument("--token-ids", help="comma- or space-separated ids, or @FILE holding them")
    ids.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer")
    ids.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template (one user turn, "
                     "the images first)")
    ids.add_argument("--image", action="append", default=[], metavar="FILE",
                     help="an image of the prompt (repeatable, in prompt order)")
    ref = ap.add_argument_group("reference")
    ref.add_argument("--backend", default="ref", choices=backends(), help="ref (NumPy) or jax (jaxrun; f32/bf16) "
                     "(default ref)")
    add_mode_arguments(ref)
    ref.add_argument("--fit-profiles", nargs="*", metavar="NAME",
                     help="run the reference under each engine profile (default: all) and say which one "
                          "explains the engine, or that none does")
    th = ap.add_argument_group("thresholds (defaults: the engine profile's, or these)")
    th.add_argument("--max-kl", type=float, help=f"mean KL(ref||engine), nats (default {d.max_kl})")
    th.add_argument("--max-kl-pos", type=float, help=f"KL at any one position (default {d.max_kl_pos})")
    th.add_argument("--min-top1", type=float, help=f"top-1 agreement, 0..1 (default {d.min_top1})")
    th.add_argument("--layer-rtol", type=float,
                    help=f"relative error of one step (layer mixer, MoE, norm, lm_head), whole tensor "
                         f"(default {d.layer_rtol}); given, it bounds every kind of step")
    th.add_argument("--token-rtol", type=float,
                    help=f"relative error of one step at its worst token (default {d.token_rtol}); given, it "
                         f"bounds every kind of step")
    th.add_argument("--top-k", type=int, help=f"k for logits and --server (default {d.top_k})")
    out = ap.add_argument_group("output")
    out.add_argument("--json", help="write the full report as JSON to this file")
    out.add_argument("--plot", help="write per-position KL and per-layer error to this PNG (needs matplotlib)")
    out.add_argument("--no-lint", action="store_true", help="skip the checkpoint lint (ref.checkpoint_check)")
    out.add_argument("--lint-block-scales", action="store_true",
                     help="let the lint scan every FP8 block scale too (reads ~1/9 of an NVFP4 checkpoint)")
    add_distributed_arguments(ap)  # --backend jax over several processes (passed on through the environment)
    return ap


def _token_ids_arg(args, ckpt) -> list[int] | None:
    if args.token_ids and args.prompt:
        raise FormatError("give --token-ids or --prompt, not both")
    if args.chat and not args.prompt:
        raise FormatError("--chat needs --prompt")
    if args.token_ids:
        return parse_token_ids(args.token_ids)
    if args.prompt:
        tok = _tokenizer(ckpt)
        if args.chat:
            from ref.image_prompt import user_message
            return tok.encode(tok.apply_chat_template([user_message(args.prompt, len(args.image))]))
        return tok.encode(args.prompt)
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


THRESHOLD_FLAGS = ("max_kl", "max_kl_pos", "min_top1", "layer_rtol", "token_rtol", "top_k")


def threshold_overrides(args) -> dict:
    """The Thresholds fields given on the command line (--layer-rtol / --token-rtol also replace the
    per-kind step bounds)."""
    given = {f: getattr(args, f) for f in THRESHOLD_FLAGS if getattr(args, f) is not None}
    if "layer_rtol" in given or "token_rtol" in given:
        given["steps"] = ()
    return given


def run(args) -> dict:
    from ref.checkpoint import open_checkpoint
    from ref.profiles import get_profile
    if not (args.engine_json or args.engine_logits or args.engine_dumps or args.server):
        raise FormatError("nothing to compare: give --engine-json, --engine-logits, --engine-dumps or --server")
    if args.engine_json and args.server:
        raise FormatError("give --engine-json or --server, not both")
    fit = args.fit_profiles is not None
    if fit and args.engine_profile:
        raise FormatError("give --engine-profile or --fit-profiles, not both")
    for name in args.fit_profiles or ():
        get_profile(name)
    base = get_profile(args.engine_profile).thresholds if args.engine_profile else Thresholds()
    thresholds = replace(base, **threshold_overrides(args))
    modes = modes_from_args(args)
    if args.plot:
        require_matplotlib()
    for path in (args.json, args.plot):
        check_output_path(path)
    distributed = distributed_environ(args)
    if distributed and args.backend != "jax":
        raise FormatError("--coordinator, --num-processes, --process-id and --distributed (several processes) need "
                          "--backend jax")
    os.environ.update(distributed)
    ckpt = open_checkpoint(args.model)
    images = []
    if args.image:                                  # read and checked before anything is asked of an engine
        from ref.vision_model import preprocess_for, require_vision_tower
        require_vision_tower(ckpt)
        images = [preprocess_for(ckpt, f) for f in args.image]
    token_ids = None if args.server and images else _token_ids_arg(args, ckpt)   # the server's template gives them
    if token_ids is not None and images:
        token_ids, _ = prompt_images(ckpt, token_ids, images)
    eng = None
    if args.engine_json:
        eng = io.read_engine_json(io.load_json_file(args.engine_json), _lookup(ckpt), token_ids, args.choice,
                                  where=args.engine_json)
    elif args.server and images:
        if not args.prompt or args.token_ids or args.server_api != "openai":
            raise FormatError("--server with --image needs --prompt (the images and the text go in one chat turn of "
                              "the OpenAI API)")
        raw = io.query_server_chat(args.server, args.prompt, [io.image_data_url(f) for f in args.image], thresholds.top_k,
                                   args.server_model)
        eng = io.read_engine_json(raw, _lookup(ckpt), None, where=args.server)
    elif args.server:
        if token_ids is None:
            raise FormatError("--server needs --token-ids or --prompt")
        raw = io.query_server(args.server, token_ids, thresholds.top_k, args.server_api, args.server_model)
        eng = io.read_engine_json(raw, _lookup(ckpt), token_ids, where=args.server)
    if eng is not None:
        token_ids = eng.token_ids
    eng_logits = io.read_logits(args.engine_logits) if args.engine_logits else None
    dumps, ignored = (io.read_dumps(args.engine_dumps, ckpt.config.text.num_hidden_layers)
                      if args.engine_dumps else (None, []))
    if fit:
        from ref.profile_fit import fit_profiles
        return fit_profiles(ckpt, token_ids, eng, eng_logits, dumps, names=args.fit_profiles, precision=args.precision,
                            backend=args.backend, overrides=threshold_overrides(args), lint=not args.no_lint,
                            lint_block_scales=args.lint_block_scales, ignored_dumps=ignored)
    return crosscheck(ckpt, token_ids, eng, eng_logits, dumps, backend=args.backend, modes=modes,
                      thresholds=thresholds, lint=not args.no_lint, lint_block_scales=args.lint_block_scales,
                      ignored_dumps=ignored, images=images)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    rep = run(args)
    fit = "profiles" in rep
    if args.plot:
        plot_report(rep["best_report"] if fit else rep, args.plot)
    if args.json:
        atomic_write(args.json, lambda f: json.dump(jsonable(rep), f, indent=1), binary=False)
    print(format_fit(rep) if fit else format_report(rep))
    return 0 if rep["verdict"]["ok"] else 1



def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
