"""Write spec/vectors/vision_hf/: the image path computed by Hugging Face transformers itself.

DEV ONLY — not run by the tests or CI, which only read the committed files. It needs torch and
transformers (a version with qwen3_5_moe; written with transformers 5.24.0, torch 2.13.0+cpu,
Pillow 13.0.0) in a separate virtual environment, never the project's:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers pillow numpy safetensors ml_dtypes
    /tmp/hfvenv/bin/python spec/vectors/make_hf_vision_vectors.py [--out DIR]

What it runs (schema of every file: spec/vectors/layers/README.md; cases: vision_hf/README.md):
- smart_resize.safetensors: transformers' smart_resize over a table of sizes (the real Qwen3.5
  budget and a small one), -1 where it raises;
- preprocess_*.safetensors: the Pillow-backend Qwen2-VL image processor on small PNG files of
  several modes and sizes (a small patch size keeps the files small);
- encoder.safetensors: Qwen3_5MoeVisionModel in float64 (eager attention) with tiny random weights
  that are exact in bfloat16, on two images' patches: patch embedding, interpolated position
  embedding, rotary cos/sin, every block's output, the merger output; and the same model in
  bfloat16 on CPU (its merger output) for the bf16 emulation;
- rope_index.safetensors: Qwen3_5MoeModel.get_rope_index on prompts with images and a video.
"""
import argparse
import io
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from ref.layer_vectors import save_case  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parent / "vision_hf"
IMAGE, VIDEO, START, END = 248056, 248057, 248053, 248054  # Qwen3.5's token ids


def _bf16_exact(rng, shape, std, mean=0.0):
    return (rng.normal(size=shape) * std + mean).astype(ml_dtypes.bfloat16).astype(np.float64)


def _png(pixels: np.ndarray, mode: str) -> bytes:
    img = Image.fromarray(pixels)
    assert img.mode == mode, (img.mode, mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------

def smart_resize_cases(out: Path):
    sizes = [(1, 1), (1, 200), (1, 201), (16, 16), (48, 80), (80, 48), (112, 144), (144, 112), (240, 208),
             (256, 256), (300, 700), (333, 1001), (1024, 1024), (4000, 3000), (4096, 4096), (5000, 7000),
             (20000, 20000), (64, 12800), (65, 12999), (31, 33), (17, 3400)]
    budgets = {"qwen35": (32, 65536, 16777216), "small": (32, 64 * 64, 256 * 256)}
    for name, (factor, lo, hi) in budgets.items():
        got = []
        for h, w in sizes:
            try:
                got.append(smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi))
            except ValueError:
                got.append((-1, -1))
        save_case(out / f"smart_resize_{name}.safetensors", "smart_resize", {"hw": np.array(sizes, np.int64)},
                  {"factor": factor, "min_pixels": lo, "max_pixels": hi}, {"hw": np.array(got, np.int64)})


PRE = {"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
       "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 16 * 16, "longest_edge": 40 * 40}}


def preprocess_cases(out: Path):
    rng = np.random.default_rng(7)
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (20, 28), dtype=np.uint16)
    palette = Image.fromarray(u8(18, 30, 3), "RGB").quantize(16)
    pbuf = io.BytesIO()
    palette.save(pbuf, "PNG", transparency=3)
    cases = {
        "rgb_down": _png(u8(90, 120, 3), "RGB"),        # above the budget: scaled down
        "rgb_up": _png(u8(9, 13, 3), "RGB"),            # below it: scaled up
        "rgb_ties_up": _png(u8(28, 44, 3), "RGB"),      # 28/8 = 3.5 -> 4, 44/8 = 5.5 -> 6 (halves to even)
        "rgb_ties": _png(u8(12, 20, 3), "RGB"),         # 12/8 = 1.5 -> 2, 20/8 = 2.5 -> 2
        "rgb_exact": _png(u8(32, 16, 3), "RGB"),        # already a multiple of 8 within budget: no resize
        "one_pixel": _png(u8(1, 1, 3), "RGB"),
        "rgba": _png(u8(21, 35, 4), "RGBA"),
        "gray": _png(u8(26, 19), "L"),
        "gray_alpha": _png(u8(17, 23, 2), "LA"),
        "gray16": _png(gray16, "I;16"),
        "palette_transparent": pbuf.getvalue(),
        "tall": _png(u8(150, 5, 3), "RGB"),
    }
    proc = Qwen2VLImageProcessorPil(**PRE)
    for name, data in cases.items():
        res = proc(images=[Image.open(io.BytesIO(data))], return_tensors="np")
        save_case(out / f"preprocess_{name}.safetensors", "preprocess",
                  {"file": np.frombuffer(data, np.uint8)}, {"preprocessor": PRE},
                  {"pixel_values": res["pixel_values"], "grid": res["image_grid_thw"][0].astype(np.int64)})


# ------------------------------------------------------------------------------------------------

VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=24, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=36, in_channels=3,
              hidden_act="gelu_pytorch_tanh", deepstack_visual_indexes=[])


def _vision_model(dtype):
    """Built as from_pretrained(dtype=...) builds it: parameters in dtype, the rotary inv_freq buffer
    in float32 (a later .to(dtype) would round that buffer too)."""
    cfg = Qwen3_5MoeVisionConfig(**VISION)
    cfg._attn_implementation = "eager"
    model = hf.Qwen3_5MoeVisionModel._from_config(cfg, dtype=dtype).eval()
    assert model.rotary_pos_emb.inv_freq.dtype == torch.float32
    return model


def encoder_case(out: Path):
    rng = np.random.default_rng(11)
    model = _vision_model(torch.float64)
    weights = {}
    for name, prm in model.state_dict().items():
        shape = tuple(prm.shape)
        if ".norm" in name:
            w = _bf16_exact(rng, shape, 0.1, 1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            w = _bf16_exact(rng, shape, 0.1)
        elif name == "pos_embed.weight":
            w = _bf16_exact(rng, shape, 0.5)
        else:
            w = _bf16_exact(rng, shape, 1 / np.sqrt(np.prod(shape[1:])))
        weights[name] = w
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    proc = Qwen2VLImageProcessorPil(**PRE)
    images = [Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (40, 12, 3), dtype=np.uint8))]
    res = proc(images=images, return_tensors="pt")
    pixels, grid = res["pixel_values"], res["image_grid_thw"]
    with torch.no_grad():
        captured = _run_captured(model, pixels.to(torch.float64), grid)
        idx, wts = hf.get_vision_interpolation_indices_and_weights(grid, model.num_grid_per_side, mode="bilinear",
                                                                   align_corners=True, spatial_merge_size=2)
        pos = (model.pos_embed(idx) * wts[:, :, None].double()).sum(1)
        cos, sin = model.rotary_pos_emb(pos, hf.get_vision_position_ids(grid, 2))
        bf16 = _vision_model(torch.bfloat16)
        bf16.load_state_dict({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in weights.items()})
        captured_bf16 = _run_captured(bf16, pixels.to(torch.bfloat16), grid)
    inputs = {f"model.visual.{k}": v.astype(np.float32) for k, v in weights.items()}
    inputs |= {"pixel_values": pixels.numpy(), "grid": grid.numpy().astype(np.int64)}
    outputs = {k: v.numpy() for k, v in captured.items()}
    outputs |= {f"bf16.{k}": v.float().numpy() for k, v in captured_bf16.items()}
    outputs |= {"pos_embed": pos.numpy(), "cos": cos.numpy(), "sin": sin.numpy(),
                "pos_indices": idx.numpy().astype(np.int64), "pos_weights": wts.numpy()}
    scalars = {k: v for k, v in VISION.items()} | {"rope_theta": 10000.0, "preprocessor": PRE}
    save_case(out / "encoder.safetensors", "vision_encoder", inputs, scalars, outputs)


def _run_captured(model, pixels, grid) -> dict:
    """The model's forward -> {patch_embed, block_input, blocks.{i}, merger} (each block's output)."""
    captured = {}
    hooks = [model.patch_embed.register_forward_hook(lambda m, i, o: captured.__setitem__("patch_embed", o)),
             model.blocks[0].register_forward_pre_hook(lambda m, i: captured.__setitem__("block_input", i[0]))]
    for b, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_hook(lambda m, i, o, b=b: captured.__setitem__(f"blocks.{b}", o)))
    captured["merger"] = model(pixels, grid_thw=grid).pooler_output
    for h in hooks:
        h.remove()
    return captured


# ------------------------------------------------------------------------------------------------

class _RopeIndex:
    """Just enough of Qwen3_5MoeModel for its own get_rope_index to run unchanged."""
    config = Qwen3_5MoeConfig(vision_config=dict(spatial_merge_size=2))
    get_vision_position_ids = hf.Qwen3_5MoeModel.get_vision_position_ids
    get_rope_index = hf.Qwen3_5MoeModel.get_rope_index


def rope_index_cases(out: Path):
    def pads(grid, token=IMAGE):
        return [START] + [token] * (grid[0] * grid[1] * grid[2] // 4) + [END]

    g1, g2, g3 = (1, 4, 6), (1, 8, 2), (1, 2, 2)
    video = (2, 4, 4)  # two frames; Qwen3.5 puts a timestamp between frames
    frame = (1, 4, 4)
    cases = {
        "one_image": ([1, 2, 3] + pads(g1) + [4, 5], [g1], None),
        "two_images_text_between": ([1, 2] + pads(g1) + [6, 7, 8] + pads(g2) + [9], [g1, g2], None),
        "image_first": (pads(g2) + [3, 4, 5, 6], [g2], None),
        "three_images": ([7] + pads(g3) + pads(g1) + [8] + pads(g2), [g3, g1, g2], None),
        "video_two_frames": ([1, 11] + pads(frame, VIDEO) + [12] + pads(frame, VIDEO) + [2, 3], None, [video]),
        "image_and_video": ([1] + pads(g1) + [11] + pads(frame, VIDEO) + [12] + pads(frame, VIDEO) + [5],
                            [g1], [video]),
    }
    holder = _RopeIndex()
    for name, (ids, images, videos) in cases.items():
        ids_t = torch.tensor([ids])
        types = (ids_t == IMAGE).int() + 2 * (ids_t == VIDEO).int()
        pos, delta = holder.get_rope_index(ids_t, mm_token_type_ids=types,
                                           image_grid_thw=torch.tensor(images) if images else None,
                                           video_grid_thw=torch.tensor(videos) if videos else None)
        inputs = {"input_ids": np.array(ids, np.int64)}
        if images:
            inputs["image_grid_thw"] = np.array(images, np.int64)
        if videos:
            inputs["video_grid_thw"] = np.array(videos, np.int64)
        save_case(out / f"rope_index_{name}.safetensors", "rope_index", inputs,
                  {"image_token_id": IMAGE, "video_token_id": VIDEO, "spatial_merge_size": 2},
                  {"positions": pos[:, 0].numpy().astype(np.int64),
                   "rope_delta": delta.numpy().reshape(1).astype(np.int64)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    smart_resize_cases(args.out)
    preprocess_cases(args.out)
    encoder_case(args.out)
    rope_index_cases(args.out)
    print(json.dumps(sorted(p.name for p in args.out.glob("*.safetensors"))), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
