"""Regressions of jaxrun found in use, each run in the shape that triggered it, and the watchdog that
ends a wedged run.

Sharded prefill deadlock (issue 16): on CPU, chunked_delta_rule solved its unit-triangular systems
with jaxlib's batched LAPACK kernel, which (jaxlib 0.10) splits a batch of more than ~2e5 FLOP into
tasks on XLA's intra-op thread pool and blocks its own pool thread until they are done. With several
simulated devices on a pool of 2 threads, every pool thread ended up blocked in such a solve (or in
the psum waiting for a device stuck in one) and prefill never finished. The tiny preset hangs with a
prompt of 65..128 tokens: two DeltaNet chunks of 64, 4 value heads, head dim 16 -> a solve of 8
matrices, 5.2e5 FLOP, split in two tasks. The CLI runs in a subprocess pinned to 2 CPUs (XLA sizes
its pool from the affinity), as on the machine where it hung.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrun.generate import main
from jaxrun.layers import chunked_delta_rule, unit_lower_solve
from jaxrun.watchdog import EXIT_STALLED
from ref.model import Model

ROOT = Path(__file__).parents[1]
PROMPT = [(i * 37) % 400 + 5 for i in range(100)]      # bucket 128: two DeltaNet chunks
STEPS = 3
HANG_TIMEOUT = 300                                       # backstop; the watchdog ends a hang after STEP_TIMEOUT
STEP_TIMEOUT = 60

PINNED = ("import os, runpy, sys\n"
          "if hasattr(os, 'sched_setaffinity'):\n"
          "    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])\n"
          "runpy.run_module('jaxrun.generate', run_name='__main__')\n")


def _generate(args, timeout=HANG_TIMEOUT):
    """python -m jaxrun.generate ARGS on CPU, at most 2 CPUs -> CompletedProcess; a timeout fails the test."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    try:
        return subprocess.run([sys.executable, "-c", PINNED, *args], capture_output=True, text=True, timeout=timeout,
                             env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as e:                # its stderr comes back as bytes
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"jaxrun.generate {' '.join(args[:4])} ... did not finish in {timeout} s (a hang):\n{err[-2000:]}")


def _forward_substitution(a, b):
    """(I + a) x = b by explicit loops in float64, a strictly lower triangular [c, c], b [c, d]."""
    x = np.array(b, np.float64)
    for r in range(a.shape[0]):
        for j in range(r):
            x[r] -= a[r, j] * x[j]
    return x


@pytest.mark.parametrize("lead,c,d", [((), 1, 3), ((), 5, 2), ((2, 3), 16, 8), ((1,), 64, 16)])
def test_unit_lower_solve_equals_float64_forward_substitution(lead, c, d):
    rng = np.random.default_rng(c * 100 + d)
    a = np.tril(rng.uniform(-0.5, 0.5, lead + (c, c)), -1).astype(np.float32)
    b = rng.standard_normal(lead + (c, d)).astype(np.float32)
    got = np.asarray(unit_lower_solve(jnp.asarray(a), jnp.asarray(b)))
    want = np.stack([_forward_substitution(ai, bi) for ai, bi in zip(a.reshape(-1, c, c), b.reshape(-1, c, d))])
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_chunked_delta_rule_on_cpu_runs_no_kernel_outside_xla():
    """No LAPACK (nor any other custom call) that could wait on the thread pool it runs on."""
    B, T, H, dk, dv = 1, 128, 4, 16, 16
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((B, T, H, dk), f32), jax.ShapeDtypeStruct((B, T, H, dk), f32),
            jax.ShapeDtypeStruct((B, T, H, dv), f32), jax.ShapeDtypeStruct((B, T, H), f32),
            jax.ShapeDtypeStruct((B, T, H), f32), jax.ShapeDtypeStruct((B, H, dk, dv), f32))
    hlo = jax.jit(chunked_delta_rule, static_argnums=6).lower(*args, 64).compile().as_text()
    assert "custom_call_target=" not in hlo


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Shared by the CLI runs of this module: the later ones load what the first compiled."""
    return str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(scope="module")
def ref_tokens(tiny_checkpoint):
    return Model(str(tiny_checkpoint), "f64").generate(PROMPT, STEPS)


@pytest.mark.parametrize("devices", [2, 4])
def test_sharded_prefill_of_two_chunks_finishes_with_the_reference_tokens(tiny_checkpoint, compile_cache,
                                                                          ref_tokens, devices):
    out = _generate(["--model", str(tiny_checkpoint), "--devices", str(devices), "--token-ids",
                     ",".join(map(str, PROMPT)), "--max-new-tokens", str(STEPS), "--json", "--quiet",
                     "--compile-cache", compile_cache, "--step-timeout", str(STEP_TIMEOUT)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["token_ids"] == ref_tokens


def _python(code, timeout=60):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_watchdog_ends_a_stalled_phase_with_one_line_naming_it():
    t0 = time.monotonic()
    out = _python("import time\nfrom jaxrun.watchdog import Watchdog\n"
                  "w = Watchdog(0.3, hint=' (--step-timeout)')\nw.phase('the stalled phase')\ntime.sleep(50)\n")
    assert out.returncode == EXIT_STALLED
    assert time.monotonic() - t0 < 40
    (line,) = out.stderr.splitlines()
    assert line.startswith("jaxrun: error: no progress for 0.3 s (--step-timeout) while waiting for the stalled "
                           "phase;")
    assert out.stdout == ""


def test_watchdog_unarmed_progressing_or_stopped_does_not_fire():
    out = _python("import time\nfrom jaxrun.watchdog import Watchdog\n"
                  "w = Watchdog(1.0)\ntime.sleep(1.3)\n"                      # unarmed: no phase yet
                  "for i in range(6):\n    w.phase(f'phase {i}')\n    time.sleep(0.2)\n"
                  "w.stop()\ntime.sleep(1.3)\nprint('alive')\n")
    assert (out.returncode, out.stdout, out.stderr) == (0, "alive\n", "")


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_step_timeout_must_be_a_number_of_seconds(value, capsys):
    assert main(["--token-ids", "1", "--step-timeout", value]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"jaxrun.generate: error: --step-timeout must be a number of seconds >= 0 (0 = off), got {float(value)}"]


def test_a_step_over_the_step_timeout_ends_the_run_naming_the_step(tiny_checkpoint, compile_cache):
    """A normal run (the 2-device one above) with an artificially tiny --step-timeout: every step
    takes longer than 1 ms."""
    out = _generate(["--model", str(tiny_checkpoint), "--devices", "2", "--token-ids", ",".join(map(str, PROMPT)),
                     "--max-new-tokens", str(STEPS), "--json", "--quiet", "--compile-cache", compile_cache,
                     "--step-timeout", "0.001"])
    assert out.returncode == EXIT_STALLED, out.stderr[-2000:]
    (line,) = out.stderr.splitlines()
    assert line.startswith("jaxrun.generate: error: no progress for 0.001 s (--step-timeout) while waiting for ")
    assert "(compiled 'prefill', 'first') on 2 cpu device(s)" in line or "(compiled 'decode') on 2" in line
    assert out.stdout == ""


def test_the_lapack_form_of_the_chunk_solve_gives_the_same_values():
    """Options.triangular_solve "lapack" (accelerators) and "substitution" (CPU) solve the same systems."""
    from jaxrun.layers import _unit_lower_lapack
    rng = np.random.default_rng(3)
    B, T, H, dk, dv = 1, 128, 2, 8, 8
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, dk)) * 0.3, jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, dv)), jnp.float32)
    beta, g = jnp.asarray(rng.uniform(0, 1, (B, T, H)), jnp.float32), jnp.asarray(-rng.uniform(0, 1, (B, T, H)), jnp.float32)
    s0 = jnp.zeros((B, H, dk, dv), jnp.float32)
    o1, s1 = chunked_delta_rule(q, k, v, beta, g, s0, 64, unit_lower_solve)
    o2, s2 = chunked_delta_rule(q, k, v, beta, g, s0, 64, _unit_lower_lapack)
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o2), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-4, atol=1e-5)
