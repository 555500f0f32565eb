"""Continuous batching over the JAX runner: the engine behind `python -m jaxrun.serve`
(jaxrun.engine_api.Engine).

One thread owns the device. The decode state has B slots (jaxrun.runner.DecodeState); each loop turn
is planned, then run:
1. plan: take new requests and cancellations (a cancelled or finished request frees its slot at
   once), and choose the turn's work (a `Plan`): one prefill chunk of the oldest waiting request that
   has a free slot to go to (a long prompt is prefilled `chunk` tokens per turn, so running sequences
   wait at most one chunk), and whether to step;
2. run: the prefill chunk; when it is the prompt's last, its first token is chosen and the sequence
   inserted into the slot the plan names; then one decode (or speculative) step of all B slots when
   a slot was busy at the plan or a sequence was just inserted; each live request gets its tokens.
Free slots run along harmlessly (their tokens are ignored). A request's tokens depend only on its own
prompt and seed: sampling uses per-slot keys, and every row's maths is independent of the others'.
An exception inside a turn loses the decode state: the requests it held (running or being prefilled)
fail (Finished "error"), the waiting ones are served on fresh state.

Over several processes (jaxrun.distributed), process 0 (the leader) owns the requests and plans each
turn; the plan reaches every process before the turn (a broadcast), and all run the same compiled
calls on the same slots; the others (`follow`) only run plans until the leader's stop plan. There a
failing turn ends the run (each process exits with one line), since the processes' states could part.
"""
from __future__ import annotations

import base64
import itertools
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
from ref.image import PreprocessedImage

log = logging.getLogger("jaxrun.scheduler")


@dataclass(eq=False)
class _Sequence:
    """One request from submit to Finished."""
    request: Request
    channel: EventChannel
    seed: int
    number: int = 0
    slot: int | None = None
    job: Prefill | None = None
    emitted: int = 0
    cancelled: bool = False
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Plan:
    """One turn's work, decided by the leader, run alike on every process. `request`: the number of
    the sequence a prefill chunk is run for, `prompt` its token ids when the chunk is its first (a
    new prefill job), `sampling` (temperature, top_p, top_k, seed) and `slot` for its first token and
    insertion when the chunk is the last; `step`: a decode step even if nothing is inserted, of the
    first `active` slots (0: all; the busy slots are the lowest, so that few requests cost little)."""
    stop: bool = False
    step: bool = False
    active: int = 0
    request: int | None = None
    prompt: tuple[int, ...] | None = None
    all_logits: bool = False
    images: tuple = ()          # the prompt's images with its first chunk (image_to_json)
    sampling: tuple = ()
    slot: int = -1

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v != getattr(Plan, k)}

    @staticmethod
    def from_json(d: dict) -> "Plan":
        return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def image_to_json(image: PreprocessedImage) -> dict:
    """A preprocessed image as a JSON value, for a plan's broadcast (pixels as base64 float32 bytes)."""
    pixels = np.ascontiguousarray(image.pixel_values, np.float32)
    return {"pixels": base64.b64encode(pixels.tobytes()).decode(), "shape": list(pixels.shape),
            "grid": list(image.grid), "size": list(image.size), "source": image.source}


def image_from_json(d: dict) -> PreprocessedImage:
    pixels = np.frombuffer(base64.b64decode(d["pixels"]), np.float32).reshape(d["shape"])
    return PreprocessedImage(pixels, tuple(d["grid"]), tuple(d["size"]), d["source"])


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
    tokens at a time. cluster (jaxrun.distributed.Cluster): the processes of a multi-process run."""

    def __init__(self, runner: Runner, slots: int = 4, max_context: int = 4096, speculative: int = 0,
                 chunk: int = 256, cluster=None):
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
        self._job: tuple[int, Prefill] | None = None   # (sequence number, its prefill in progress)
        self._numbers = itertools.count(1)
        self._cluster = cluster if cluster is not None and cluster.multi else None
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    # -- Engine ------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Compile the decode step and the first prefill bucket, then serve from the engine thread."""
        self._warm_up()
        self.ready = True
        self._thread.start()
        return self

    def follow(self) -> None:
        """A process other than the leader: warm up alike, then run the leader's plans until its stop plan."""
        self._warm_up()
        while True:
            plan = Plan.from_json(self._cluster.broadcast())
            if plan.stop:
                return
            try:
                self._run(plan)
            except Exception as e:  # noqa: BLE001 (the processes' states could part: end the run)
                self._cluster.fail(e)

    def _warm_up(self) -> None:
        self._state = self._fresh_state()
        job = Prefill(self.runner, [[0]], self.S, self.K > 0, self.chunk)
        while not job.advance():
            pass
        rows, _ = job.finish(Sampling(), self.K)
        self._state = self.runner.insert(self._state, rows, [0], self.S)
        n = 1
        while n < self.slots:                            # every step a plan can ask for (_active)
            self._state, _ = self.runner.step(self._state, self.S, n)
            n *= 2
        self._state, _ = self.runner.step(self._state, self.S)

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
        seq = _Sequence(request, None, seed, next(self._numbers))
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
        while True:
            plan = self._plan()
            if self._cluster:
                try:
                    plan = Plan.from_json(self._cluster.broadcast(plan.to_json()))
                except Exception as e:  # noqa: BLE001 (another process is lost: end the run)
                    self._cluster.fail(e)
            if plan.stop:
                break
            try:
                self._run(plan)
            except Exception as e:  # the decode state is lost: fail the sequences it held, go on afresh
                log.error("scheduler step failed", exc_info=e)
                msg = f"{type(e).__name__}: {e}"
                for seq in list(self._running.values()) + [s for s in self._waiting if s.job is not None]:
                    self._finish(seq, Finished("error", msg))
                if self._cluster:
                    self._cluster.fail(e)
                self._state, self._job = self._fresh_state(), None

    def _plan(self) -> Plan:
        """The leader's next turn: a chunk of the oldest waiting request, when a slot is free for it."""
        self._take_inbox(block=not (self._waiting or self._running))
        if self._stop.is_set():
            return Plan(stop=True)
        slot = self._free_slot()
        if not self._waiting or slot is None:
            return Plan(step=bool(self._running), active=self._active())
        seq = self._waiting[0]
        r, s = seq.request, seq.request.sampling
        first = seq.job is None
        return Plan(step=bool(self._running), active=self._active(slot), request=seq.number,
                    prompt=tuple(r.prompt_ids) if first else None, all_logits=r.prompt_logprobs is not None,
                    images=tuple(image_to_json(i) for i in r.images) if first and self._cluster else (),
                    sampling=(s.temperature, s.top_p, s.top_k, seq.seed), slot=slot)

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
        """The lowest free slot (busy slots stay low: see _active)."""
        return next((b for b in range(self.slots) if b not in self._running), None)

    def _active(self, inserting: int | None = None) -> int:
        """How many leading slots a step runs: the smallest power of two holding every busy slot (and
        the one being filled), 0 when that is all of them. Each count is compiled once."""
        used = max(list(self._running) + ([inserting] if inserting is not None else []), default=0) + 1
        n = 1 << (used - 1).bit_length()
        return 0 if n >= self.slots else n

    def _run(self, plan: Plan) -> None:
        """A turn's device work, the same on every process; the leader hands out the tokens."""
        inserted = False
        if plan.request is not None:
            if plan.prompt is not None:
                seq = self._sequence(plan.request)
                images = seq.request.images if seq is not None else [image_from_json(i) for i in plan.images]
                job = Prefill(self.runner, [list(plan.prompt)], self.S, self.K > 0, self.chunk,
                              all_logits=plan.all_logits, images=[list(images)] if images else None)
                self._job = (plan.request, job)
                if seq is not None:
                    seq.job = job
            number, job = self._job
            if number != plan.request:
                raise RuntimeError(f"plan for request {plan.request} while prefilling request {number}")
            if job.advance():
                rows, first = job.finish(Sampling(*plan.sampling), self.K)
                self._state = self.runner.insert(self._state, rows, [plan.slot], self.S)
                self._job, inserted = None, True
                self._started(plan.request, plan.slot, first)
        if plan.step or inserted:
            self._state, out = self.runner.step(self._state, self.S, plan.active or None)
            self._stepped(out)

    def _sequence(self, number: int) -> _Sequence | None:
        """The leader's waiting sequence of that number (None on the other processes)."""
        return next((seq for seq in self._waiting if seq.number == number), None)

    def _started(self, number: int, slot: int, first) -> None:
        """A sequence's prefill is done and it sits in `slot`: its prompt logprobs and first token."""
        seq = self._sequence(number)
        if seq is None:
            return
        r = seq.request
        if r.prompt_logprobs is not None:
            seq.channel.put(self._prompt_logprobs(seq, r.prompt_logprobs))
        with self._lock:
            self._waiting.remove(seq)
            seq.job, seq.slot = None, slot
            self._running[slot] = seq
        tokens = np.asarray(first.tokens)[0]
        logits = np.asarray(first.logits)[0][None] if r.logprobs is not None else None
        self._emit(seq, tokens, logits)

    def _stepped(self, out) -> None:
        """A decode step's tokens to each running sequence."""
        if not self._running:
            return
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
