"""ref.image: preprocessing bit for bit as transformers' Qwen2-VL image processor (committed vectors
from its Pillow backend), smart_resize by hand and by property, the patch order by explicit loops,
the arithmetic of rescale/normalise exhaustively, and ImageError for every kind of bad input."""
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from ref.config import QWEN35_PREPROCESSOR, PreprocessorConfig, parse_preprocessor_config
from ref.errors import ImageError
from ref.image import SAMPLE_IMAGE, patchify, preprocess, rescale_normalize, smart_resize, to_rgb
from ref.layer_vectors import read

HF_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "vision_hf"
SMALL = PreprocessorConfig(patch_size=4, temporal_patch_size=2, merge_size=2, image_mean=(0.5,) * 3,
                           image_std=(0.5,) * 3, min_pixels=16 * 16, max_pixels=40 * 40)


def png(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", **save)
    return buf.getvalue()


def noise(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# transformers' own outputs

@pytest.mark.parametrize("path", sorted(HF_DIR.glob("preprocess_*.safetensors")), ids=lambda p: p.stem)
def test_equals_transformers_bit_for_bit(path):
    fn, a, s, o = read(path)
    im = preprocess(a["file"].tobytes(), parse_preprocessor_config(s["preprocessor"]))
    assert im.pixel_values.dtype == np.float32 and im.grid == tuple(int(v) for v in o["grid"])
    assert np.array_equal(im.pixel_values, o["pixel_values"])


@pytest.mark.parametrize("path", sorted(HF_DIR.glob("smart_resize_*.safetensors")), ids=lambda p: p.stem)
def test_smart_resize_equals_transformers(path):
    fn, a, s, o = read(path)
    for (h, w), want in zip(a["hw"], o["hw"]):
        if want[0] < 0:
            with pytest.raises(ImageError, match="aspect ratio .* is above 200"):
                smart_resize(int(h), int(w), s["factor"], s["min_pixels"], s["max_pixels"])
        else:
            assert smart_resize(int(h), int(w), s["factor"], s["min_pixels"], s["max_pixels"]) == tuple(want)


# ------------------------------------------------------------------------------------------------
# smart_resize by hand

@pytest.mark.parametrize("hw, want", [
    ((272, 304), (256, 320)),    # 272/32 = 8.5 -> 8, 304/32 = 9.5 -> 10: halves go to the even neighbour
    ((400, 336), (384, 320)),    # 12.5 -> 12, 10.5 -> 10
    ((256, 256), (256, 256)),    # exactly the minimum area
    ((1024, 1024), (1024, 1024)),
    ((48, 80), (224, 352)),      # 64 x 64 is below 65536: beta = sqrt(65536/3840) = 4.131, ceil(6.20), ceil(10.33)
    ((1, 1), (256, 256)),        # beta = 256: ceil(256/32) * 32 on both sides
    ((5000, 7000), (3456, 4832)),  # beta = sqrt(35e6 / 16777216) = 1.4444: floor(108.2) * 32, floor(151.5) * 32
])
def test_smart_resize_hand_worked(hw, want):
    assert smart_resize(*hw, 32, 65536, 16777216) == want


def test_smart_resize_budget_branches_round_half_to_even():
    # 24 x 40 within a 16x16 .. 40x40 budget at factor 8: 3 and 5 exactly; 12 x 20: 1.5 -> 2, 2.5 -> 2
    assert smart_resize(24, 40, 8, 256, 1600) == (24, 40)
    assert smart_resize(12, 20, 8, 256, 1600) == (16, 16)
    assert smart_resize(20, 12, 8, 256, 1600) == (16, 16)
    assert smart_resize(28, 12, 8, 256, 1600) == (32, 16)   # 3.5 -> 4, 1.5 -> 2


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_smart_resize_properties(h, w):
    f, lo, hi = 32, 65536, 16777216
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ImageError):
            smart_resize(h, w, f, lo, hi)
        return
    H, W = smart_resize(h, w, f, lo, hi)
    assert H % f == 0 and W % f == 0 and H >= f and W >= f
    rh, rw = round(h / f) * f, round(w / f) * f
    if lo <= rh * rw <= hi:
        assert (H, W) == (rh, rw)
    elif rh * rw < lo:
        assert H * W >= lo
    else:
        assert H * W <= hi or f in (H, W)


def test_aspect_ratio_limit():
    assert smart_resize(1, 200, 32, 65536, 16777216) == (32, 3648)  # beta = sqrt(65536/200): ceil(0.57), ceil(113.1)
    with pytest.raises(ImageError, match="aspect ratio 201 is above 200 \\(201x1 pixels\\)"):
        smart_resize(1, 201, 32, 65536, 16777216)


# ------------------------------------------------------------------------------------------------
# The arithmetic and the patch order

def test_rescale_normalize_exhaustive():
    """Every uint8 value: x * (1/255) in float64 stored as float32, then (x - mean) / std in float32."""
    pp = QWEN35_PREPROCESSOR
    u = np.arange(256, dtype=np.uint8)
    rgb = np.stack([u, u[::-1], u], axis=-1)[None]                              # [1, 256, 3]
    got = rescale_normalize(rgb, pp)
    for c in range(3):
        for j in range(256):
            x = np.float32(float(rgb[0, j, c]) * (1 / 255))
            want = (x - np.float32(pp.image_mean[c])) / np.float32(pp.image_std[c])
            assert got[c, 0, j] == want and got.dtype == np.float32


def test_patch_order_by_explicit_loops():
    C, H, W, P, T, m = 3, 8, 12, 2, 2, 2
    pixels = np.random.default_rng(1).normal(size=(C, H, W)).astype(np.float32)
    rows = patchify(pixels, P, T, m)
    want = []
    for bi in range(H // P // m):
        for bj in range(W // P // m):
            for i in range(m):
                for j in range(m):
                    r, c = (bi * m + i) * P, (bj * m + j) * P
                    want.append([pixels[ch, r + y, c + x] for ch in range(C) for t in range(T)
                                 for y in range(P) for x in range(P)])
    assert np.array_equal(rows, np.array(want, np.float32))


def test_no_resize_when_the_size_fits():
    pixels = noise(32, 16)                                # multiples of 8, inside the small budget
    im = preprocess(png(pixels), SMALL)
    assert im.size == (32, 16) and im.grid == (1, 8, 4)
    assert np.array_equal(im.pixel_values, patchify(rescale_normalize(pixels, SMALL), 4, 2, 2))


@pytest.mark.parametrize("hw, size", [
    ((90, 120), (32, 40)),   # 88 x 120 > 1600: beta = sqrt(10800/1600), floor(4.33) * 8, floor(5.77) * 8
    ((9, 13), (16, 24)),     # 8 x 16 < 256: beta = sqrt(256/117), ceil(1.66) * 8, ceil(2.40) * 8
    ((150, 5), (152, 8)),    # 18.75 -> 19, 0.625 -> 1: 152 x 8 within the budget
    ((5, 150), (8, 152)),
    ((40, 40), (40, 40)),
    ((37, 21), (40, 24))])   # 4.625 -> 5, 2.625 -> 3
def test_aspect_ratios_up_and_down(hw, size):
    im = preprocess(png(noise(*hw)), SMALL)
    assert im.size == size == smart_resize(*hw, 8, 256, 1600)
    assert im.grid == (1, size[0] // 4, size[1] // 4) and im.pixel_values.shape == (size[0] * size[1] // 16, 96)
    assert im.merged_tokens(2) == size[0] * size[1] // 64


def test_sample_image_ships_with_the_package():
    im = preprocess(SAMPLE_IMAGE, QWEN35_PREPROCESSOR)
    assert Image.open(SAMPLE_IMAGE).size == (120, 90) and im.grid == (1, 14, 20) and im.merged_tokens(2) == 70


# ------------------------------------------------------------------------------------------------
# Modes

def test_alpha_is_composited_onto_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200                                    # red, fully transparent on the left half
    rgba[:, 4:, 3] = 255
    out = np.asarray(to_rgb(Image.fromarray(rgba)))
    assert (out[:, :4] == 255).all() and (out[:, 4:] == [200, 0, 0]).all()
    pal = Image.fromarray(noise(6, 6)).quantize(4)
    pal.info["transparency"] = 0
    assert (np.asarray(to_rgb(pal))[np.asarray(pal) == 0] == 255).all()


def test_sixteen_bit_grey_saturates_as_pillow_converts():
    grey = Image.fromarray(np.array([[0, 100, 255, 256, 65535]], np.uint16))
    assert grey.mode == "I;16"
    assert np.asarray(to_rgb(grey))[0, :, 0].tolist() == [0, 100, 255, 255, 255]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I", "F", "1"])
def test_modes_pillow_can_convert(mode):
    img = Image.fromarray(noise(20, 30)).convert(mode)
    im = preprocess(img, SMALL)
    assert im.grid == (1, 4, 8)


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the image

def test_bad_files(tmp_path):
    good = png(noise(20, 30))
    (tmp_path / "truncated.png").write_bytes(good[:len(good) // 2])
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {tmp_path / "missing.png": "missing.png: file not found",
             tmp_path / "truncated.png": "truncated.png: cannot decode the image",
             tmp_path / "text.png": "text.png: not an image file Pillow can decode",
             tmp_path / "empty.png": "empty.png: not an image file Pillow can decode",
             tmp_path: ": cannot decode the image"}
    for path, message in cases.items():
        with pytest.raises(ImageError) as e:
            preprocess(path, SMALL)
        assert message in str(e.value) and str(e.value).startswith(str(path)) and "\n" not in str(e.value)
    with pytest.raises(ImageError, match="^image bytes: not an image file"):
        preprocess(b"\x89PNG garbage", SMALL)


def test_unconvertible_mode():
    img = Image.fromarray(noise(4, 4, 2)).convert("La")
    with pytest.raises(ImageError, match="^odd.png: mode La cannot be converted to RGB"):
        preprocess(img, SMALL, name="odd.png")


def test_sizes_at_the_edges(monkeypatch, tmp_path):
    one = preprocess(png(noise(1, 1)), SMALL)             # a single pixel is scaled up, as transformers does
    assert one.size == (16, 16) and len(np.unique(one.pixel_values)) <= 3
    path = tmp_path / "line.png"
    path.write_bytes(png(noise(1, 201)))
    with pytest.raises(ImageError, match=f"^{path}: aspect ratio 201 is above 200"):
        preprocess(path, SMALL)
    big = preprocess(png(noise(2000, 3000, seed=2)), SMALL)  # far beyond the budget: scaled down
    assert big.size == (32, 48)                           # beta = sqrt(6e6/1600): floor(4.08), floor(6.12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's decompression-bomb guard
    with pytest.raises(ImageError, match="too many pixels to decode safely"):
        preprocess(png(noise(100, 100)), SMALL)
