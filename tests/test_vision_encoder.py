"""ref.vision / ref.vision_model: the encoder against an independent float64 recomputation with
explicit loops (on the tiny synthetic checkpoint's vision tower), against transformers' own outputs
(spec/vectors/vision_hf/encoder.safetensors: float64 stage by stage, bfloat16 rounding points stage
by stage), and its properties (attention stays within each image, precision modes, dumps, errors)."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ref import vision as V
from ref.errors import CheckpointError, ConfigError
from ref.image import SAMPLE_IMAGE
from ref.layer_vectors import read
from ref.layers import Precision
from ref.vision_model import VisionModel
from ref.vision_vectors import block_params, merger_params

HF = read(Path(__file__).resolve().parent.parent / "spec" / "vectors" / "vision_hf" / "encoder.safetensors")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------------
# Independent float64 recomputation: scalar formulas and explicit loops, nothing from ref.vision

def indep_pos_embed(table, h, w):
    """Bilinear resampling of a side x side table onto h x w with aligned corners -> [h, w, D]."""
    side = math.isqrt(len(table))
    t = table.reshape(side, side, -1)
    out = np.zeros((h, w, t.shape[-1]))
    for i in range(h):
        sy = i * (side - 1) / (h - 1) if h > 1 else 0.0
        y0 = math.floor(sy)
        y1, fy = min(y0 + 1, side - 1), sy - y0
        for j in range(w):
            sx = j * (side - 1) / (w - 1) if w > 1 else 0.0
            x0 = math.floor(sx)
            x1, fx = min(x0 + 1, side - 1), sx - x0
            out[i, j] = ((1 - fy) * (1 - fx) * t[y0, x0] + (1 - fy) * fx * t[y0, x1]
                         + fy * (1 - fx) * t[y1, x0] + fy * fx * t[y1, x1])
    return out


def block_order(h, w, m):
    """(row, col) of the patches in the processor's order, by explicit loops."""
    return [(bi * m + i, bj * m + j)
            for bi in range(h // m) for bj in range(w // m) for i in range(m) for j in range(m)]


def indep_layer_norm(x, w, b, eps=1e-6):
    out = np.empty_like(x)
    for r in range(len(x)):
        mu = sum(x[r]) / len(x[r])
        var = sum((v - mu) ** 2 for v in x[r]) / len(x[r])
        out[r] = (x[r] - mu) / math.sqrt(var + eps) * w + b
    return out


def indep_rope(x, row, col, theta):
    """x [nH, hd] of one patch: dims d, d + hd/2 rotate by row * f_d (d < hd/4) or col * f_(d - hd/4)."""
    hd = x.shape[-1]
    y = x.copy()
    for d in range(hd // 2):
        k = d % (hd // 4)
        angle = (row if d < hd // 4 else col) * theta ** (-2 * k / (hd // 2))
        c, s = math.cos(angle), math.sin(angle)
        y[:, d] = x[:, d] * c - x[:, d + hd // 2] * s
        y[:, d + hd // 2] = x[:, d + hd // 2] * c + x[:, d] * s
    return y


def indep_encoder(W, pixels, grids, n_heads, m, theta, C, T, P):
    """W: checkpoint tensor name (after 'model.visual.') -> float64. -> (merged [M, O], block outputs)."""
    N = len(pixels)
    k = W["patch_embed.proj.weight"]
    x = np.einsum("nctyx,dctyx->nd", pixels.astype(np.float64).reshape(N, C, T, P, P), k) + W["patch_embed.proj.bias"]
    coords, pos, segments = [], [], []
    for t, h, w in grids:
        grid = indep_pos_embed(W["pos_embed.weight"], h, w)
        for _ in range(t):
            segments.append(range(len(coords), len(coords) + h * w))
            for r, c in block_order(h, w, m):
                coords.append((r, c))
                pos.append(grid[r, c])
    x = x + np.array(pos)
    D = x.shape[1]
    hd = D // n_heads
    outs = []
    for b in range(len([n for n in W if n.endswith("attn.qkv.weight")])):
        pre = f"blocks.{b}."
        hn = indep_layer_norm(x, W[pre + "norm1.weight"], W[pre + "norm1.bias"])
        qkv = hn @ W[pre + "attn.qkv.weight"].T + W[pre + "attn.qkv.bias"]
        q, kk, v = (qkv[:, i * D:(i + 1) * D].reshape(N, n_heads, hd) for i in range(3))
        q = np.array([indep_rope(q[n], *coords[n], theta) for n in range(N)])
        kk = np.array([indep_rope(kk[n], *coords[n], theta) for n in range(N)])
        att = np.zeros((N, n_heads, hd))
        for seg in segments:
            for head in range(n_heads):
                for i in seg:
                    s = np.array([q[i, head] @ kk[j, head] / math.sqrt(hd) for j in seg])
                    e = np.exp(s - s.max())
                    att[i, head] = sum(p * v[j, head] for p, j in zip(e / e.sum(), seg))
        x = x + att.reshape(N, D) @ W[pre + "attn.proj.weight"].T + W[pre + "attn.proj.bias"]
        hn = indep_layer_norm(x, W[pre + "norm2.weight"], W[pre + "norm2.bias"])
        f1 = hn @ W[pre + "mlp.linear_fc1.weight"].T + W[pre + "mlp.linear_fc1.bias"]
        g = np.vectorize(lambda u: 0.5 * u * (1 + math.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3))))(f1)
        x = x + g @ W[pre + "mlp.linear_fc2.weight"].T + W[pre + "mlp.linear_fc2.bias"]
        outs.append(x.copy())
    hn = indep_layer_norm(x, W["merger.norm.weight"], W["merger.norm.bias"])
    grouped = np.array([np.concatenate(hn[i:i + m * m]) for i in range(0, N, m * m)])
    f1 = grouped @ W["merger.linear_fc1.weight"].T + W["merger.linear_fc1.bias"]
    g = np.vectorize(lambda u: 0.5 * u * (1 + math.erf(u / math.sqrt(2))))(f1)
    return g @ W["merger.linear_fc2.weight"].T + W["merger.linear_fc2.bias"], outs


@pytest.fixture(scope="module")
def vm(tiny_checkpoint):
    return VisionModel(tiny_checkpoint)


@pytest.fixture(scope="module")
def images(vm):
    tall = Image.fromarray(np.random.default_rng(3).integers(0, 256, (150, 40, 3), dtype=np.uint8))
    return [vm.preprocess(SAMPLE_IMAGE), vm.preprocess(tall, name="tall")]


def test_encoder_equals_loop_recomputation(vm, images):
    v = vm.cfg
    W = {n[len("model.visual."):]: vm.ckpt.tensor(n).astype(np.float64) for n in vm.ckpt.names()
         if n.startswith("model.visual.")}
    pixels = np.concatenate([im.pixel_values for im in images])
    want, blocks = indep_encoder(W, pixels, [im.grid for im in images], v.num_heads, v.spatial_merge_size,
                                 v.rope_theta, v.in_channels, v.temporal_patch_size, v.patch_size)
    dumps = {}
    got = vm.encode(images, dumps)
    assert got.shape == (sum(vm.merged_tokens(im) for im in images), v.out_hidden_size) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
    for i, b in enumerate(blocks):
        np.testing.assert_allclose(dumps[f"vision.blocks.{i}"], b, rtol=1e-11, atol=1e-11)
    N = len(pixels)
    want_shapes = {"vision.patch_embed": (N, v.hidden_size), "vision.pos_embed": (N, v.hidden_size),
                   **{f"vision.blocks.{i}": (N, v.hidden_size) for i in range(v.depth)}, "vision.merger": got.shape}
    assert {k: d.shape for k, d in dumps.items()} == want_shapes


def test_attention_stays_within_each_image(vm, images):
    together = vm.encode(images)
    alone = np.concatenate([vm.encode([im]) for im in images])
    np.testing.assert_allclose(together, alone, rtol=1e-12, atol=1e-12)
    swapped = vm.encode(images[::-1])
    n = vm.merged_tokens(images[1])
    np.testing.assert_allclose(swapped, np.concatenate([together[-n:], together[:-n]]), rtol=1e-12, atol=1e-12)


def test_precision_modes(tiny_checkpoint, vm, images):
    f64 = vm.encode(images)
    f32 = VisionModel(tiny_checkpoint, "f32").encode(images)
    bf16 = VisionModel(tiny_checkpoint, "bf16").encode(images)
    assert f32.dtype == bf16.dtype == np.float32
    assert rel(f32, f64) < 1e-5
    assert 1e-4 < rel(bf16, f64) < 0.02  # rounds (it differs) but stays close
    assert np.array_equal(bf16.astype(np.float64), bf16.astype("bfloat16").astype(np.float64))


# ------------------------------------------------------------------------------------------------
# transformers' Qwen3_5MoeVisionModel (spec/vectors/make_hf_vision_vectors.py)

def _hf():
    fn, a, s, o = HF
    W = {k[len("model.visual."):]: v.astype(np.float64) for k, v in a.items() if k.startswith("model.visual.")}
    return W, a, s, o


def _params(W, dtype):
    W = {k: v.astype(dtype) for k, v in W.items()}
    return (V.Linear(W["patch_embed.proj.weight"], W["patch_embed.proj.bias"]), W["pos_embed.weight"],
            [block_params(W, f"blocks.{i}.") for i in range(2)], merger_params(W, "merger."))


def test_hf_float64_stage_by_stage(monkeypatch):
    """transformers computes the interpolation weights, the rotary angles, the rotation and the
    attention softmax in float32 even in a float64 model: the weights are compared bit for bit, the
    angles and the blocks (rotation done in float32 as there; the softmax's float32 exp is torch's
    own) to float32 precision, every other stage from transformers' own input to float64 precision."""
    W, a, s, o = _hf()
    grids = [tuple(int(v) for v in g) for g in a["grid"]]
    patch, table, blocks, merger = _params(W, np.float64)
    m, nH = s["spatial_merge_size"], s["num_heads"]
    np.testing.assert_allclose(V.patch_embed(a["pixel_values"], patch), o["patch_embed"], rtol=1e-13, atol=1e-13)
    side = math.isqrt(len(table))
    taps32 = [V.pos_embed_taps(g, side, m, np.float32) for g in grids]
    assert np.array_equal(np.concatenate([t[0] for t in taps32]), o["pos_indices"])
    assert np.array_equal(np.concatenate([t[1] for t in taps32]), o["pos_weights"])  # the same float32 bits
    w32 = np.concatenate([t[1] for t in taps32]).astype(np.float64)
    pos = np.einsum("nk,nkd->nd", w32, table[o["pos_indices"]])
    np.testing.assert_allclose(pos, o["pos_embed"], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(V.interpolated_pos_embed(table, grids, m), o["pos_embed"], rtol=1e-6, atol=1e-6)
    cos, sin = V.vision_rope_cos_sin(grids, m, W["pos_embed.weight"].shape[1] // nH, s["rope_theta"],
                                     Precision("f32"))
    np.testing.assert_allclose(cos, o["cos"], atol=2e-7)
    np.testing.assert_allclose(sin, o["sin"], atol=2e-7)
    rope = V.apply_vision_rope
    monkeypatch.setattr(V, "apply_vision_rope", lambda x, c, s, p: rope(
        x.astype(np.float32), c.astype(np.float32), s.astype(np.float32), Precision("f32")).astype(np.float64))
    x, bounds = o["block_input"], V.cu_seqlens(grids)
    np.testing.assert_allclose(x, o["patch_embed"] + o["pos_embed"], rtol=1e-15, atol=1e-15)
    for i, prm in enumerate(blocks):
        y = V.vision_block(x, prm, nH, o["cos"].astype(np.float64), o["sin"].astype(np.float64), bounds)
        np.testing.assert_allclose(y, o[f"blocks.{i}"], rtol=1e-6, atol=1e-6)
        x = o[f"blocks.{i}"]
    np.testing.assert_allclose(V.patch_merger(x, merger, m), o["merger"], rtol=1e-12, atol=1e-12)
    monkeypatch.undo()
    whole = V.vision_encoder(a["pixel_values"], grids, patch, table, blocks, merger, nH, m, s["rope_theta"])
    assert rel(whole, o["merger"]) < 1e-6  # the float32 weights and angles, nothing else


def _differing(a, b):
    return float(np.mean(np.asarray(a, np.float64) != np.asarray(b, np.float64)))


def test_hf_bfloat16_rounding_points():
    """transformers' bfloat16 model (CPU, eager attention) stage by stage from its own bf16 inputs:
    patch embedding, position sum, norms, attention and merger round exactly where ours do (same
    bits); the GELUs evaluate tanh/erf in float32 with another libm, so a rare element may land one
    bf16 step away."""
    W, a, s, o = _hf()
    grids = [tuple(int(v) for v in g) for g in a["grid"]]
    p = Precision("bf16")
    patch, table, blocks, merger = _params(W, np.float32)
    m, nH = s["spatial_merge_size"], s["num_heads"]
    pe = V.patch_embed(a["pixel_values"], patch, p)
    assert _differing(pe, o["bf16.patch_embed"]) == 0
    x = p.act(pe + V.interpolated_pos_embed(table, grids, m, p))
    assert _differing(x, o["bf16.block_input"]) == 0
    cos, sin = V.vision_rope_cos_sin(grids, m, x.shape[1] // nH, s["rope_theta"], p)
    bounds = V.cu_seqlens(grids)
    x = o["bf16.block_input"]
    for i, prm in enumerate(blocks):
        y = V.vision_block(x, prm, nH, cos, sin, bounds, V.gelu_tanh, p)
        assert _differing(y, o[f"bf16.blocks.{i}"]) < 0.002
        x = o[f"bf16.blocks.{i}"]
    assert _differing(V.patch_merger(x, merger, m, p), o["bf16.merger"]) < 0.002
    whole = V.vision_encoder(a["pixel_values"], grids, patch, table, blocks, merger, nH, m, s["rope_theta"], p=p)
    assert rel(whole, o["bf16.merger"]) < 0.5 * rel(o["bf16.merger"], o["merger"])


# ------------------------------------------------------------------------------------------------
# Errors

def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_no_vision_tower(tiny_checkpoint, tmp_path):
    d = _edited_copy(tiny_checkpoint, tmp_path / "c", lambda c: c.pop("vision_config"))
    with pytest.raises(CheckpointError, match="has no vision tower \\(no vision_config in config.json\\)"):
        VisionModel(d)


@pytest.mark.parametrize("field, value, message", [
    ("deepstack_visual_indexes", [1], "field 'vision_config.deepstack_visual_indexes' is \\[1\\]; DeepStack"),
    ("hidden_act", "relu", "field 'vision_config.hidden_act' is 'relu'"),
])
def test_unsupported_vision_configs(tiny_checkpoint, tmp_path, field, value, message):
    d = _edited_copy(tiny_checkpoint, tmp_path / "c", lambda c: c["vision_config"].update({field: value}))
    with pytest.raises(ConfigError, match=message):
        VisionModel(d)


def test_pixel_rows_must_match_grids(vm, images):
    with pytest.raises(ValueError, match="pixel_values has 48 rows but the grids"):
        vm.encode_pixels(images[0].pixel_values, [(1, 4, 4)])
    with pytest.raises(ValueError, match="pixel_values must be \\[patches, 1536\\]"):
        vm.encode_pixels(images[0].pixel_values[:, :10], [images[0].grid])


def test_query_blocks_change_nothing(vm, images, monkeypatch):
    whole = vm.encode(images)
    monkeypatch.setattr(V, "ATTENTION_BLOCK_BYTES", 8 * 2 * 48 * 5)  # 5 query rows of the sample at a time
    np.testing.assert_allclose(vm.encode(images), whole, rtol=1e-13, atol=1e-13)
