"""ref.parallel and the threads of the reference (spec/model.md §7): every piece runs once, errors
come back, pieces really run side by side, and the logits do not depend on the number of worker
threads (identical bits) or of OpenBLAS threads (within the f64 bound)."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ref import parallel
from ref import weights as W
from ref.checkpoint import open_checkpoint
from ref.model import Model

ROOT = Path(__file__).resolve().parent.parent
OPENBLAS_THREADS_REL = 1e-12  # spec/model.md §7: other BLAS thread counts, other summation orders


def test_for_each_runs_every_piece_once_on_the_worker_threads(monkeypatch):
    monkeypatch.setenv(parallel.ENV, "2")
    seen, threads = [], set()
    lock = threading.Lock()
    both = threading.Barrier(2, timeout=20)  # only passes if two pieces run at the same time

    def piece(i):
        if i < 2:
            both.wait()
        with lock:
            seen.append(i)
            threads.add(threading.get_ident())

    parallel.for_each(50, piece)
    assert sorted(seen) == list(range(50)) and len(threads) == 2 and threading.get_ident() in threads


def test_for_each_reraises_and_nested_calls_stay_on_their_thread(monkeypatch):
    monkeypatch.setenv(parallel.ENV, "2")

    def fails(i):
        if i == 7:
            raise KeyError(i)

    with pytest.raises(KeyError):
        parallel.for_each(20, fails)
    inner = []

    def outer(i):
        me = threading.get_ident()
        parallel.for_each(5, lambda j: inner.append((i, j, threading.get_ident() == me)))

    parallel.for_each(4, outer)
    assert sorted((i, j) for i, j, _ in inner) == [(i, j) for i in range(4) for j in range(5)]
    assert all(same for *_, same in inner)


def test_worker_count_from_the_environment(monkeypatch):
    monkeypatch.setenv(parallel.ENV, "3")
    assert parallel.workers() == 3
    monkeypatch.delenv(parallel.ENV)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert parallel.workers() == 1  # BLAS may use threads of its own: ours would oversubscribe
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert parallel.workers() >= 1
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv(parallel.ENV, bad)
        with pytest.raises(ValueError, match=parallel.ENV):
            parallel.workers()


@pytest.mark.parametrize("precision", ["f64", "f32"])
def test_logits_do_not_depend_on_the_number_of_worker_threads(tiny_checkpoint, monkeypatch, precision):
    ckpt = open_checkpoint(tiny_checkpoint)
    monkeypatch.setattr(W, "ROW_BLOCK_BYTES", 8 * 64 * 3)  # several blocks in every linear (hidden 64)
    ids = np.random.default_rng(4).integers(0, 512, 70).tolist()
    results = {}
    for n in ("1", "2"):
        monkeypatch.setenv(parallel.ENV, n)
        model = Model(ckpt, precision=precision)
        logits, cache = model.prefill(ids)
        last, _ = model.decode(ids[0], cache)
        results[n] = (logits, last)
    for a, b in zip(results["1"], results["2"]):
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


SCRIPT = """
import json, sys
import numpy as np
from ref.model import Model
model = Model(sys.argv[1])
ids = np.random.default_rng(5).integers(0, 512, 80).tolist()
logits, cache = model.prefill(ids)
last, _ = model.decode(ids[1], cache)
np.save(sys.argv[2], np.concatenate([logits, last[None]]))
from ref import parallel
print(json.dumps({"workers": parallel.workers()}))
"""


def test_logits_within_the_f64_bound_for_one_and_two_openblas_threads(tiny_checkpoint, tmp_path):
    """One OpenBLAS thread (the reference's own workers on every CPU) against two (workers 1)."""
    out = {}
    for n in ("1", "2"):
        env = {k: v for k, v in os.environ.items() if k not in (parallel.ENV, "OMP_NUM_THREADS")}
        env["OPENBLAS_NUM_THREADS"] = n
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_checkpoint), str(tmp_path / f"{n}.npy")],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out[n] = (np.load(tmp_path / f"{n}.npy"), json.loads(r.stdout.splitlines()[-1])["workers"])
    assert out["2"][1] == 1
    a, b = out["1"][0], out["2"][0]
    assert np.linalg.norm(a - b) <= OPENBLAS_THREADS_REL * np.linalg.norm(b)
