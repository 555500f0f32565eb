"""Continuous batching over the JAX runner: the engine behind `python -m jaxrun.serve`
(jaxrun.engine_api.Engine).

One thread owns the device. The decode state has B slots (jaxrun.runner.DecodeState); each loop turn:
1. takes new requests and cancellations (a cancelled or finished request frees its slot at once);
2. runs one prefill chunk of the oldest waiting request that has a free slot to go to (a long
   prompt is prefilled `chunk` tokens per turn, so running sequences wait at most one chunk);
   when its last chunk is done, its first token is chosen and the sequence is inserted into the slot;
3. runs one decode (or speculative) step of all B slots, and hands each live request its tokens.
Free slots run along harmlessly (their tokens are ignored). A request's tokens depend only on its own
prompt and seed: sampling uses per-slot keys, and every row's maths is independent of the others'.
An exception inside a turn loses the decode state: the requests it held (running or being prefilled)
fail (Finished "error"), the waiting ones are served on fresh state.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from jaxrun.engine_api import (EngineUnavailable, EventChannel, Finished, PromptLogprobs, Request, TokenLogprob,
                               Tokens)
from jaxrun.runner import DecodeState, Prefill, Runner
from jaxrun.sampling import Sampling

log = logging.getLogger("jaxrun.scheduler")


@dataclass(eq=False)
class _Sequence:
    """One request from submit to Finished."""
    request: Request
    channel: EventChannel
    seed: int
    slot: int | None = None
    job: Prefill | None = None
    emitted: int = 0
    cancelled: bool = False
    arrival: float = field(default_factory=time.monotonic)


def token_logprobs(logits: np.ndarray, token: int, n: int) -> TokenLogprob:
    """The model's log-softmax (float64) of one row of logits [V]: the token's logprob, its rank and
    the n most likely (id, logprob), descending (ties to the lower id)."""
    x = logits.astype(np.float64)
    m = x.max()
    lp = x - (m + np.log(np.sum(np.exp(x - m))))
    top = np.argsort(-lp, kind="stable")[:n] if n else []
    return TokenLogprob(int(token), float(lp[token]), tuple((int(i), float(lp[i])) for i in top),
                        rank=int(np.sum(lp > lp[token])) + 1)


class Scheduler:
    """An Engine over a Runner with `slots` decode slots, a cache of `max_context` positions per slot,
    speculative decoding with `speculative` MTP drafts per step (0: off), prompts prefilled `chunk`
    tokens at a time."""

    def __init__(self, runner: Runner, slots: int = 4, max_context: int = 4096, speculative: int = 0,
                 chunk: int = 256):
        if slots < 1 or chunk < 1:
            raise ValueError(f"slots {slots} and chunk {chunk} must be >= 1")
        if speculative and not runner.has_mtp:
            raise ValueError("--speculative: the checkpoint has no MTP head (mtp.fc.weight)")
        self.runner, self.slots, self.K, self.chunk = runner, slots, speculative, chunk
        self.S = max_context
        self.vocab_size = runner.cfg.vocab_size
        self.max_context = max_context - 2 * speculative   # a speculative step writes 2K positions past its last token
        self.ready = False
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: list[_Sequence] = []
        self._running: dict[int, _Sequence] = {}
        self._accepting = True
        self._stop = threading.Event()
        self._state: DecodeState | None = None
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    # -- Engine ------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Compile the decode step and the first prefill bucket, then serve from the engine thread."""
        self._state = self._fresh_state()
        job = Prefill(self.runner, [[0]], self.S, self.K > 0, self.chunk)
        while not job.advance():
            pass
        rows, _ = job.finish(Sampling(), self.K)
        self._state = self.runner.insert(self._state, rows, [0], self.S)
        self._state, _ = self.runner.step(self._state, self.S)
        self.ready = True
        self._thread.start()
        return self

    def submit(self, request: Request) -> EventChannel:
        n, V = len(request.prompt_ids), self.vocab_size
        if not self._accepting:
            raise EngineUnavailable("the server is shutting down")
        if n == 0:
            raise ValueError("the prompt is empty")
        bad = [t for t in request.prompt_ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {V})")
        if request.images and not self.runner.has_vision:
            raise ValueError("image input: the model has no vision tower")
        if request.max_tokens < 1 or n + request.max_tokens > self.max_context:
            raise ValueError(f"prompt of {n} tokens + max_tokens {request.max_tokens} exceeds the context of "
                             f"{self.max_context}")
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        seq = _Sequence(request, None, seed)
        seq.channel = EventChannel(on_cancel=lambda: self._inbox.put(("cancel", seq)))
        self._inbox.put(("submit", seq))
        return seq.channel

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._running) + sum(s.job is not None for s in self._waiting),
                    "waiting": sum(s.job is None for s in self._waiting)}

    def shutdown(self, drain: bool = False) -> None:
        """Stop admitting; let the requests in flight finish (drain) or abort them; stop the thread."""
        self._accepting = False
        if drain:
            while self.stats()["running"] + self.stats()["waiting"] and self._thread.is_alive():
                time.sleep(0.05)
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        for seq in self._waiting + list(self._running.values()):
            seq.channel.put(Finished("abort"))

    # -- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._take_inbox(block=not (self._waiting or self._running))
            if self._stop.is_set():
                break
            try:
                self._prefill_turn()
                if self._running:
                    self._decode_turn()
            except Exception as e:  # the decode state is lost: fail the sequences it held, go on afresh
                log.error("scheduler step failed", exc_info=e)
                msg = f"{type(e).__name__}: {e}"
                for seq in list(self._running.values()) + [s for s in self._waiting if s.job is not None]:
                    self._finish(seq, Finished("error", msg))
                self._state = self._fresh_state()

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, seq = item
            if kind == "submit":
                with self._lock:
                    self._waiting.append(seq)
            elif kind == "cancel" and not seq.cancelled:
                seq.cancelled = True
                self._finish(seq, Finished("abort"))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _free_slot(self) -> int | None:
        return next((b for b in range(self.slots) if b not in self._running), None)

    def _prefill_turn(self) -> None:
        """One chunk of the oldest waiting request, when a slot is free for it."""
        if not self._waiting or self._free_slot() is None:
            return
        seq = self._waiting[0]
        r = seq.request
        if seq.job is None:
            seq.job = Prefill(self.runner, [list(r.prompt_ids)], self.S, self.K > 0, self.chunk,
                              all_logits=r.prompt_logprobs is not None, images=[list(r.images)] if r.images else None)
        if not seq.job.advance():
            return
        s = r.sampling
        rows, first = seq.job.finish(Sampling(s.temperature, s.top_p, s.top_k, seq.seed), self.K)
        if r.prompt_logprobs is not None:
            seq.channel.put(self._prompt_logprobs(seq, r.prompt_logprobs))
        slot = self._free_slot()
        self._state = self.runner.insert(self._state, rows, [slot], self.S)
        with self._lock:
            self._waiting.pop(0)
            seq.job, seq.slot = None, slot
            self._running[slot] = seq
        tokens = np.asarray(first.tokens)[0]
        logits = np.asarray(first.logits)[0][None] if r.logprobs is not None else None
        self._emit(seq, tokens, logits)

    def _decode_turn(self) -> None:
        self._state, out = self.runner.step(self._state, self.S)
        tokens = np.asarray(out.tokens)                                  # [B, n]
        count = np.asarray(out.count) if out.count is not None else np.full(len(tokens), tokens.shape[1])
        want_logits = any(seq.request.logprobs is not None for seq in self._running.values())
        logits = np.asarray(out.logits).reshape(len(tokens), tokens.shape[1], -1) if want_logits else None
        for b, seq in list(self._running.items()):
            self._emit(seq, tokens[b, :count[b]], None if logits is None else logits[b])

    def _emit(self, seq: _Sequence, tokens: np.ndarray, logits: np.ndarray | None) -> None:
        """Hand a sequence the tokens of one step, cut at a stop id or max_tokens; finish it there."""
        r, kept, reason = seq.request, [], None
        for t in map(int, tokens):
            kept.append(t)
            if t in r.stop_ids:
                reason = "stop"
            elif seq.emitted + len(kept) >= r.max_tokens:
                reason = "length"
            if reason:
                break
        lps = None
        if r.logprobs is not None:
            lps = tuple(token_logprobs(logits[i], t, r.logprobs) for i, t in enumerate(kept))
        seq.emitted += len(kept)
        seq.channel.put(Tokens(tuple(kept), lps))
        if reason:
            self._finish(seq, Finished(reason))

    def _finish(self, seq: _Sequence, event: Finished) -> None:
        """End a sequence: its slot (or place in the queue) is free at once."""
        with self._lock:
            if seq.slot is not None and self._running.get(seq.slot) is seq:
                del self._running[seq.slot]
            if seq in self._waiting:
                self._waiting.remove(seq)
        seq.slot, seq.job = None, None
        seq.channel.put(event)

    def _prompt_logprobs(self, seq: _Sequence, n: int) -> PromptLogprobs:
        """Entry t (t >= 1): prompt token t under the prefill's logits of row t - 1."""
        rows = np.concatenate(seq.job.prompt_logits, axis=1)[0]         # [T, V]
        ids = seq.request.prompt_ids
        return PromptLogprobs((None,) + tuple(token_logprobs(rows[t - 1], ids[t], n) for t in range(1, len(ids))))

    def _fresh_state(self) -> DecodeState:
        return self.runner.empty_state(self.slots, self.S, self.K > 0, self.K)
