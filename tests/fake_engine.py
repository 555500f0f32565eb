"""A deterministic engine behind jaxrun.engine_api for the server tests.

FakeModel: the log-probabilities after a context are a pseudo-random function of (length, last two
ids), so a request's greedy tokens depend only on its own prompt; special ids (>= text_vocab) are made
unlikely. FakeEngine runs it with continuous batching in a thread (max_running slots, a step every
step_s seconds, tokens_per_step tokens per step as speculative decoding emits them), honouring stop
ids, max_tokens, seeds, prompt logprobs and cancellation, and records what happened to each request.
A prompt containing `fail_token` fails after its first step (Finished("error")); `script(prompt_ids)`
may return the exact ids to emit instead of the model's choice.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from jaxrun.engine_api import (EngineUnavailable, EventChannel, Finished, PromptLogprobs, Request, TokenLogprob,
                               Tokens)


class FakeModel:
    def __init__(self, vocab_size: int, text_vocab: int):
        self.vocab_size, self.text_vocab = vocab_size, text_vocab

    def logprobs(self, context) -> np.ndarray:
        """log p(next | context) [V], float64."""
        c = list(context)
        rng = np.random.default_rng([len(c), c[-1] if c else 0, c[-2] if len(c) > 1 else 0])
        logits = rng.standard_normal(self.vocab_size) * 3.0
        logits[self.text_vocab:] -= 30.0
        m = logits.max()
        return logits - (m + np.log(np.exp(logits - m).sum()))

    def entry(self, context, token: int, n: int) -> TokenLogprob:
        lp = self.logprobs(context)
        order = np.argsort(-lp, kind="stable")
        return TokenLogprob(int(token), float(lp[token]), tuple((int(i), float(lp[i])) for i in order[:n]),
                            1 + int((lp > lp[token]).sum()))

    def choose(self, context, temperature: float, seed: int) -> int:
        lp = self.logprobs(context)
        if temperature == 0:
            return int(np.argmax(lp))
        p = np.exp((lp - lp.max()) / temperature)
        rng = np.random.default_rng([seed % 2 ** 64, len(context)])
        return int(rng.choice(self.vocab_size, p=p / p.sum()))

    def greedy(self, prompt, max_tokens: int, stop_ids=()) -> list[int]:
        """What the engine emits for a greedy request, computed directly."""
        out: list[int] = []
        while len(out) < max_tokens:
            out.append(self.choose(list(prompt) + out, 0.0, 0))
            if out[-1] in stop_ids:
                break
        return out


@dataclass
class _Live:
    request: Request
    channel: EventChannel = None
    seed: int = 0
    out: list = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prefilled: bool = False
    script: list | None = None


class FakeEngine:
    def __init__(self, vocab_size: int = 512, text_vocab: int = 480, max_context: int = 256, max_running: int = 4,
                 step_s: float = 0.002, tokens_per_step: int = 1, fail_token: int | None = None, script=None):
        self.vocab_size, self.max_context, self.ready = vocab_size, max_context, True
        self.model = FakeModel(vocab_size, text_vocab)
        self.max_running, self.step_s, self.tokens_per_step = max_running, step_s, tokens_per_step
        self.fail_token, self.script = fail_token, script
        self._lock = threading.Condition()
        self._waiting: deque[_Live] = deque()
        self._running: list[_Live] = []
        self._closing = self._stop = False
        self.submitted: list[Request] = []
        self.outcomes: list[tuple[Request, str, int]] = []   # (request, finish reason, tokens emitted)
        self._seeds = np.random.default_rng(12345)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # ---- the Engine interface
    def submit(self, request: Request) -> EventChannel:
        if self._closing:
            raise EngineUnavailable("shutting down")
        if len(request.prompt_ids) + request.max_tokens > self.max_context:
            raise ValueError(f"prompt + max_tokens exceeds {self.max_context}")
        live = _Live(request)
        live.channel = EventChannel(on_cancel=live.cancelled.set)
        live.seed = request.sampling.seed if request.sampling.seed is not None else int(self._seeds.integers(2 ** 31))
        live.script = self.script(request.prompt_ids) if self.script else None
        with self._lock:
            self.submitted.append(request)
            self._waiting.append(live)
            self._lock.notify()
        return live.channel

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def shutdown(self, drain: bool) -> None:
        with self._lock:
            self._closing = True
            if not drain:
                for live in list(self._waiting) + self._running:
                    live.cancelled.set()
            self._lock.notify()
        deadline = time.monotonic() + 10
        while (self._waiting or self._running) and time.monotonic() < deadline:
            time.sleep(0.005)
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(10)

    # ---- test helpers
    def outcome(self, predicate) -> tuple[Request, str, int] | None:
        with self._lock:
            return next((o for o in self.outcomes if predicate(o[0])), None)

    # ---- the loop
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._running:
                    self._lock.wait(0.1)
                if self._stop:
                    return
                while self._waiting and len(self._running) < self.max_running:
                    self._running.append(self._waiting.popleft())
                for live in [w for w in self._waiting if w.cancelled.is_set()]:
                    self._waiting.remove(live)
                    self._end(live, "abort")
                batch = list(self._running)
            for live in batch:
                reason = self._step(live)
                if reason is not None:
                    with self._lock:
                        self._running.remove(live)
                        self._end(live, reason)
            time.sleep(self.step_s)

    def _end(self, live: _Live, reason: str) -> None:
        self.outcomes.append((live.request, reason, len(live.out)))
        live.channel.put(Finished(reason, "injected failure" if reason == "error" else None))

    def _step(self, live: _Live) -> str | None:
        r, m = live.request, self.model
        if live.cancelled.is_set():
            return "abort"
        if not live.prefilled:
            live.prefilled = True
            if r.prompt_logprobs is not None:
                p = r.prompt_ids
                live.channel.put(PromptLogprobs((None,) + tuple(m.entry(p[:t], p[t], r.prompt_logprobs)
                                                                for t in range(1, len(p)))))
        ids, lps = [], []
        for _ in range(self.tokens_per_step):
            context = list(r.prompt_ids) + live.out
            if live.script is not None:
                tid = live.script[len(live.out)] if len(live.out) < len(live.script) else 0
            else:
                tid = m.choose(context, r.sampling.temperature, live.seed)
            live.out.append(tid)
            ids.append(tid)
            if r.logprobs is not None:
                lps.append(m.entry(context, tid, r.logprobs))
            if tid in r.stop_ids or len(live.out) >= r.max_tokens:
                break
        live.channel.put(Tokens(tuple(ids), tuple(lps) if r.logprobs is not None else None))
        if self.fail_token is not None and self.fail_token in r.prompt_ids:
            return "error"
        if ids[-1] in r.stop_ids:
            return "stop"
        return "length" if len(live.out) >= r.max_tokens else None
