"""The server's image path: chat `image_url` parts with base64 data URLs are decoded and preprocessed
with the checkpoint's settings, the prompt's image pads expanded, and the images handed to the engine
in Request.images; everything else is a clear 400. The engine here is the reference itself (RefEngine:
ref.model f64 on the tiny checkpoint), so `ref.crosscheck --server --image` against it must pass.
"""
import base64
import io
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image

from fake_server import running
from jaxrun.engine_api import EventChannel, Finished, PromptLogprobs, Tokens
from jaxrun.scheduler import token_logprobs
from jaxrun.server import build_app
from ref import crosscheck as X
from ref.image import SAMPLE_IMAGE, preprocess
from ref.model import Model
from ref.tokenizer import load_tokenizer


class RefEngine:
    """An Engine answering each request with ref.model's prompt logprobs and greedy tokens (f64)."""

    def __init__(self, ckpt_dir):
        self.model = Model(str(ckpt_dir), "f64")
        self.vocab_size, self.max_context, self.ready = self.model.cfg.vocab_size, 512, True
        self.submitted = []

    def submit(self, request):
        self.submitted.append(request)
        channel = EventChannel()
        ids = list(request.prompt_ids)
        logits = self.model.logits(ids, images=list(request.images) or None)
        if request.prompt_logprobs is not None:
            channel.put(PromptLogprobs((None,) + tuple(token_logprobs(logits[t - 1], ids[t], request.prompt_logprobs)
                                                       for t in range(1, len(ids)))))
        token = int(np.argmax(logits[-1]))
        lps = (token_logprobs(logits[-1], token, request.logprobs),) if request.logprobs is not None else None
        channel.put(Tokens((token,), lps))
        channel.put(Finished("length"))
        return channel

    def stats(self):
        return {"running": 0, "waiting": 0}

    def shutdown(self, drain):
        pass


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    engine = RefEngine(tiny_checkpoint)
    cfg = engine.model.ckpt.config
    app = build_app(engine, load_tokenizer(tiny_checkpoint), "tiny", preprocessor=cfg.preprocessor,
                    image_token_id=cfg.special_tokens["image_token_id"])
    with running(app) as url:
        yield url, engine


def data_url(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def post(url, body):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({"model": "tiny", **body}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def image_chat(*urls, text="What is it?"):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
                          + [{"type": "text", "text": text}]}], "max_tokens": 1}


def test_images_reach_the_engine_preprocessed_with_pads_expanded(served, tiny_checkpoint):
    url, engine = served
    sample = Image.open(SAMPLE_IMAGE)
    code, obj = post(url, {**image_chat(data_url(sample, "PNG"), data_url(sample.resize((200, 60)), "JPEG")),
                           "return_token_ids": True})
    assert code == 200, obj
    req = engine.submitted[-1]
    pp = engine.model.ckpt.config.preprocessor
    want = preprocess(SAMPLE_IMAGE, pp)
    assert [im.grid for im in req.images] == [(1, 6, 8), (1, 4, 12)]                 # 128 x 96, 192 x 64 pixels
    assert np.array_equal(req.images[0].pixel_values, want.pixel_values)
    pad = engine.model.ckpt.config.special_tokens["image_token_id"]
    assert req.prompt_ids.count(pad) == 12 + 12 and obj["prompt_token_ids"] == list(req.prompt_ids)


@pytest.mark.parametrize("part, words", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "image URLs are not fetched"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}, "not valid base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}},
     "not an image file Pillow can decode"),
    ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, "expected a base64 data URL"),
    ({"type": "image_url", "image_url": {}}, "image_url: expected"),
    ({"type": "input_image", "image_url": "data:image/png;base64,aGk="}, "not supported; send images as"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,aGk="}}, "video input not supported"),
])
def test_bad_image_parts_are_400(served, part, words):
    url, _ = served
    code, obj = post(url, {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]})
    assert code == 400 and obj["error"]["param"] == "messages" and words in obj["error"]["message"], obj
    assert obj["error"]["message"].startswith("messages[0].content[0]")


def test_a_server_without_a_vision_tower_refuses_images(tiny_checkpoint):
    engine = RefEngine(tiny_checkpoint)
    with running(build_app(engine, load_tokenizer(tiny_checkpoint), "tiny")) as url:
        code, obj = post(url, image_chat(data_url(Image.open(SAMPLE_IMAGE), "PNG")))
    assert code == 400 and obj["error"]["message"] == \
        "messages[0].content[0]: image input not supported by this model/server (no vision tower)"


def test_crosscheck_server_sends_images_as_data_urls(served, tiny_checkpoint, tmp_path, capsys):
    """ref.crosscheck --server --image: one chat turn with image_url data URLs; the server's own template
    and expansion give the token ids; the reference recomputes them with the same images: PASS."""
    url, engine = served
    wide = tmp_path / "wide.jpg"
    Image.new("RGB", (300, 40), (10, 200, 30)).save(wide)
    out = tmp_path / "rep.json"
    argv = ["--model", str(tiny_checkpoint), "--server", url, "--server-model", "tiny", "--image", str(SAMPLE_IMAGE),
            "--image", str(wide), "--prompt", "Compare the two pictures", "--top-k", "5", "--no-lint",
            "--json", str(out)]
    assert X.main(argv) == 0, capsys.readouterr()
    rep = json.loads(out.read_text())
    req = engine.submitted[-1]
    assert [im.grid for im in req.images] == [(1, 6, 8), (1, 2, 18)]
    assert rep["token_ids"][:len(req.prompt_ids)] == list(req.prompt_ids) and rep["summary"]["mean_kl"] < 1e-9
    assert rep["engine"]["images"] == [str(SAMPLE_IMAGE), str(wide)]
