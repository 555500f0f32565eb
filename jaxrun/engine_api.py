"""The interface between the HTTP server (jaxrun.server) and a generation engine (jaxrun.scheduler).

The server turns each OpenAI request into one `Request` per choice and calls `Engine.submit` from its
event loop; the engine answers with a `RequestStream` of events: `PromptLogprobs` first when asked
for, then `Tokens` per decode step, then one `Finished`, always last. Text, stop strings, reasoning
and tool-call parsing are the server's; token ids, logprobs and slots are the engine's.

`EventChannel` is a ready RequestStream for engines that run in their own thread: the engine calls
`put(event)` from any thread, the server iterates on its event loop.

What an engine owes the server:
- submit() returns at once (it queues); a request the engine cannot run raises ValueError (HTTP 400),
  one arriving after shutdown() began raises EngineUnavailable (HTTP 503).
- Events in order: PromptLogprobs (only when asked, before any Tokens), Tokens, then exactly one
  Finished. Nothing is emitted after a stop id or past max_tokens, even within one speculative step;
  the stop id itself is emitted, then Finished("stop"); max_tokens reached: Finished("length").
- Logprobs are of the distribution tokens are drawn from before temperature / top-p / top-k
  (the model's log-softmax, as vLLM reports them); `top` holds the N most likely, descending.
- cancel(): stop computing for the request and free its slot; a Finished("abort") may follow.
- A failure inside a step fails the requests it touched with Finished("error", message); the
  engine keeps serving the others.
- Greedy tokens of a request do not depend on what else runs; a seeded request's tokens neither.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol, Union


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0            # in (0, 1]
    top_k: int = 0                # 0 = off
    seed: int | None = None       # any int64; None: the engine picks one per request


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int               # >= 1; prompt + max_tokens <= Engine.max_context
    sampling: SamplingParams
    stop_ids: frozenset[int]      # generation ends after emitting one of these (it is emitted)
    logprobs: int | None = None   # None: no logprobs; N >= 0: logprob of each emitted token plus its top-N
    prompt_logprobs: int | None = None   # logprob of each prompt token (from the prefill) plus its top-N
    images: tuple = ()            # ref.image.PreprocessedImage of the prompt's image-pad runs, in order
    # (prompt_ids hold each image's pads expanded to its merged-token count)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float                       # log p(token_id | context), -inf allowed
    top: tuple[tuple[int, float], ...]   # (id, logprob) of the N most likely, descending
    rank: int | None = None              # 1 + number of ids with a strictly larger logprob (vLLM's rank)


@dataclass(frozen=True)
class PromptLogprobs:              # the first event when prompt_logprobs was asked
    entries: tuple[TokenLogprob | None, ...]   # one per prompt token; entry 0 is None (nothing predicts it)


@dataclass(frozen=True)
class Tokens:                      # one decode step's emitted tokens (1, or more with speculative decoding)
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None   # one per token when Request.logprobs is set


@dataclass(frozen=True)
class Finished:
    reason: str                    # "stop" (a stop id) | "length" | "abort" (cancelled) | "error"
    error: str | None = None       # the failure, for reason "error"


Event = Union[PromptLogprobs, Tokens, Finished]


class EngineUnavailable(RuntimeError):
    """submit() after shutdown began, or while the engine cannot take requests (HTTP 503)."""


class RequestStream(Protocol):
    def __aiter__(self) -> AsyncIterator[Event]: ...  # [PromptLogprobs], Tokens..., Finished (always last)
    def cancel(self) -> None: ...  # client gone or stop string matched: the engine frees the slot at once;
    # may be called more than once, and after Finished (then it does nothing)


class Engine(Protocol):
    vocab_size: int
    max_context: int               # prompt + max_tokens must fit
    ready: bool                    # loaded and compiled for the first bucket (GET /health)

    def submit(self, request: Request) -> RequestStream: ...  # thread-safe; ValueError: invalid request;
    # EngineUnavailable: shutting down. Called on the server's event loop.
    def stats(self) -> dict: ...   # {"running": n, "waiting": n}
    def shutdown(self, drain: bool) -> None: ...  # stop admitting; finish (drain) or abort in-flight requests


class EventChannel:
    """A RequestStream fed from any thread. Create it on the event loop that will iterate it (inside
    Engine.submit); `put` is thread-safe and ignored once the loop is closed; `cancel` calls
    `on_cancel` once, and not at all after a Finished was put (the engine frees the slot there)."""

    def __init__(self, on_cancel: Callable[[], None] | None = None):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._on_cancel = on_cancel
        self._lock = threading.Lock()
        self.cancelled = False
        self.finished = False      # a Finished event was put

    def put(self, event: Event) -> None:
        with self._lock:
            if self.finished:
                return
            self.finished = isinstance(event, Finished)
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:       # the server's loop is closed: nobody listens any more
            pass

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled or self.finished:
                return
            self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, Finished):
                return
