"""Ctrl-C ends every CLI cleanly: one line, exit status 130, no output file, no crash, also while JAX
compiles (a native call that Python's own signal handling waits for)."""
import signal
import subprocess
import sys
import time

import pytest


def _interrupt_when(cmd, ready: str, cwd, timeout: float = 240):
    """Start cmd, send SIGINT once `ready` appears on its stderr; -> (exit status, stderr)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd)
    seen, deadline = "", time.monotonic() + timeout
    while ready not in seen:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"{cmd[2]} ended ({proc.returncode}) before {ready!r}: {seen[-2000:]}")
        seen += line
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{cmd[2]}: no {ready!r} within {timeout} s")
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{cmd[2]} did not end within 60 s of SIGINT")
    return proc.returncode, rest


def test_generate_interrupted_while_compiling(tiny_checkpoint, tmp_path):
    code, err = _interrupt_when([sys.executable, "-m", "jaxrun.generate", "--model", str(tiny_checkpoint),
                                 "--token-ids", "1,2,3", "--compile-cache", "off"], "compiling prefill", tmp_path)
    assert code == 130 and err.strip().endswith("jaxrun.generate: interrupted") and "Traceback" not in err


def test_ref_run_interrupted_writes_no_file(tiny_checkpoint, tmp_path):
    out = tmp_path / "l.npy"
    code, err = _interrupt_when([sys.executable, "-m", "ref.run", "--model", str(tiny_checkpoint), "--token-ids",
                                 "1,2,3", "--max-new-tokens", "400", "--logits-out", str(out), "--verbose"],
                                "layer 2/4", tmp_path)
    assert code == 130 and err.strip().splitlines()[-1] == "ref.run: interrupted" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []                                # no output, no temporary file
