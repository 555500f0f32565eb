"""Conformance vectors for the image path: small cases written to spec/vectors/vision/.

`python -m ref.vision_vectors [--out DIR]` (re)writes one safetensors file per case, in the schema of
spec/vectors/layers/README.md (ref.layer_vectors.save_case / read); the cases are listed in
spec/vectors/vision/README.md. Tests recompute every case with ref and compare. Vectors computed by
transformers itself are in spec/vectors/vision_hf/ (spec/vectors/make_hf_vision_vectors.py).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ref import vision as V
from ref.config import PreprocessorConfig, parse_preprocessor_config, preprocessor_config_dict
from ref.errors import ImageError
from ref.image import patchify, preprocess, smart_resize
from ref.image_prompt import expand_image_pads, mrope_positions
from ref.layer_vectors import read, save_case, vectors_main  # noqa: F401  (read: for the tests' convenience)

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "vision"
IMAGE, VIDEO, START, END = 248056, 248057, 248053, 248054  # Qwen3.5's token ids
SMALL = PreprocessorConfig(patch_size=4, temporal_patch_size=2, merge_size=2, image_mean=(0.5, 0.5, 0.5),
                           image_std=(0.5, 0.5, 0.5), min_pixels=16 * 16, max_pixels=40 * 40)
QWEN35_SIZES = [(1, 1), (16, 16), (48, 80), (80, 48), (112, 144), (144, 112), (240, 208), (300, 700), (1024, 1024),
                (5000, 7000), (1, 200), (1, 201)]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _block(r: np.random.Generator, D: int, I: int) -> dict:
    return {"norm1.weight": 1 + 0.1 * r.normal(size=D), "norm1.bias": 0.1 * r.normal(size=D),
            "attn.qkv.weight": r.normal(size=(3 * D, D)) / np.sqrt(D), "attn.qkv.bias": 0.1 * r.normal(size=3 * D),
            "attn.proj.weight": r.normal(size=(D, D)) / np.sqrt(D), "attn.proj.bias": 0.1 * r.normal(size=D),
            "norm2.weight": 1 + 0.1 * r.normal(size=D), "norm2.bias": 0.1 * r.normal(size=D),
            "mlp.linear_fc1.weight": r.normal(size=(I, D)) / np.sqrt(D), "mlp.linear_fc1.bias": 0.1 * r.normal(size=I),
            "mlp.linear_fc2.weight": r.normal(size=(D, I)) / np.sqrt(I), "mlp.linear_fc2.bias": 0.1 * r.normal(size=D)}


def cases() -> dict[str, tuple[str, dict, dict]]:
    """name -> (function, inputs, scalar arguments)."""
    r = np.random.default_rng(20261202)
    out = {
        "smart_resize": ("smart_resize", {"hw": np.array(QWEN35_SIZES, np.int64)},
                         {"factor": 32, "min_pixels": 65536, "max_pixels": 16777216}),
        "patchify": ("patchify", {"pixels": np.arange(3 * 8 * 12, dtype=np.float32).reshape(3, 8, 12)},
                     {"patch_size": 2, "temporal_patch_size": 2, "merge_size": 2}),
    }
    pre = preprocessor_config_dict(SMALL)
    for name, pixels in {"ties": r.integers(0, 256, (12, 20, 3), dtype=np.uint8),        # 1.5 -> 2, 2.5 -> 2
                         "downscale": r.integers(0, 256, (50, 90, 3), dtype=np.uint8),
                         "rgba": r.integers(0, 256, (7, 11, 4), dtype=np.uint8)}.items():
        out[f"preprocess_{name}"] = ("preprocess", {"file": np.frombuffer(_png(pixels), np.uint8)},
                                     {"preprocessor": pre})
    D, nH, m = 16, 2, 2
    grids = [(1, 4, 6), (1, 2, 2)]
    out["pos_embed"] = ("pos_embed", {"table": r.normal(size=(25, D)), "grids": np.array(grids + [(1, 10, 8)])},
                        {"merge_size": m})
    out["vision_rope"] = ("vision_rope", {"grids": np.array(grids), "x": r.normal(size=(28, nH, D // nH))},
                          {"merge_size": m, "head_dim": D // nH, "theta": 10000.0})
    out["vision_block"] = ("vision_block", {"x": r.normal(size=(28, D)), "grids": np.array(grids), **_block(r, D, 24)},
                           {"merge_size": m, "num_heads": nH, "theta": 10000.0, "hidden_act": "gelu_pytorch_tanh"})
    M = D * m * m
    out["patch_merger"] = ("patch_merger", {
        "x": r.normal(size=(28, D)), "norm.weight": 1 + 0.1 * r.normal(size=D), "norm.bias": 0.1 * r.normal(size=D),
        "linear_fc1.weight": r.normal(size=(M, M)) / np.sqrt(M), "linear_fc1.bias": 0.1 * r.normal(size=M),
        "linear_fc2.weight": r.normal(size=(12, M)) / np.sqrt(M), "linear_fc2.bias": 0.1 * r.normal(size=12)},
        {"merge_size": m})
    g1, g2 = (1, 4, 6), (1, 6, 2)
    prompt = [1, 2, START, IMAGE, END, 3, 4, 5, START, IMAGE, END, 6]     # one pad per image: expanded
    out["mrope_two_images"] = ("mrope_positions", {"input_ids": np.array(prompt), "image_grid_thw": np.array([g1, g2])},
                               {"image_token_id": IMAGE, "spatial_merge_size": 2})
    video = [7, START] + [VIDEO] * 4 + [END, 8, START] + [VIDEO] * 4 + [END, 9]  # two frames, a timestamp between
    out["mrope_video"] = ("mrope_positions", {"input_ids": np.array(video), "video_grid_thw": np.array([(2, 4, 4)])},
                          {"image_token_id": IMAGE, "video_token_id": VIDEO, "spatial_merge_size": 2})
    return out


def _sized(h: int, w: int, s: dict) -> tuple[int, int]:
    """smart_resize's (height, width), or (-1, -1) where it refuses the size."""
    try:
        return smart_resize(h, w, s["factor"], s["min_pixels"], s["max_pixels"])
    except ImageError:
        return -1, -1


def _grids(a: np.ndarray) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in g) for g in a]


def _linear(a: dict, name: str) -> V.Linear:
    return V.Linear(a[name + ".weight"], a[name + ".bias"])


def _norm(a: dict, name: str) -> V.LayerNorm:
    return V.LayerNorm(a[name + ".weight"], a[name + ".bias"])


def block_params(a: dict, prefix: str = "") -> V.VisionBlockParams:
    """A VisionBlockParams from tensors named as in the checkpoint (after `prefix`)."""
    return V.VisionBlockParams(**{f: (_norm if f.startswith("norm") else _linear)(a, prefix + mod)
                                  for f, mod in V.BLOCK_MODULES.items()})


def merger_params(a: dict, prefix: str = "") -> V.MergerParams:
    return V.MergerParams(**{f: (_norm if f == "norm" else _linear)(a, prefix + mod)
                             for f, mod in V.MERGER_MODULES.items()})


def evaluate(function: str, a: dict, s: dict) -> dict[str, np.ndarray]:
    """Run ref on one case (f64) -> named outputs."""
    if function == "smart_resize":
        return {"hw": np.array([_sized(int(h), int(w), s) for h, w in a["hw"]], np.int64)}
    if function == "patchify":
        return {"rows": patchify(a["pixels"], s["patch_size"], s["temporal_patch_size"], s["merge_size"])}
    if function == "preprocess":
        im = preprocess(a["file"].tobytes(), parse_preprocessor_config(s["preprocessor"]))
        return {"pixel_values": im.pixel_values, "grid": np.array(im.grid, np.int64), "size": np.array(im.size)}
    if function == "pos_embed":
        side = int(np.sqrt(len(a["table"])))
        taps = [V.pos_embed_taps(g, side, s["merge_size"]) for g in _grids(a["grids"])]
        return {"indices": np.concatenate([t[0] for t in taps]), "weights": np.concatenate([t[1] for t in taps]),
                "y": V.interpolated_pos_embed(a["table"], _grids(a["grids"]), s["merge_size"])}
    if function == "vision_rope":
        cos, sin = V.vision_rope_cos_sin(_grids(a["grids"]), s["merge_size"], s["head_dim"], s["theta"])
        return {"positions": V.rotary_positions(_grids(a["grids"]), s["merge_size"]), "cos": cos, "sin": sin,
                "y": V.apply_vision_rope(a["x"], cos, sin)}
    if function == "vision_block":
        grids = _grids(a["grids"])
        cos, sin = V.vision_rope_cos_sin(grids, s["merge_size"], a["x"].shape[1] // s["num_heads"], s["theta"])
        return {"y": V.vision_block(a["x"], block_params(a), s["num_heads"], cos, sin, V.cu_seqlens(grids),
                                    V.ACTIVATIONS[s["hidden_act"]])}
    if function == "patch_merger":
        return {"y": V.patch_merger(a["x"], merger_params(a), s["merge_size"])}
    if function == "mrope_positions":
        m = s["spatial_merge_size"]
        images = _grids(a.get("image_grid_thw", np.zeros((0, 3), int)))
        ids = expand_image_pads(a["input_ids"], [t * (h // m) * (w // m) for t, h, w in images], s["image_token_id"])
        pos, delta = mrope_positions(ids, s["image_token_id"], images, m, s.get("video_token_id"),
                                     _grids(a.get("video_grid_thw", np.zeros((0, 3), int))))
        return {"input_ids": np.array(ids, np.int64), "positions": pos, "rope_delta": np.array([delta], np.int64)}
    raise ValueError(f"unknown vision function {function!r}")


def write(directory: Path = DEFAULT_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [save_case(directory / f"{name}.safetensors", function, inputs, scalars, evaluate(function, inputs, scalars))
            for name, (function, inputs, scalars) in cases().items()]


def main(argv=None) -> int:
    return vectors_main("ref.vision_vectors", __doc__.splitlines()[0], write, DEFAULT_DIR, argv)


if __name__ == "__main__":
    sys.exit(main())
