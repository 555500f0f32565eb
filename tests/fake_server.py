"""A real uvicorn server around a FakeEngine, for the server tests: in a thread (`running`), or as a
process (`python tests/fake_server.py --port P [--tokenizer DIR]`, for the signal tests)."""
from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).parent))
from fake_engine import FakeEngine  # noqa: E402

from jaxrun.server import build_app, run_server  # noqa: E402


@contextmanager
def running(app, timeout: float = 20.0):
    """Serve `app` on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--step-s", type=float, default=0.002)
    a = p.parse_args()
    tok = None
    if a.tokenizer:
        from ref.tokenizer import load_tokenizer
        tok = load_tokenizer(a.tokenizer)
    app = build_app(FakeEngine(step_s=a.step_s), tok, "fake-model")
    return run_server(app, "127.0.0.1", a.port, graceful_timeout=20, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
