"""How the reference uses the machine's cores (spec/model.md §7).

Work that splits into independent pieces (the row blocks of a weight in ref.weights.StreamedWeight)
runs on `workers()` threads: the calling thread and a small pool. Each piece is the same
computation whatever the number of threads (the pieces depend only on the shapes, and each calls
single-threaded BLAS), so results do not depend on the thread count; NumPy and BLAS release the
GIL while they work, which is where the time goes.

`configure_blas()` is for programs, before NumPy is imported: one BLAS thread (the parallelism is
the pieces'). This module does not import NumPy.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

ENV = "REF_NUM_THREADS"  # worker threads; default: the CPUs this process may run on

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)
_pool_lock = threading.Lock()
_inside = threading.local()  # .active: this thread is running pieces of a for_each


def configure_blas() -> None:
    """OPENBLAS_NUM_THREADS=1 unless already set (call before NumPy is imported)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def workers() -> int:
    """Threads a for_each uses: $REF_NUM_THREADS; else, when BLAS is told to run one thread
    (OPENBLAS_NUM_THREADS or OMP_NUM_THREADS is 1, as configure_blas sets it), the CPUs this process
    may run on; else 1 (BLAS threads of its own beside ours would oversubscribe the cores)."""
    value = os.environ.get(ENV, "").strip()
    if value:
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{ENV} must be a positive integer, got {value!r}")
        return n
    if "1" not in (os.environ.get("OPENBLAS_NUM_THREADS", "").strip(), os.environ.get("OMP_NUM_THREADS", "").strip()):
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def for_each(n: int, piece: Callable[[int], None]) -> None:
    """piece(0), ..., piece(n-1), each exactly once, on up to workers() threads (the caller's among
    them), each thread taking the next index when it is free; returns when all are done and re-raises
    the first error. Inside a piece (a nested for_each) everything runs on the calling thread."""
    threads = min(n, workers())
    if threads <= 1 or getattr(_inside, "active", False):
        for i in range(n):
            piece(i)
        return
    indices = itertools.count()  # next() is atomic: every index goes to exactly one thread
    failed = threading.Event()

    def drain():
        _inside.active = True
        try:
            for i in indices:
                if i >= n or failed.is_set():
                    return
                try:
                    piece(i)
                except BaseException:
                    failed.set()
                    raise
        finally:
            _inside.active = False

    helpers = [_executor().submit(drain) for _ in range(threads - 1)]
    try:
        drain()
    finally:
        errors = [f.exception() for f in helpers]  # waits for every helper
    for e in errors:
        if e is not None:
            raise e


def _executor() -> ThreadPoolExecutor:
    """The helper threads (workers() - 1 of them, started when first needed)."""
    global _pool
    need = workers() - 1
    with _pool_lock:
        if _pool is None or _pool[0] < need:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (need, ThreadPoolExecutor(max_workers=need, thread_name_prefix="ref-worker"))
        return _pool[1]
