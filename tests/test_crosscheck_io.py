"""ref.engine_io: readers for the exact JSON shapes vLLM and SGLang return, arrays, dumps, a live server."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from ref import engine_io as io
from ref.errors import FormatError

DATA = Path(__file__).parent / "data"
# The vocabulary the recorded fixtures in tests/data use (byte-level BPE spellings, as in vocab.json).
VOCAB = {"The": 0, "Ġquick": 1, "Ġbrown": 2, "Ġfox": 3, "Ġjumps": 4, "Ġover": 5, "Ġthe": 6, "Ġlazy": 7,
         "Ġdog": 8, ".": 9, "Ġcat": 10, "Ġa": 11, "Ġred": 12, "Ã©": 13, "<|im_end|>": 14}
LOOKUP = io.vocab_lookup(VOCAB.get)
PROMPT = [0, 1, 2, 3, 4, 5, 6]
# engine logprob of each prompt token t=1..6, and the top-3 at t=4 (the prompt token there has rank 7)
PROMPT_LP = [None, -0.5, -1.2, -0.2, -4.1, -0.1, -0.3]
TOP_AT_4 = {5: -0.7, 9: -1.5, 6: -2.2}


def load(name):
    return json.loads((DATA / name).read_text())


def test_vllm_prompt_logprobs():
    rec = io.read_engine_json(load("vllm_completions_prompt_logprobs.json"), LOOKUP)
    assert rec.token_ids == PROMPT and rec.n_prompt == 7 and rec.k == 3
    assert rec.logprob == PROMPT_LP
    assert rec.top[0] is None
    assert rec.top[4] == TOP_AT_4                      # the rank-7 prompt token is not part of the top-3
    assert rec.top[2] == {12: -0.9, 2: -1.2, 7: -2.5}  # prompt token inside the top-k stays


def test_vllm_prompt_logprobs_needs_ids():
    obj = load("vllm_completions_prompt_logprobs.json")
    del obj["choices"][0]["prompt_token_ids"]
    with pytest.raises(FormatError, match="prompt token ids are needed"):
        io.read_engine_json(obj, LOOKUP)
    assert io.read_engine_json(obj, LOOKUP, token_ids=PROMPT).token_ids == PROMPT
    with pytest.raises(FormatError, match="6 prompt token ids"):
        io.read_engine_json(obj, LOOKUP, token_ids=PROMPT[:6])


def test_vllm_legacy_echo_token_ids():
    rec = io.read_engine_json(load("vllm_completions_echo_token_ids.json"))  # no tokenizer needed
    assert rec.token_ids == PROMPT + [7] and rec.n_prompt == 7
    assert rec.logprob == PROMPT_LP + [-0.4]
    assert rec.k == 3 and rec.top[4] == TOP_AT_4 and rec.top[7] == {7: -0.4, 8: -1.4, 11: -2.6}


def test_sglang_legacy_echo_token_text():
    rec = io.read_engine_json(load("sglang_completions_echo.json"), LOOKUP)
    assert rec.token_ids == PROMPT + [7] and rec.n_prompt == 7
    assert rec.logprob == PROMPT_LP + [-0.4]
    assert rec.top[4] == TOP_AT_4
    assert rec.dropped == 1 and rec.k == 3             # the "\ufffd" partial-byte entry names no token
    assert rec.top[7] == {7: -0.4, 8: -1.4}


def test_sglang_text_without_tokenizer():
    """Exact ids (return_token_ids) carry the sequence; the text-keyed top-k needs the vocabulary."""
    rec = io.read_engine_json(load("sglang_completions_echo.json"))
    assert rec.token_ids == PROMPT + [7] and rec.logprob == PROMPT_LP + [-0.4]
    assert rec.dropped == 21 and rec.k == 0 and all(t is None for t in rec.top)
    obj = load("sglang_completions_echo.json")
    del obj["choices"][0]["prompt_token_ids"], obj["choices"][0]["token_ids"]
    with pytest.raises(FormatError, match=r"tokens\[0\]: token 'The' matches no vocabulary id"):
        io.read_engine_json(obj)


def test_sglang_generate_native():
    for obj in (load("sglang_generate.json"), [load("sglang_generate.json")]):
        rec = io.read_engine_json(obj)
        assert rec.token_ids == PROMPT + [7] and rec.n_prompt == 7
        assert rec.logprob == PROMPT_LP + [-0.4]
        assert rec.top[4] == TOP_AT_4 and rec.k == 3


def test_vllm_chat_prompt_logprobs_and_content():
    rec = io.read_engine_json(load("vllm_chat_logprobs.json"), LOOKUP)
    assert rec.token_ids == [0, 1, 2, 3, 9] and rec.n_prompt == 3
    assert rec.logprob == [None, -0.5, -1.2, -0.2, -0.05]
    assert rec.k == 2 and rec.top[3] == {3: -0.2, 8: -2.3} and rec.top[4] == {9: -0.05, 5: -3.2}


def test_chat_content_only_needs_prompt_ids():
    obj = load("vllm_chat_logprobs.json")
    del obj["prompt_logprobs"], obj["prompt_token_ids"]
    with pytest.raises(FormatError, match="prompt token ids are needed"):
        io.read_engine_json(obj, LOOKUP)
    rec = io.read_engine_json(obj, LOOKUP, token_ids=[0, 1, 2])
    assert rec.token_ids == [0, 1, 2, 3, 9] and rec.logprob == [None, None, None, -0.2, -0.05]


def test_lookup_spellings():
    assert LOOKUP("token_id:42", None) == 42
    assert LOOKUP("Ġfox", None) == 3                   # raw vocabulary piece
    assert LOOKUP(" fox", None) == 3                   # decoded text
    assert LOOKUP("é", None) == 13                     # decoded text, multi-byte
    assert LOOKUP("\ufffd", [195, 169]) == 13          # chat `bytes` beat the lossy text
    assert LOOKUP("bytes:\\xc3\\xa9", None) == 13      # vLLM's spelling of undecodable bytes
    assert LOOKUP("<|im_end|>", None) == 14
    assert LOOKUP("nope", None) is None


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.update(choices=[]), "no 'choices'"),
    (lambda o: o["choices"][0].update(prompt_logprobs=None), "no prompt_logprobs and no logprobs"),
    (lambda o: o["choices"][0]["prompt_logprobs"][2].update({"x": 1}), "key 'x' is not a token id"),
    (lambda o: o["choices"][0]["prompt_logprobs"][2]["2"].update(logprob="a"), "expected a number"),
])
def test_malformed_json(mutate, message):
    obj = load("vllm_completions_prompt_logprobs.json")
    mutate(obj)
    with pytest.raises(FormatError, match=message):
        io.read_engine_json(obj, LOOKUP)


def test_read_logits_npy_npz_safetensors(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.save(tmp_path / "l.npy", a)
    save_file({"logits": a[0].astype(ml_dtypes.bfloat16), "other": a[0]}, str(tmp_path / "l.safetensors"))
    assert io.read_logits(tmp_path / "l.npy").shape == (3, 4)
    got = io.read_logits(tmp_path / "l.safetensors")
    assert got.dtype == np.float64 and np.array_equal(got, a[0])
    np.savez(tmp_path / "l.npz", logits=a, other=a)
    assert io.read_logits(tmp_path / "l.npz").shape == (3, 4)
    (tmp_path / "bad.npy").write_text("nope")
    (tmp_path / "l.txt").write_text("")
    np.savez(tmp_path / "two.npz", a=a, b=a)
    for name, msg in (("bad.npy", "not a .npy"), ("missing.npy", "no such file"), ("two.npz", "none named 'logits'"),
                      ("l.txt", "expected .safetensors, .npz or .npy")):
        with pytest.raises(FormatError, match=msg):
            io.read_logits(tmp_path / name)


def test_dump_aliases(tmp_path):
    x = np.ones((2, 4), np.float32)
    names = {"embed_tokens": "embeddings", "model.layers.0.after_attn": "layers.0.after_mixer",
             "layer1.moe_router_logits": "layers.1.router_logits", "layer_1.moe_topk_idx": "layers.1.topk_ids",
             "layers.2.after_moe": "layers.2.after_moe", "hidden_states.2": "layers.1.after_moe",
             "final_norm": "final_hidden", "mystery": None}
    for name, canon in names.items():
        assert io.canonical_dump_name(name, num_layers=4) == canon
    assert io.canonical_dump_name("hidden_states.4", 4) == "final_hidden"
    save_file({"embed_tokens": x[None], "layers.0.after_moe": x, "mystery": x}, str(tmp_path / "d.safetensors"))
    dumps, ignored = io.read_dumps(tmp_path / "d.safetensors", 4)
    assert sorted(dumps) == ["embeddings", "layers.0.after_moe"] and ignored == ["mystery"]
    assert dumps["embeddings"].shape == (2, 4)
    np.savez(tmp_path / "d.npz", **{"layer0.after_attn": x, "final_norm": x})
    assert sorted(io.read_dumps(tmp_path / "d.npz", 4)[0]) == ["final_hidden", "layers.0.after_mixer"]
    save_file({"embed": x, "embeddings": x}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(FormatError, match="both mean 'embeddings'"):
        io.read_dumps(tmp_path / "dup.safetensors", 4)


class _Recorded(BaseHTTPRequestHandler):
    """Serves recorded responses by path; remembers the request bodies it saw."""
    responses: dict = {}
    seen: list = []

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "nvidia/Qwen3.5-397B-A17B-NVFP4", "object": "model"}]})

    strict = False  # refuse fields outside the OpenAI schema, as a strict server would

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        if self.strict and "prompt_logprobs" in body:
            self._send(422, {"object": "error", "message": "extra fields not permitted", "code": 422})
        elif self.path in self.responses:
            self._send(200, self.responses[self.path])
        else:
            self._send(400, {"object": "error", "message": "unknown path", "code": 400})

    def log_message(self, *args):
        pass


@pytest.fixture
def recorded_server():
    """A real HTTP server on 127.0.0.1 (ephemeral port) serving the recorded responses."""
    _Recorded.responses = {"/v1/completions": load("vllm_completions_prompt_logprobs.json"),
                           "/generate": load("sglang_generate.json")}
    _Recorded.seen, _Recorded.strict = [], False
    srv = HTTPServer(("127.0.0.1", 0), _Recorded)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Recorded
    srv.shutdown()
    srv.server_close()


def test_server_openai(recorded_server):
    url, handler = recorded_server
    raw = io.query_server(url, PROMPT, top_k=3)
    rec = io.read_engine_json(raw, LOOKUP, token_ids=PROMPT)
    assert rec.logprob == PROMPT_LP and rec.top[4] == TOP_AT_4
    path, body = handler.seen[-1]
    assert path == "/v1/completions" and body["prompt"] == PROMPT and body["echo"] is True
    assert body["model"] == "nvidia/Qwen3.5-397B-A17B-NVFP4" and body["prompt_logprobs"] == body["logprobs"] == 3


def test_server_strict_openai_schema(recorded_server):
    """A server refusing vLLM's extra fields is asked again with echo + logprobs only."""
    url, handler = recorded_server
    handler.strict = True
    handler.responses["/v1/completions"] = load("sglang_completions_echo.json")
    rec = io.read_engine_json(io.query_server(url, PROMPT, top_k=3, model="m"), LOOKUP, token_ids=PROMPT)
    assert rec.token_ids == PROMPT + [7] and rec.top[4] == TOP_AT_4
    assert [("prompt_logprobs" in b) for _, b in handler.seen] == [True, False]


def test_server_sglang(recorded_server):
    url, handler = recorded_server
    rec = io.read_engine_json(io.query_server(url + "/", PROMPT, top_k=3, api="sglang"), token_ids=PROMPT)
    assert rec.token_ids == PROMPT + [7]
    path, body = handler.seen[-1]
    assert path == "/generate" and body["input_ids"] == PROMPT and body["logprob_start_len"] == 0


def test_server_errors(recorded_server):
    url, _ = recorded_server
    _Recorded.responses = {}
    with pytest.raises(FormatError, match="HTTP 400"):
        io.query_server(url, PROMPT, top_k=3, model="m")
    with pytest.raises(FormatError, match="cannot connect"):
        io.query_server("http://127.0.0.1:9", PROMPT, top_k=3, model="m", timeout=5)
