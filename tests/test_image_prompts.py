"""Image prompts through the reference forward pass (ref.model) and its CLI (ref.run --image).

The forward pass with images is recomputed independently: each image encoded alone, its rows put
into the pads by hand, the 3-D positions walked with explicit loops, the decoder run step by step
(Layer.mixer_step with those positions, moe_step, final_norm, lm_head); then the self-consistency
rules of the text path: full forward == prefill + decode (the cache carries rope_delta), a prefill
continued from a cache, batch == single. The CLI's bad input is one line, exit 2, no output file.
"""
import io
import struct

import numpy as np
import pytest
from PIL import Image

from ckpt_edit import copy_checkpoint, edit_tensors
from ref import layers as L
from ref.errors import CheckpointError, ImageError
from ref.image import SAMPLE_IMAGE
from ref.image_prompt import user_message
from ref.model import Model
from ref.run import main as run_main
from ref.tokenizer import load_tokenizer
from ref.weights import StreamedWeight

WIDE = Image.new("RGB", (300, 40), (10, 200, 30))      # grid (1, 2, 18): 9 merged tokens, wider than tall


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Model(str(tiny_checkpoint), "f64")


@pytest.fixture(scope="module")
def pads(model):
    s = model.ckpt.config.special_tokens
    return s["vision_start_token_id"], s["image_token_id"], s["vision_end_token_id"]


@pytest.fixture(scope="module")
def two_image_prompt(model, pads):
    """Text, image 1, text, image 2, text (one pad per image) and the two images preprocessed."""
    S, I, E = pads
    ids = [5, 17, S, I, E, 300, 42, S, I, E, 7, 99]
    return ids, [model.vision.preprocess(SAMPLE_IMAGE), model.vision.preprocess(WIDE)]


def walk_positions(ids, image_token, grids, m):
    """get_rope_index by explicit loops: a counter p; text (p, p, p), p += 1; an image's merged tokens
    (p + 0, p + row, p + col) in raster order, then p += max(rows, cols)."""
    out, p, i, k = [], 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token:
            out.append((p, p, p))
            p, i = p + 1, i + 1
            continue
        _, h, w = grids[k]
        rows, cols = h // m, w // m
        for r in range(rows):
            for c in range(cols):
                out.append((p, p + r, p + c))
        p, i, k = p + max(rows, cols), i + rows * cols, k + 1
    return np.array(out).T, p - len(ids)


def test_forward_equals_an_independent_recomputation(model, two_image_prompt):
    ids, images = two_image_prompt
    full, pre = model.image_prompt(ids, images)
    pad = model.ckpt.config.special_tokens["image_token_id"]
    assert [len(full) - len(ids)] == [12 + 9 - 2] and full.count(pad) == 21
    logits, cache = model.prefill(full, images=images)
    # by hand: token rows from the table, each image encoded alone, its rows into its own pads
    h = np.asarray(model.ckpt.tensor(model.weights.tables["embed_tokens"].name)[np.array(full)], np.float64)
    at = [t for t, x in enumerate(full) if x == pad]
    rows = np.concatenate([model.vision.encode([im]) for im in images])
    h[at] = rows
    positions, delta = walk_positions(full, pad, [im.grid for im in images], 2)
    for i in range(model.cfg.num_hidden_layers):
        layer = model.layer(i)
        h = layer.moe_step(layer.mixer_step(h, positions=positions)[0])[0]
    want = model.lm_head(model.final_norm(h))
    assert np.abs(logits - want).max() < 1e-12
    assert cache.rope_delta == delta == (4 - 12) + (9 - 9)        # image 1: 3 x 4 merged, advances 4; image 2: 1 x 9


def test_image_order_matters(model, two_image_prompt, pads):
    S, I, E = pads
    a = model.logits([1, S, I, E, 2, S, I, E, 3], images=[SAMPLE_IMAGE, WIDE])
    b = model.logits([1, S, I, E, 2, S, I, E, 3], images=[WIDE, SAMPLE_IMAGE])
    assert a.shape[0] == b.shape[0] and np.abs(a[-1] - b[-1]).max() > 1e-3


def test_full_forward_equals_prefill_then_decode(model, two_image_prompt):
    ids, images = two_image_prompt
    full, _ = model.image_prompt(ids, images)
    logits, _ = model.prefill(full, images=images)
    part, cache = model.prefill(full[:-3], images=images)
    assert cache.rope_delta == -8 and np.abs(part - logits[:-3]).max() < 1e-12
    for t in range(len(full) - 3, len(full)):                      # text tokens after the images: s + rope_delta
        last, cache = model.decode(full[t], cache)
        assert np.abs(last - logits[t]).max() < 1e-12
    assert cache.pos == len(full) and cache.rope_delta == -8


def test_prefill_continued_by_a_chunk_with_an_image(model, two_image_prompt):
    """The second chunk holds image 2: its positions continue the cached counter (start + rope_delta)."""
    ids, images = two_image_prompt
    full, pre = model.image_prompt(ids, images)
    logits, end = model.prefill(full, images=pre)
    cut = full.index(model.ckpt.config.special_tokens["image_token_id"]) + 12 + 2   # after image 1 and its end
    a, cache = model.prefill(full[:cut], images=pre[:1])
    b, cache = model.prefill(full[cut:], cache, images=pre[1:])
    assert np.abs(np.concatenate([a, b]) - logits).max() < 1e-12 and cache.rope_delta == end.rope_delta


def test_batch_equals_single(model, two_image_prompt, pads):
    ids, images = two_image_prompt
    text = [9, 8, 7, 6, 5]
    batch, caches = model.prefill_batch([ids, text, ids[:6]], images=[images, None, images[:1]])
    assert np.abs(batch[0] - model.logits(ids, images=images)).max() < 1e-12
    assert np.abs(batch[1] - model.logits(text)).max() < 1e-12
    assert np.abs(batch[2] - model.logits(ids[:6], images=images[:1])).max() < 1e-12
    assert [c.rope_delta for c in caches] == [-8, 0, -8]


def test_dumps_and_streaming(model, two_image_prompt):
    ids, images = two_image_prompt
    dumps = {}
    full, _ = model.image_prompt(ids, images)
    model.prefill(full, dumps=dumps, images=images)
    names = {"vision.patch_embed", "vision.pos_embed", "vision.blocks.0", "vision.blocks.1", "vision.merger"}
    assert names <= set(dumps)
    pad = model.ckpt.config.special_tokens["image_token_id"]
    assert np.array_equal(dumps["embeddings"][np.array(full) == pad], dumps["vision.merger"])
    assert dumps["vision.patch_embed"].shape == (48 + 36, 32)
    block = model.vision.block(0)
    assert isinstance(block.attn_qkv.weight, StreamedWeight) and isinstance(model.vision.patch_embed().weight,
                                                                           StreamedWeight)


def test_mtp_rows_take_image_rows_and_positions(model, two_image_prompt):
    """Row t of the MTP head: the image row of token t + 1 where it is an image pad, position of token t."""
    ids, images = two_image_prompt
    full, _ = model.image_prompt(ids, images)
    got = model.mtp_logits(full, images=images)
    ids_, positions, _, rows = model.prompt_inputs(full, images)
    w, c = model.weights, model.cfg
    m = w.tables["mtp"]
    dumps = {}
    model.prefill(full, dumps=dumps, images=images)
    hidden = dumps["final_hidden"]
    x = L.mtp_input(model.embed(ids_, rows)[1:], hidden[:-1], w.vector(m["pre_fc_norm_embedding"]),
                    w.vector(m["pre_fc_norm_hidden"]), w.linear(m["fc"]), c.rms_norm_eps, model.p)
    layer = model.layer("mtp")
    h = layer.moe_step(layer.mixer_step(x, positions=positions[:, :-1])[0])[0]
    want = model.lm_head(L.rms_norm(h, w.vector(m["norm"]), c.rms_norm_eps, model.p))
    assert np.abs(got - want).max() < 1e-12
    text_only = model.mtp_logits(full)                               # pads as plain tokens at text positions
    assert np.abs(text_only - got).max() > 1e-3


def test_api_errors(model, pads):
    S, I, E = pads
    with pytest.raises(ValueError, match=r"image 1 of 1 \(.*sample.png\): the prompt has 2 image-pad tokens"):
        model.logits([1, S, I, I, E], images=[SAMPLE_IMAGE])
    with pytest.raises(ValueError, match="the prompt has 2 image placeholder"):
        model.logits([1, S, I, E, S, I, E], images=[SAMPLE_IMAGE])
    with pytest.raises(ImageError, match="mode La cannot be converted to RGB"):
        model.logits([1, S, I, E], images=[Image.new("La", (40, 40))])


# ---------------------------------------------------------------- ref.run --image

def tiff_grey_alpha_16(w=4, h=4) -> bytes:
    """A little-endian TIFF of 16-bit grey + alpha samples: a pixel layout Pillow does not read."""
    tags = [(256, 3, w), (257, 3, h), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 2),
            (278, 3, h), (279, 4, w * h * 4)]
    data_at = 8 + 2 + 12 * len(tags) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(tags))
    for tag, typ, val in tags:
        val = data_at if tag == 273 else val
        out += struct.pack("<HHI", tag, typ, 2 if tag == 258 else 1)
        out += struct.pack("<HH", val, 16 if tag == 258 else 0) if typ == 3 else struct.pack("<I", val)
    return out + struct.pack("<I", 0) + bytes(w * h * 4)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_cli_chat_with_images_dumps_and_tokens(tiny_checkpoint, model, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    wide = tmp_path / "wide.png"
    wide.write_bytes(png(WIDE))
    argv = ["--model", str(tiny_checkpoint), "--prompt", "Compare them", "--chat", "--image", str(SAMPLE_IMAGE),
            "--image", str(wide), "--dump-layers", str(out), "--logits-out", str(tmp_path / "l.npy"),
            "--max-new-tokens", "3"]
    assert run_main(argv) == 0
    tok = load_tokenizer(tiny_checkpoint)
    ids = tok.encode(tok.apply_chat_template([user_message("Compare them", 2)]))
    full, _ = model.image_prompt(ids, [SAMPLE_IMAGE, wide])
    want = model.generate(full, 3, images=[SAMPLE_IMAGE, wide])
    assert f"generated ids: {','.join(map(str, want))}" in capsys.readouterr().out
    from safetensors.numpy import load_file
    dumps = load_file(str(out))
    assert dumps["vision.merger"].shape == (21, 64) and dumps["embeddings"].shape[0] == len(full)
    assert np.load(tmp_path / "l.npy").shape == (len(full), 512)


def test_cli_token_ids_expanded_or_not(tiny_checkpoint, model, pads, tmp_path):
    S, I, E = pads
    one, many = [1, S, I, E, 2], [1, S] + [I] * 12 + [E, 2]
    for ids in (one, many):
        out = tmp_path / f"l{len(ids)}.npy"
        assert run_main(["--model", str(tiny_checkpoint), "--token-ids", ",".join(map(str, ids)), "--image",
                         str(SAMPLE_IMAGE), "--logits-out", str(out)]) == 0
    assert np.array_equal(np.load(tmp_path / "l5.npy"), np.load(tmp_path / "l16.npy"))


def test_cli_accepts_convertible_tiny_and_huge_images(tiny_checkpoint, pads, tmp_path):
    """Palette, RGBA, 16-bit grey and grey files are converted; a 1 x 1 image is scaled up to the
    pixel budget (as the processor does: accepted); a 6000 x 4000 image is scaled down into it."""
    S, I, E = pads
    rgb = np.asarray(Image.open(SAMPLE_IMAGE))
    files = {"palette": Image.open(SAMPLE_IMAGE).convert("P"), "rgba": Image.open(SAMPLE_IMAGE).convert("RGBA"),
             "grey16": Image.fromarray((rgb[..., 0].astype(np.uint16) * 200)).convert("I;16"),
             "grey": Image.open(SAMPLE_IMAGE).convert("L"), "one": Image.new("RGB", (1, 1), (200, 10, 10)),
             "huge": Image.new("RGB", (6000, 4000), (20, 30, 40))}
    for name, img in files.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(png(img))
        out = tmp_path / f"{name}.npy"
        assert run_main(["--model", str(tiny_checkpoint), "--token-ids", f"1,{S},{I},{E}", "--image", str(path),
                         "--logits-out", str(out)]) == 0, name
        assert np.isfinite(np.load(out)).all()
    assert np.load(tmp_path / "one.npy").shape[0] == 3 + 4          # 64 x 64 pixels: 2 x 2 merged tokens
    assert np.load(tmp_path / "huge.npy").shape[0] == 3 + 9 * 6     # 288 x 192 pixels: within 256 x 256


@pytest.fixture(scope="module")
def no_vision(tiny_checkpoint, tmp_path_factory):
    d = copy_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("nv") / "no_vision")
    edit_tensors(d, {"model.visual.patch_embed.proj.weight": lambda a: None})
    return d


@pytest.mark.parametrize("case, message", [
    ("missing", "missing.png: file not found"),
    ("truncated", "cannot decode the image"),
    ("not_an_image", "not an image file Pillow can decode"),
    ("grey_alpha_16", "not an image file Pillow can decode"),
    ("more_images", "the prompt has 1 image placeholder(s) but 2 image(s) were given"),
    ("fewer_images", "the prompt has 2 image placeholder(s) but 1 image(s) were given"),
    ("no_image", "image placeholders (492) but no --image was given"),
    ("wrong_count", "image 1 of 1 ("),
    ("no_vision", "has no vision tower"),
])
def test_cli_bad_images_exit_2_without_output(tiny_checkpoint, no_vision, pads, tmp_path, capsys, case, message):
    S, I, E = pads
    good = str(SAMPLE_IMAGE)
    (tmp_path / "truncated.png").write_bytes(SAMPLE_IMAGE.read_bytes()[:300])
    (tmp_path / "not_an_image.png").write_bytes(b"hello, world" * 10)
    (tmp_path / "grey_alpha_16.tif").write_bytes(tiff_grey_alpha_16())
    model, ids, images = tiny_checkpoint, f"1,{S},{I},{E}", [good]
    if case in ("missing", "truncated", "not_an_image", "grey_alpha_16"):
        images = [str(next(tmp_path.glob(case + ".*"), tmp_path / "missing.png"))]
    elif case == "more_images":
        images = [good, good]
    elif case == "fewer_images":
        ids = f"1,{S},{I},{E},{S},{I},{E}"
    elif case == "no_image":
        images = []
    elif case == "wrong_count":
        ids = f"1,{S},{I},{I},{I},{E}"
    elif case == "no_vision":
        model = no_vision
    out = tmp_path / "l.npy"
    argv = ["--model", str(model), "--token-ids", ids, "--logits-out", str(out)]
    assert run_main(argv + [x for f in images for x in ("--image", f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ref.run: error:") and message in err[0], err
    assert not out.exists()


def test_no_vision_tower_is_a_checkpoint_error(no_vision, pads):
    S, I, E = pads
    with pytest.raises(CheckpointError, match="no vision tower"):
        Model(str(no_vision)).logits([1, S, I, E], images=[SAMPLE_IMAGE])
