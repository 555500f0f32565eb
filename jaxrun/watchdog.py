"""A watchdog for the generation loop: when a step makes no progress for too long, the process ends
with one line on stderr saying what it waited for, instead of waiting forever in silence.

A thread blocked inside XLA (a computation that never finishes, e.g. a deadlock in the runtime)
cannot be interrupted from Python, so the watchdog is a daemon thread that writes the message and
ends the whole process with os._exit.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STALLED = 3


class Watchdog:
    """phase(what) marks progress: the clock restarts and `what` names what the caller waits for
    next. If no phase follows within `timeout` seconds, the process exits with status EXIT_STALLED.
    Unarmed until the first phase (so compiling before it is not timed); stop() disarms it."""

    def __init__(self, timeout: float, hint: str = "", stream=None, prog: str = "jaxrun", status: int = EXIT_STALLED,
                 why: str | None = None):
        """hint: text after the timeout in the message, e.g. the flag that sets it; prog: the message's
        prefix (the command, as ref.cli's one-line errors have it); status: the exit status; why: the
        message's end (default: that a computation stuck inside XLA cannot be interrupted)."""
        if not 0 < timeout < float("inf"):
            raise ValueError(f"watchdog timeout must be a positive number of seconds, got {timeout}")
        self.timeout, self.hint, self.prog, self.status = timeout, hint, prog, status
        self.why = why or (f"a computation stuck inside XLA cannot be interrupted, so the run ends here with exit "
                           f"status {status}")
        self._stream = stream or sys.stderr
        self._what: str | None = None
        self._since = 0.0
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="jaxrun-watchdog", daemon=True)
        self._thread.start()

    def phase(self, what: str) -> None:
        with self._cond:
            self._what, self._since = what, time.monotonic()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _watch(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._what is None:
                    self._cond.wait()
                    continue
                left = self._since + self.timeout - time.monotonic()
                if left <= 0:
                    self._expire(self._what)
                self._cond.wait(left)

    def _expire(self, what: str) -> None:
        self._stream.write(f"{self.prog}: error: no progress for {self.timeout:g} s{self.hint} while waiting for {what}; "
                           f"{self.why}\n")
        self._stream.flush()
        os._exit(self.status)
