"""python -m ref.run: teacher-forced logits, layer dumps and greedy tokens from the NumPy reference.

Image prompts: `--image FILE` (repeatable), in the order of the images in the prompt. With --chat
each image becomes an image content part before the text (the template writes
<|vision_start|><|image_pad|><|vision_end|>); a raw --prompt or --token-ids holds the image pads
itself, one pad per image (expanded here) or already the image's merged-token count.

Bad input (unreadable model, token ids outside the vocabulary, empty prompt, bad option, an image
that cannot be read or used, more or fewer images than the prompt's placeholders, images for a
checkpoint without a vision tower) prints one line on stderr and exits 2 without writing any output
file; an interrupt prints one line and exits 130. Progress goes to stderr: a bar over the layers run
(--verbose: a line per layer, --quiet: none).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

if __name__ == "__main__":  # before numpy loads OpenBLAS: one BLAS thread unless told otherwise (spec/model.md §7),
    from ref.parallel import configure_blas  # and before any library starts a thread: threads inherit
    configure_blas()                         # the blocked signals
    from ref.cli import exit_on_interrupt
    exit_on_interrupt("ref.run")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ref.cli import ArgumentParser, UsageError, atomic_write, check_output_path, check_token_ids, \
    parse_token_ids, prompt_images, run_main  # noqa: E402
from ref.image_prompt import user_message  # noqa: E402
from ref.model import Model  # noqa: E402
from ref.modes import add_mode_arguments, modes_from_args  # noqa: E402

PROG = "ref.run"


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--token-ids", help="token ids, comma- or space-separated, or @FILE")
    src.add_argument("--prompt", help="text, encoded with the checkpoint's tokenizer")
    ap.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template (one user turn)")
    ap.add_argument("--image", action="append", default=[], metavar="FILE",
                    help="an image of the prompt (repeatable, in prompt order)")
    ap.add_argument("--logits-out", type=Path, help="write teacher-forced logits [T, vocab] to this .npy")
    add_mode_arguments(ap)
    ap.add_argument("--dump-layers", type=Path, help="write per-layer tensors to this .safetensors")
    ap.add_argument("--max-new-tokens", type=int, default=0,
                    help="tokens to generate greedily; the prompt and these must fit the model's context (default 0: "
                         "none, logits only)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--verbose", action="store_true", help="a line per layer with its time, instead of a bar")
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def _token_ids(args, ckpt) -> tuple[list[int], object, list]:
    """-> (prompt ids, pads expanded; the tokenizer or None; the preprocessed images)."""
    tok = None
    if args.chat and args.token_ids is not None:
        raise UsageError("--chat needs --prompt")
    if args.token_ids is not None:
        ids = parse_token_ids(args.token_ids)
    else:
        if not args.prompt:
            raise UsageError("--prompt is empty")
        tok = _tokenizer(ckpt)
        text = args.prompt
        if args.chat:
            text = tok.apply_chat_template([user_message(text, len(args.image))], add_generation_prompt=True)
        ids = list(tok.encode(text))
    check_token_ids(ids, ckpt.config.text.vocab_size)
    ids, images = prompt_images(ckpt, ids, args.image)
    return ids, tok, images


def _tokenizer(ckpt):
    from ref.tokenizer import load_tokenizer
    return load_tokenizer(ckpt.directory)


def run(args) -> None:
    from ref.checkpoint import open_checkpoint
    check_output_path(args.logits_out, ".npy")
    check_output_path(args.dump_layers, ".safetensors")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    modes = modes_from_args(args)
    ckpt = open_checkpoint(args.model)
    ids, tok, images = _token_ids(args, ckpt)
    limit = ckpt.config.text.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise UsageError(f"prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens exceeds the model's context "
                         f"of {limit} positions")
    say = lambda msg: None if args.quiet else tqdm.write(f"[ref.run] {msg}", file=sys.stderr)
    L = ckpt.config.text.num_hidden_layers
    bar = tqdm(total=L * max(1, args.max_new_tokens), unit="layer", desc="ref.run", file=sys.stderr,
               disable=args.quiet or args.verbose)      # the prefill, then a step per token after the first
    progress = say if args.verbose else lambda msg: bar.update()
    model = Model(ckpt, **asdict(modes), progress=progress)
    say(f"{len(ids)} tokens" + (f" ({len(images)} image(s))" if images else "") + f", {modes.describe()}")
    t0 = time.perf_counter()
    dumps = {} if args.dump_layers else None
    logits, cache = model.prefill(ids, dumps=dumps, images=images)
    say(f"prefill done in {time.perf_counter() - t0:.1f}s")
    if args.max_new_tokens and tok is None:
        try:
            tok = _tokenizer(ckpt)
        except (ValueError, OSError) as e:
            say(f"no tokenizer, text not shown ({e})")
    stop_ids = tuple(ckpt.config.text.eos_token_ids) + (tok.eos_token_ids if tok else ())  # + generation_config
    new = model.continue_greedy(logits[-1], cache, args.max_new_tokens, stop_ids)
    bar.close()
    if args.logits_out:
        atomic_write(args.logits_out, lambda f: np.save(f, logits))
        say(f"wrote {args.logits_out} {logits.shape} {logits.dtype}")
    if args.dump_layers:
        from safetensors.numpy import save
        blob = save({k: np.ascontiguousarray(v) for k, v in dumps.items()})
        atomic_write(args.dump_layers, lambda f: f.write(blob))
        say(f"wrote {args.dump_layers} ({len(dumps)} tensors)")
    if args.max_new_tokens:
        print("generated ids:", ",".join(map(str, new)))
        if tok is not None:
            print("generated text:", tok.decode(new))


def main(argv=None) -> int:
    return run_main(PROG, lambda: run(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
