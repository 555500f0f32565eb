"""Prometheus metrics of the server (GET /metrics), named as vLLM names them with a `jaxrun:` prefix.

Requests running and waiting (asked of the engine at scrape time), prompt and generation token
counters, time to first token, inter-token latency (one observation per engine step that emitted
tokens for a request, as vLLM counts it), end-to-end latency, and finished requests by reason.
Each app has its own registry, so several servers can live in one process.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = r = CollectorRegistry()
        lab = {"model_name": model_name}
        for key, name in (("running", "num_requests_running"), ("waiting", "num_requests_waiting")):
            g = Gauge(f"jaxrun:{name}", f"Requests {key} in the engine.", list(lab), registry=r).labels(**lab)
            g.set_function(lambda key=key: engine.stats().get(key, 0))
        self.prompt_tokens = Counter("jaxrun:prompt_tokens", "Prompt tokens submitted.", list(lab),
                                     registry=r).labels(**lab)
        self.generation_tokens = Counter("jaxrun:generation_tokens", "Tokens generated.", list(lab),
                                         registry=r).labels(**lab)
        self.ttft = Histogram("jaxrun:time_to_first_token_seconds", "Time from arrival to the first token.",
                              list(lab), buckets=TTFT_BUCKETS, registry=r).labels(**lab)
        self.itl = Histogram("jaxrun:inter_token_latency_seconds", "Time between a request's engine steps.",
                             list(lab), buckets=ITL_BUCKETS, registry=r).labels(**lab)
        self.e2e = Histogram("jaxrun:e2e_request_latency_seconds", "Time from arrival to the end.", list(lab),
                             buckets=E2E_BUCKETS, registry=r).labels(**lab)
        self._success = Counter("jaxrun:request_success", "Finished requests by reason.",
                                [*lab, "finished_reason"], registry=r)
        self._lab = lab

    def request(self, prompt_tokens: int, arrival: float) -> "RequestObserver":
        self.prompt_tokens.inc(prompt_tokens)
        return RequestObserver(self, arrival)

    def finished(self, reason: str) -> None:
        self._success.labels(**self._lab, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestObserver:
    """One engine request's timeline (time.monotonic seconds)."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.m, self.arrival, self.last = metrics, arrival, None

    def tokens(self, n: int, now: float) -> None:
        if n <= 0:
            return
        self.m.generation_tokens.inc(n)
        if self.last is None:
            self.m.ttft.observe(now - self.arrival)
        else:
            self.m.itl.observe(now - self.last)
        self.last = now

    def finished(self, reason: str) -> None:
        self.m.e2e.observe(time.monotonic() - self.arrival)
        self.m.finished(reason)
