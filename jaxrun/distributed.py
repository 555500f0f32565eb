"""jaxrun over several processes (one per host): JAX's multi-controller runtime (jax.distributed), one
global mesh (jaxrun.sharding.make_mesh), each process reading only its own shards (jaxrun.load).

`Cluster.start(settings, prog)` connects the processes (the gloo collectives on CPU, so that a run
of several processes works on one machine) and returns the view every CLI uses:
- `agree(prepare, describe)`: every process prepares its run (opens the checkpoint, reads prompts...),
  then all exchange either a fingerprint of what they will run (flags, checkpoint, code, devices) or
  the error that stopped them; any error or disagreement ends every process with the same one line;
- `gather` / `broadcast`: small JSON values between processes (the server's turn plans);
- `guard()`: in a multi-process run, any failure prints one line and ends the process at once (exit
  2 bad input, 4 another process lost, 1 otherwise), without waiting on the others at exit;
- `finish()`: the processes leave the runtime together once the collective work is done.
Only process 0 prints results: followers' stdout goes to /dev/null, and so does native code's stdout
(gloo's connection lines).

How failures end every process within bounded time: a coordinator that cannot be reached (or a
process that never starts) -> a watchdog around the connection (--init-timeout); a process that
dies -> the next collective of the others fails at once (the TCP connection closes) and they exit
4; a process that stops answering -> JAX's heartbeat (--heartbeat-timeout) ends the others.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ref.cli import UsageError, error_line
from ref.distributed_args import ENV, HEARTBEAT_TIMEOUT, INIT_TIMEOUT

EXIT_USAGE, EXIT_FAILED, EXIT_LOST = 2, 1, 4
HEADER_BYTES = 1024  # a broadcast of up to this many bytes is one collective; longer ones take a second
_LOST = ("gloo", "connection closed", "connection reset", "unavailable", "heartbeat", "deadline_exceeded",
         "coordination service", "barrier")


@dataclass(frozen=True)
class Settings:
    """How this process joins a run: the arguments of jax.distributed.initialize."""
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    init_timeout: float = INIT_TIMEOUT
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT

    @property
    def active(self) -> bool:
        """A run of several processes (or one whose size the cluster gives)."""
        return self.auto or (self.num_processes or 1) > 1

    @staticmethod
    def resolve(args=None, environ=None) -> "Settings":
        """From the flags of ref.distributed_args (args may be None), each falling back on its
        environment variable; UsageError for values that cannot work."""
        environ = os.environ if environ is None else environ

        def value(key, kind):
            v = getattr(args, key, None) if args is not None else None
            if v is None and environ.get(ENV[key], "") != "":
                try:
                    v = kind(environ[ENV[key]])
                except ValueError:
                    raise UsageError(f"${ENV[key]}: expected {kind.__name__}, got {environ[ENV[key]]!r}") from None
            return v

        mode = value("distributed", str)
        if mode not in (None, "auto"):
            raise UsageError(f"${ENV['distributed']}: expected 'auto', got {mode!r}")
        s = Settings(value("coordinator", str), value("num_processes", int), value("process_id", int),
                     mode == "auto", value("init_timeout", float) or INIT_TIMEOUT,
                     value("heartbeat_timeout", float) or HEARTBEAT_TIMEOUT)
        s.check()
        return s

    def check(self) -> None:
        if self.num_processes is not None and self.num_processes < 1:
            raise UsageError(f"--num-processes must be >= 1, got {self.num_processes}")
        if not self.active:
            return
        if not self.auto:
            missing = [f for f, v in (("--coordinator", self.coordinator), ("--process-id", self.process_id))
                       if v is None]
            if missing:
                raise UsageError(f"--num-processes {self.num_processes}: also give {' and '.join(missing)} (or "
                                 f"--distributed auto)")
            if not 0 <= self.process_id < self.num_processes:
                raise UsageError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UsageError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        for name, v in (("--init-timeout", self.init_timeout), ("--heartbeat-timeout", self.heartbeat_timeout)):
            if not 1 <= v < float("inf"):
                raise UsageError(f"{name} must be a number of seconds >= 1, got {v}")


def run_in_cluster(a, prog: str, body) -> int:
    """body(a, cluster) as this process's part of the run the flags describe (one process unless told
    otherwise): --devices set up before JAX starts, the run joined, failures ended with one line."""
    settings = Settings.resolve(a)
    local_devices_flag(settings, a.devices)      # simulated CPU devices; no effect on GPUs
    cluster = Cluster.start(settings, prog)
    with cluster.guard():
        return body(a, cluster)


def local_devices_flag(settings: Settings, devices: int | None) -> None:
    """--devices N on CPU: N simulated devices in all, N / processes in each (set before JAX starts)."""
    if not devices or "jax" in sys.modules:
        return
    processes = settings.num_processes if settings.active else 1
    if processes is None:
        raise UsageError("--devices with --distributed auto: also give --num-processes")
    if devices % processes:
        raise UsageError(f"--devices {devices}: not divisible among {processes} processes")
    per = devices // processes
    if per > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={per}").strip()


class Cluster:
    """The processes of a run as one process sees them (index, count); one process: a trivial view."""

    def __init__(self, prog: str, index: int = 0, count: int = 1):
        self.prog, self.index, self.count = prog, index, count

    @property
    def leader(self) -> bool:
        return self.index == 0

    @property
    def multi(self) -> bool:
        return self.count > 1

    @staticmethod
    def start(settings: Settings, prog: str) -> "Cluster":
        """Join the run (nothing to do for one process). A coordinator that cannot be reached, or
        processes that do not all connect within settings.init_timeout, end this process with one
        line, exit status 4."""
        import jax
        if not settings.active:
            return Cluster(prog)
        from jaxrun.watchdog import Watchdog
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        where = settings.coordinator or "the address the cluster gives"
        why = (f"is process 0 running and {where} reachable from here, and were all "
               f"{settings.num_processes or 'the'} processes started? The run ends here with exit status {EXIT_LOST}")
        watchdog = Watchdog(settings.init_timeout, " (--init-timeout)", prog=prog, status=EXIT_LOST, why=why)
        watchdog.phase(f"the coordinator at {where} and every process to connect")
        try:
            jax.distributed.initialize(
                settings.coordinator, settings.num_processes, settings.process_id,
                initialization_timeout=int(settings.init_timeout) + 30,   # the watchdog speaks first
                heartbeat_timeout_seconds=int(settings.heartbeat_timeout),
                shutdown_timeout_seconds=int(settings.heartbeat_timeout) + 10)
        except (RuntimeError, ValueError) as e:
            _exit(prog, f"cannot join the run at {where}: {error_line(e)}", EXIT_LOST)
        finally:
            watchdog.stop()
        cluster = Cluster(prog, jax.process_index(), jax.process_count())
        cluster._redirect_output()
        return cluster

    def _redirect_output(self) -> None:
        """Native code's stdout (gloo prints a line there per group of devices it connects) dropped;
        Python's stdout: the real one on process 0, nothing elsewhere."""
        sys.stdout.flush()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        sys.stdout = os.fdopen(saved, "w", buffering=1) if self.leader else open(os.devnull, "w")

    # -- exchanging values ---------------------------------------------------------------------------
    def gather(self, value) -> list:
        """A JSON value from every process -> the list of them, by process index."""
        if not self.multi:
            return [value]
        from jax.experimental import multihost_utils
        data = json.dumps(value, sort_keys=True).encode()
        sizes = multihost_utils.process_allgather(np.array([len(data)], np.int32))[:, 0]
        buf = np.zeros(_bucket(int(sizes.max())), np.uint8)
        buf[:len(data)] = np.frombuffer(data, np.uint8)
        rows = multihost_utils.process_allgather(buf)
        return [json.loads(bytes(rows[i, :sizes[i]])) for i in range(self.count)]

    def broadcast(self, value=None):
        """Process 0's JSON value, on every process (the others pass None). One collective of
        HEADER_BYTES for a short value, a second for a longer one."""
        if not self.multi:
            return value
        from jax.experimental import multihost_utils
        data = json.dumps(value).encode() if self.leader else b""
        head = np.zeros(HEADER_BYTES, np.uint8)
        head[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
        if len(data) <= HEADER_BYTES - 4:
            head[4:4 + len(data)] = np.frombuffer(data, np.uint8)
        head = multihost_utils.broadcast_one_to_all(head)
        n = int(np.frombuffer(head[:4].tobytes(), np.uint32)[0])
        if n <= HEADER_BYTES - 4:
            return json.loads(bytes(head[4:4 + n]))
        body = np.zeros(_bucket(n), np.uint8)
        if self.leader:
            body[:n] = np.frombuffer(data, np.uint8)
        return json.loads(bytes(multihost_utils.broadcast_one_to_all(body)[:n]))

    def agree(self, prepare, describe):
        """prepare() on every process, then every process's describe(prepared) (a dict of str -> str)
        or the error prepare raised, compared: any error, or any entry that differs, raises the same
        UsageError on every process. -> what prepare returned."""
        try:
            prepared, mine = prepare(), None
        except Exception as e:  # noqa: BLE001 (in a multi-process run, every process learns of it)
            if not self.multi:
                raise
            usage = isinstance(e, (ValueError, OSError))
            prepared, mine = None, {"error": error_line(e) if usage else f"{type(e).__name__}: {error_line(e)}"}
        if not self.multi:
            return prepared
        entries = self.gather(mine or {"fingerprint": describe(prepared)})
        errors = [(i, e["error"]) for i, e in enumerate(entries) if "error" in e]
        if errors:
            i, msg = errors[0]
            raise UsageError(f"process {i} of {self.count}: {msg}")
        differ = disagreement([e["fingerprint"] for e in entries])
        if differ:
            raise UsageError(f"the processes were started differently: {differ}")
        return prepared

    def where(self, mesh) -> str:
        """'4 cpu device(s)', or with several processes '4 cpu device(s) in 2 processes'."""
        devices = f"{mesh.size} {mesh.devices.flat[0].platform} device(s)"
        return devices + (f" in {self.count} processes" if self.multi else "")

    def sync(self, name: str) -> None:
        """Wait until every process gets here."""
        if self.multi:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(name)

    # -- failures and the end ------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self):
        """In a multi-process run, a failure prints one line and ends this process at once."""
        if not self.multi:
            yield
            return
        try:
            yield
        except (ValueError, OSError) as e:
            _exit(self.prog, error_line(e), EXIT_USAGE)
        except Exception as e:  # noqa: BLE001 (every failure ends the process with one line)
            self.fail(e)

    def fail(self, e: BaseException) -> None:
        """End this process of a multi-process run for exception e: one line, exit 4 when another
        process was lost (a collective failed), else 1."""
        line = error_line(e)
        if any(word in str(e).lower() for word in _LOST):
            _exit(self.prog, f"lost another process of the run (it ended or cannot be reached): {line}", EXIT_LOST)
        _exit(self.prog, f"{type(e).__name__}: {line}", EXIT_FAILED)

    def finish(self) -> None:
        """Leave the runtime together (after the last collective; local work may follow)."""
        if self.multi:
            import jax
            jax.distributed.shutdown()


def _exit(prog: str, message: str, status: int):
    sys.stdout.flush()
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    os._exit(status)


def _bucket(n: int) -> int:
    return max(64, 1 << max(0, n - 1).bit_length())


def disagreement(fingerprints: list[dict]) -> str:
    """'' when all fingerprints are equal, else the entries that differ, with each process's value."""
    keys = sorted(set().union(*fingerprints))
    parts = []
    for k in keys:
        values = [f.get(k) for f in fingerprints]
        if len(set(values)) > 1:
            parts.append(f"{k} (" + ", ".join(f"process {i}: {v}" for i, v in enumerate(values)) + ")")
    return "; ".join(parts)


# ---- fingerprints ------------------------------------------------------------------------------------

LOCAL_FLAGS = frozenset({"model", "process_id", "compile_cache", "quiet", "json", "hide_thinking", "check",
                         "log_level", "init_timeout", "heartbeat_timeout", "step_timeout", "prompt", "token_ids",
                         "batch_file", "served_model_name"})  # a process's own I/O, or compared by content


def fingerprint(flags, ckpt, **more) -> dict[str, str]:
    """What must be the same on every process: the flags (an argparse Namespace or a dict; but
    LOCAL_FLAGS), the checkpoint's content, the code, JAX's version and the devices, plus `more`
    (e.g. the prompts' token ids)."""
    import jax
    flags = flags if isinstance(flags, dict) else vars(flags)
    flags = {f"--{k.replace('_', '-')}": _short(v) for k, v in sorted(flags.items()) if k not in LOCAL_FLAGS}
    local = jax.local_devices()
    return {**flags, "checkpoint": checkpoint_fingerprint(ckpt.directory), "code": code_fingerprint(),
            "jax": f"{jax.__version__} / jaxlib {getattr(jax.lib, '__version__', '?')}",
            "devices per process": f"{len(local)} {local[0].platform}",
            **{k: _short(v) for k, v in more.items()}}


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 80 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_fingerprint(directory: Path, samples: int = 16, sample_bytes: int = 64) -> str:
    """A hash of a checkpoint directory's JSON files (config, index, tokenizer) and, per safetensors
    file, its name, size, header and `samples` evenly spaced slices of its data: two checkpoints that
    differ in layout, shapes, formats or (almost surely) weights differ here, for a few kB read."""
    h = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.json")) + sorted(Path(directory).glob("*.safetensors")):
        h.update(path.name.encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            if path.suffix == ".json":
                h.update(f.read())
                continue
            header = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header, size)))
            for i in range(samples):
                f.seek(8 + header + (size - 8 - header) * i // samples)
                h.update(f.read(sample_bytes))
    return h.hexdigest()[:16]


def code_fingerprint() -> str:
    """A hash of the jaxrun and ref sources this process runs."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for package in ("jaxrun", "ref"):
        for path in sorted((root / package).glob("*.py")):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]
