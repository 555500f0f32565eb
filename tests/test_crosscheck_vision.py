"""ref.crosscheck on image prompts: a faithful 'engine' (the reference itself, bf16) passes from its
logits, layer dumps with the vision encoder's, or a vLLM chat response; engines with the image-path
bugs users hit are flagged at the step that makes them (attention across images: the first vision
block; text positions for image tokens: the first full-attention layer); the prompt's pad count is
checked against each image.
"""
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from engine_bodies import chat_response

from ref import crosscheck as X
from ref import layers as L
from ref import model as ref_model_module
from ref import vision as V
from ref.checkpoint import open_checkpoint
from ref.compare import Thresholds
from ref.image import SAMPLE_IMAGE
from ref.model import Model
from ref.modes import Modes

WIDE = Image.new("RGB", (300, 40), (10, 200, 30))


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return open_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompt(ckpt, tmp_path_factory):
    """Two images with text around them: (expanded ids, image files, the ids with one pad per image)."""
    wide = tmp_path_factory.mktemp("img") / "wide.png"
    WIDE.save(wide)
    s = ckpt.config.special_tokens
    S, I, E = s["vision_start_token_id"], s["image_token_id"], s["vision_end_token_id"]
    rng = np.random.default_rng(3)
    ids = [int(i) for i in rng.integers(0, 480, 30)] + [S, I, E] + [int(i) for i in rng.integers(0, 480, 20)] + \
        [S, I, E] + [int(i) for i in rng.integers(0, 480, 30)]
    files = [SAMPLE_IMAGE, wide]
    full, _ = Model(ckpt).image_prompt(ids, files)
    return full, files, ids


def engine(ckpt, ids, files, **kw):
    """An 'engine' = ref.model in some mode -> (logits [T, V], dumps)."""
    dumps = {}
    logits, _ = Model(ckpt, **kw).prefill(ids, dumps=dumps, images=files)
    return np.asarray(logits, np.float64), dumps


def test_faithful_engine_passes_with_vision_dumps(ckpt, prompt):
    ids, files, _ = prompt
    logits, dumps = engine(ckpt, ids, files, precision="bf16")
    rep = X.crosscheck(ckpt, ids, eng_logits=logits, eng_dumps=dumps, lint=False, images=files)
    assert rep["verdict"]["ok"], X.format_report(rep)
    names = [row["name"] for row in rep["layers"]]
    assert names[:6] == ["vision.patch_embed", "vision.pos_embed", "vision.blocks.0", "vision.blocks.1",
                         "vision.merger", "embeddings"]
    assert all(row.get("local_err", 0) < 1e-2 for row in rep["layers"][:6])
    assert rep["engine"]["images"] == [str(f) for f in files]


def test_attention_across_images_is_charged_to_the_first_vision_block(ckpt, prompt, monkeypatch):
    ids, files, _ = prompt
    with monkeypatch.context() as mp:       # the engine's vision attention sees every patch of every image
        mp.setattr(V, "cu_seqlens", lambda grids: np.array([0, sum(t * h * w for t, h, w in grids)]))
        logits, dumps = engine(ckpt, ids, files)
    rep = X.crosscheck(ckpt, ids, eng_logits=logits, eng_dumps=dumps, lint=False, images=files)
    assert rep["verdict"]["first_divergent"]["name"] == "vision.blocks.0", X.format_report(rep)


def test_text_positions_for_image_tokens_are_charged_to_the_first_attention_layer(ckpt, prompt, monkeypatch):
    ids, files, _ = prompt
    with monkeypatch.context() as mp:       # the engine gives image tokens 1-D positions (no mRoPE)
        mp.setattr(ref_model_module, "mrope_positions", lambda ids, *a, **k: (L.text_positions(0, len(ids)), 0))
        logits, dumps = engine(ckpt, ids, files)
    # an f64 engine against the f64 reference: any step error beyond rounding is the bug (the tiny
    # model's 8 rotary dims make it small: local error ~1e-2, below the bf16-sized default)
    exact = Thresholds(layer_rtol=1e-9, token_rtol=1e-9)
    rep = X.crosscheck(ckpt, ids, eng_logits=logits, eng_dumps=dumps, lint=False, images=files, thresholds=exact)
    first = ckpt.config.text.full_attention_layers[0]
    assert not rep["verdict"]["ok"]
    assert rep["verdict"]["first_divergent"]["name"] == f"layers.{first}.after_mixer", X.format_report(rep)
    assert all(not row.get("flagged") for row in rep["layers"] if row["name"].startswith("vision."))


def test_cli_engine_json_and_files(ckpt, prompt, tmp_path, capsys):
    ids, files, _ = prompt
    logits, dumps = engine(ckpt, ids, files, precision="bf16")
    (tmp_path / "resp.json").write_text(json.dumps(chat_response(ids, logits, 5)))
    images = [x for f in files for x in ("--image", str(f))]
    base = ["--model", str(ckpt.directory), "--no-lint", "--precision", "bf16"] + images
    assert X.main(base + ["--engine-json", str(tmp_path / "resp.json")]) == 0
    assert "PASS" in capsys.readouterr().out.splitlines()[-1]
    np.save(tmp_path / "logits.npy", logits.astype(np.float32))
    save_file({k: np.ascontiguousarray(v) for k, v in dumps.items()}, str(tmp_path / "d.safetensors"))
    one_pad_each = prompt[2]                                           # expanded by crosscheck
    assert X.main(base + ["--engine-logits", str(tmp_path / "logits.npy"), "--engine-dumps",
                          str(tmp_path / "d.safetensors"), "--token-ids", ",".join(map(str, one_pad_each))]) == 0
    out = capsys.readouterr().out
    assert "vision.merger" in out and "PASS" in out.splitlines()[-1]


def test_cli_image_errors_exit_2(ckpt, prompt, tmp_path, capsys):
    ids, files, raw = prompt
    pad = ckpt.config.special_tokens["image_token_id"]
    at = raw.index(pad)
    wrong = raw[:at] + [pad] * 5 + raw[at + 1:]                         # 5 pads for image 1 (12 merged tokens)
    (tmp_path / "resp.json").write_text(json.dumps(chat_response(wrong, np.zeros((len(wrong), 512)), 2)))
    out = tmp_path / "rep.json"
    cases = [(["--engine-json", str(tmp_path / "resp.json"), "--image", str(files[0]), "--image", str(files[1])],
              "the prompt has 5 image-pad tokens for it but the image is 12 tokens"),
             (["--engine-json", str(tmp_path / "resp.json")], "no --image was given"),
             (["--engine-json", str(tmp_path / "resp.json"), "--image", str(tmp_path / "nope.png")],
              "nope.png: file not found"),
             (["--server", "http://127.0.0.1:9", "--image", str(files[0]), "--token-ids", f"1,{pad}"],
              "needs --prompt")]
    for args, message in cases:
        assert X.main(["--model", str(ckpt.directory), "--json", str(out)] + args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_modes_are_passed_to_the_image_reference(ckpt, prompt):
    """The reference runs the engine's modes on the image prompt too (bf16 engine == bf16 reference)."""
    ids, files, _ = prompt
    logits, _ = engine(ckpt, ids, files, precision="bf16")
    rep = X.crosscheck(ckpt, ids, eng_logits=logits, lint=False, images=files, modes=Modes("bf16"))
    assert rep["summary"]["mean_kl"] < 1e-12
