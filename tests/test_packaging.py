"""ref installs and runs without JAX: its declared dependencies hold no JAX, and its command-line tools
run in a process where importing jax fails."""
import re
import subprocess
import sys
from importlib.metadata import requires

import pytest

NO_JAX = "import sys, runpy; sys.modules['jax'] = None; sys.argv = [{module!r}] + {args!r}; " \
         "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"


def test_core_dependencies_hold_no_jax():
    core = [r for r in requires("qwen35-nvfp4-spec") if "extra ==" not in r]
    assert core and not [r for r in core if re.match(r"jax\b", r)]
    assert any(re.match(r"jax\b", r) and 'extra == "jax"' in r for r in requires("qwen35-nvfp4-spec"))


@pytest.mark.parametrize("module, args", [
    ("ref.run", ["--token-ids", "5,17,300", "--max-new-tokens", "2"]),
    ("ref.checkpoint", ["check"]),
])
def test_ref_tools_run_without_jax(tiny_checkpoint, tmp_path, module, args):
    args = ["--model", str(tiny_checkpoint), *args] if module == "ref.run" else [*args, str(tiny_checkpoint)]
    code = NO_JAX.format(module=module, args=args)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_crosscheck_runs_without_jax(tiny_checkpoint, tmp_path):
    import numpy as np
    np.save(tmp_path / "l.npy", np.zeros((3, 512), np.float32))
    args = ["--model", str(tiny_checkpoint), "--engine-logits", str(tmp_path / "l.npy"), "--token-ids", "1,2,3",
            "--no-lint"]
    r = subprocess.run([sys.executable, "-c", NO_JAX.format(module="ref.crosscheck", args=args)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1 and "DIVERGES" in r.stdout, r.stderr[-2000:]   # zero logits are not the model's
    r = subprocess.run([sys.executable, "-c", NO_JAX.format(module="ref.crosscheck", args=args + ["--backend", "jax",
                                                                                               "--precision", "f32"])],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("ref.crosscheck: error: --backend jax: unavailable"), r.stderr
