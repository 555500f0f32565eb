"""One choice of a request: its engine events -> kept tokens, logprobs and released text.

Tokens after a stop id, or after the token that completes a stop string, are dropped (the stream is
cancelled at once so the engine frees the slot); the stop id itself counts as generated but adds no
text. Text comes out in complete characters, minus what could still begin a stop string.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from jaxrun.chat_output import IncrementalDetokenizer, StopStrings
from jaxrun.engine_api import Finished, PromptLogprobs, RequestStream, TokenLogprob, Tokens
from jaxrun.openai_protocol import APIError, ChoicePlan, OutputOptions


@dataclass
class ChoiceUpdate:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class EngineFailure(APIError):
    """The engine failed the request (Finished("error")): HTTP 500 or an error event."""

    def __init__(self, message: str):
        super().__init__(500, f"the engine failed this request: {message}")


class ChoiceRun:
    """Consumes one RequestStream. `updates()` yields one ChoiceUpdate per Tokens event and a last one
    carrying the finish reason; the totals (token_ids, logprobs, text, prompt_logprobs) accumulate."""

    def __init__(self, plan: ChoicePlan, stream: RequestStream, opts: OutputOptions, tokenizer, observer=None):
        self.plan, self.stream, self.opts, self.observer = plan, stream, opts, observer
        decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=opts.skip_special)) if tokenizer else None
        self._detok = IncrementalDetokenizer(decode) if decode else None
        self._stops = StopStrings(list(opts.stops), opts.include_stop) if opts.stops else None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self.prompt_logprobs: PromptLogprobs | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._engine_done = False

    async def updates(self):
        try:
            async for event in self.stream:
                if isinstance(event, PromptLogprobs):
                    self.prompt_logprobs = event
                elif isinstance(event, Tokens):
                    update = self._tokens(event)
                    if self.observer is not None:
                        self.observer.tokens(len(update.token_ids), time.monotonic())
                    yield update
                    if self.finish_reason is not None:
                        return
                elif isinstance(event, Finished):
                    self._engine_done = True
                    if event.reason == "error":
                        self.finish_reason = "error"
                        raise EngineFailure(event.error or "unknown error")
                    yield self._finish(event.reason)
                    return
        finally:
            if not self._engine_done:         # a stop string, the client gone, or an error here
                self.stream.cancel()
            if self.observer is not None:
                self.observer.finished(self.finish_reason or "abort")

    def _tokens(self, event: Tokens) -> ChoiceUpdate:
        out = ChoiceUpdate()
        if self.opts.discard_output:
            return out
        stop_ids = self.plan.request.stop_ids
        for k, tid in enumerate(event.token_ids):
            out.token_ids.append(tid)
            if event.logprobs is not None:
                out.logprobs.append(event.logprobs[k])
            if tid in stop_ids:               # the engine ends here; its text is not shown
                self.stop_reason = tid if tid in self.opts.user_stop_ids else None
                break
            piece = self._detok.add(tid) if self._detok else ""
            out.text += self._stops.feed(piece) if self._stops else piece
            if self._stops and self._stops.matched is not None:
                self.finish_reason, self.stop_reason = "stop", self._stops.matched
                out.finish_reason, out.stop_reason = "stop", self._stops.matched
                break
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.text += out.text
        return out

    def _finish(self, reason: str) -> ChoiceUpdate:
        text = ""
        if self._detok is not None and not self.opts.discard_output:
            piece = self._detok.flush()
            text = self._stops.feed(piece) if self._stops else piece
            if self._stops and self._stops.matched is not None:
                reason, self.stop_reason = "stop", self._stops.matched
            elif self._stops:
                text += self._stops.flush()
        self.text += text
        self.finish_reason = reason
        return ChoiceUpdate(text=text, finish_reason=reason, stop_reason=self.stop_reason)
