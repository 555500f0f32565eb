"""Image preprocessing for the vision encoder, as transformers' Qwen2-VL image processor does it with
its Pillow backend for a still image (spec/model.md §9.1).

    file -> Pillow decode -> RGB (alpha composited onto white) -> smart_resize sizes -> Pillow resize
         of the uint8 image (the processor's filter, bicubic) -> x * rescale_factor (float64, stored
         float32) -> (x - mean) / std (float32) -> patches [N, C*T*P*P] in spatial-merge-block order

Every number comes from the checkpoint's PreprocessorConfig. The output is float32, bit for bit what
the processor returns; `grid` (t, h, w) counts patches. Anything that cannot be read, decoded,
converted or sized raises ImageError with one line naming the image.
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ref.config import PreprocessorConfig
from ref.errors import ImageError

MAX_ASPECT_RATIO = 200  # the processor refuses images longer than this many times their width
SAMPLE_IMAGE = Path(__file__).resolve().parent / "data" / "sample.png"  # 120x90 RGB: a house, a sun, grass


@dataclass(frozen=True)
class PreprocessedImage:
    """One image ready for the encoder."""
    pixel_values: np.ndarray    # [t*h*w, C*T*P*P] float32, rows in spatial-merge-block order
    grid: tuple[int, int, int]  # (t, h, w) in patches; t = 1 for a still image
    size: tuple[int, int]       # (height, width) in pixels after resizing
    source: str                 # the file (or the name given), for messages

    def merged_tokens(self, merge_size: int) -> int:
        """How many <|image_pad|> tokens (merged patches) the image becomes."""
        return merged_tokens(self.grid, merge_size)


def merged_tokens(grid: tuple[int, int, int], merge_size: int) -> int:
    """t * h * w / merge^2: the encoder's output rows for a patch grid (t, h, w)."""
    t, h, w = grid
    return t * (h // merge_size) * (w // merge_size)


# ------------------------------------------------------------------------------------------------
# Decoding

def open_image(source: str | Path | bytes | Image.Image, name: str | None = None) -> tuple[Image.Image, str]:
    """Decode a file (path or encoded bytes) or take a Pillow image -> (fully loaded image, name)."""
    if isinstance(source, Image.Image):
        return source, name or "image"
    name = name or ("image bytes" if isinstance(source, (bytes, bytearray)) else str(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big images are scaled down
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can decode") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data, unreadable file
        raise ImageError(f"{name}: cannot decode the image ({e})") from None
    return img, name


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """The processor's RGB conversion: an image with an alpha band (or a transparent palette entry)
    is composited onto opaque white; any other mode is converted by Pillow (16-bit grey values
    above 255 saturate to white, as Pillow converts them)."""
    try:
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: mode {img.mode} cannot be converted to RGB ({e})") from None


# ------------------------------------------------------------------------------------------------
# Sizing, resizing, normalising, patches

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's target size: each side rounded to a multiple of `factor` (Python's round,
    halves to even), then, if the area is above max_pixels, both sides scaled down by
    sqrt(area / max_pixels) and floored to multiples of `factor` (at least `factor`); if below
    min_pixels, scaled up by sqrt(min_pixels / area) and ceiled. Raises ImageError (no name) for an
    empty image or an aspect ratio above 200."""
    if min(height, width) <= 0:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):g} is above {MAX_ASPECT_RATIO} "
                         f"({width}x{height} pixels)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def rescale_normalize(rgb: np.ndarray, pp: PreprocessorConfig) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [C, H, W]: x * rescale_factor computed in float64 and stored as
    float32, then (x - mean) / std in float32 arithmetic, as the processor's NumPy code does."""
    x = np.moveaxis(rgb, -1, 0)                                               # [C, H, W]
    if pp.do_rescale:
        x = (x.astype(np.float64) * pp.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if pp.do_normalize:
        mean = np.asarray(pp.image_mean, np.float32)[:, None, None]
        std = np.asarray(pp.image_std, np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def patchify(pixels: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int) -> np.ndarray:
    """[C, H, W] -> [h*w, C*T*P*P] with h = H/P, w = W/P. Rows go merge block by merge block (block
    rows, block columns, then the merge x merge patches of the block in raster order); each row is one
    patch flattened as [C, T, P, P] with the still image repeated over the T temporal slots."""
    C, H, W = pixels.shape
    P, m, T = patch_size, merge_size, temporal_patch_size
    h, w = H // P, W // P
    x = pixels.reshape(C, h // m, m, P, w // m, m, P)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)                                      # [h/m, w/m, m, m, C, P, P]
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (T,) + x.shape[5:])
    return np.ascontiguousarray(x).reshape(h * w, C * T * P * P)


def preprocess(source: str | Path | bytes | Image.Image, pp: PreprocessorConfig,
               name: str | None = None) -> PreprocessedImage:
    """One image file (path or encoded bytes) or Pillow image -> PreprocessedImage."""
    img, name = open_image(source, name)
    rgb = to_rgb(img, name)
    try:
        height, width = smart_resize(rgb.height, rgb.width, pp.factor, pp.min_pixels, pp.max_pixels)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), resample=pp.resample)
    pixels = rescale_normalize(np.asarray(rgb), pp)
    patches = patchify(pixels, pp.patch_size, pp.temporal_patch_size, pp.merge_size)
    return PreprocessedImage(patches, (1, height // pp.patch_size, width // pp.patch_size), (height, width), name)
