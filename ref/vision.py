"""The Qwen3.5 vision encoder (a ViT without DeepStack) as small pure NumPy functions (spec/model.md §9).

    pixel rows -> patch embedding + interpolated position table -> depth x pre-norm blocks (2-D RoPE
    attention within each image, GELU-tanh MLP) -> patch merger (LayerNorm, 2x2 groups, GELU-erf MLP)

Nothing here knows where weights come from (ref.vision_model reads them from a checkpoint). Weights
use the nn.Linear layout [out, in] and are in the compute dtype, or stored BF16 that ref.layers.linear
converts a block of rows at a time (ref.weights.StreamedWeight). `p.act(x)` marks each point where Hugging
Face's bf16 path stores a bf16 tensor (see ref.layers.Precision).

Shapes: N patches of all images together (rows in spatial-merge-block order, image after image),
D vision hidden size, nH heads of hd = D / nH dims, m the spatial merge size, M = N / m^2 merged
tokens, O the text hidden size. A grid (t, h, w) counts one image's patches.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from ref import layers as L
from ref.layers import F64, Precision, softmax

LAYER_NORM_EPS = 1e-6  # every LayerNorm of the vision tower (fixed in the model, not in config.json)
ATTENTION_BLOCK_BYTES = 1 << 26  # attention scores held at a time (float64 bytes): query rows in blocks
Grid = tuple[int, int, int]


class Linear(NamedTuple):
    weight: np.ndarray  # [out, in] (the patch embedding: [D, C, T, P, P])
    bias: np.ndarray    # [out]


class LayerNorm(NamedTuple):
    weight: np.ndarray  # [D]
    bias: np.ndarray    # [D]


class VisionBlockParams(NamedTuple):
    """model.visual.blocks.{i}.* (field -> tensor module in BLOCK_MODULES)."""
    norm1: LayerNorm
    attn_qkv: Linear   # [3D, D], output columns q heads | k heads | v heads
    attn_proj: Linear  # [D, D]
    norm2: LayerNorm
    mlp_fc1: Linear    # [I, D]
    mlp_fc2: Linear    # [D, I]


class MergerParams(NamedTuple):
    """model.visual.merger.*"""
    norm: LayerNorm    # over D, before grouping
    linear_fc1: Linear  # [m^2 D, m^2 D]
    linear_fc2: Linear  # [O, m^2 D]


BLOCK_MODULES = {"norm1": "norm1", "attn_qkv": "attn.qkv", "attn_proj": "attn.proj", "norm2": "norm2",
                 "mlp_fc1": "mlp.linear_fc1", "mlp_fc2": "mlp.linear_fc2"}
MERGER_MODULES = {"norm": "norm", "linear_fc1": "linear_fc1", "linear_fc2": "linear_fc2"}


# ------------------------------------------------------------------------------------------------
# Elementwise pieces

def _unrounded(p: Precision) -> Precision:
    """The precision whose act() only casts: bf16 mode's float32 arithmetic without the rounding."""
    return Precision("f32") if p.name == "bf16" else p


def linear(x: np.ndarray, prm: Linear, p: Precision = F64) -> np.ndarray:
    """x [..., in] @ weight.T + bias -> [..., out], rounded once (bias included). The weight is an
    array (the patch embedding's may be [D, C, T, P, P]) or a 2-D ref.weights.StreamedWeight."""
    w = prm.weight if len(prm.weight.shape) == 2 else prm.weight.reshape(prm.weight.shape[0], -1)
    return p.act(L.linear(x, w, _unrounded(p)) + prm.bias)


def layer_norm(x: np.ndarray, prm: LayerNorm, p: Precision = F64, eps: float = LAYER_NORM_EPS) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance), rounded once."""
    xf = x.astype(p.dtype)
    mu = np.mean(xf, axis=-1, keepdims=True)
    var = np.mean((xf - mu) ** 2, axis=-1, keepdims=True)
    return p.act((xf - mu) / np.sqrt(var + eps) * prm.weight + prm.bias)


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) (torch nn.GELU()); erf from libm in float64."""
    e = _erf(x.astype(np.float64) / math.sqrt(2)).astype(np.float64).astype(x.dtype)
    return 0.5 * x * (1 + e)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (torch gelu(approximate='tanh'), 'gelu_pytorch_tanh')."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "gelu": gelu_erf}


# ------------------------------------------------------------------------------------------------
# Patch embedding and the position table

def patch_embed(pixel_values: np.ndarray, prm: Linear, p: Precision = F64) -> np.ndarray:
    """[N, C*T*P*P] -> [N, D]: the Conv3d with kernel = stride = (T, P, P) as one matmul with the
    kernel flattened [D, C*T*P*P]. The pixels are first stored in the compute dtype (bf16 mode:
    rounded to bf16, as the model casts the processor's float32 to its dtype)."""
    return linear(p.act(pixel_values), prm, p)


def merge_block_order(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of each patch of an h x w grid, in the order the processor emits them: merge
    block by merge block in raster order, the m x m patches of a block in raster order. -> 2 x [h*w]."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    return order(rows), order(cols)


def _axis_taps(n: int, side: int, dt) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps of n target positions on a side-long table axis with aligned corners:
    src = i (side-1) / (n-1) (0 when n = 1) -> (taps [n, 2] (floor, floor+1 clamped), weights [n, 2])."""
    i = np.arange(n).astype(dt)
    src = i * dt(side - 1) / dt(max(n - 1, 1))
    lo = np.floor(src)
    d = src - lo
    taps = np.minimum(lo.astype(np.int64)[:, None] + np.arange(2), side - 1)
    weights = np.stack([np.maximum(1 - d, 0), np.maximum(1 - np.abs(d - 1), 0)], axis=-1).astype(dt)
    return taps, weights


def pos_embed_taps(grid: Grid, side: int, m: int, dt=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """The four table rows and bilinear weights of each patch of one image, rows in merge-block
    order, repeated over t -> (indices [t*h*w, 4] into the flattened side x side table, weights
    [t*h*w, 4]), taps ordered (top-left, top-right, bottom-left, bottom-right)."""
    t, h, w = grid
    h_taps, h_w = _axis_taps(h, side, dt)
    w_taps, w_w = _axis_taps(w, side, dt)
    rows, cols = merge_block_order(h, w, m)
    idx = (h_taps[rows][:, :, None] * side + w_taps[cols][:, None, :]).reshape(-1, 4)
    wts = (h_w[rows][:, :, None] * w_w[cols][:, None, :]).reshape(-1, 4)
    return np.tile(idx, (t, 1)), np.tile(wts, (t, 1))


def interpolated_pos_embed(table: np.ndarray, grids: Sequence[Grid], m: int, p: Precision = F64) -> np.ndarray:
    """The learned side x side position table [side^2, D] resampled bilinearly (aligned corners) onto
    each image's patch grid -> [N, D]: per patch the weighted sum of its four table rows, weights and
    sum in the compute dtype (float32 in bf16 mode), stored once."""
    side = math.isqrt(table.shape[0])
    table = np.asarray(table).astype(p.dtype)
    out = []
    for grid in grids:
        idx, wts = pos_embed_taps(grid, side, m, p.dtype)                        # [n, 4] each
        acc = table[idx[:, 0]] * wts[:, :1]
        for k in range(1, 4):
            acc = acc + table[idx[:, k]] * wts[:, k:k + 1]
        out.append(acc)
    return p.act(np.concatenate(out))


# ------------------------------------------------------------------------------------------------
# 2-D rotary position and attention within each image

def rotary_positions(grids: Sequence[Grid], m: int) -> np.ndarray:
    """(row, column) of every patch, in patch order -> [N, 2] int64."""
    out = []
    for t, h, w in grids:
        rows, cols = merge_block_order(h, w, m)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out)


def vision_rope_cos_sin(grids: Sequence[Grid], m: int, head_dim: int, theta: float, p: Precision = F64):
    """cos, sin [N, head_dim] of the 2-D axial RoPE: inv_freq_j = theta^(-2j / (head_dim/2)),
    j < head_dim/4; angles [row * inv_freq | column * inv_freq] (head_dim/2), duplicated to head_dim.
    Computed and kept in the compute dtype (float32 in bf16 mode: the model never rounds them)."""
    dt, half = p.dtype, head_dim // 2
    inv_freq = (1 / dt(theta) ** (np.arange(0, half, 2).astype(dt) / dt(half))).astype(dt)  # [hd/4]
    pos = rotary_positions(grids, m).astype(dt)                                            # [N, 2]
    angles = (pos[:, :, None] * inv_freq).reshape(len(pos), -1)                            # [N, hd/2]
    emb = np.concatenate([angles, angles], axis=-1)
    return np.cos(emb), np.sin(emb)


def apply_vision_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, p: Precision = F64) -> np.ndarray:
    """Rotate-half RoPE over the whole head: x [N, nH, hd], cos/sin [N, hd]; dims j and j + hd/2
    rotate together. Computed in the compute dtype from the stored x, stored once."""
    half = x.shape[-1] // 2
    xf = x.astype(p.dtype)
    rot = np.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return p.act(xf * cos[:, None, :] + rot * sin[:, None, :])


def cu_seqlens(grids: Sequence[Grid]) -> np.ndarray:
    """Boundaries of the attention segments: one per frame (h*w patches), t per image -> [S + 1]."""
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def vision_attention(x: np.ndarray, qkv: Linear, proj: Linear, n_heads: int, cos: np.ndarray, sin: np.ndarray,
                     bounds: np.ndarray, p: Precision = F64) -> np.ndarray:
    """Bidirectional multi-head attention restricted to each segment [bounds[s], bounds[s+1]).
    x [N, D] (after norm1) -> [N, D]. Scores scaled by hd^-1/2; softmax in the compute dtype. Query
    rows go in blocks of ATTENTION_BLOCK_BYTES of scores (each row's softmax is its own)."""
    N, D = x.shape
    hd = D // n_heads
    q, k, v = linear(x, qkv, p).reshape(N, 3, n_heads, hd).transpose(1, 0, 2, 3)   # 3 x [N, nH, hd]
    q, k = apply_vision_rope(q, cos, sin, p), apply_vision_rope(k, cos, sin, p)
    o = np.empty((N, n_heads, hd), p.dtype)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ks, vs = k[lo:hi].transpose(1, 2, 0), v[lo:hi].transpose(1, 0, 2)          # [nH, hd, n], [nH, n, hd]
        rows = max(1, ATTENTION_BLOCK_BYTES // (8 * n_heads * (hi - lo)))         # query rows at a time
        for r in range(lo, hi, rows):
            qs = q[r:min(r + rows, hi)].transpose(1, 0, 2)                          # [nH, r, hd]
            scores = p.act(p.act(qs @ ks) * hd ** -0.5)                             # [nH, r, n]
            w = p.act(softmax(scores))
            o[r:r + qs.shape[1]] = p.act(w @ vs).transpose(1, 0, 2)
    return linear(o.reshape(N, D), proj, p)


# ------------------------------------------------------------------------------------------------
# Block, merger, encoder

def vision_block(x: np.ndarray, prm: VisionBlockParams, n_heads: int, cos: np.ndarray, sin: np.ndarray,
                 bounds: np.ndarray, act: Callable = gelu_tanh, p: Precision = F64) -> np.ndarray:
    """x + attn(norm1(x)), then + fc2(act(fc1(norm2(x)))). [N, D] -> [N, D]."""
    x = p.act(x + vision_attention(layer_norm(x, prm.norm1, p), prm.attn_qkv, prm.attn_proj, n_heads,
                                   cos, sin, bounds, p))
    hidden = p.act(act(linear(layer_norm(x, prm.norm2, p), prm.mlp_fc1, p)))
    return p.act(x + linear(hidden, prm.mlp_fc2, p))


def patch_merger(x: np.ndarray, prm: MergerParams, m: int, p: Precision = F64) -> np.ndarray:
    """LayerNorm per patch, then each run of m^2 consecutive patches (one merge block) concatenated
    -> fc1 -> exact GELU -> fc2. [N, D] -> [N / m^2, O]."""
    x = layer_norm(x, prm.norm, p)
    x = x.reshape(-1, x.shape[-1] * m * m)
    return linear(p.act(gelu_erf(linear(x, prm.linear_fc1, p))), prm.linear_fc2, p)


def vision_encoder(pixel_values: np.ndarray, grids: Sequence[Grid], patch: Linear, pos_table: np.ndarray,
                   blocks: Iterable[VisionBlockParams], merger: MergerParams, n_heads: int, m: int,
                   theta: float = 10_000.0, act: Callable = gelu_tanh, p: Precision = F64,
                   dumps: dict | None = None) -> np.ndarray:
    """All images' pixel rows [N, C*T*P*P] (image after image, as preprocessed) and their grids ->
    merged embeddings [M, O] in the same order, which replace the prompt's image-pad rows.
    `blocks` yields each block's parameters in turn (read lazily by the caller if it likes).
    `dumps`, if a dict, receives vision.patch_embed, vision.pos_embed, vision.blocks.{i} and
    vision.merger."""
    if pixel_values.shape[0] != sum(t * h * w for t, h, w in grids):
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but the grids {list(grids)} "
                         f"hold {sum(t * h * w for t, h, w in grids)} patches")
    x = patch_embed(pixel_values, patch, p)                                       # [N, D]
    pos = interpolated_pos_embed(pos_table, grids, m, p)
    _dump(dumps, "vision.patch_embed", x)
    _dump(dumps, "vision.pos_embed", pos)
    x = p.act(x + pos)
    cos, sin = vision_rope_cos_sin(grids, m, x.shape[-1] // n_heads, theta, p)
    bounds = cu_seqlens(grids)
    for i, prm in enumerate(blocks):
        x = vision_block(x, prm, n_heads, cos, sin, bounds, act, p)
        _dump(dumps, f"vision.blocks.{i}", x)
    out = patch_merger(x, merger, m, p)
    _dump(dumps, "vision.merger", out)
    return out


def _dump(dumps: dict | None, name: str, value: np.ndarray) -> None:
    if dumps is not None:
        dumps[name] = value.copy()
