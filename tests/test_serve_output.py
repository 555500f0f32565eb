"""jaxrun.chat_output: incremental detokenization, stop strings, the qwen3 reasoning split and the
qwen3_coder tool-call parser. Streaming equals one-shot parsing for every way of cutting the text;
hand-worked cases pin vLLM's behaviour; the real Qwen3.5 template's tool-call rendering parses back."""
import asyncio
import json
import threading

import pytest
from hypothesis import given, strategies as st

from jaxrun.chat_output import (ChatTextStream, IncrementalDetokenizer, StopStrings, convert_parameter,
                                merge_tool_call_deltas, parse_tool_calls, prompt_ends_reasoning, split_reasoning,
                                token_bytes)
from jaxrun.engine_api import EventChannel, Finished, Tokens
from ref.synth_tokenizer import build_tokenizer, tokenizer_config
from ref.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.json").write_text(build_tokenizer(480, 480))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(480)))
    return load_tokenizer(d)


ids_strategy = st.lists(st.one_of(st.integers(0, 479), st.integers(480, 505)), max_size=40)


@given(ids=ids_strategy, skip=st.booleans())
def test_detokenizer_releases_prefixes_that_add_up(tok, ids, skip):
    decode = lambda x: tok.decode(x, skip_special_tokens=skip)  # noqa: E731
    d, out = IncrementalDetokenizer(decode), ""
    for k, i in enumerate(ids):
        out += d.add(i)
        assert decode(ids[:k + 1]).startswith(out) and not out.endswith("\ufffd") or out == decode(ids[:k + 1])
    assert out + d.flush() == decode(ids)


def test_token_bytes_are_the_raw_bytes(tok):
    for i in range(480):
        raw = bytes(token_bytes(tok.piece(i), tok.decode([i])))
        text = tok.decode([i])
        assert raw.decode("utf-8", "replace") == text
    assert bytes(token_bytes(tok.piece(tok.token_id("<think>")), "<think>")) == b"<think>"
    assert token_bytes(None, "é") == [0xC3, 0xA9]


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(start, stop) of the stop string completed first: the earliest end, then the longest, then
    the one listed first."""
    for end in range(1, len(text) + 1):
        done = [(end - len(s), n, s) for n, s in enumerate(stops) if text[:end].endswith(s)]
        if done:
            i, _, s = min(done)
            return i, s
    return None


@given(text=st.text("ab<>/c", max_size=40), stops=st.lists(st.text("ab<>/", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=8), include=st.booleans())
def test_stop_strings_cut_at_the_first_completed_however_fed(text, stops, cuts, include):
    s, out = StopStrings(stops, include), ""
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    for a, b in zip(bounds, bounds[1:]):
        out += s.feed(text[a:b])
    hit = _first_stop(text, stops)
    if hit is None:
        assert s.matched is None and out + s.flush() == text
    else:
        i, stop = hit
        assert s.matched == stop and out == text[:i] + (stop if include else "")


FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<function=f>", "<function=get_w>",
             "<function={{x}}>", "<function name=q>", "<parameter=a>", "<parameter=n>", "</parameter>",
             "</function>", "\n", " ", "x", "12", "<", "</", "<func", "<tool_c", "</par", "é"]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"n": {"type": "integer"}}}}}]


def _run(stream: ChatTextStream, text: str, cuts: list[int]):
    bounds = sorted({len(text), *[c for c in cuts if c < len(text)]})
    deltas = [stream.update(text[:b], final=b == len(text)) for b in bounds]
    if not bounds:
        deltas.append(stream.update(text, final=True))
    return ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas),
            [{k: v for k, v in c.items() if k != "id"} for c in
             merge_tool_call_deltas([t for d in deltas for t in d.tool_calls])])


@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=30), cuts=st.lists(st.integers(0, 200), max_size=12),
       thinking=st.booleans(), tools=st.booleans())
def test_streamed_message_equals_one_shot(parts, cuts, thinking, tools):
    text = "".join(parts)
    whole = _run(ChatTextStream(thinking, TOOLS if tools else None), text, [])
    assert _run(ChatTextStream(thinking, TOOLS if tools else None), text, cuts) == whole
    per_char = _run(ChatTextStream(thinking, TOOLS if tools else None), text, list(range(len(text))))
    assert per_char == whole
    for call in whole[2]:
        json.loads(call["function"]["arguments"])    # always a complete JSON object


@pytest.mark.parametrize("text, final, expected", [
    ("Let me see.\n</think>\n\nIt is 4.", True, ("Let me see.\n", "\n\nIt is 4.")),
    ("<think>\nhmm</think>ok", True, ("\nhmm", "ok")),
    ("still thinking", True, ("still thinking", "")),                          # truncated: all reasoning
    ("still thinking</thi", False, ("still thinking", "")),                  # a tag may be starting
    ("plan<tool_call>\n<function=f>\n", True, ("plan", "<tool_call>\n<function=f>\n")),   # implicit end
    ("the <tool_call> tag</think>done", True, ("the <tool_call> tag", "done")),  # a mention, not a call
    ("x<tool_call>\n", False, ("x", "")),                                    # undecided yet
    ("x<tool_call>\n", True, ("x<tool_call>\n", "")),
])
def test_split_reasoning_cases(text, final, expected):
    assert split_reasoning(text, final) == expected


def test_prompt_ends_reasoning():
    assert not prompt_ends_reasoning("<|im_start|>assistant\n<think>\n")
    assert prompt_ends_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_ends_reasoning("no tags")


CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n</function>\n</tool_call>")


def test_parse_tool_calls_cases():
    content, calls = parse_tool_calls("Sure.\n\n" + CALL, True)
    assert content == "Sure.\n\n" and [(c.name, c.params, c.closed) for c in calls] == \
        [("get_weather", [("city", "Paris"), ("days", "3")], True)]
    # two calls; text between and after them is dropped; a literal </parameter> inside a value stays
    two = CALL + "\nbetween\n" + "<tool_call>\n<function=run>\n<parameter=code>\nx = '</parameter> ok'\n" \
                                 "</parameter>\n</function>\n</tool_call>\ntrailing"
    content, calls = parse_tool_calls(two, True)
    assert content == "" and [c.name for c in calls] == ["get_weather", "run"]
    assert calls[1].params == [("code", "x = '</parameter> ok'")]
    # generation stopped inside a call: the parameters so far, closed at the end
    cut = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\n2"
    content, calls = parse_tool_calls(cut, True)
    assert [(c.name, c.params, c.closed) for c in calls] == [("f", [("a", "1"), ("b", "2")], True)]
    # not yet final: only what is complete
    content, calls = parse_tool_calls(cut, False)
    assert [(c.params, c.closed) for c in calls] == [([("a", "1")], False)]
    # an unrendered template is no call; a bare mention of the tag is content
    assert parse_tool_calls("<tool_call>\n<function={{ name }}>\n</function>\n</tool_call>", True)[1] == []
    assert parse_tool_calls("use <tool_call> tags", True) == ("use <tool_call> tags", [])


@pytest.mark.parametrize("value, schema, expected", [
    ("Paris", {"type": "string"}, "Paris"),
    ("3", {"type": "integer"}, 3),
    ("3.0", {"type": "number"}, 3),
    ("2.5", {"type": "number"}, 2.5),
    ("x", {"type": "integer"}, "x"),
    ("True", {"type": "boolean"}, True),
    ("no", {"type": "boolean"}, False),
    ('{"a": [1, 2]}', {"type": "object"}, {"a": [1, 2]}),
    ("{'a': 1}", {"type": "object"}, {"a": 1}),
    ("[1, 2]", {"type": "array"}, [1, 2]),
    ("null", {"type": "integer"}, None),
    ("null", {"type": "string"}, "null"),
    ("None", {"anyOf": [{"type": "string"}, {"type": "null"}]}, None),
    ("7", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, 7),
    ("7", None, "7"),                                            # not in the schema: a string
])
def test_convert_parameter(value, schema, expected):
    got = convert_parameter(value, schema)
    assert got == expected and type(got) is type(expected)


def test_template_tool_calls_parse_back(tok):
    """What the Qwen3.5 template renders for an assistant's tool calls (the form the model learned)
    parses back to the same names and arguments."""
    args = [{"city": "Paris", "days": 3, "units": {"temp": "C"}}, {"query": "a\nb", "flags": [1, 2]}]
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": p}}}
             for n, p in (("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"},
                                           "units": {"type": "object"}}),
                          ("search", {"query": {"type": "string"}, "flags": {"type": "array"}}))]
    msgs = [{"role": "user", "content": "Go."},
            {"role": "assistant", "content": "Calling.", "tool_calls": [
                {"type": "function", "function": {"name": t["function"]["name"], "arguments": a}}
                for t, a in zip(tools, args)]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=False, tools=tools)
    turn = text.split("<|im_start|>assistant\n")[-1].split("<|im_end|>")[0]
    assert turn.startswith("<think>\n")                 # what the generation prompt ends with
    d = ChatTextStream(True, tools).update(turn[len("<think>\n"):], final=True)
    assert (d.reasoning, d.content) == ("\n", "\n\nCalling.\n\n")
    calls = merge_tool_call_deltas(d.tool_calls)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "search"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == args


def test_event_channel_bridges_a_thread_to_the_loop():
    cancels = []

    async def main():
        ch = EventChannel(on_cancel=lambda: cancels.append(1))
        feeder = threading.Thread(target=lambda: [ch.put(Tokens((i,), None)) for i in range(3)] +
                                  [ch.put(Finished("length")), ch.put(Tokens((9,), None))])
        feeder.start()
        got = [e async for e in ch]
        feeder.join()
        ch.cancel()                                  # after Finished: nothing to free
        other = EventChannel(on_cancel=lambda: cancels.append(2))
        other.cancel()
        other.cancel()
        return got, other

    got, other = asyncio.run(main())
    assert got == [Tokens((0,), None), Tokens((1,), None), Tokens((2,), None), Finished("length")]
    assert cancels == [2]
    other.put(Finished("abort"))                     # the loop is gone: ignored
