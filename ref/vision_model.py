"""The vision tower of a checkpoint: its weights (model.visual.*) read lazily and wired to ref.vision.

    vm = VisionModel(checkpoint_or_dir, precision="f64")
    images = [vm.preprocess("cat.png"), vm.preprocess("dog.jpg")]       # ref.image, the checkpoint's settings
    rows = vm.encode(images)                                           # [sum of merged tokens, text hidden]

Weights stay memory-mapped: each block's tensors are read when the block runs; BF16 linears reach
ref.layers.linear as ref.weights.StreamedWeight (converted a block of rows at a time, never whole).
Every other tensor is converted by ref.weights.Weights.array, the one conversion of the reference
(BF16 exact in every compute dtype; other float dtypes stored as the compute dtype, bf16 mode:
rounded to bf16, as Hugging Face loads them).

`image_prompt(ckpt, ids, images)` is the prompt side every front end shares: the images preprocessed
with the checkpoint's settings and the prompt's image pads expanded to their merged-token counts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import ml_dtypes
import numpy as np

from ref import vision as V
from ref.errors import CheckpointError, ConfigError
from ref.image import PreprocessedImage, preprocess
from ref.image_prompt import expand_image_pads, merged_counts
from ref.layers import Precision
from ref.weights import Weights, stored_weight

PREFIX = "model.visual."


class VisionModel:
    """Qwen3.5 vision encoder over a Checkpoint (or a checkpoint directory). precision 'f64' | 'f32' |
    'bf16' as for ref.model.Model."""

    def __init__(self, ckpt, precision: str = "f64"):
        if isinstance(ckpt, (str, Path)):
            from ref.checkpoint import open_checkpoint
            ckpt = open_checkpoint(ckpt)
        self.ckpt, self.p = ckpt, Precision(precision)
        self.cfg = require_vision_tower(ckpt)
        self.weights = Weights(ckpt, self.p)
        self.act = V.ACTIVATIONS[self.cfg.hidden_act]

    # ---- public API -------------------------------------------------------------------------------

    def preprocess(self, source, name: str | None = None) -> PreprocessedImage:
        """An image file (path or encoded bytes) or Pillow image -> PreprocessedImage, with the
        checkpoint's preprocessor_config.json (ImageError for an image that cannot be used)."""
        return preprocess_for(self.ckpt, source, name)

    def merged_tokens(self, image: PreprocessedImage) -> int:
        """How many image-pad tokens the image takes in the prompt."""
        return image.merged_tokens(self.cfg.spatial_merge_size)

    def encode(self, images: Sequence[PreprocessedImage], dumps: dict | None = None) -> np.ndarray:
        """Images in prompt order -> merged embeddings [sum of merged tokens, out_hidden_size], in the
        same order (they replace the prompt's image-pad rows). `dumps`: see ref.vision.vision_encoder."""
        if not images:
            raise ValueError("no images to encode")
        pixels = np.concatenate([im.pixel_values for im in images])
        return self.encode_pixels(pixels, [im.grid for im in images], dumps)

    def encode_pixels(self, pixel_values: np.ndarray, grids: Sequence[tuple[int, int, int]],
                      dumps: dict | None = None) -> np.ndarray:
        """The encoder on preprocessed pixel rows [N, C*T*P*P] of images with patch grids `grids`."""
        v = self.cfg
        width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        if pixel_values.ndim != 2 or pixel_values.shape[1] != width:
            raise ValueError(f"pixel_values must be [patches, {width}], got {list(pixel_values.shape)}")
        return V.vision_encoder(pixel_values, [tuple(int(x) for x in g) for g in grids], self.patch_embed(),
                                self._array(PREFIX + "pos_embed.weight"), self.blocks(), self.merger(), v.num_heads,
                                v.spatial_merge_size, v.rope_theta, self.act, self.p, dumps)

    def block_step(self, i: int, x: np.ndarray, grids) -> np.ndarray:
        """Block i alone on its input x [N, D] (e.g. an engine's dumped vision.blocks.{i-1}) for images
        with patch grids `grids` -> [N, D]."""
        v, p = self.cfg, self.p
        cos, sin = V.vision_rope_cos_sin(grids, v.spatial_merge_size, v.head_dim, v.rope_theta, p)
        return V.vision_block(p.act(x), self.block(i), v.num_heads, cos, sin, V.cu_seqlens(grids), self.act, p)

    def merger_step(self, x: np.ndarray) -> np.ndarray:
        """The patch merger alone on the last block's output x [N, D] -> [N / m^2, O]."""
        return V.patch_merger(self.p.act(x), self.merger(), self.cfg.spatial_merge_size, self.p)

    # ---- weights --------------------------------------------------------------------------------

    def patch_embed(self) -> V.Linear:
        return self._linear("patch_embed.proj")

    def block(self, i: int) -> V.VisionBlockParams:
        """Block i's parameters (read now, memory-mapped weights)."""
        pre = f"blocks.{i}."
        return V.VisionBlockParams(**{field: (self._norm if field.startswith("norm") else self._linear)(pre + module)
                                      for field, module in V.BLOCK_MODULES.items()})

    def blocks(self) -> Iterator[V.VisionBlockParams]:
        """Every block in turn, each read only when the encoder reaches it."""
        return (self.block(i) for i in range(self.cfg.depth))

    def merger(self) -> V.MergerParams:
        return V.MergerParams(**{field: (self._norm if field == "norm" else self._linear)("merger." + module)
                                 for field, module in V.MERGER_MODULES.items()})

    def _linear(self, module: str) -> V.Linear:
        w = self.ckpt.tensor(PREFIX + module + ".weight")
        w = w.reshape(w.shape[0], -1)                                # the patch embedding: [D, C*T*P*P]
        weight = stored_weight(w, self.p) if w.dtype == ml_dtypes.bfloat16 else self.weights.array(w)
        return V.Linear(weight, self._array(PREFIX + module + ".bias"))

    def _norm(self, module: str) -> V.LayerNorm:
        return V.LayerNorm(self._array(PREFIX + module + ".weight"), self._array(PREFIX + module + ".bias"))

    def _array(self, name: str) -> np.ndarray:
        return self.weights.array(self.ckpt.tensor(name))


def require_vision_tower(ckpt):
    """The checkpoint's VisionConfig, checked; CheckpointError (one line) when it has no vision tower."""
    cfg = ckpt.config
    if cfg.vision is None or not ckpt.has(PREFIX + "patch_embed.proj.weight"):
        raise CheckpointError(f"{ckpt.directory}: the checkpoint has no vision tower "
                              f"({'no vision_config in config.json' if cfg.vision is None else 'no ' + PREFIX + '*'})")
    _check_vision(cfg.vision, ckpt.directory / "config.json")
    return cfg.vision


def preprocess_for(ckpt, source, name: str | None = None) -> PreprocessedImage:
    """One image (path, encoded bytes, Pillow image; a PreprocessedImage is taken as it is) with the
    checkpoint's preprocessor_config.json."""
    if isinstance(source, PreprocessedImage):
        return source
    if ckpt.config.preprocessor is None:
        raise CheckpointError(f"{ckpt.directory}: no preprocessor_config.json (the image processor's "
                              f"settings) in the checkpoint")
    return preprocess(source, ckpt.config.preprocessor, name)


def image_prompt(ckpt, token_ids, images) -> tuple[list[int], list[PreprocessedImage]]:
    """A prompt's token ids, where each image is one run of image-pad tokens (a single pad, expanded
    here, or a run already of the image's merged-token count), and its images in prompt order (files,
    encoded bytes, Pillow images or PreprocessedImage) -> (expanded ids, preprocessed images).
    CheckpointError without a vision tower, ImageError for an unusable image, ValueError (one line
    naming the image and both counts) when the prompt's placeholders do not fit the images."""
    v = require_vision_tower(ckpt)
    image_token = ckpt.config.special_tokens.get("image_token_id")
    if image_token is None:
        raise CheckpointError(f"{ckpt.directory}: config.json has no image_token_id")
    pre = [preprocess_for(ckpt, im) for im in images]
    counts = merged_counts([im.grid for im in pre], v.spatial_merge_size)
    return expand_image_pads(token_ids, counts, image_token, [im.source for im in pre]), pre


def _check_vision(v, source: Path) -> None:
    """What this encoder implements: no DeepStack, a known activation, heads dividing the width into
    a multiple of 4 (2-D RoPE halves), a square position table."""
    def need(ok: bool, name: str, why: str):
        if not ok:
            raise ConfigError(f"{source}: field 'vision_config.{name}' {why}")

    need(not v.deepstack_visual_indexes, "deepstack_visual_indexes",
         f"is {list(v.deepstack_visual_indexes)}; DeepStack (Qwen3-VL) is not part of this model")
    need(v.hidden_act in V.ACTIVATIONS, "hidden_act", f"is {v.hidden_act!r}; expected one of {sorted(V.ACTIVATIONS)}")
    need(v.hidden_size % v.num_heads == 0 and v.head_dim % 4 == 0, "num_heads",
         f"{v.num_heads} must divide hidden_size {v.hidden_size} into heads of a multiple of 4 dims")
    need(math.isqrt(v.num_position_embeddings) ** 2 == v.num_position_embeddings, "num_position_embeddings",
         f"{v.num_position_embeddings} is not a square (side x side table)")
