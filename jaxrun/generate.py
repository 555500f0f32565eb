"""python -m jaxrun.generate: text generation with the sharded JAX runner.

    python -m jaxrun.generate --prompt "Why is the sky blue?"            # built-in tiny synthetic model
    python -m jaxrun.generate --model DIR|REPO --prompt TEXT [--raw] [--max-new-tokens N]
        [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop TEXT ...] [--devices N]
        [--dense replicated|sharded] [--engine-profile NAME] [--precision f32|bf16] [--activations w4a16|w4a4]
        [--act-scale per-expert|max] [--kv-cache-dtype auto|fp8_e4m3|nvfp4] [--kv-engine vllm|sglang]
        [--kv-prefill cache|fresh] [--state-dtype float32|bfloat16] [--mtp | --speculative [K]]
        [--hide-thinking] [--json] [--check]
    python -m jaxrun.generate --list-profiles
    python -m jaxrun.generate --token-ids 1,2,3 ...     |     --batch-file FILE (one prompt per line)
    python -m jaxrun.generate --image ref/data/sample.png --prompt "Describe the image"

Without --model, a tiny random-weight checkpoint (ref.synth preset "tiny") is written once to
$XDG_CACHE_HOME/qwen35-nvfp4-spec/tiny (default ~/.cache/...) and used: no download needed; its
text is random but well-formed. Prompts go through the checkpoint's chat template unless --raw.
Text streams to stdout (one prompt) or is printed per prompt at the end (a batch); thinking (after
<think>, before </think>) is dimmed on a terminal, kept between its tags otherwise, or dropped with
--hide-thinking. stderr gets one summary line: prefill and decode tokens/s and compile time.
Compiled steps are kept in JAX's persistent compilation cache (--compile-cache), so a later run of
the same shapes loads them instead of compiling again.

--image FILE (repeatable, in the order of the images in the prompt): an image prompt. Through the chat
template each image is a content part before the text (<|vision_start|><|image_pad|><|vision_end|>);
with --raw or --token-ids the prompt holds the image pads itself, one per image (expanded to the
image's merged-token count) or already that many. prompt_token_ids in --json are the expanded ids.

--json: stdout holds only JSON lines, one object per prompt (the last line for a single prompt):
prompt_token_ids, token_ids (generated), text, finish_reason ("stop" | "length"), timings. A
checkpoint without a tokenizer takes --token-ids and gives ids (text empty).

--activations w4a4 quantizes every routed-expert GEMM input as the engines' NVFP4 kernels do (the
CUDA quantizer, with each expert's input scales, or the layer's largest with --act-scale max);
the default w4a16 keeps activations in the compute dtype.

--engine-profile NAME runs the modes an engine configuration runs (ref.profiles; --list-profiles
prints them): its precision, activations and act-scale rule, KV-cache dtype and store rule, the K/V a
prefill attends to and the DeltaNet state dtype; the mode flags given override its fields. The KV cache
is then held on the device in its stored form (FP8 codes, or packed NVFP4 codes and block scales).

--mtp runs the checkpoint's MTP head beside the model: its greedy draft of each next token, and how
many drafts the model's own choice then matched (the acceptance a speculative decoder would see),
go to the summary line and to --json (mtp_draft_ids, mtp_accepted); no step is skipped.
--speculative [K] uses those drafts, K per step (default 1; the head chained on its own drafts as the
engines do): each step runs the last token and the drafts through the model together and keeps
drafts while the model agrees (greedy), or each with the probability the model's sampling
distribution gives it (drawing the token from the rest at the first refusal), so a step can emit up
to K + 1 tokens. The text is that of plain greedy decoding, or distributed as plain sampling's. The
summary line and --json (speculative) report the figures engines log: drafts accepted of proposed,
the acceptance rate per draft position, and the mean acceptance length (tokens per step).

--check recomputes each produced sequence with ref.model (float64, the same modes; with --mtp also
the MTP head's logits) and reports, per generated token, max |Δ logit|,
KL(ref || jaxrun) and top-1 agreement; exit status 1 when beyond the bounds of jaxrun.check.

--step-timeout S (default 600, 0 = off): once compiled, a step (the prefill, one decode or
speculative step) that has not finished after S seconds ends the run with one line on stderr naming
the step and its compiled function, exit status 3: a computation stuck inside XLA cannot be
interrupted, so a wedged run says so instead of waiting forever.

More than one host (README "More than one host"): one process per host, each started with
--coordinator HOST:PORT --num-processes N --process-id I (or --distributed auto under SLURM, Open
MPI...; or `python -m jaxrun.launch -n N -- jaxrun.generate ...` on one machine). The mesh spans every
device of every process; each process reads only its share of the checkpoint (--json:
checkpoint_bytes_read, per process; the summary line too); the processes compare a fingerprint of
their flags, checkpoint and code before loading; only process 0 prints.

Bad input (model path, prompt longer than the context, more devices than visible, invalid sampling
values, token ids outside the vocabulary, an image that cannot be read or used, more or fewer images
than the prompt's placeholders, images for a checkpoint without a vision tower) prints one line on
stderr and exits 2; an interrupt prints one line and exits 130.
"""
from __future__ import annotations

if __name__ == "__main__":  # before any library starts a thread: threads inherit the blocked signals
    from ref.cli import exit_on_interrupt
    exit_on_interrupt("jaxrun.generate")

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from ref.cli import ArgumentParser, HelpFormatter, UsageError, check_token_ids, parse_token_ids, \
    prompt_images, run_main
from ref.distributed_args import add_distributed_arguments
from ref.image_prompt import user_message
from ref.modes import DENSE_LAYOUTS, JAX_PRECISIONS, add_mode_arguments, modes_from_args

PROG = "jaxrun.generate"
STEP_TIMEOUT = 600.0  # seconds a compiled step may take before the watchdog ends the run


def parse_args(argv):
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="checkpoint directory or hub id (default: built-in tiny synthetic model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (chat template applied unless --raw)")
    src.add_argument("--token-ids", help="prompt token ids, comma- or space-separated, or @FILE (no template)")
    src.add_argument("--batch-file", help="file with one prompt per line, generated together")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image of the prompt (repeatable, in prompt order)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-thinking", action="store_true", help="chat template with enable_thinking=False")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate per prompt; the prompt and these must fit the model's context "
                        "(default 64; 0: none)")
    p.add_argument("--max-context", type=int, help="cache length (default: prompt + new tokens, rounded up)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches P, in (0, 1] (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K likeliest tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=[], help="stop text (repeatable); EOS ids always stop")
    p.add_argument("--devices", type=int, help="devices in the mesh: 1, 2, 4 or 8, dividing the number of experts "
                   "(default: all visible; on CPU, that many simulated devices)")
    p.add_argument("--dense", choices=DENSE_LAYOUTS, default="replicated",
                   help="dense weights replicated on every device or tensor-parallel (default replicated)")
    add_mode_arguments(p, JAX_PRECISIONS, default_precision=None)
    p.add_argument("--mtp", action="store_true", help="run the MTP head and report its draft acceptance")
    p.add_argument("--speculative", nargs="?", const=1, type=int, metavar="K",
                   help="speculative decoding with K MTP drafts per step (default 1)")
    p.add_argument("--hide-thinking", action="store_true", help="drop the text between <think> and </think>")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout instead of text")
    p.add_argument("--check", action="store_true", help="recompute with ref.model and compare logits")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--step-timeout", type=float, default=STEP_TIMEOUT, metavar="SECONDS",
                   help="end the run (exit status 3) when a compiled step makes no progress for this long; "
                        f"0 = wait forever (default {STEP_TIMEOUT:g})")
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="where compiled steps are kept for later runs (default: $JAX_COMPILATION_CACHE_DIR, "
                        "else $XDG_CACHE_HOME/qwen35-nvfp4-spec/xla); off: compile every run")
    add_distributed_arguments(p)
    return p.parse_args(argv)


def validate(a) -> None:
    """The flags alone (nothing read yet)."""
    if a.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {a.max_new_tokens}")
    if a.prompt == "":
        raise UsageError("--prompt is empty")
    if not (a.temperature >= 0 and a.temperature < float("inf")):
        raise UsageError(f"--temperature must be >= 0, got {a.temperature}")
    if a.speculative is not None and a.speculative < 1:
        raise UsageError(f"--speculative K must be >= 1, got {a.speculative}")
    if not 0 < a.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {a.top_k}")
    if a.devices is not None and a.devices not in (1, 2, 4, 8):
        raise UsageError(f"--devices must be 1, 2, 4 or 8, got {a.devices}")
    if a.max_context is not None and a.max_context < 2:
        raise UsageError(f"--max-context must be >= 2, got {a.max_context}")
    if not 0 <= a.step_timeout < float("inf"):
        raise UsageError(f"--step-timeout must be a number of seconds >= 0 (0 = off), got {a.step_timeout}")
    if a.image and a.batch_file is not None:
        raise UsageError("--image goes with one prompt (--prompt or --token-ids), not --batch-file")


def prompts_from(a, tok, vocab: int) -> list[list[int]]:
    """The prompts' token ids (chat template applied unless --raw, with --image's content parts); tok
    may be None with --token-ids. Image pads are expanded later (ref.cli.prompt_images)."""
    if a.token_ids is not None:
        batch = [parse_token_ids(a.token_ids)]
    else:
        if tok is None:
            raise UsageError("a text prompt needs the checkpoint's tokenizer (tokenizer.json); give --token-ids")
        if a.batch_file is not None:
            try:
                texts = [line.rstrip("\n") for line in Path(a.batch_file).read_text().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--batch-file {a.batch_file}: {e}") from None
            if not texts:
                raise UsageError(f"--batch-file {a.batch_file}: no prompts")
        else:
            texts = [a.prompt if a.prompt is not None else "Why is the sky blue?"]
        if not a.raw:
            texts = [tok.apply_chat_template([user_message(t, len(a.image))], enable_thinking=not a.no_thinking)
                     for t in texts]
        batch = [tok.encode(t) for t in texts]
    for ids in batch:
        if not ids:
            raise UsageError("empty prompt")
        check_token_ids(ids, vocab)
    return batch


class Display:
    """Generated ids -> display text: thinking dimmed (terminal), tagged (otherwise) or hidden;
    only complete characters and tags are released, so the output is prefix-stable for streaming."""
    OPEN, CLOSE = "<think>", "</think>"
    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, prompt_text: str, hide: bool, tty: bool):
        self.hide, self.tty = hide, tty
        self.thinking0 = prompt_text.rfind(self.OPEN) > prompt_text.rfind(self.CLOSE)
        self.shown = ""

    def render(self, text: str, final: bool = False) -> str:
        if not final:
            text = text.rstrip("\ufffd")
            for tag in (self.OPEN, self.CLOSE):
                for k in range(len(tag) - 1, 0, -1):
                    if text.endswith(tag[:k]):
                        text = text[:-k]
                        break
        out, thinking, i = [], self.thinking0, 0
        if thinking:
            out.append(self._start())
        while i < len(text):
            tag = self.CLOSE if thinking else self.OPEN
            j = text.find(tag, i)
            seg = text[i:] if j < 0 else text[i:j]
            out.append("" if thinking and self.hide else seg)
            if j < 0:
                break
            thinking = not thinking
            out.append(self._start() if thinking else self._end())
            i = j + len(tag)
        if final and thinking:
            out.append(self._end())
        return "".join(out)

    def _start(self):
        return "" if self.hide else (self.DIM if self.tty else self.OPEN)

    def _end(self):
        return "" if self.hide else (self.RESET if self.tty else self.CLOSE)

    def update(self, text: str, final=False) -> str:
        """The new display text since the last call."""
        full = self.render(text, final)
        new = full[len(self.shown):] if full.startswith(self.shown) else ""
        self.shown = full if full.startswith(self.shown) else self.shown
        return new


def trim_stop(text: str, stops) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def speculative_summary(stats: dict) -> str:
    rates = " ".join(f"{r:.2f}" for r in stats["acceptance_per_position"])
    length = stats["mean_acceptance_length"]
    return (f" | speculative: {stats['drafts_accepted']} of {stats['drafts_proposed']} drafts accepted"
            + (f" (per position {rates}; mean acceptance length {length:.2f})" if stats["steps"] else ""))


def note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def compile_progress(name: str, done) -> None:
    """'compiling prefill ... 3.1 s' (or '... from the compile cache, 0.4 s') on stderr, one line each."""
    if done is None:
        print(f"{PROG}: compiling {name} ...", end="", file=sys.stderr, flush=True)
    else:
        seconds, cached = done
        print(f" {'from the compile cache, ' if cached else ''}{seconds:.1f} s", file=sys.stderr, flush=True)


def _context(a, ckpt, prompts) -> int:
    """The cache length, checked against what the run needs (before any weight is read)."""
    from jaxrun.runner import Runner
    cfg, K = ckpt.config.text, a.speculative or 0
    ctx = min(a.max_context or Runner.context_for(prompts, a.max_new_tokens, K), cfg.max_position_embeddings)
    if Runner.positions_needed(prompts, a.max_new_tokens, K) > ctx:
        raise UsageError(f"prompt of {max(map(len, prompts))} tokens + {a.max_new_tokens} new tokens"
                         + (f" + {2 * K} for {K} speculative drafts" if K else "") + f" exceeds the context of {ctx}")
    return ctx


def _check_checkpoint(a, ckpt, modes) -> None:
    """What the flags need of the checkpoint, read from its index (before any weight is read)."""
    if (a.mtp or a.speculative) and not ckpt.has("mtp.fc.weight"):
        flag = "--speculative" if a.speculative else "--mtp"
        raise UsageError(f"{flag}: {ckpt.directory} has no MTP head (mtp.fc.weight)")
    if modes.activations == "w4a4" and ckpt.expert_input_scales(0) is None:
        raise UsageError("--activations w4a4: the checkpoint's routed experts are not NVFP4 with input scales")


def _tokenizer(ckpt, needed: bool):
    """The checkpoint's tokenizer; None when it has none and the prompt is token ids."""
    from ref.errors import CheckpointError
    from ref.tokenizer import load_tokenizer
    try:
        return load_tokenizer(ckpt.directory)
    except CheckpointError:
        if needed:
            raise
        return None


def run(a) -> int:
    validate(a)
    from jaxrun.distributed import run_in_cluster
    return run_in_cluster(a, PROG, _run)


class _Setup(NamedTuple):
    """What every process agrees on before loading."""
    ckpt: object
    tok: object
    prompts: list[list[int]]
    images: list
    context: int
    mesh: object


def _setup(a, cluster, modes) -> _Setup:
    """Checkpoint, tokenizer, prompts, images, context and mesh, checked alike on every process."""
    from jaxrun.distributed import fingerprint
    from jaxrun.sharding import check_experts, make_mesh
    from ref.checkpoint import open_checkpoint
    from ref.synth import cached_checkpoint

    def prepare():
        ckpt = open_checkpoint(a.model or cached_checkpoint("tiny"))
        tok = _tokenizer(ckpt, needed=a.token_ids is None)
        prompts = prompts_from(a, tok, ckpt.config.text.vocab_size)
        prompts[0], images = prompt_images(ckpt, prompts[0], a.image)     # --image goes with one prompt
        _check_checkpoint(a, ckpt, modes)
        ctx = _context(a, ckpt, prompts)
        mesh = make_mesh(a.devices)
        check_experts(ckpt.config.text.num_experts, mesh.size)
        return _Setup(ckpt, tok, prompts, images, ctx, mesh)

    return cluster.agree(prepare, lambda r: fingerprint(a, r.ckpt, prompts=r.prompts, context=r.context,
                                                        modes=asdict(modes)))


class _Output:
    """The generated text of each prompt: streamed (one prompt), or printed at the end (text or JSON);
    only process 0 prints."""

    def __init__(self, a, tok, prompts, stop_ids, leader: bool):
        self.a, self.tok, self.stop_ids = a, tok, stop_ids
        self.stream = len(prompts) == 1 and not a.json and leader
        self.displays = [Display(tok.decode(p) if tok else "", a.hide_thinking, sys.stdout.isatty()) for p in prompts]
        self.stopped = [False] * len(prompts)

    def text_of(self, ids) -> tuple[str, bool]:
        """The generated text without a final stop token, cut at the first stop text; whether one was hit."""
        if self.tok is None:
            return "", False
        return trim_stop(self.tok.decode(ids[:-1] if ids and ids[-1] in self.stop_ids else ids), self.a.stop)

    def on_step(self, results, done) -> list[bool]:
        """The runner's per-step hook: streams, and says which sequences met a stop text."""
        texts = [self.text_of(r.token_ids) for r in results]
        for b, (_, hit) in enumerate(texts):
            self.stopped[b] = self.stopped[b] or hit
        if self.stream:
            print(self.displays[0].update(texts[0][0]), end="", flush=True)
        return self.stopped

    def final(self, results, timings, bytes_read) -> None:
        from jaxrun.runner import speculative_stats
        a = self.a
        for b, r in enumerate(results):
            text, hit = self.text_of(r.token_ids)
            if a.json:
                finish = "stop" if hit or (r.token_ids and r.token_ids[-1] in self.stop_ids) else "length"
                obj = {"prompt_token_ids": r.prompt_token_ids, "token_ids": r.token_ids, "text": text,
                       "finish_reason": finish, "timings": timings.as_dict(), "checkpoint_bytes_read": bytes_read}
                if a.mtp and not a.speculative:
                    obj.update(mtp_draft_ids=r.mtp_draft_ids, mtp_accepted=list(r.mtp_accepted()))
                if a.speculative:
                    obj["speculative"] = speculative_stats([r])
                print(json.dumps(obj), flush=True)
            elif self.stream:
                print(self.displays[0].update(text, final=True), flush=True)
            else:
                print(f"[{b}] {self.displays[b].render(text, final=True)}", flush=True)


def _summary(a, results, t, where: str, modes, bytes_read) -> str:
    """The closing stderr line: rates, compile time, devices, modes, bytes read, MTP / speculative stats."""
    from jaxrun.load import bytes_summary
    from jaxrun.runner import speculative_stats
    rate = lambda n, s: f"{n / s:.1f}" if s > 0 else "n/a"  # noqa: E731
    line = (f"prefill {t.prefill_tokens} tok {rate(t.prefill_tokens, t.prefill_s)} tok/s | decode {t.decode_tokens} "
            f"tok {rate(t.decode_tokens, t.decode_s)} tok/s | compile {t.compile_s:.1f} s | {where}, "
            f"{modes.describe()}, dense {a.dense} | read {bytes_summary(bytes_read)}")
    if a.mtp and not a.speculative:
        line += " | mtp drafts accepted %d/%d" % tuple(map(sum, zip(*(r.mtp_accepted() for r in results))))
    if a.speculative:
        line += speculative_summary(speculative_stats(results))
    return line


def _run(a, cluster) -> int:
    import jax
    from jaxrun.check import check
    from jaxrun.load import BytesRead, load
    from jaxrun.options import default_precision
    from jaxrun.runner import Runner
    from jaxrun.sampling import Sampling
    from jaxrun.watchdog import Watchdog
    from ref.synth import user_cache

    if a.compile_cache != "off":                  # compiles of 1 s or more are kept (JAX's default threshold)
        cache = a.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(user_cache("xla"))
        jax.config.update("jax_compilation_cache_dir", cache)
    modes = modes_from_args(a, default_precision())
    ckpt, tok, prompts, images, ctx, mesh = _setup(a, cluster, modes)
    quiet = a.quiet or not cluster.leader
    if not a.model and not quiet:
        note("the built-in tiny model has random weights: its text is noise (give --model for a real one)")
    count = BytesRead()
    ckpt, params = load(str(ckpt.directory), mesh, modes.precision, a.dense, progress=not quiet, count=count)
    runner = Runner(params, ckpt.config, mesh, **asdict(modes))
    if not quiet:
        runner.on_compile = compile_progress
    cfg = ckpt.config.text
    out = _Output(a, tok, prompts, tuple(cfg.eos_token_ids) + (tuple(tok.eos_token_ids) if tok else ()),
                  cluster.leader)
    watchdog = Watchdog(a.step_timeout, " (--step-timeout)", prog=PROG) if a.step_timeout else None
    compiled = []

    def progress(what):  # once compiled: the processes wait for each other, so that timings start together
        if not compiled:
            compiled.append(cluster.sync("compiled"))
        if watchdog:
            watchdog.phase(what)

    try:
        results = runner.generate(prompts, a.max_new_tokens, Sampling(a.temperature, a.top_p, a.top_k, a.seed),
                                  stop_ids=out.stop_ids, max_context=ctx, keep_logits=a.check, on_step=out.on_step,
                                  mtp=a.mtp, speculative=a.speculative or 0, images=[images] if images else None,
                                  progress=progress)
    finally:
        if watchdog:
            watchdog.stop()
    bytes_read = cluster.gather(count.total)                      # per process
    cluster.finish()
    if not cluster.leader:
        return 0
    out.final(results, runner.timings, bytes_read)
    print(_summary(a, results, runner.timings, cluster.where(mesh), modes, bytes_read), file=sys.stderr)
    if a.check and not check(ckpt, results, modes, images=[images] * len(results) if images else None):
        return 1
    return 0


def main(argv=None) -> int:
    return run_main(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
