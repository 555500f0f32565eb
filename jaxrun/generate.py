"""python -m jaxrun.generate: text generation with the sharded JAX runner.

    python -m jaxrun.generate --prompt "Why is the sky blue?"            # built-in tiny synthetic model
    python -m jaxrun.generate --model DIR|REPO --prompt TEXT [--raw] [--max-new-tokens N]
        [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop TEXT ...] [--devices N]
        [--dense replicated|sharded] [--precision f32|bf16] [--activations w4a16|w4a4]
        [--act-scale per-expert|max] [--mtp | --speculative [K]] [--hide-thinking] [--json] [--check]
    python -m jaxrun.generate --token-ids 1,2,3 ...     |     --batch-file FILE (one prompt per line)

Without --model, a tiny random-weight checkpoint (ref.synth preset "tiny") is written once to
$XDG_CACHE_HOME/qwen35-nvfp4-spec/tiny (default ~/.cache/...) and used: no download needed; its
text is random but well-formed. Prompts go through the checkpoint's chat template unless --raw.
Text streams to stdout (one prompt) or is printed per prompt at the end (a batch); thinking (after
<think>, before </think>) is dimmed on a terminal, kept between its tags otherwise, or dropped with
--hide-thinking. stderr gets one summary line: prefill and decode tokens/s and compile time.
Compiled steps are kept in JAX's persistent compilation cache (--compile-cache), so a later run of
the same shapes loads them instead of compiling again.

--json: stdout holds only JSON lines, one object per prompt (the last line for a single prompt):
prompt_token_ids, token_ids (generated), text, finish_reason ("stop" | "length"), timings.

--activations w4a4 quantizes every routed-expert GEMM input as the engines' NVFP4 kernels do (the
CUDA quantizer, with each expert's input scales, or the layer's largest with --act-scale max);
the default w4a16 keeps activations in the compute dtype.

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

--check recomputes each produced sequence with ref.model (float64, the same --activations and
--act-scale; with --mtp also the MTP head's logits, under the same bound) and reports, per generated
token, max |Δ logit|, KL(ref || jaxrun) and top-1 agreement; exit status 1 when beyond the bound:
  f32:  max |Δ logit| <= 1e-3 * max(1, max |ref logit|), and top-1 equal unless the ref's top-2 gap
        is below 2 max |Δ| (a near tie);
  bf16: KL <= 0.02 on average over a sequence's tokens and <= 0.25 for every token (bf16 rounding
        can flip a near-tied expert choice, a discrete jump at one token), and the same top-1 rule.
Bad input (model path, prompt longer than the context, more devices than visible, invalid sampling
values, token ids outside the vocabulary) prints one line on stderr and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

F32_BOUND = 1e-3                             # max |Δ logit| / max(1, max |ref logit|)
BF16_MEAN_KL, BF16_MAX_KL = 0.02, 0.25       # KL(ref || jaxrun) per sequence (mean) and per token


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m jaxrun.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory or hub id (default: built-in tiny synthetic model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (chat template applied unless --raw)")
    src.add_argument("--token-ids", help="comma-separated prompt token ids (no template)")
    src.add_argument("--batch-file", help="file with one prompt per line, generated together")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-thinking", action="store_true", help="chat template with enable_thinking=False")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-context", type=int, help="cache length (default: prompt + new tokens, rounded up)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop text (repeatable); EOS ids always stop")
    p.add_argument("--devices", type=int, help="devices in the mesh (default: all visible)")
    p.add_argument("--dense", choices=("replicated", "sharded"), default="replicated",
                   help="dense weights replicated or tensor-parallel")
    p.add_argument("--precision", choices=("f32", "bf16"), help="default f32 on CPU, bf16 on GPU")
    p.add_argument("--activations", choices=("w4a16", "w4a4"), default="w4a16",
                   help="w4a4: quantize routed-expert GEMM inputs as the engines do")
    p.add_argument("--act-scale", choices=("per-expert", "max"), default="per-expert",
                   help="W4A4 input scale: each expert's own, or the layer's largest")
    p.add_argument("--mtp", action="store_true", help="run the MTP head and report its draft acceptance")
    p.add_argument("--speculative", nargs="?", const=1, type=int, metavar="K",
                   help="speculative decoding with K MTP drafts per step (default 1)")
    p.add_argument("--hide-thinking", action="store_true")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout instead of text")
    p.add_argument("--check", action="store_true", help="recompute with ref.model and compare logits")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile-cache", metavar="DIR|off",
                   help="where compiled steps are kept for later runs (default: $JAX_COMPILATION_CACHE_DIR, "
                        "else $XDG_CACHE_HOME/qwen35-nvfp4-spec/xla); off: compile every run")
    return p.parse_args(argv)


def validate(a) -> None:
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
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


def prompts_from(a, tok, vocab: int) -> list[list[int]]:
    if a.token_ids is not None:
        try:
            ids = [int(x) for x in a.token_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--token-ids: expected comma-separated integers, got {a.token_ids!r}") from None
        batch = [ids]
    else:
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
            texts = [tok.apply_chat_template([{"role": "user", "content": t}], enable_thinking=not a.no_thinking)
                     for t in texts]
        batch = [tok.encode(t) for t in texts]
    for ids in batch:
        if not ids:
            raise UsageError("empty prompt")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(f"token id {bad[0]} outside the vocabulary 0..{vocab - 1}")
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


def _compare(a, b, precision: str) -> tuple[float, float, bool]:
    """ref logits a [V] (float64) vs jaxrun's b [V] -> (max |Δ|, KL(ref || jaxrun), within the
    precision's per-token bound)."""
    import numpy as np
    from ref.divergence import kl_full, log_softmax
    d = float(np.abs(a - b).max())
    kl = kl_full(log_softmax(a), log_softmax(b))
    bound = d <= F32_BOUND * max(1.0, float(np.abs(a).max())) if precision == "f32" else kl <= BF16_MAX_KL
    return d, kl, bound


def check(ckpt, results, precision: str, activations: str = "w4a16", act_scale: str = "per-expert") -> bool:
    """Recompute each sequence with ref.model (float64, the same activation mode; the MTP head's drafts
    too when kept); per-token report on stderr; True if within bounds."""
    import numpy as np
    from ref.model import Model
    ref = Model(ckpt, "f64", activations=activations, act_scale=act_scale)
    ok = True
    for n, r in enumerate(results):
        kls = []
        full = ref.logits(r.prompt_token_ids + r.token_ids[:-1])
        rl = full[len(r.prompt_token_ids) - 1:]                          # [steps, V], predicts token_ids
        for i, jl in enumerate(r.logits):
            a, b = rl[i], np.asarray(jl, np.float64)
            d, kl, bound = _compare(a, b, precision)
            top = np.sort(a)[-2:]
            agree = int(np.argmax(a)) == int(np.argmax(b))
            near_tie = top[1] - top[0] < 2 * d
            kls.append(kl)
            good = bound and (agree or near_tie)
            ok &= good
            print(f"check [{n}] step {i}: max|dlogit| {d:.3e}  KL {kl:.3e}  top1 {'agree' if agree else 'DIFFER'}"
                  f"{'' if good else '  <-- beyond bound'}", file=sys.stderr)
        if precision == "bf16" and kls and np.mean(kls) > BF16_MEAN_KL:
            ok = False
            print(f"check [{n}]: mean KL {np.mean(kls):.3e} > {BF16_MEAN_KL}  <-- beyond bound", file=sys.stderr)
        if r.mtp_logits:                                                 # ref row t drafts token t + 2
            want = ref.mtp_logits(r.prompt_token_ids + r.token_ids)[len(r.prompt_token_ids) - 1:]
            for i, (a, b) in enumerate(zip(want, r.mtp_logits)):
                d, kl, good = _compare(a, np.asarray(b, np.float64), precision)
                ok &= good
                print(f"check [{n}] mtp draft {i}: max|dlogit| {d:.3e}  KL {kl:.3e}"
                      f"{'' if good else '  <-- beyond bound'}", file=sys.stderr)
    print(f"check: {'PASS' if ok else 'FAIL'} ({precision} {activations} vs ref f64)", file=sys.stderr)
    return ok


def speculative_summary(stats: dict) -> str:
    rates = " ".join(f"{r:.2f}" for r in stats["acceptance_per_position"])
    length = stats["mean_acceptance_length"]
    return (f" | speculative: {stats['drafts_accepted']} of {stats['drafts_proposed']} drafts accepted"
            + (f" (per position {rates}; mean acceptance length {length:.2f})" if stats["steps"] else ""))


def run(a) -> int:
    if a.devices and a.devices > 1 and "jax" not in sys.modules:  # fake CPU devices; no effect on GPUs
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={a.devices}").strip()
    import jax
    from ref.errors import CheckpointError, ConfigError
    from ref.synth import cached_checkpoint, user_cache
    from ref.tokenizer import load_tokenizer
    from jaxrun.load import load
    from jaxrun.runner import Runner, speculative_stats
    from jaxrun.sampling import Sampling
    from jaxrun.sharding import make_mesh

    if a.compile_cache != "off":                  # compiles of 1 s or more are kept (JAX's default threshold)
        cache = a.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(user_cache("xla"))
        jax.config.update("jax_compilation_cache_dir", cache)
    precision = a.precision or ("f32" if jax.default_backend() == "cpu" else "bf16")
    try:
        mesh = make_mesh(a.devices)
        model = a.model or cached_checkpoint("tiny")
        ckpt, params = load(str(model), mesh, precision, a.dense, progress=not a.quiet)
        tok = load_tokenizer(ckpt.directory)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    cfg = ckpt.config.text
    prompts = prompts_from(a, tok, cfg.vocab_size)
    try:
        runner = Runner(params, cfg, mesh, precision, a.dense, a.activations, a.act_scale)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if (a.mtp or a.speculative) and "mtp" not in params:
        flag = "--speculative" if a.speculative else "--mtp"
        raise UsageError(f"{flag}: {ckpt.directory} has no MTP head (mtp.fc.weight)")
    K = a.speculative or 0
    ctx = min(a.max_context or runner.context_for(prompts, a.max_new_tokens, K), cfg.max_position_embeddings)
    if runner.positions_needed(prompts, a.max_new_tokens, K) > ctx:
        raise UsageError(f"prompt of {max(map(len, prompts))} tokens + {a.max_new_tokens} new tokens"
                         + (f" + {2 * K} for {K} speculative drafts" if K else "") + f" exceeds the context of {ctx}")
    texts = [tok.decode(p) for p in prompts]
    stream = len(prompts) == 1 and not a.json
    displays = [Display(t, a.hide_thinking, sys.stdout.isatty()) for t in texts]
    stopped = [False] * len(prompts)
    stop_ids = tuple(cfg.eos_token_ids) + tuple(tok.eos_token_ids)

    def text_of(ids):  # generated text without a final stop token, cut at the first stop text
        return trim_stop(tok.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids), a.stop)

    def on_step(results, done):
        for b, r in enumerate(results):
            stopped[b] = stopped[b] or text_of(r.token_ids)[1]
        if stream:
            print(displays[0].update(text_of(results[0].token_ids)[0]), end="", flush=True)
        return stopped

    results = runner.generate(prompts, a.max_new_tokens, Sampling(a.temperature, a.top_p, a.top_k, a.seed),
                              stop_ids=stop_ids, max_context=ctx, keep_logits=a.check, on_step=on_step, mtp=a.mtp,
                              speculative=a.speculative or 0)
    t = runner.timings
    for b, r in enumerate(results):
        text, hit = text_of(r.token_ids)
        finish = "stop" if hit or (r.token_ids and r.token_ids[-1] in stop_ids) else "length"
        if a.json:
            obj = {"prompt_token_ids": r.prompt_token_ids, "token_ids": r.token_ids, "text": text,
                   "finish_reason": finish, "timings": t.as_dict()}
            if a.mtp and not a.speculative:
                obj.update(mtp_draft_ids=r.mtp_draft_ids, mtp_accepted=list(r.mtp_accepted()))
            if a.speculative:
                obj["speculative"] = speculative_stats([r])
            print(json.dumps(obj), flush=True)
        elif stream:
            print(displays[0].update(text, final=True), flush=True)
        else:
            print(f"[{b}] {displays[b].render(text, final=True)}", flush=True)
    rate = lambda n, s: f"{n / s:.1f}" if s > 0 else "n/a"
    print(f"prefill {t.prefill_tokens} tok {rate(t.prefill_tokens, t.prefill_s)} tok/s | decode {t.decode_tokens} "
          f"tok {rate(t.decode_tokens, t.decode_s)} tok/s | compile {t.compile_s:.1f} s | {mesh.size} "
          f"{mesh.devices.flat[0].platform} device(s), {precision}, {a.activations}, dense {a.dense}"
          + (" | mtp drafts accepted %d/%d" % tuple(map(sum, zip(*(r.mtp_accepted() for r in results))))
             if a.mtp and not a.speculative else "")
          + (speculative_summary(speculative_stats(results)) if a.speculative else ""),
          file=sys.stderr)
    if a.check and not check(ckpt, results, precision, a.activations, a.act_scale):
        return 1
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        validate(a)
        return run(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
