"""jaxrun's image path against ref: the JAX vision encoder, 3-D RoPE from the rope table, image
prompts through prefill, decode, speculative and MTP steps (f32 vs ref f64 within the text path's
bound), chunked prefill across an image, batch == single, the scheduler with an image request,
4 simulated devices == 1 (subprocess), and the CLI (--image, bad input, no tokenizer).

One f32 Runner on one CPU device (cache of CONTEXT positions) serves the module, so each shape is
compiled once.
"""
import asyncio
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from ckpt_edit import copy_checkpoint, edit_tensors
from jaxrun import vision as JV
from jaxrun.engine_api import Finished, PromptLogprobs, Request, SamplingParams, Tokens
from jaxrun.generate import main as cli_main
from jaxrun.layers import mrope_axes, rope_at_positions, rope_table
from jaxrun.load import load
from jaxrun.runner import Prefill, Runner
from jaxrun.scheduler import Scheduler
from jaxrun.sharding import make_mesh
from ref import layers as L
from ref.config import TextConfig
from ref.divergence import log_softmax
from ref.image import SAMPLE_IMAGE
from ref.model import Model

CONTEXT, STEPS = 256, 6
TOL = 1e-4                                           # f32 runner vs f64 reference, max |Δ logit| (as text)
# Prompt rows at image tokens are more sensitive on the tiny random model: the f32 rounding of the encoder's
# rows alone (relative 6e-7) moves them by up to 1.5e-4 (ref f64 fed jaxrun's rows), ref's own f32 path by
# 1.4e-4; jaxrun's whole f32 path by 2.8e-4 on this prompt. Generated tokens' logits stay within TOL.
IMAGE_ROWS_TOL = 5e-4
WIDE = Image.new("RGB", (300, 40), (10, 200, 30))   # grid (1, 2, 18)


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    mesh = make_mesh(1)
    ckpt, params = load(str(tiny_checkpoint), mesh, "f32", progress=False)
    return Runner(params, ckpt.config, mesh, "f32")


@pytest.fixture(scope="module")
def ref_model(tiny_checkpoint):
    return Model(str(tiny_checkpoint), "f64")


@pytest.fixture(scope="module")
def prompt(ref_model):
    """Text, image 1, text, image 2, text: (ids with one pad per image, the images preprocessed)."""
    s = ref_model.ckpt.config.special_tokens
    S, I, E = s["vision_start_token_id"], s["image_token_id"], s["vision_end_token_id"]
    return [5, 17, S, I, E, 300, 42, S, I, E, 7, 99], [ref_model.vision.preprocess(SAMPLE_IMAGE),
                                                       ref_model.vision.preprocess(WIDE)]


@pytest.fixture(scope="module")
def single(runner, prompt):
    ids, images = prompt
    return runner.generate([ids], STEPS, max_context=CONTEXT, keep_logits=True, mtp=True, images=[images])[0]


# ---- the encoder and 3-D RoPE ------------------------------------------------------------------

def _encode(runner, images, n):
    pixels = np.concatenate([im.pixel_values for im in images])
    padded = np.zeros((n, pixels.shape[1]), np.float32)
    padded[:len(pixels)] = pixels
    layout = JV.patch_layout([im.grid for im in images], n, 2)
    f = jax.jit(functools.partial(JV.encode, cfg=runner.config.vision, opts=runner.opts))
    return np.asarray(f(runner.params.visual, padded, layout), np.float64)


def test_encoder_matches_ref_f64_in_any_bucket(runner, ref_model, prompt, monkeypatch):
    images = prompt[1]
    want = ref_model.vision.encode(images)                              # [12 + 9, 64]
    got = _encode(runner, images, JV.patch_bucket(48 + 36))[:len(want)]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-6 * scale
    assert np.abs(_encode(runner, images, 512)[:len(want)] - got).max() <= 1e-6 * scale   # more padding
    monkeypatch.setattr(JV, "QUERY_BLOCK", 32)                          # attention in query blocks
    assert np.abs(_encode(runner, images, 128)[:len(want)] - got).max() <= 1e-6 * scale


@pytest.mark.parametrize("sections, interleaved", [((2, 1, 1), True), ((11, 11, 10), True), ((16, 24, 24), False)])
def test_rope_at_3d_positions_matches_ref(sections, interleaved):
    rd = 2 * sum(sections)
    cfg = TextConfig(64, 1, ("full_attention",), 2, 1, rd, 1, 1, 8, 8, 4, 2, 1, 8, 8, 64, rope_theta=1e6,
                     partial_rotary_factor=1.0, mrope_section=sections, mrope_interleaved=interleaved)
    positions = np.random.default_rng(0).integers(0, 100, (2, 3, 7))
    got = np.asarray(rope_at_positions(rope_table(cfg, 128, np.float32), positions, mrope_axes(cfg)))  # [B, T, 2, rd]
    rope = L.Rope(rd, cfg.rope_theta, sections, interleaved)
    for b in range(2):
        cos, sin = L.rope_cos_sin(positions[b], rope)
        assert np.abs(got[b, :, 0] - cos).max() < 1e-6 and np.abs(got[b, :, 1] - sin).max() < 1e-6


# ---- image prompts through the runner -----------------------------------------------------------

def test_generation_matches_ref(ref_model, single, prompt):
    """Every generated token's logits (prefill's last row, then each decode step at s + rope_delta) and
    the MTP head's drafts (image rows for pads, the prompt's positions) against ref f64."""
    images = prompt[1]
    seq = single.prompt_token_ids + single.token_ids
    n = len(single.prompt_token_ids)
    assert n == len(prompt[0]) + 12 + 9 - 2
    full = ref_model.logits(seq[:-1], images=images)
    assert np.abs(np.stack(single.logits) - full[n - 1:]).max() <= TOL
    mtp = ref_model.mtp_logits(seq, images=images)
    assert np.abs(np.stack(single.mtp_logits) - mtp[n - 1:n - 1 + len(single.mtp_logits)]).max() <= TOL


def _prompt_logits(runner, ids, images, chunk=None):
    job = Prefill(runner, [ids], CONTEXT, chunk=chunk, all_logits=True, images=[images])
    while not job.advance():
        pass
    return np.concatenate(job.prompt_logits, axis=1)[0]


def test_prefill_equals_prefill_then_decode_and_chunks_split_images(runner, single, prompt):
    """The whole sequence prefilled (16-token chunks, boundaries inside both images) gives the logits
    that generation produced step by step."""
    seq = single.prompt_token_ids + single.token_ids[:-1]
    n = len(single.prompt_token_ids)
    chunked = _prompt_logits(runner, seq, prompt[1], chunk=16)
    assert np.abs(chunked[n - 1:] - np.stack(single.logits)).max() <= TOL


def test_speculative_greedy_equals_plain(runner, single, prompt):
    spec = runner.generate([prompt[0]], STEPS, max_context=CONTEXT, speculative=2, images=[prompt[1]])[0]
    assert spec.token_ids == single.token_ids and spec.speculative_steps >= 1


def test_batch_equals_single(runner, single, prompt, ref_model):
    """An image prompt batched with a text prompt: its tokens and logits as alone; the text row's as ref's."""
    text = [64, 2, 11, 400]
    both = runner.generate([prompt[0], text], STEPS, max_context=CONTEXT, keep_logits=True, mtp=True,
                           images=[prompt[1], None])
    assert both[0].token_ids == single.token_ids
    assert np.abs(np.stack(both[0].logits) - np.stack(single.logits)).max() <= 2e-5
    want = ref_model.logits(text + both[1].token_ids[:-1])[len(text) - 1:]
    assert np.abs(np.stack(both[1].logits) - want).max() <= TOL


def test_scheduler_serves_an_image_request(runner, single, prompt, ref_model):
    """The scheduler's Prefill job gets the request's images: the same greedy tokens as generate,
    and the prompt logprobs of the expanded prompt as ref computes them."""
    ids = single.prompt_token_ids
    sched = Scheduler(runner, slots=1, max_context=CONTEXT, chunk=16).start()
    try:
        async def serve():
            req = Request(tuple(ids), STEPS, SamplingParams(0.0), frozenset(), prompt_logprobs=1,
                          images=tuple(prompt[1]))
            return [e async for e in sched.submit(req)]
        events = asyncio.run(serve())
    finally:
        sched.shutdown()
    assert isinstance(events[0], PromptLogprobs) and isinstance(events[-1], Finished)
    assert [t for e in events if isinstance(e, Tokens) for t in e.token_ids] == single.token_ids
    lp = log_softmax(ref_model.logits(ids, images=prompt[1]))
    got = [e.logprob for e in events[0].entries[1:]]
    assert np.abs(np.array(got) - lp[np.arange(len(ids) - 1), ids[1:]]).max() <= 2 * TOL   # logit and log-sum-exp


def test_crosscheck_jax_backend_encodes_images(tiny_checkpoint, ref_model, single, prompt):
    """ref.crosscheck --backend jax on an image prompt: jaxrun's own encoder and positions, ref's logits
    (every prompt row: text rows within TOL, rows at image tokens within IMAGE_ROWS_TOL)."""
    from jaxrun.crosscheck_backend import reference_logits
    from ref.modes import Modes
    ids = single.prompt_token_ids
    logits, dumps = reference_logits(ref_model.ckpt, ids, Modes("f32"), False, images=prompt[1])
    err = np.abs(logits - ref_model.logits(ids, images=prompt[1])).max(-1)
    at_image = np.array(ids) == ref_model.ckpt.config.special_tokens["image_token_id"]
    assert dumps is None and err[~at_image].max() <= TOL and err[at_image].max() <= IMAGE_ROWS_TOL


def test_runner_refuses_images_without_a_tower(runner, prompt):
    text_only = Runner(runner.params._replace(visual=None), runner.config, runner.mesh, "f32")
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.generate([prompt[0]], 2, max_context=CONTEXT, images=[prompt[1]])


def test_four_devices_equal_one(tiny_checkpoint, single, prompt):
    """4 simulated CPU devices, dense weights tensor-parallel (the vision tower replicated): the same
    greedy tokens and logits within the bound (subprocess, tests/jax_vision_multidevice.py)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = Path(__file__).with_name("jax_vision_multidevice.py")
    out = subprocess.run([sys.executable, str(script), str(tiny_checkpoint), json.dumps(prompt[0]), str(STEPS),
                          str(CONTEXT)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["devices"] == 4 and got["visual_replicated"]
    assert got["tokens"] == single.token_ids
    assert np.abs(np.array(got["logits"]) - np.stack(single.logits)).max() <= TOL


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_default_model_describes_the_sample_image(capsys):
    """The built-in tiny model answers an image prompt out of the box, within --check's bounds."""
    argv = ["--image", str(SAMPLE_IMAGE), "--prompt", "Describe the image", "--max-new-tokens", "4", "--json",
            "--check", "--quiet"]
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    obj = json.loads(out.strip().splitlines()[-1])
    assert len(obj["token_ids"]) >= 1 and isinstance(obj["text"], str) and "check: PASS" in err
    assert obj["prompt_token_ids"].count(492) == 12                     # the sample's 3 x 4 merged tokens


def test_cli_token_ids_without_a_tokenizer(tiny_checkpoint, tmp_path, capsys):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "no_tokenizer")
    (d / "tokenizer.json").unlink()
    assert cli_main(["--model", str(d), "--token-ids", "5,17,300", "--max-new-tokens", "3", "--json", "--quiet"]) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["prompt_token_ids"] == [5, 17, 300] and len(obj["token_ids"]) == 3 and obj["text"] == ""
    assert cli_main(["--model", str(d), "--prompt", "hi", "--quiet"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def no_vision(tiny_checkpoint, tmp_path_factory):
    d = copy_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("nv") / "no_vision")
    edit_tensors(d, {"model.visual.patch_embed.proj.weight": lambda a: None})
    return d


@pytest.mark.parametrize("args, words", [
    (["--image", "/nonexistent.png", "--prompt", "x"], "/nonexistent.png: file not found"),
    (["--image", "{bad}", "--prompt", "x"], "not an image file Pillow can decode"),
    (["--image", "{sample}", "--image", "{sample}", "--token-ids", "1,489,492,490"],
     "1 image placeholder(s) but 2 image(s)"),
    (["--image", "{sample}", "--token-ids", "1,489,492,490,489,492,490"], "2 image placeholder(s) but 1 image(s)"),
    (["--image", "{sample}", "--token-ids", "1,492,492"], "image 1 of 1 ("),
    (["--token-ids", "1,492"], "no --image was given"),
    (["--image", "{sample}", "--batch-file", "{bad}"], "--batch-file"),
    (["--model", "{no_vision}", "--image", "{sample}", "--prompt", "x"], "no vision tower"),
])
def test_cli_bad_images_exit_2(tiny_checkpoint, no_vision, tmp_path, capsys, args, words):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    args = [a.format(bad=tmp_path / "bad.png", sample=SAMPLE_IMAGE, no_vision=no_vision) for a in args]
    argv = args if args[0] == "--model" else ["--model", str(tiny_checkpoint), *args]
    assert cli_main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxrun.generate: error:") and words in err[0], err
