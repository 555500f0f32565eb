"""python -m jaxrun.serve end to end: a real server process on 127.0.0.1 (the tiny checkpoint, the real
scheduler and runner) and the real `openai` client. Greedy results equal jaxrun.generate's whatever
else runs; cancelled streams free their slots; ref.crosscheck --server agrees with the engine; SIGINT
ends the server with status 0."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 1, 3], [64, 2, 11, 400], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15,
                                                                  16, 17, 18, 19, 20, 21, 22, 23]]
STEPS, CONTEXT = 8, 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


class Server:
    def __init__(self, ckpt, *flags, slots: int = 4):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxrun.serve", "--model", str(ckpt), "--port", str(self.port),
             "--max-running-requests", str(slots), "--max-context", str(CONTEXT), "--prefill-chunk", "64",
             "--log-level", "warning", *flags], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
            try:
                if _get(self.url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("server did not become healthy")
            time.sleep(0.5)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", timeout=120, max_retries=0)
        self.model = str(ckpt)

    def stop(self, sig=signal.SIGINT, timeout: float = 60) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, self.proc.stderr.read()

    def running(self) -> float:
        text = _get(self.url + "/metrics")[1]
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("jaxrun:num_requests_running"))


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint)
    yield s
    if s.proc.poll() is None:
        s.stop(signal.SIGKILL, 10)


@pytest.fixture(scope="module")
def generated(tiny_checkpoint):
    """Greedy tokens of each prompt alone, from jaxrun.generate's runner (one device, f32)."""
    from jaxrun.load import load
    from jaxrun.runner import Runner
    from jaxrun.sharding import make_mesh
    mesh = make_mesh(1)
    ckpt, params = load(str(tiny_checkpoint), mesh, "f32", progress=False)
    runner = Runner(params, ckpt.config.text, mesh, "f32")
    return [runner.generate([p], STEPS, max_context=CONTEXT)[0].token_ids for p in PROMPTS]


def _complete(server, prompt, **kw):
    kw.setdefault("temperature", 0)
    return server.client.completions.create(model=server.model, prompt=prompt, max_tokens=STEPS,
                                            extra_body={"return_token_ids": True, "ignore_eos": True}, **kw)


def test_greedy_equals_generate_alone_and_among_16_clients(server, generated):
    """Each prompt alone, then 16 concurrent clients (4 slots: some wait, all are served): the same
    tokens as jaxrun.generate, whatever else ran beside them."""
    alone = [_complete(server, p).choices[0].model_extra["token_ids"] for p in PROMPTS]
    assert alone == generated
    results, errors = {}, []

    def client(i):
        try:
            p = PROMPTS[i % len(PROMPTS)]
            results[i] = _complete(server, p).choices[0].model_extra["token_ids"]
        except Exception as e:  # noqa: BLE001 -- collected and reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == 16
    assert all(results[i] == generated[i % len(PROMPTS)] for i in range(16))


def test_seeded_sampling_does_not_depend_on_the_batch(server):
    kw = dict(temperature=1.0, top_p=0.9, seed=11)
    alone = _complete(server, PROMPTS[0], **kw).choices[0].model_extra["token_ids"]
    batch = server.client.completions.create(model=server.model, prompt=[PROMPTS[1], PROMPTS[0]], max_tokens=STEPS,
                                             extra_body={"return_token_ids": True, "ignore_eos": True}, **kw)
    assert batch.choices[1].model_extra["token_ids"] == alone


def test_text_chat_stream_logprobs_and_echo(server):
    r = server.client.completions.create(model=server.model, prompt="The quick brown fox", max_tokens=4,
                                         temperature=0, logprobs=3, echo=True, extra_body={"prompt_logprobs": 2})
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    assert r.usage.completion_tokens == len(lp.tokens) - n_prompt <= 4
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(r.choices[0].model_extra["prompt_logprobs"]) == n_prompt
    chunks = list(server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 6
    whole = server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hello there"}],
                                                  max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    streamed = "".join((c.choices[0].delta.model_extra.get("reasoning_content") or "") + (c.choices[0].delta.content or "")
                       for c in chunks if c.choices)
    m = whole.choices[0].message
    assert streamed == (m.model_extra.get("reasoning_content") or "") + (m.content or "")
    assert m.model_extra.get("reasoning_content")                      # the template opens <think>: all thinking


def test_tools_are_rendered_and_a_tool_result_round_trips(server):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    plain = server.client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Weather?"}],
                                                  max_tokens=1)
    with_tools = server.client.chat.completions.create(model=server.model, tools=tools, max_tokens=1,
                                                       messages=[{"role": "user", "content": "Weather?"}])
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    r = server.client.chat.completions.create(model=server.model, tools=tools, max_tokens=2, messages=[
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert r.usage.prompt_tokens > with_tools.usage.prompt_tokens and r.choices[0].finish_reason in ("length", "stop")


def test_disconnect_mid_stream_frees_the_slot(server):
    with server.client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=200, stream=True,
                                          extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))
        assert server.running() >= 1
    deadline = time.monotonic() + 30
    while server.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.running() == 0


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": [1, 2], "max_tokens": CONTEXT}, 400, None),             # beyond the context
    ({"prompt": [1, 10 ** 6], "max_tokens": 2}, 400, "prompt"),
    ({"prompt": [1, 2], "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": [1, 2], "temperature": -1}, 400, "temperature"),
    ({"prompt": [1, 2], "model": "no-such-model"}, 404, "model"),
])
def test_bad_requests_get_the_openai_error_body(server, body, status, param):
    req = urllib.request.Request(server.url + "/v1/completions", json.dumps({"model": server.model, **body}).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    err = json.loads(e.value.read())["error"]
    assert e.value.code == status and err["message"] and (param is None or err["param"] == param)
    assert _get(server.url + "/health")[0] == 200                       # still serving


def test_crosscheck_against_the_server_passes(server, tiny_checkpoint):
    ids = ",".join(map(str, PROMPTS[2]))
    r = subprocess.run([sys.executable, "-m", "ref.crosscheck", "--model", str(tiny_checkpoint), "--server", server.url,
                        "--token-ids", ids, "--precision", "f32", "--no-lint"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_speculative_server_and_sigint(tiny_checkpoint, generated):
    """--speculative 2: the same greedy tokens; SIGINT while a stream runs: it finishes, exit 0."""
    s = Server(tiny_checkpoint, "--speculative", "2", slots=2)
    try:
        assert [_complete(s, p).choices[0].model_extra["token_ids"] for p in PROMPTS] == generated
        stream = s.client.completions.create(model=s.model, prompt=PROMPTS[0], max_tokens=40, stream=True,
                                             extra_body={"ignore_eos": True})
        first = next(iter(stream))
        code_err = {}
        stopper = threading.Thread(target=lambda: code_err.update(r=s.stop(signal.SIGINT)))
        stopper.start()
        rest = list(stream)
        stopper.join(90)
        assert first.choices and sum(len(c.choices[0].text) >= 0 for c in rest if c.choices) >= 1
        code, err = code_err["r"]
        assert code == 0, err[-2000:]
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
