"""Finished or streaming choices -> OpenAI response bodies and stream chunks.

`CompletionChoice` and `ChatChoice` format one choice either whole (`whole()`, after its run ended)
or as the `choices[]` entry of each stream chunk (`chunk(update)`); a streamed choice's text,
tokens and logprobs concatenate to the whole one's.
"""
from __future__ import annotations

from jaxrun.chat_output import ChatTextStream, MessageDelta, merge_tool_call_deltas
from jaxrun.choice_stream import ChoiceRun, ChoiceUpdate
from jaxrun.openai_protocol import (Plan, TokenStrings, chat_logprobs, envelope, legacy_logprobs, usage,
                                    vllm_prompt_logprobs)


def prompt_tokens(plan: Plan) -> int:
    """Usage's prompt tokens: each prompt once, however many choices it has."""
    return sum(len(ids) for ids in {c.prompt_index: c.prompt_ids for c in plan.choices}.values())


class CompletionChoice:
    def __init__(self, plan: Plan, run: ChoiceRun, names: TokenStrings):
        self.plan, self.run, self.names, self.opts = plan, run, names, plan.options
        self._started = False          # the prompt was echoed / its token ids sent
        self._offset = 0               # text_offset of the next token: the token strings' lengths so far

    def _prompt_entries(self) -> list:
        pl = self.run.prompt_logprobs
        return list(pl.entries) if pl is not None else [None] * len(self.run.plan.prompt_ids)

    def _logprobs(self, ids, entries, offset) -> dict | None:
        n = self.opts.logprobs
        return None if n is None else legacy_logprobs(ids, entries, n, self.names, offset)

    def _base(self, text: str, ids: list[int], entries: list, finish, stop_reason, offset: int) -> dict:
        return {"index": self.run.plan.index, "text": text, "logprobs": self._logprobs(ids, entries, offset),
                "finish_reason": finish, "stop_reason": stop_reason}

    def whole(self) -> dict:
        r, cp = self.run, self.run.plan
        text, ids, entries = r.text, list(r.token_ids), list(r.logprobs)
        if self.opts.echo:
            text = (cp.prompt_text or "") + text
            ids, entries = list(cp.prompt_ids) + ids, self._prompt_entries() + entries
        choice = self._base(text, ids, entries, r.finish_reason, r.stop_reason, 0)
        choice["prompt_logprobs"] = (vllm_prompt_logprobs(r.prompt_logprobs, self.opts.prompt_logprobs, self.names)
                                     if self.opts.prompt_logprobs is not None and r.prompt_logprobs else None)
        choice["prompt_token_ids"] = list(cp.prompt_ids) if self.opts.return_token_ids else None
        choice["token_ids"] = list(r.token_ids) if self.opts.return_token_ids else None
        return choice

    def chunk(self, u: ChoiceUpdate) -> dict | None:
        cp = self.run.plan
        text, ids, entries = u.text, list(u.token_ids), list(u.logprobs)
        first = not self._started
        if first and self.opts.echo:
            text = (cp.prompt_text or "") + text
            ids, entries = list(cp.prompt_ids) + ids, self._prompt_entries() + entries
        if not (text or ids or u.finish_reason):
            return None
        self._started = True
        choice = self._base(text, ids, entries, u.finish_reason, u.stop_reason, self._offset)
        if choice["logprobs"] is not None:
            self._offset += sum(map(len, choice["logprobs"]["tokens"]))
        if self.opts.return_token_ids:
            choice["token_ids"] = list(u.token_ids)
            if first:
                choice["prompt_token_ids"] = list(cp.prompt_ids)
        return choice


class ChatChoice:
    def __init__(self, plan: Plan, run: ChoiceRun, names: TokenStrings):
        self.plan, self.run, self.names, self.opts = plan, run, names, plan.options
        self._parser = ChatTextStream(plan.thinking, None if plan.tools is None else list(plan.tools))
        self._text = ""

    @property
    def uses_parser(self) -> bool:
        return self.plan.thinking or self.plan.tools is not None

    def _calls_allowed(self, d: MessageDelta) -> MessageDelta:
        if not self.plan.parallel_tool_calls:                  # as vLLM: only the first call
            d.tool_calls = [t for t in d.tool_calls if t["index"] == 0]
        return d

    def _finish(self, reason: str | None, called_tools: bool) -> str | None:
        return "tool_calls" if reason == "stop" and called_tools else reason

    def _logprobs(self, ids, entries) -> dict | None:
        n = self.opts.logprobs
        return None if n is None else chat_logprobs(ids, entries, n, self.names)

    def whole(self) -> dict:
        r = self.run
        parser = ChatTextStream(self.plan.thinking, None if self.plan.tools is None else list(self.plan.tools))
        d = self._calls_allowed(parser.update(r.text, final=True))
        reasoning = d.reasoning if self.plan.include_reasoning and d.reasoning else None
        empty = None if self.uses_parser else ""
        message = {"role": "assistant", "content": d.content or empty, "reasoning_content": reasoning,
                   "reasoning": reasoning}
        if d.tool_calls:
            message["tool_calls"] = merge_tool_call_deltas(d.tool_calls)
        choice = {"index": r.plan.index, "message": message,
                  "logprobs": self._logprobs(r.token_ids, r.logprobs),
                  "finish_reason": self._finish(r.finish_reason, bool(d.tool_calls)), "stop_reason": r.stop_reason}
        if self.opts.return_token_ids:
            choice["token_ids"] = list(r.token_ids)
        return choice

    def first_chunk(self) -> dict:
        return {"index": self.run.plan.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def chunk(self, u: ChoiceUpdate) -> dict | None:
        self._text += u.text
        d = self._calls_allowed(self._parser.update(self._text, final=u.finish_reason is not None))
        delta = {}
        if d.reasoning and self.plan.include_reasoning:
            delta["reasoning_content"] = delta["reasoning"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = d.tool_calls
        logprobs = self._logprobs(u.token_ids, u.logprobs) if u.token_ids else None
        if not (delta or logprobs or u.finish_reason):
            return None
        choice = {"index": self.run.plan.index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": self._finish(u.finish_reason, self._parser.called_tools)}
        if u.finish_reason is not None:
            choice["stop_reason"] = u.stop_reason
        if self.opts.return_token_ids:
            choice["token_ids"] = list(u.token_ids)
        return choice


def formatter(plan: Plan, run: ChoiceRun, names: TokenStrings):
    return (ChatChoice if plan.kind == "chat" else CompletionChoice)(plan, run, names)


def whole_response(plan: Plan, rid: str, formatters: list) -> dict:
    runs = [f.run for f in formatters]
    extra = {"usage": usage(prompt_tokens(plan), sum(len(r.token_ids) for r in runs)), "system_fingerprint": None}
    if plan.kind == "chat":
        r, opts = runs[0], plan.options
        extra["prompt_logprobs"] = (vllm_prompt_logprobs(r.prompt_logprobs, opts.prompt_logprobs, formatters[0].names)
                                    if opts.prompt_logprobs is not None and r.prompt_logprobs else None)
        extra["prompt_token_ids"] = list(r.plan.prompt_ids) if opts.return_token_ids else None
    return envelope(plan.kind, rid, plan.model, [f.whole() for f in formatters], chunk=False, **extra)
