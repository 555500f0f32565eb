"""python -m ref.run: teacher-forced logits, layer dumps and greedy tokens from the NumPy reference.

Bad input (unreadable model, token ids outside the vocabulary, empty prompt, bad option) prints one
line on stderr and exits 2 without writing any output file. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before numpy loads OpenBLAS: one BLAS thread unless told otherwise (spec/model.md §7)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from ref.model import ACT_SCALES, ACTIVATIONS, Model  # noqa: E402


class BadInput(Exception):
    """Reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(message)


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m ref.run", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--token-ids", help="comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--prompt", help="text, encoded with the checkpoint's tokenizer")
    ap.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template (one user turn)")
    ap.add_argument("--logits-out", type=Path, help="write teacher-forced logits [T, vocab] to this .npy")
    ap.add_argument("--precision", choices=("f64", "f32", "bf16"), default="f64")
    ap.add_argument("--activations", choices=ACTIVATIONS, default="w4a16")
    ap.add_argument("--act-scale", choices=ACT_SCALES, default="per-expert")
    ap.add_argument("--dump-layers", type=Path, help="write per-layer tensors to this .safetensors")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="greedy continuation length")
    return ap


def _token_ids(args, ckpt) -> tuple[list[int], object]:
    tok = None
    if args.token_ids is not None:
        try:
            ids = [int(t) for t in args.token_ids.split(",")]
        except ValueError:
            raise BadInput(f"--token-ids: expected comma-separated integers, got {args.token_ids!r}") from None
    else:
        if not args.prompt:
            raise BadInput("--prompt is empty")
        tok = _tokenizer(ckpt)
        text = args.prompt
        if args.chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = list(tok.encode(text))
    if args.chat and args.token_ids is not None:
        raise BadInput("--chat needs --prompt")
    V = ckpt.config.text.vocab_size
    bad = [i for i in ids if not 0 <= i < V]
    if not ids or bad:
        raise BadInput(f"token id {bad[0]} is outside the vocabulary [0, {V})" if bad else "no token ids")
    return ids, tok


def _tokenizer(ckpt):
    from ref.tokenizer import load_tokenizer
    return load_tokenizer(ckpt.directory)


def _check_writable(path: Path | None, suffix: str) -> None:
    if path is None:
        return
    if path.suffix != suffix:
        raise BadInput(f"{path}: expected a {suffix} file name")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise BadInput(f"{path}: directory {path.parent} does not exist or is not writable")


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, renamed into place when complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args) -> None:
    from ref.checkpoint import open_checkpoint
    _check_writable(args.logits_out, ".npy")
    _check_writable(args.dump_layers, ".safetensors")
    if args.max_new_tokens < 0:
        raise BadInput(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    ckpt = open_checkpoint(args.model)
    ids, tok = _token_ids(args, ckpt)
    say = lambda msg: print(f"[ref.run] {msg}", file=sys.stderr, flush=True)
    model = Model(ckpt, precision=args.precision, activations=args.activations, act_scale=args.act_scale,
                  progress=say)
    say(f"{len(ids)} tokens, precision {args.precision}, activations {args.activations} ({args.act_scale})")
    t0 = time.perf_counter()
    dumps = {} if args.dump_layers else None
    logits, cache = model.prefill(ids, dumps=dumps)
    say(f"prefill done in {time.perf_counter() - t0:.1f}s")
    if args.max_new_tokens and tok is None:
        try:
            tok = _tokenizer(ckpt)
        except (ValueError, OSError) as e:
            say(f"no tokenizer, text not shown ({e})")
    stop_ids = tuple(ckpt.config.text.eos_token_ids) + (tok.eos_token_ids if tok else ())  # + generation_config
    new = model.continue_greedy(logits[-1], cache, args.max_new_tokens, stop_ids)
    if args.logits_out:
        _atomic_write(args.logits_out, lambda f: np.save(f, logits))
        say(f"wrote {args.logits_out} {logits.shape} {logits.dtype}")
    if args.dump_layers:
        from safetensors.numpy import save
        blob = save({k: np.ascontiguousarray(v) for k, v in dumps.items()})
        _atomic_write(args.dump_layers, lambda f: f.write(blob))
        say(f"wrote {args.dump_layers} ({len(dumps)} tensors)")
    if args.max_new_tokens:
        print("generated ids:", ",".join(map(str, new)))
        if tok is not None:
            print("generated text:", tok.decode(new))


def main(argv=None) -> int:
    try:
        run(_parser().parse_args(argv))
    except (BadInput, ValueError, OSError) as e:
        print(f"ref.run: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
