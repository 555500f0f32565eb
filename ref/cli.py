"""What every command-line tool of the project does alike.

- Errors: bad input raises `UsageError` (or any ValueError / OSError from the libraries); `run_main`
  prints one line `<prog>: error: <message>` on stderr and returns 2. An interrupt (Ctrl-C, SIGTERM)
  prints `<prog>: interrupted` and exits 130 at once, wherever the program is (also inside a long
  native call such as an XLA compile), after removing the temporary file of any output being written.
- Token ids: integers separated by commas and/or whitespace, or @FILE holding them; an empty entry
  ("1,,2") or an empty list is refused; ids outside the vocabulary are refused.
- Images (`--image FILE`, repeatable): preprocessed with the checkpoint's settings, each image's
  image-pad run expanded (`prompt_images`); any problem is one line.
- Output files: written whole to a temporary file beside the target and renamed into place, with the
  usual permissions (umask), so a failed or interrupted run never leaves a partial file.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

_writing: set[str] = set()  # temporary files of outputs being written (removed on interrupt)
_on_interrupt: list = []    # an action replacing the exit on the first interrupt (e.g. a server's graceful stop)


class UsageError(ValueError):
    """Bad input to a command-line tool: reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (one line through run_main, not a usage block)."""

    def error(self, message):
        raise UsageError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (examples keep their layout)."""


def parse_token_ids(text: str, flag: str = "--token-ids") -> list[int]:
    """'1,2,3', '1 2 3' or '@ids.txt' -> [1, 2, 3]."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{flag} {text}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    parts = re.split(r"\s*,\s*|\s+", text.strip())
    if parts == [""]:
        raise UsageError(f"{flag}: no token ids")
    if "" in parts:
        raise UsageError(f"{flag}: empty entry in {text.strip()[:60]!r}")
    try:
        return [int(x) for x in parts]
    except ValueError:
        raise UsageError(f"{flag}: expected integers separated by commas or spaces, got {text.strip()[:60]!r}") \
            from None


def check_token_ids(ids: list[int], vocab_size: int, where: str = "token id") -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"{where} {bad[0]} is outside the vocabulary [0, {vocab_size})")


def prompt_images(ckpt, ids: list[int], files) -> tuple[list[int], list]:
    """The images of `--image FILE ...` for prompt `ids` -> (ids with each image's pads expanded, the
    preprocessed images). Without images, a prompt holding image pads is refused (fewer images than
    placeholders). Errors (ValueError: unreadable image, no vision tower, counts) are one line each."""
    image_token = ckpt.config.special_tokens.get("image_token_id")
    if not files:
        if image_token is not None and image_token in ids:
            raise UsageError(f"the prompt has image placeholders ({image_token}) but no --image was given")
        return ids, []
    from ref.vision_model import image_prompt
    return image_prompt(ckpt, ids, list(files))


def check_output_path(path: str | Path | None, suffix: str | None = None) -> None:
    """Refuse an output path before any work: wrong suffix, or a directory that is missing or read-only."""
    if path is None:
        return
    path = Path(path)
    if suffix and path.suffix != suffix:
        raise UsageError(f"{path}: expected a {suffix} file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{path}: directory {parent} does not exist or is not writable")


def atomic_write(path: str | Path, write: Callable, binary: bool = True) -> None:
    """write(file) into a temporary file in the target's directory, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
    _writing.add(tmp)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        _writing.discard(tmp)


def error_line(e: BaseException) -> str:
    """The first line of an exception's message (OSError: 'file: reason')."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def exit_on_interrupt(prog: str) -> None:
    """SIGINT and SIGTERM end the process at once with one line and status 130, from a thread of their
    own, so that they work while the main thread is inside native code (an XLA compile ignores
    Python's handlers until it returns, and unwinding through JAX's threads can crash). Call it before
    any other thread starts: threads inherit the blocked signals."""
    signals = {signal.SIGINT, signal.SIGTERM}
    if any(t.name == "interrupt" for t in threading.enumerate()):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    def wait():
        signal.sigwait(signals)
        if _on_interrupt:                       # the first interrupt asks; a second one ends the process
            _on_interrupt.pop()()
            signal.sigwait(signals)
        for tmp in list(_writing):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    threading.Thread(target=wait, name="interrupt", daemon=True).start()


def on_interrupt(action: Callable[[], None]) -> bool:
    """Run `action` on the first SIGINT / SIGTERM instead of exiting (a second one still exits 130);
    False when exit_on_interrupt is not in force (the caller then handles signals itself)."""
    if not any(t.name == "interrupt" for t in threading.enumerate()):
        return False
    _on_interrupt[:] = [action]
    return True


def run_main(prog: str, main: Callable[[], int | None]) -> int:
    """main() with the project's error contract: its status (None = 0), or one line and 2 on bad input.
    (A module run as a program also calls exit_on_interrupt first.)"""
    try:
        return main() or 0
    except (ValueError, OSError) as e:  # UsageError, ConfigError, CheckpointError, FormatError, ImageError...
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 2
