"""Generated token ids -> the text, reasoning and tool calls a client sees, incrementally.

- `IncrementalDetokenizer`: releases text in complete characters as tokens arrive.
- `StopStrings`: cuts the text at the first stop string completed, holding back what could begin one.
- `split_reasoning`: Qwen3 thinking (vLLM's `qwen3` reasoning parser): text before `</think>` is
  reasoning; a `<tool_call>` followed by `<function` also ends it; without either, all reasoning.
- `parse_tool_calls`: Qwen3-Coder XML tool calls (vLLM's `qwen3_coder` tool parser):
  `<tool_call>\\n<function=NAME>\\n<parameter=P>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>`,
  values converted by the tool's JSON schema.
- `ChatTextStream`: the two parsers applied to a growing text, as deltas.

Both parsers are functions of the whole text with a `final` flag: before the end they return only
what no later text can change (a partial tag is held back), so streamed deltas concatenate to exactly
the non-streamed result.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ref.engine_io import BYTE_TO_UNICODE

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"
_FUNCTION_START = re.compile(r"<function[\s=]")       # what makes a <tool_call> end the reasoning
_UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


# --------------------------------------------------------------------------- tokens -> text

class IncrementalDetokenizer:
    """Token ids -> text deltas in complete characters: the decoded tail is held while it ends in an
    incomplete UTF-8 sequence (U+FFFD); `flush` releases it as it stands."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0          # ids[prefix:read] decode to the last released piece (context)
        self._read = 0            # ids before read are released

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return now[len(before):]


def token_bytes(piece: str | None, text: str) -> list[int]:
    """The raw bytes of one token: its byte-level vocabulary spelling decoded, else its text's UTF-8."""
    if piece and all(c in _UNICODE_TO_BYTE for c in piece):
        return [_UNICODE_TO_BYTE[c] for c in piece]
    return list(text.encode("utf-8"))


class StopStrings:
    """Cuts text at the first stop string to be complete (the earliest end; on a tie the longer, then
    the one listed first), so the cut does not depend on how the text arrives. `feed` returns the
    text safe to release: all but the last len(longest stop) - 1 characters, which could begin one."""

    def __init__(self, stops: list[str], include: bool = False):
        self.stops = [s for s in stops if s]
        self.include = include
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buf = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.matched is not None:
            return ""
        self._buf += text
        hits = [(i + len(s), i, n, s) for n, s in enumerate(self.stops) if (i := self._buf.find(s)) >= 0]
        if hits:
            _, i, _, s = min(hits)
            self.matched = s
            out, self._buf = self._buf[:i] + (s if self.include else ""), ""
            return out
        cut = max(0, len(self._buf) - self._hold)
        out, self._buf = self._buf[:cut], self._buf[cut:]
        return out

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


# --------------------------------------------------------------------------- reasoning (qwen3)

def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of the tags."""
    for n in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(len(t) > n and t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def _tool_call_at(text: str, k: int, final: bool, function_start) -> bool | None:
    """Is the <tool_call> at k a real call (followed, after whitespace, by a function tag)?
    None: not decidable yet (the text after it could still become one)."""
    after = text[k + len(TOOL_CALL_OPEN):].lstrip()
    if function_start(after):
        return True
    if not final and len(after) < len(FUNCTION_OPEN) and FUNCTION_OPEN.startswith(after):
        return None
    return False


def _function_start_reasoning(after: str) -> bool:
    return bool(_FUNCTION_START.match(after))


def _function_start_tools(after: str) -> bool:
    return after.startswith(FUNCTION_OPEN)


def split_reasoning(text: str, final: bool) -> tuple[str, str]:
    """Generated text that starts inside a think block -> (reasoning, content).

    As vLLM's qwen3 parser: a leading <think> is dropped; reasoning ends at the first </think> (the
    tag belongs to neither part) or at the first <tool_call> followed by <function (the call starts
    the content); a text with neither is all reasoning (generation stopped while thinking)."""
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
    elif not final and THINK_OPEN.startswith(text):
        return "", ""
    end = text.find(THINK_CLOSE)
    limit = end if end >= 0 else len(text)
    k = text.find(TOOL_CALL_OPEN)
    while 0 <= k < limit:
        real = _tool_call_at(text, k, final, _function_start_reasoning)
        if real:
            return text[:k], text[k:]
        if real is None:
            return text[:k], ""
        k = text.find(TOOL_CALL_OPEN, k + 1)
    if end >= 0:
        return text[:end], text[end + len(THINK_CLOSE):]
    if final:
        return text, ""
    return text[:len(text) - _partial_suffix(text, (THINK_CLOSE, TOOL_CALL_OPEN))], ""


def prompt_ends_reasoning(prompt_text: str) -> bool:
    """The prompt already closed its think block (enable_thinking=False renders '<think>\\n\\n</think>')."""
    return prompt_text.rfind(THINK_CLOSE) > prompt_text.rfind(THINK_OPEN)


# --------------------------------------------------------------------------- tool calls (qwen3_coder)

@dataclass
class ParsedToolCall:
    name: str
    params: list[tuple[str, str]]   # (name, raw value) of the parameters complete so far
    closed: bool                    # </function> seen (or the text ended)


def _first_tool_call(text: str, start: int, final: bool) -> tuple[int, bool]:
    """(position of the first real <tool_call> at or after start, or of a possible one still
    undecided, or of a partial tag at the end; whether it is decided real). No call: (len(text), False)."""
    k = text.find(TOOL_CALL_OPEN, start)
    while k >= 0:
        real = _tool_call_at(text, k, final, _function_start_tools)
        if real or real is None:
            return k, bool(real)
        k = text.find(TOOL_CALL_OPEN, k + 1)
    held = 0 if final else _partial_suffix(text[start:], (TOOL_CALL_OPEN,))
    return len(text) - held, False


def _parameter_end(text: str, start: int, final: bool) -> int | None:
    """Index of the structural </parameter> at or after start: one followed (after whitespace) by
    another parameter, </function> or </tool_call>, or by the end of a final text. None: not yet."""
    follow = (PARAMETER_OPEN, FUNCTION_CLOSE, TOOL_CALL_CLOSE)
    e = text.find(PARAMETER_CLOSE, start)
    while e >= 0:
        after = text[e + len(PARAMETER_CLOSE):].lstrip()
        if any(after.startswith(f) for f in follow) or (final and not after):
            return e
        if not final and any(f.startswith(after) for f in follow):
            return None
        e = text.find(PARAMETER_CLOSE, e + 1)
    return None


def _valid_function_name(name: str) -> bool:
    return bool(name) and not any(c in "{}<>\"' \t\n\r" for c in name)


def _after_call(text: str, p: int) -> int:
    """Index after the </tool_call> that follows p (after whitespace), or p when there is none."""
    rest = text[p:].lstrip()
    return len(text) - len(rest) + len(TOOL_CALL_CLOSE) if rest.startswith(TOOL_CALL_CLOSE) else p


def _parse_function(text: str, k: int, final: bool) -> tuple[ParsedToolCall | None, int | None]:
    """The call whose <tool_call> is at k -> (the call, None while its name is incomplete or when it
    is invalid; the index after the call once it is closed, else None)."""
    f = text.find(FUNCTION_OPEN, k) + len(FUNCTION_OPEN)
    name_end = text.find(">", f)
    if name_end < 0:
        return None, None
    if not _valid_function_name(text[f:name_end]):      # not a call (e.g. an unrendered template)
        e = text.find(FUNCTION_CLOSE, name_end)
        return None, (_after_call(text, e + len(FUNCTION_CLOSE)) if e >= 0 else None)
    call = ParsedToolCall(text[f:name_end], [], False)
    p = name_end + 1
    while True:
        q = p
        while q < len(text) and text[q] in " \t\r\n":
            q += 1
        rest = text[q:]
        if rest.startswith(FUNCTION_CLOSE):
            call.closed = True
            return call, _after_call(text, q + len(FUNCTION_CLOSE))
        if rest.startswith(PARAMETER_OPEN):
            pname_end = text.find(">", q + len(PARAMETER_OPEN))
            if pname_end < 0:
                break
            v = pname_end + 1 + (text[pname_end + 1:pname_end + 2] == "\n")
            e = _parameter_end(text, v, final)
            if e is None:
                if not final:
                    break
                e = text.find(FUNCTION_CLOSE, v)     # unterminated value: up to </function> or the end
                e = len(text) if e < 0 else e
            value = text[v:e]
            call.params.append((text[q + len(PARAMETER_OPEN):pname_end], value[:-1] if value.endswith("\n") else value))
            p = e + len(PARAMETER_CLOSE) if text.startswith(PARAMETER_CLOSE, e) else e
            continue
        if not final and (FUNCTION_CLOSE.startswith(rest) or PARAMETER_OPEN.startswith(rest)):
            break                                    # a tag may be starting
        nxt = [i for i in (text.find(PARAMETER_OPEN, q + 1), text.find(FUNCTION_CLOSE, q + 1)) if i >= 0]
        if not nxt:                                  # stray text in the body: skip to the next tag
            break
        p = min(nxt)
    call.closed = final
    return call, None


def parse_tool_calls(text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
    """Content text -> (content before the first tool call, the calls).

    As vLLM's qwen3_coder parser: a call is a <tool_call> followed by <function=NAME>; parameter values
    lose one leading and one trailing newline; a </parameter> counts only when another parameter,
    </function> or </tool_call> follows it (or the text ends). Text between and after calls is dropped."""
    start, real = _first_tool_call(text, 0, final)
    content, calls = text[:start], []
    while real:
        call, after = _parse_function(text, start, final)
        if call is not None:
            calls.append(call)
        if after is None:
            break
        start, real = _first_tool_call(text, after, final)
    return content, calls


def tool_properties(tools: list[dict] | None, name: str) -> dict:
    """The JSON-schema properties of the tool called `name` ({} if unknown)."""
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and fn.get("name") == name:
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            return props if isinstance(props, dict) else {}
    return {}


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def convert_parameter(value: str, schema: dict | None):
    """A raw parameter value -> its JSON value by the parameter's schema type (vLLM's rules: strings
    stay strings, integers and numbers parsed, booleans from true/false, objects and arrays as JSON;
    null/None where the type allows it; anything unparsable stays the string)."""
    if not isinstance(schema, dict):
        return value
    allows_null, kind = False, "string"
    if "type" in schema:
        kind = str(schema["type"]).strip().lower()
        allows_null = kind == "null"
    elif "anyOf" in schema:
        picked = False
        for option in schema["anyOf"]:
            if isinstance(option, dict) and "type" in option:
                t = str(option["type"]).strip().lower()
                if t == "null":
                    allows_null = True
                elif not picked:
                    kind, picked = t, True
    if allows_null and value.lower() in ("null", "none"):
        return None
    if kind in ("string", "str", "text", "varchar", "char", "enum"):
        return value
    if value.lower() in ("null", "none"):
        return None
    if kind.startswith(("int", "uint", "long", "short", "unsigned")):
        try:
            return int(value)
        except ValueError:
            return value
    if kind.startswith(("num", "float")):
        try:
            x = float(value)
        except ValueError:
            return value
        return int(x) if x.is_integer() else x
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    container = kind in ("object", "array", "arr") or kind.startswith(("dict", "list"))
    if container:
        try:
            parsed = json.loads(value)
            return _literal(parsed) if isinstance(parsed, str) else parsed
        except ValueError:
            pass
    parsed = _literal(value)
    return _literal(parsed) if container and isinstance(parsed, str) else parsed


def _json_value(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):        # a Python literal JSON cannot hold (set, bytes, nan...)
        return json.dumps(str(value), ensure_ascii=False)


# --------------------------------------------------------------------------- the chat message, incrementally

@dataclass
class MessageDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)   # OpenAI delta form, with "index"

    def __bool__(self):
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class _SentCall:
    id: str
    params: int = 0
    closed: bool = False


class ChatTextStream:
    """The assistant message of a growing generated text, as deltas.

    thinking: the output starts inside a think block (reasoning parser on, the prompt left it open);
    tools: the request's tools when tool calls are parsed, else None."""

    def __init__(self, thinking: bool, tools: list[dict] | None):
        self.thinking, self.tools = thinking, tools
        self._reasoning = self._content = 0      # characters sent
        self._calls: list[_SentCall] = []

    def update(self, text: str, final: bool = False) -> MessageDelta:
        reasoning, content = split_reasoning(text, final) if self.thinking else ("", text)
        calls: list[ParsedToolCall] = []
        if self.tools is not None:
            content, calls = parse_tool_calls(content, final)
        delta = MessageDelta(reasoning[self._reasoning:], content[self._content:])
        self._reasoning, self._content = len(reasoning), len(content)
        for i, call in enumerate(calls):
            if i == len(self._calls):
                self._calls.append(_SentCall(f"call_{uuid.uuid4().hex[:24]}"))
                head = {"index": i, "id": self._calls[i].id, "type": "function",
                        "function": {"name": call.name, "arguments": "{"}}
            else:
                head = {"index": i, "function": {"arguments": ""}}
            sent, props = self._calls[i], tool_properties(self.tools, call.name)
            for name, raw in call.params[sent.params:]:
                value = _json_value(convert_parameter(raw, props.get(name)))
                head["function"]["arguments"] += (", " if sent.params else "") + f"{json.dumps(name)}: {value}"
                sent.params += 1
            if call.closed and not sent.closed:
                head["function"]["arguments"] += "}"
                sent.closed = True
            if "id" in head or head["function"]["arguments"]:
                delta.tool_calls.append(head)
        return delta

    @property
    def called_tools(self) -> bool:
        return bool(self._calls)


def merge_tool_call_deltas(deltas: list[dict]) -> list[dict]:
    """Streamed tool-call deltas -> the complete calls ({"id", "type", "function": {name, arguments}})."""
    calls: dict[int, dict] = {}
    for d in deltas:
        c = calls.setdefault(d["index"], {"id": d.get("id"), "type": "function",
                                          "function": {"name": d["function"].get("name"), "arguments": ""}})
        c["function"]["arguments"] += d["function"].get("arguments", "")
    return [calls[i] for i in sorted(calls)]
