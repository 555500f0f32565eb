"""jaxrun.server end to end: a real uvicorn server on 127.0.0.1 around a deterministic FakeEngine
(tests/fake_engine.py), driven by the real `openai` client (and raw HTTP where the exact bytes
matter). Every number a response carries is checked against the fake model computed directly."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest

from fake_engine import FakeEngine
from fake_server import running
from jaxrun.engine_api import SamplingParams
from jaxrun.openai_protocol import generation_defaults
from jaxrun.server import build_app
from ref.engine_io import query_server, read_engine_json, vocab_lookup
from ref.synth_tokenizer import build_tokenizer, tokenizer_config
from ref.tokenizer import load_tokenizer

BASE = 480                                  # special_base of the test tokenizer (the tiny preset's)
ENDOFTEXT, IM_END = BASE, BASE + 2
EOS = (IM_END, ENDOFTEXT)
FAIL = 511                                  # a prompt holding this id fails inside the engine
MODEL = "fake-model"
CTX = 2048                                  # the test engine's context (the tool prompt is long in this vocabulary)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.json").write_text(build_tokenizer(BASE, BASE))
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(BASE)))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": list(EOS), "temperature": 0.6,
                                                          "top_p": 0.95, "top_k": 20}))
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


REASONED = "I should add.\n</think>\n\nThe answer is 4."
TOOL_TURN = ("Need weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
             "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def chat_script(tok):
    """The fake model's answers to the chat tests' prompts (None: the fake model's own tokens)."""
    def script(prompt_ids):
        text = tok.decode(prompt_ids)
        if "<tool_response>" in text:
            out = "Done.\n</think>\n\nIt is sunny."
        elif "two cities" in text:
            out = TOOL_TURN + "\n" + TOOL_TURN.split("</think>\n\n")[1].replace("Paris", "Rome")
        elif "weather" in text:
            out = TOOL_TURN
        elif "2+2" in text:
            out = "The answer is 4." if text.endswith("</think>\n\n") else REASONED
        else:
            return None
        return tok.encode(out) + [IM_END]
    return script


class Env:
    def __init__(self, url, engine, tok):
        self.url, self.engine, self.tok, self.model = url, engine, tok, engine.model
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

    def post(self, path: str, body, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def text_of(self, ids) -> str:
        """The text a client sees for generated ids: a final stop id shows nothing, nor special tokens."""
        ids = ids[:-1] if ids and ids[-1] in EOS else ids
        return self.tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def env(tok, tok_dir):
    engine = FakeEngine(max_context=CTX, max_running=4, fail_token=FAIL, script=chat_script(tok))
    app = build_app(engine, tok, [MODEL, "alias"], eos_token_ids=EOS, default_sampling=generation_defaults(tok_dir))
    with running(app) as url:
        yield Env(url, engine, tok)


def _prompt(seed: int, n: int = 6) -> list[int]:
    return np.random.default_rng(seed).integers(0, BASE, n).tolist()


# --------------------------------------------------------------------------- completions

def test_models_and_health(env):
    assert [m.id for m in env.client.models.list().data] == [MODEL, "alias"]
    assert env.get("/health")[0] == 200


def test_completions_from_text_and_token_ids(env):
    prompt = "The quick brown fox"
    ids = env.tok.encode(prompt)
    want = env.model.greedy(ids, 10, EOS)
    for p in (prompt, ids):
        r = env.client.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0,
                                          extra_body={"return_token_ids": True})
        c = r.choices[0]
        assert c.text == env.text_of(want) and c.token_ids == want and c.prompt_token_ids == ids
        assert c.finish_reason == ("stop" if want[-1] in EOS else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (len(ids), len(want), len(ids) + len(want))
    r = env.client.completions.create(model="alias", prompt=[_prompt(1), _prompt(2, 9)], n=2, max_tokens=5,
                                      temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text == env.text_of(env.model.greedy([_prompt(1), _prompt(2, 9)][c.index // 2], 5, EOS))
    assert r.usage.prompt_tokens == 6 + 9 and r.usage.completion_tokens == 20


def test_echo_logprobs_and_prompt_logprobs_as_crosscheck_reads_them(env):
    """ref.crosscheck's own query (echo, logprobs, vLLM's prompt_logprobs, token ids) -> ref.engine_io
    reads back every logprob and top-k exactly as the model gives them."""
    ids = _prompt(3, 8)
    raw = query_server(env.url, ids, 3)
    gen = env.model.greedy(ids, 1, EOS)
    rec = read_engine_json(raw, token_ids=ids)
    seq = ids + gen
    assert rec.token_ids == seq and rec.n_prompt == len(ids) and rec.k == 3
    assert rec.source == "vllm prompt_logprobs + completion logprobs"
    for t in range(1, len(seq)):
        lp = env.model.logprobs(seq[:t])
        top = np.argsort(-lp, kind="stable")[:3]
        assert rec.logprob[t] == lp[seq[t]]
        assert rec.top[t] == {int(i): lp[i] for i in top}
    c = raw["choices"][0]
    assert c["prompt_logprobs"][0] is None and c["logprobs"]["token_logprobs"][0] is None
    e = c["prompt_logprobs"][1]                      # the prompt token first, then the top 3 by rank
    lp = env.model.logprobs(seq[:1])
    assert list(e)[0] == str(seq[1]) and e[str(seq[1])]["rank"] == 1 + int((lp > lp[seq[1]]).sum())
    assert c["logprobs"]["tokens"] == [f"token_id:{i}" for i in seq]
    assert c["text"] == env.tok.decode(ids) + env.text_of(gen)


def test_echo_legacy_logprobs_with_token_strings(env):
    ids = _prompt(4, 5)
    r = env.client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    seq = ids + env.model.greedy(ids, 3, EOS)
    assert lp.tokens == [env.tok.decode([i]) for i in seq] and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == [env.model.logprobs(seq[:t])[seq[t]] for t in range(1, len(seq))]
    assert lp.text_offset == list(np.cumsum([0] + [len(s) for s in lp.tokens[:-1]]))
    for t in range(1, len(seq)):                      # the token itself, then the top 2: 2 or 3 entries
        top = env.model.entry(seq[:t], seq[t], 2).top
        assert set(lp.top_logprobs[t].values()) == {env.model.logprobs(seq[:t])[seq[t]], *(v for _, v in top)}


def test_completion_stream_adds_up_to_the_whole(env):
    ids = _prompt(5, 7)
    kw = dict(model=MODEL, prompt=ids, max_tokens=20, temperature=0, logprobs=1, echo=True)
    whole = env.client.completions.create(**kw).choices[0]
    assert whole.text.startswith(env.tok.decode(ids)) and len(whole.logprobs.tokens) == 7 + 20
    chunks = list(env.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(c.choices[0].logprobs, field) for c in chunks if c.choices and c.choices[0].logprobs),
                   []) == getattr(whole.logprobs, field)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(env.model.greedy(ids, 20, EOS))


def _stop_case(env) -> tuple[list[int], str, str]:
    """A prompt whose greedy text holds an ASCII stop string first seen past its start."""
    for seed in range(100):
        ids = _prompt(100 + seed, 5)
        text = env.text_of(env.model.greedy(ids, 40, EOS))
        for i in range(4, len(text) - 2):
            s = text[i:i + 2]
            if s.isascii() and s.isalnum() and text.find(s) == i:
                return ids, s, text[:i]
    raise AssertionError("no usable stop string")


def test_stop_string_cuts_and_frees_the_slot(env):
    ids, stop, want = _stop_case(env)
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=ids, max_tokens=40, temperature=0, stop=[stop, "never-seen"])
        if stream:
            chunks = list(env.client.completions.create(**kw, stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            last = chunks[-1].choices[0]
        else:
            last = env.client.completions.create(**kw).choices[0]
            text = last.text
        assert text == want and last.finish_reason == "stop" and last.stop_reason == stop
    time.sleep(0.1)
    outcomes = [o for o in env.engine.outcomes if list(o[0].prompt_ids) == ids and o[0].max_tokens == 40]
    assert len(outcomes) == 2 and all(reason == "abort" and n < 40 for _, reason, n in outcomes)


def test_seeded_sampling_and_defaults(env):
    ids = _prompt(6, 6)
    kw = dict(model=MODEL, prompt=ids, max_tokens=12, temperature=0.8, extra_body={"return_token_ids": True})
    one = env.client.completions.create(**kw, seed=7).choices[0].token_ids
    assert env.client.completions.create(**kw, seed=7).choices[0].token_ids == one
    two = env.client.completions.create(**kw, seed=7, n=2).choices
    eight = env.client.completions.create(**kw, seed=8).choices[0].token_ids
    assert two[0].token_ids == one and two[1].token_ids == eight
    env.client.completions.create(model=MODEL, prompt=ids, max_tokens=2)
    assert env.engine.submitted[-1].sampling == SamplingParams(0.6, 0.95, 20, None)   # generation_config.json


def test_echo_with_max_tokens_0_returns_the_prompt_scored(env):
    ids = _prompt(11, 5)
    r = env.client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text == env.tok.decode(ids) and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == 5
    assert c.logprobs.token_logprobs == [None] + [env.model.logprobs(ids[:t])[ids[t]] for t in range(1, 5)]


@pytest.fixture(scope="module")
def spec(tok):
    """An engine that emits three tokens per step, as speculative decoding does."""
    engine = FakeEngine(max_context=CTX, tokens_per_step=3)
    with running(build_app(engine, tok, MODEL, eos_token_ids=EOS)) as url:
        yield Env(url, engine, tok)


def test_several_tokens_per_step(spec):
    ids = _prompt(12, 6)
    want = spec.model.greedy(ids, 30, EOS)
    r = spec.client.completions.create(model=MODEL, prompt=ids, max_tokens=31, temperature=0, logprobs=0,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == spec.model.greedy(ids, 31, EOS) and r.usage.completion_tokens == 31
    assert len(r.choices[0].logprobs.tokens) == 31
    # a stop id inside a step: nothing after it, and vLLM's stop_reason
    k = next(k for k in range(4, 30) if want[k] not in want[:k])
    r = spec.client.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0,
                                       extra_body={"stop_token_ids": [want[k]], "return_token_ids": True})
    c = r.choices[0]
    assert (c.token_ids, c.finish_reason, c.stop_reason) == (want[:k + 1], "stop", want[k])
    assert c.text == spec.text_of(want[:k])
    # a stop string completed inside a step: the tokens up to the one completing it are counted
    for n in range(3, 30):
        text = spec.text_of(want[:n])
        stop = text[-2:]
        if stop.isascii() and stop.isalnum() and stop not in spec.text_of(want[:n - 1]) and \
                text.find(stop) == len(text) - 2:
            break
    else:
        raise AssertionError("no usable stop string")
    r = spec.client.completions.create(model=MODEL, prompt=ids, max_tokens=30, temperature=0, stop=stop)
    assert (r.choices[0].text, r.usage.completion_tokens) == (text[:-2], n)


# --------------------------------------------------------------------------- chat

def test_chat_reasoning_whole_and_streamed(env):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    m = env.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0).choices[0]
    assert (m.message.reasoning_content, m.message.content, m.finish_reason) == \
        ("I should add.\n", "\n\nThe answer is 4.", "stop")
    assert m.message.reasoning == m.message.reasoning_content            # vLLM's newer field name
    chunks = list(env.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "I should add.\n"
    assert "".join(d.content or "" for d in deltas) == "\n\nThe answer is 4."
    off = env.client.chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert env.tok.decode(env.engine.submitted[-1].prompt_ids).endswith("<think>\n\n</think>\n\n")
    assert (off.choices[0].message.reasoning_content, off.choices[0].message.content) == (None, "The answer is 4.")


def test_chat_n_choices_streamed_with_usage(env):
    msgs = [{"role": "user", "content": "Say something."}]
    chunks = list(env.client.chat.completions.create(
        model=MODEL, messages=msgs, n=2, max_tokens=5, temperature=0.7, seed=3, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"include_reasoning": False}))
    whole = env.client.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=5, temperature=0.7, seed=3,
                                               extra_body={"include_reasoning": False})
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert all(getattr(m.delta, "reasoning_content", None) is None for m in mine)   # include_reasoning false
        assert whole.choices[i].message.reasoning_content is None and whole.choices[i].message.content is None
    assert chunks[-1].usage.completion_tokens == 10 == whole.usage.completion_tokens
    assert all(c.usage is not None for c in chunks)                  # continuous usage stats


def test_chat_logprobs_and_prompt_logprobs(env):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, "prompt_logprobs": 2, "return_token_ids": True}
    status, obj = env.post("/v1/chat/completions", body)
    assert status == 200
    prompt = obj["prompt_token_ids"]
    gen = env.model.greedy(prompt, 6, EOS)
    assert obj["choices"][0]["token_ids"] == gen
    rec = read_engine_json(obj, lookup=vocab_lookup(env.tok.token_id))
    seq = prompt + gen
    assert rec.token_ids == seq and rec.source == "vllm prompt_logprobs + chat logprobs"
    for t in range(1, len(seq)):
        lp = env.model.logprobs(seq[:t])
        assert rec.logprob[t] == lp[seq[t]]
        assert rec.top[t] == {int(i): lp[i] for i in np.argsort(-lp, kind="stable")[:2]}
    item = obj["choices"][0]["logprobs"]["content"][0]
    assert bytes(item["bytes"]).decode("utf-8", "replace") == env.tok.decode([gen[0]]) == item["token"]


def test_tool_call_round_trip(env):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = env.client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, temperature=0)
    c = r.choices[0]
    call = c.message.tool_calls[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert (c.message.reasoning_content, c.message.content) == ("Need weather.\n", "\n\n")
    prompt = env.tok.decode(env.engine.submitted[-1].prompt_ids)
    assert prompt == env.tok.apply_chat_template(msgs, tools=TOOLS)               # the template renders the tools
    # streamed: the same call, in deltas
    chunks = list(env.client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, temperature=0,
                                                     stream=True))
    parts = [t for ch in chunks for t in (ch.choices[0].delta.tool_calls or [])]
    assert parts[0].id and parts[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments for p in parts)) == {"city": "Paris", "days": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back: the prompt renders them in Qwen's format
    back = msgs + [c.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id,
                                                            "content": "22 C, sunny"}]
    r2 = env.client.chat.completions.create(model=MODEL, messages=back, tools=TOOLS, temperature=0)
    assert r2.choices[0].message.content == "\n\nIt is sunny." and r2.choices[0].finish_reason == "stop"
    prompt = env.tok.decode(env.engine.submitted[-1].prompt_ids)
    expected = env.tok.apply_chat_template(msgs + [
        {"role": "assistant", "content": "\n\n", "reasoning_content": "Need weather.\n",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
        {"role": "tool", "content": "22 C, sunny"}], tools=TOOLS)
    assert prompt == expected
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in prompt
    assert "<|im_start|>user\n<tool_response>\n22 C, sunny\n</tool_response><|im_end|>" in prompt


def test_parallel_tool_calls(env):
    msgs = [{"role": "user", "content": "Weather in two cities?"}]
    for parallel, cities in ((True, ["Paris", "Rome"]), (False, ["Paris"])):
        r = env.client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, temperature=0,
                                               parallel_tool_calls=parallel)
        calls = r.choices[0].message.tool_calls
        assert [json.loads(c.function.arguments)["city"] for c in calls] == cities
        assert len({c.id for c in calls}) == len(cities)
        chunks = env.client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, temperature=0,
                                                    parallel_tool_calls=parallel, stream=True)
        parts = [t for ch in chunks for t in (ch.choices[0].delta.tool_calls or [])]
        assert sorted({p.index for p in parts}) == list(range(len(cities)))


# --------------------------------------------------------------------------- many clients, disconnects

def test_sixteen_concurrent_clients(env):
    def one(k):
        ids = _prompt(1000 + k, 4 + k % 5)
        if k % 2:
            chunks = env.client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, stream=True)
            return ids, "".join(c.choices[0].text for c in chunks)
        return ids, env.client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0).choices[0].text
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    for ids, text in results:
        assert text == env.text_of(env.model.greedy(ids, 12, EOS))
    assert env.engine.stats() == {"running": 0, "waiting": 0}


@pytest.fixture()
def slow(tok):
    engine = FakeEngine(max_context=256, step_s=0.02)
    with running(build_app(engine, tok, MODEL)) as url:
        yield Env(url, engine, tok)


def _wait_outcome(engine, ids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        o = engine.outcome(lambda r: list(r.prompt_ids) == ids)
        if o is not None:
            return o
        time.sleep(0.01)
    raise AssertionError("the request did not end")


def test_disconnect_mid_stream_cancels(slow):
    ids = _prompt(7, 5)
    stream = slow.client.completions.create(model=MODEL, prompt=ids, max_tokens=200, temperature=0, stream=True)
    it = iter(stream)
    next(it), next(it)
    stream.close()                                    # the client goes away
    _, reason, n = _wait_outcome(slow.engine, ids)
    assert reason == "abort" and n < 100


def test_disconnect_while_waiting_for_a_whole_response_cancels(slow):
    ids = _prompt(8, 5)
    body = json.dumps({"model": MODEL, "prompt": ids, "max_tokens": 200, "temperature": 0}).encode()
    host, port = slow.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while slow.engine.stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    _, reason, n = _wait_outcome(slow.engine, ids)
    assert reason == "abort" and n < 100


# --------------------------------------------------------------------------- errors

IMAGE = {"messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "text", "text": "What is it?"}]}]}
BAD = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": [1, 2, 600]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": CTX - 1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1] * CTX, "max_tokens": 1}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * CTX}]}, 400, "messages"),
    ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404, "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "prompt_logprobs": 1}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [9999]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", IMAGE, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
     400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                              "tools": TOOLS}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_requests_get_openai_error_bodies(env, path, body, status, param):
    code, obj = env.post(path, {"model": MODEL, **body})
    assert code == status and set(obj["error"]) == {"message", "type", "param", "code"}
    assert obj["error"]["code"] == status and obj["error"]["param"] == param and obj["error"]["message"]


def test_error_messages_say_why(env):
    msg = env.post("/v1/chat/completions", {"model": MODEL, **IMAGE})[1]["error"]["message"]
    assert msg == "messages[0].content[0]: image input not supported by this model/server (no vision tower)"
    msg = env.post("/v1/completions", {"prompt": [1, 2], "max_tokens": CTX - 1})[1]["error"]["message"]
    assert f"maximum context length is {CTX} tokens and your request has 2 input tokens" in msg
    code, obj = env.post("/v1/completions", None, raw=b'{"prompt": "hi", ')
    assert code == 400 and "malformed JSON" in obj["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        env.client.completions.create(model="gpt-5", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        env.client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert env.client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason


def test_engine_failure_is_a_500_and_the_server_keeps_serving(env):
    code, obj = env.post("/v1/completions", {"model": MODEL, "prompt": [1, 2, FAIL], "max_tokens": 5})
    assert code == 500 and "injected failure" in obj["error"]["message"] and obj["error"]["code"] == 500
    body = {"model": MODEL, "prompt": [3, FAIL], "max_tokens": 5, "stream": True}
    req = urllib.request.Request(env.url + "/v1/completions", method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        events = [line[6:] for line in r.read().decode().split("\n") if line.startswith("data: ")]
    assert "injected failure" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    with pytest.raises(openai.APIError, match="injected failure"):
        list(env.client.completions.create(model=MODEL, prompt=[4, FAIL], max_tokens=5, stream=True))
    assert env.client.completions.create(model=MODEL, prompt=[4, 5], max_tokens=2).choices[0].text is not None


def test_metrics(env):
    env.client.completions.create(model=MODEL, prompt=_prompt(9), max_tokens=3, temperature=0)
    code, text = env.get("/metrics")
    metrics = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    lab = f'{{model_name="{MODEL}"}}'
    assert code == 200 and metrics[f"jaxrun:num_requests_running{lab}"] == 0
    assert f"jaxrun:num_requests_waiting{lab}" in metrics
    assert metrics[f"jaxrun:prompt_tokens_total{lab}"] >= 6 and metrics[f"jaxrun:generation_tokens_total{lab}"] >= 3
    assert metrics[f"jaxrun:time_to_first_token_seconds_count{lab}"] >= 1
    assert metrics[f"jaxrun:inter_token_latency_seconds_count{lab}"] >= 2
    assert metrics[f'jaxrun:request_success_total{{finished_reason="length",model_name="{MODEL}"}}'] >= 1


# --------------------------------------------------------------------------- no tokenizer; shutdown

def test_without_a_tokenizer_token_ids_work_and_text_is_refused():
    engine = FakeEngine(max_context=64)
    with running(build_app(engine, None, MODEL, eos_token_ids=EOS)) as url:
        env = Env(url, engine, None)
        ids = _prompt(10, 4)
        r = env.client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, logprobs=1)
        want = env.model.greedy(ids, 4, EOS)
        assert r.choices[0].text == "" and r.choices[0].logprobs.tokens == [f"token_id:{i}" for i in want]
        for path, body in (("/v1/completions", {"prompt": "hello"}), ("/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": ids, "stop": ["x"]})):
            code, obj = env.post(path, {"model": MODEL, **body})
            msg = obj["error"]["message"]
            assert code == 400 and "needs a tokenizer, and this model has none (no tokenizer.json" in msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_drains_requests_in_flight_and_exits_0(tok_dir, sig):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_server.py"), "--port", str(port),
                             "--tokenizer", str(tok_dir), "--step-s", "0.01"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.05)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        stream = iter(client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=150, temperature=0,
                                                stream=True))
        got = [next(stream)]
        reader = threading.Thread(target=lambda: got.extend(stream))
        reader.start()
        proc.send_signal(sig)                         # mid-stream
        refused = False
        while not refused and reader.is_alive():      # new connections are refused while the stream runs on
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                time.sleep(0.02)
            except (urllib.error.URLError, ConnectionError):
                refused = reader.is_alive()
        reader.join(60)
        assert refused and got[-1].choices[0].finish_reason == "length"
        assert sum(len(c.choices[0].text) for c in got) > 0 and proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
