"""jaxrun over several processes on one CPU machine (gloo collectives, subprocesses with timeouts):
2 processes x 2 devices give the tokens and logits of 1 process x 4 devices (tests/jax_multiprocess.py
in both layouts of the experts, greedy and seeded, plain and speculative, dense replicated and
tensor-parallel); each process reads only its share of the checkpoint; jaxrun.launch end to end
(generate, serve with the openai client, crosscheck); every failure ends every process with one line
and a non-zero status within seconds: no coordinator, processes started differently, a process
killed mid-run."""
import ast
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import urllib.request

import numpy as np
import pytest

from jaxrun.launch import free_port

ROOT = Path(__file__).parents[1]
PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 1, 3], [64, 2, 11, 400]]
STEPS, CONTEXT = 6, 64
LONG_PROMPT, LONG_STEPS = "9,8,7", 700      # greedy: 700 tokens before a stop id on the tiny model
LOGIT_TOL = 1e-5                            # |Δ logit| / max |logit|: the order of the cross-device sums
SCRIPT = Path(__file__).with_name("jax_multiprocess.py")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXRUN_") and k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _launch(*command, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "jaxrun.launch", "-n", "2", "--devices-per-process", "2", "--",
                           *map(str, command)], capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT, **kw)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


def _no_gloo(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("[Gloo]"))


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tiny_checkpoint_fused):
    """(1 process x 4 devices, 2 processes x 2 devices) results of tests/jax_multiprocess.py."""
    args = [str(a) for a in (tiny_checkpoint, tiny_checkpoint_fused, json.dumps(PROMPTS), STEPS, CONTEXT)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": ROOT}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *args], **pipes,       # both at once: compiling is
                              env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")),   # one core each
             subprocess.Popen([sys.executable, "-m", "jaxrun.launch", "-n", "2", "--devices-per-process", "2", "--",
                               str(SCRIPT), *args], **pipes, env=_env())]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, _no_gloo(err)[-3000:]
            outs.append(json.loads(out.splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return tuple(outs)


def test_two_processes_give_the_tokens_and_logits_of_one(runs):
    one, two = runs
    assert (one["processes"], one["mesh"]) == (1, {"expert": 4})
    assert (two["processes"], two["mesh"]) == (2, {"host": 2, "expert": 2})
    assert [r["name"] for r in one["runs"]] == [r["name"] for r in two["runs"]]
    for a, b in zip(one["runs"], two["runs"]):
        assert a["tokens"] == b["tokens"], a["name"]
        for la, lb in zip(a["logits"], b["logits"]):
            la, lb = np.array(la), np.array(lb)
            assert la.shape == lb.shape == (STEPS, la.shape[1])
            assert np.abs(la - lb).max() <= LOGIT_TOL * np.abs(la).max(), a["name"]
    assert two["broadcast"] == [{"a": 1}, True] and two["gathered"] == [10, 3010]
    by_name = {r["name"]: r["tokens"] for r in one["runs"]}
    assert by_name["greedy"] == by_name["greedy speculative"] == by_name["fused greedy"]   # independent checks
    assert by_name["seeded"] != by_name["greedy"]


def test_only_the_routed_experts_psum_crosses_processes(runs, tiny_checkpoint):
    """In every compiled function of both dense layouts, what crosses processes is the routed
    experts' psum, an all-reduce over all 4 devices of f32 rows of the hidden size, once per MoE layer
    run (a decode step: the 4 decoder layers; a speculative step also runs the MTP layer once per
    draft): the tensor-parallel collectives stay within a process."""
    from ref.checkpoint import open_checkpoint
    cfg = open_checkpoint(tiny_checkpoint).config.text
    one, two = runs
    assert one["cross_process"] == {k: [] for k in one["cross_process"]}       # one process: nothing crosses
    seen = set()
    for fn, crossing in two["cross_process"].items():
        for op, shape, devices in crossing:
            assert (op, devices) == ("all-reduce", 4) and shape.startswith("f32[") and \
                shape.split("]")[0].endswith(f",{cfg.hidden_size}"), (fn, op, shape)
        seen.add(fn.split()[1])
    steps = [(fn.split()[1], ast.literal_eval(fn.split(" ", 2)[2]), len(c)) for fn, c in two["cross_process"].items()]
    assert {n for name, _, n in steps if name == "decode"} == {cfg.num_hidden_layers}
    assert {(n, key[-1]) for name, key, n in steps if name == "verify"} == {(cfg.num_hidden_layers + 2, 2)}
    assert {"prefill", "first", "decode", "verify"} <= seen


def _stored_bytes(ckpt: Path) -> tuple[int, int]:
    """(dense (the vision tower's included), routed experts) bytes of the checkpoint's tensors, from
    the safetensors headers."""
    dense = experts = 0
    for path in ckpt.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            if ".mlp.experts." in name:
                experts += size
            else:
                dense += size
    return dense, experts


def test_each_process_reads_only_its_share(runs, tiny_checkpoint):
    """One process reads the dense weights once (not once per device) and every expert; each of two
    processes reads the dense weights and half of the experts. (The experts' input scales are read
    as two numbers where three are stored: a few bytes of slack.)"""
    dense, experts = _stored_bytes(Path(tiny_checkpoint))
    one, two = runs
    (alone,), shares = one["bytes_read"], two["bytes_read"]
    assert abs(alone - (dense + experts)) <= 0.01 * experts
    assert len(shares) == 2 and shares[0] == shares[1]
    assert abs(shares[0] - (dense + experts / 2)) <= 0.01 * experts / 2
    assert alone - shares[0] >= 0.49 * experts


def test_launch_generate_prints_process_0s_json_only(runs, tiny_checkpoint):
    out = _launch("jaxrun.generate", "--model", tiny_checkpoint, "--token-ids", ",".join(map(str, PROMPTS[0])),
                  "--max-new-tokens", STEPS, "--json", "--quiet")
    assert out.returncode == 0, _no_gloo(out.stderr)[-3000:]
    (line,) = out.stdout.splitlines()                                 # one prompt, one process printing
    obj = json.loads(line)
    assert obj["token_ids"] == runs[0]["runs"][0]["tokens"][0]
    assert obj["checkpoint_bytes_read"] == runs[1]["bytes_read"]
    summary = [ln for ln in out.stderr.splitlines() if ln.startswith("prefill ")]
    assert len(summary) == 1 and "4 cpu device(s) in 2 processes" in summary[0] and "(per process)" in summary[0]


def test_launch_crosscheck_backend_jax(tiny_checkpoint, tmp_path):
    from ref.model import Model
    ids = PROMPTS[0]
    np.save(tmp_path / "eng.npy", Model(str(tiny_checkpoint), "f64").logits(ids).astype(np.float32))
    report = tmp_path / "report.json"
    out = _launch("ref.crosscheck", "--backend", "jax", "--model", tiny_checkpoint, "--engine-logits",
                  tmp_path / "eng.npy", "--token-ids", ",".join(map(str, ids)), "--precision", "f32", "--no-lint",
                  "--json", report)
    assert out.returncode == 0 and "PASS" in out.stdout, out.stdout[-2000:] + _no_gloo(out.stderr)[-2000:]
    assert out.stdout.count("PASS") == 1 and json.loads(report.read_text())["verdict"]["ok"]


# ---- the server across processes ---------------------------------------------------------------------

def _children(pid: int) -> dict[int, int]:
    """{JAXRUN_PROCESS_ID: pid} of the processes a launcher started."""
    found = {}
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ids = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"JAXRUN_PROCESS_ID=")]
        if ids:
            found[int(ids[0])] = int(child)
    return found


def test_launch_serve_same_tokens_then_graceful_stop(runs, tiny_checkpoint):
    """A speculative server (2 MTP drafts per step) over 2 processes: the tokens of one process;
    SIGINT to the launcher reaches process 0, whose stop plan ends the others: every exit 0."""
    openai = pytest.importorskip("openai")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxrun.launch", "-n", "2", "--devices-per-process", "2", "--",
                             "jaxrun.serve", "--model", str(tiny_checkpoint), "--port", str(port),
                             "--max-running-requests", "2", "--max-context", "256", "--prefill-chunk", "16",
                             "--log-level", "warning", "--speculative", "2"],
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if _get(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
        want = {r["name"]: r["tokens"][0] for r in runs[0]["runs"]}
        for name, kw in (("greedy", {"temperature": 0}),              # speculative greedy == plain greedy
                         ("seeded speculative", {"temperature": 0.8, "top_p": 0.9, "seed": 7,
                                                 "extra_body": {"top_k": 50}})):
            extra = {"return_token_ids": True, "ignore_eos": True, **kw.pop("extra_body", {})}
            got = client.completions.create(model=str(tiny_checkpoint), prompt=PROMPTS[0], max_tokens=STEPS,
                                            extra_body=extra, **kw)
            assert got.choices[0].model_extra["token_ids"] == want[name], name
        proc.send_signal(signal.SIGINT)                   # to process 0: stop plan, every process exits 0
        assert proc.wait(60) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- failures ------------------------------------------------------------------------------------------

def _generate(i: int, port: int, *flags, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxrun.generate", "--coordinator", f"127.0.0.1:{port}",
                             "--num-processes", "2", "--process-id", str(i), "--devices", "4", *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, **kw)


def _finish(procs, timeout):
    outs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        outs.append((p.returncode, [ln for ln in err.splitlines() if ln.startswith("jaxrun.generate: error")]))
    return outs


def test_no_coordinator_ends_with_one_line():
    t0 = time.monotonic()
    ((code, errors),) = _finish([_generate(1, free_port(), "--token-ids", "1,2", "--init-timeout", "2")], 60)
    assert code == 4 and time.monotonic() - t0 < 30
    assert len(errors) == 1 and "--init-timeout" in errors[0] and "coordinator" in errors[0], errors


@pytest.mark.parametrize("difference", ["flags", "checkpoint"])
def test_processes_started_differently_end_at_start_up(tiny_checkpoint, tiny_checkpoint_fused, difference):
    port = free_port()
    common = ["--token-ids", "1,2", "--quiet"]
    second = (["--model", tiny_checkpoint, "--max-new-tokens", "9"] if difference == "flags"
              else ["--model", tiny_checkpoint_fused, "--max-new-tokens", "8"])
    outs = _finish([_generate(0, port, *common, "--model", tiny_checkpoint, "--max-new-tokens", "8"),
                    _generate(1, port, *common, *second)], 60)
    want = "--max-new-tokens (process 0: 8, process 1: 9)" if difference == "flags" else "checkpoint (process 0: "
    for code, errors in outs:
        assert code == 2 and len(errors) == 1 and "the processes were started differently" in errors[0], errors
        assert want in errors[0]


def test_a_process_killed_mid_run_ends_the_other(tiny_checkpoint):
    """The survivor's next collective fails (exit 4, our line), unless JAX's coordination service,
    which notices the lost connection too, ends it first (SIGABRT, JAX's line: another task died)."""
    port = free_port()
    flags = ["--model", tiny_checkpoint, "--token-ids", LONG_PROMPT, "--max-new-tokens", LONG_STEPS]
    leader, follower = _generate(0, port, *flags), _generate(1, port, *flags)
    try:
        seen = ""
        while "compiling decode ..." not in seen or not seen.endswith("s\n"):   # decode compiled: the run is on
            line = leader.stderr.readline()
            assert line, seen[-2000:]
            seen += line
        time.sleep(1)
        follower.kill()
        t0 = time.monotonic()
        _, err = leader.communicate(timeout=60)
        assert time.monotonic() - t0 < 20
        ours = [ln for ln in err.splitlines() if ln.startswith("jaxrun.generate: error")]
        if leader.returncode == 4:
            assert len(ours) == 1 and "lost another process of the run" in ours[0], err[-2000:]
        else:
            assert leader.returncode == -signal.SIGABRT and "another task died" in err, err[-2000:]
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()
