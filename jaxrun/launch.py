"""python -m jaxrun.launch: a run of several processes on this machine, as on several hosts.

    python -m jaxrun.launch -n 2 --devices-per-process 2 -- jaxrun.generate --prompt "Hi" --json
    python -m jaxrun.launch -n 2 -- jaxrun.serve --port 8000
    python -m jaxrun.launch -n 2 -- ref.crosscheck --backend jax --model DIR --engine-json out.json
    python -m jaxrun.launch -n 2 -- python my_script.py ...

Starts N processes of the command (a module name such as jaxrun.generate runs as `python -m`; a
.py file with this Python; anything else as given), each told its place in the run through the
environment (JAXRUN_COORDINATOR on a free local port, JAXRUN_NUM_PROCESSES, JAXRUN_PROCESS_ID: what
--coordinator, --num-processes and --process-id give on real hosts) and given D devices: on CPU, D
simulated devices (XLA_FLAGS); on GPUs, GPUs D*i .. D*i+D-1 (JAX_LOCAL_DEVICE_IDS).

Process 0's output is shown as it comes; the others' only when one of them fails (its last lines).
The exit status is process 0's (or, when process 0 succeeded and another did not, that one's). When
a process fails, the others get --grace seconds to end on their own, then are ended. Ctrl-C (or
SIGTERM) goes to process 0 (a server stops gracefully, telling the others); a second one ends every
process at once.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ref.cli import ArgumentParser, HelpFormatter, UsageError, run_main
from ref.distributed_args import ENV

PROG = "jaxrun.launch"
GRACE = 20.0   # seconds the others get to end on their own once one process has ended badly
TAIL = 15      # lines shown of a failed process's output


def parse_args(argv):
    p = ArgumentParser(prog=f"python -m {PROG}", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("-n", "--num-processes", type=int, required=True, metavar="N", help="processes to start")
    p.add_argument("--devices-per-process", type=int, default=1, metavar="D",
                   help="devices each process holds (default 1)")
    p.add_argument("--grace", type=float, default=GRACE, metavar="SECONDS",
                   help=f"how long the others may take to end after one failed (default {GRACE:g})")
    p.add_argument("command", nargs="+", help="the command after --, e.g. jaxrun.generate --prompt Hi")
    a = p.parse_args(argv)
    if a.num_processes < 1:
        raise UsageError(f"-n must be >= 1, got {a.num_processes}")
    if a.devices_per_process < 1:
        raise UsageError(f"--devices-per-process must be >= 1, got {a.devices_per_process}")
    if not a.grace >= 0:
        raise UsageError(f"--grace must be >= 0, got {a.grace}")
    return a


def command_line(command: list[str]) -> list[str]:
    """A module name -> python -m; a .py file -> python FILE; else as given."""
    head = command[0]
    if head.endswith(".py"):
        return [sys.executable, *command]
    if "/" not in head and "." in head and head.split(".")[0] in ("jaxrun", "ref", "bench"):
        return [sys.executable, "-m", *command]
    return list(command)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(i: int, n: int, port: int, devices: int, base=None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update({ENV["coordinator"]: f"127.0.0.1:{port}", ENV["num_processes"]: str(n), ENV["process_id"]: str(i),
                "JAX_LOCAL_DEVICE_IDS": ",".join(str(devices * i + d) for d in range(devices))})
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


class Launch:
    """The N processes of one run."""

    def __init__(self, command: list[str], n: int, devices: int, grace: float):
        self.grace = grace
        port = free_port()
        self.logs = [None] + [tempfile.TemporaryFile(mode="w+b") for _ in range(n - 1)]
        self.procs = [subprocess.Popen(command, env=environment(i, n, port, devices), start_new_session=True,
                                       stdout=None if i == 0 else self.logs[i], stderr=subprocess.STDOUT if i else None)
                      for i in range(n)]
        self.interrupted = 0

    def interrupt(self, signum, _frame) -> None:
        self.interrupted += 1
        if self.interrupted == 1 and self.procs[0].poll() is None:
            self.procs[0].send_signal(signum)
        else:
            self.end_all(signal.SIGKILL)

    def wait(self) -> int:
        """Until every process has ended (ending the rest once one fails or process 0 ends)."""
        deadline = None
        while any(p.poll() is None for p in self.procs):
            failed = any(p.returncode not in (None, 0) for p in self.procs)
            if deadline is None and (failed or self.procs[0].returncode is not None):
                deadline = time.monotonic() + self.grace
            if deadline is not None and time.monotonic() > deadline:
                self.end_all(signal.SIGTERM)
                time.sleep(2)
                self.end_all(signal.SIGKILL)
            time.sleep(0.05)
        self.report()
        codes = [_status(p.returncode) for p in self.procs]
        return codes[0] or next((c for c in codes if c), 0)

    def end_all(self, sig) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def report(self) -> None:
        """The tail of each other process that failed (not after an interrupt)."""
        if self.interrupted:
            return
        for i, (p, log) in enumerate(zip(self.procs, self.logs)):
            if i == 0 or p.returncode == 0:
                continue
            log.seek(0)
            lines = [ln for ln in log.read().decode(errors="replace").splitlines() if not ln.startswith("[Gloo]")]
            print(f"{PROG}: process {i} ended with {_describe(p.returncode)}"
                  + ("; its last lines:" if lines else " (no output)"), file=sys.stderr)
            for ln in lines[-TAIL:]:
                print(f"  [{i}] {ln}", file=sys.stderr)
        sys.stderr.flush()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def run(a) -> int:
    launch = Launch(command_line(a.command), a.num_processes, a.devices_per_process, a.grace)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, launch.interrupt)
    try:
        return launch.wait()
    finally:
        launch.end_all(signal.SIGKILL)


def main(argv=None) -> int:
    return run_main(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
