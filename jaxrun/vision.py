"""The Qwen3.5 vision encoder in JAX (spec/model.md §9.2-9.5), written apart from ref.vision on
purpose: tests compare the two.

    pixel rows -> patch embedding + the position table resampled onto each grid -> depth x pre-norm
    blocks (2-D rotary attention within each frame, GELU-tanh MLP) -> patch merger (LayerNorm, m x m
    groups, exact GELU) -> rows that replace the prompt's image pads

All images of a call are encoded together, right-padded to a patch-count bucket, so one compiled
function serves every mix of image sizes with that many patches: what depends on the grids (the
processor's merge-block order, the position-table taps, the rotary angles, which patches attend to
which) is computed inside the jit from a `PatchLayout`, per patch its frame, its index in the frame
and the frame's grid. Padding patches form a segment of their own and their rows are dropped.

Shapes: N patches (a bucket), D width, nH heads of hd dims, m the merge size, O the text hidden size.
Weights: jaxrun.params.Visual (matrices in the compute dtype, biases and LayerNorms float32).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrun.matmul import dot
from jaxrun.options import Options
from jaxrun.params import BiasedLinear, LayerNorm, Visual, VisionBlock
from ref.config import VisionConfig

LAYER_NORM_EPS = 1e-6     # every LayerNorm of the tower (fixed in the model)
MIN_PATCHES = 64          # the smallest patch bucket
QUERY_BLOCK = 1024        # attention query rows at a time above this many patches (bounded score memory)
Grid = tuple[int, int, int]


class PatchLayout(NamedTuple):
    """Where each patch of a padded batch of images sits (int32 arrays, host or device)."""
    segment: np.ndarray   # [N] the frame it belongs to (its attention segment); padding -1
    index: np.ndarray     # [N] its index within the frame, in the processor's (merge-block) order
    grid: np.ndarray      # [N, 2] (h, w) of its frame, in patches (padding: (m, m))


def patch_bucket(n: int) -> int:
    """The padded patch count of n patches: a power of two, at least MIN_PATCHES."""
    return max(MIN_PATCHES, 1 << max(0, n - 1).bit_length())


def patch_layout(grids: Sequence[Grid], n: int, m: int) -> PatchLayout:
    """The layout of images with patch grids (t, h, w), in order, padded to n patches."""
    seg, idx, hw, frame = [], [], [], 0
    for t, h, w in grids:
        for _ in range(t):
            seg.append(np.full(h * w, frame))
            idx.append(np.arange(h * w))
            hw.append(np.tile([h, w], (h * w, 1)))
            frame += 1
    real = sum(len(s) for s in seg)
    if real > n:
        raise ValueError(f"{real} patches do not fit a bucket of {n}")
    seg.append(np.full(n - real, -1))
    idx.append(np.arange(n - real))
    hw.append(np.tile([m, m], (n - real, 1)))
    return PatchLayout(*(np.concatenate(a).astype(np.int32) for a in (seg, idx, hw)))


# ------------------------------------------------------------------------------------------------
# The maths

def _linear(x, p: BiasedLinear, opts: Options):
    """x [..., in] @ W.T + b, float32 accumulation, the sum rounded once to the compute dtype."""
    dt = opts.dtype
    return (dot("...i,oi->...o", x.astype(dt), p.weight.astype(dt), opts) + p.bias).astype(dt)


def _layer_norm(x, p: LayerNorm, dt):
    """(x - mean) / sqrt(biased var + eps) * w + b over the last axis, float32 inside."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    return ((xf - mu) * lax.rsqrt(var + LAYER_NORM_EPS) * p.weight + p.bias).astype(dt)


def grid_coordinates(layout: PatchLayout, m: int):
    """(row, column) [N] of each patch on its frame's grid, from its index in merge-block order:
    block b = index // m^2 of the frame's (w/m)-wide block grid, then raster order inside the block."""
    blocks_per_row = layout.grid[:, 1] // m
    b, r = layout.index // (m * m), layout.index % (m * m)
    return (b // blocks_per_row) * m + r // m, (b % blocks_per_row) * m + r % m


def resampled_positions(table, rows, cols, layout: PatchLayout):
    """The side x side table [S*S, D] sampled bilinearly (aligned corners) at each patch -> [N, D]
    float32: along an axis of n patches, patch i samples s = i (S-1) / max(n-1, 1) between ⌊s⌋ and
    min(⌊s⌋+1, S-1); the four taps summed top-left, top-right, bottom-left, bottom-right."""
    side = math.isqrt(table.shape[0])

    def axis(i, n):
        s = i.astype(jnp.float32) * jnp.float32(side - 1) / jnp.maximum(n - 1, 1).astype(jnp.float32)
        lo = jnp.floor(s)
        frac = s - lo
        lo = lo.astype(jnp.int32)
        return (lo, jnp.minimum(lo + 1, side - 1)), (1.0 - frac, frac)

    (r0, r1), (wr0, wr1) = axis(rows, layout.grid[:, 0])
    (c0, c1), (wc0, wc1) = axis(cols, layout.grid[:, 1])
    tap = lambda r, c, w: table[r * side + c].astype(jnp.float32) * w[:, None]
    return tap(r0, c0, wr0 * wc0) + tap(r0, c1, wr0 * wc1) + tap(r1, c0, wr1 * wc0) + tap(r1, c1, wr1 * wc1)


def rotary_cos_sin(rows, cols, head_dim: int, theta: float):
    """cos, sin [N, hd] float32 of the 2-D axial RoPE: frequencies theta^(-2j / (hd/2)), j < hd/4;
    angles [row * f | column * f], duplicated to the whole head."""
    half = head_dim // 2
    inv = 1.0 / theta ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half))       # [hd/4]
    inv = jnp.asarray(inv.astype(np.float32))
    ang = jnp.concatenate([rows[:, None].astype(jnp.float32) * inv, cols[:, None].astype(jnp.float32) * inv], -1)
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate(x, cos, sin, dt):
    """Rotate-half over the whole head: x [N, nH, hd], cos/sin [N, hd] -> [N, nH, hd] in dt."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None] + rot * sin[:, None]).astype(dt)


def _attend(q, k, v, seg_q, seg_k, opts: Options):
    """Softmax attention of query rows q [n, nH, hd] over k, v [N, nH, hd], each row only within its
    own segment -> [n, nH, hd] in the compute dtype."""
    sc = dot("qhd,khd->hqk", q, k, opts) * q.shape[-1] ** -0.5
    sc = jnp.where((seg_q[:, None] == seg_k[None, :])[None], sc, -jnp.inf)
    pr = jax.nn.softmax(sc, axis=-1).astype(opts.dtype)
    return dot("hqk,khd->qhd", pr, v, opts).astype(opts.dtype)


def attention(x, p, n_heads: int, cos, sin, segment, opts: Options):
    """Bidirectional multi-head attention restricted to each segment: x [N, D] (after norm1) -> [N, D].
    Above QUERY_BLOCK patches the query rows go in blocks (a lax.map), so the scores held at a time
    are QUERY_BLOCK x N per head."""
    N, D = x.shape
    dt = opts.dtype
    q, k, v = jnp.moveaxis(_linear(x, p.qkv, opts).reshape(N, 3, n_heads, D // n_heads), 1, 0)
    q, k = _rotate(q, cos, sin, dt), _rotate(k, cos, sin, dt)
    if N <= QUERY_BLOCK:
        o = _attend(q, k, v, segment, segment, opts)
    else:
        nb = N // QUERY_BLOCK
        blocks = (q.reshape(nb, QUERY_BLOCK, *q.shape[1:]), segment.reshape(nb, QUERY_BLOCK))
        o = lax.map(lambda qs: _attend(qs[0], k, v, qs[1], segment, opts), blocks).reshape(q.shape)
    return _linear(o.reshape(N, D), p.proj, opts)


def block(x, p: VisionBlock, n_heads: int, cos, sin, segment, act, opts: Options):
    """x + attn(norm1(x)), then + fc2(act(fc1(norm2(x)))); [N, D] -> [N, D]."""
    dt = opts.dtype
    x = (x + attention(_layer_norm(x, p.norm1, dt), p.attn, n_heads, cos, sin, segment, opts)).astype(dt)
    h = act(_linear(_layer_norm(x, p.norm2, dt), p.mlp.linear_fc1, opts).astype(jnp.float32)).astype(dt)
    return (x + _linear(h, p.mlp.linear_fc2, opts)).astype(dt)


ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def encode(visual: Visual, pixels, layout: PatchLayout, *, cfg: VisionConfig, opts: Options):
    """Pixel rows [N, C*T*P*P] (images in order, then padding; rows as the processor emits them) ->
    merged rows [N / m^2, O] in the compute dtype, image after image (then the padding's)."""
    dt, m = opts.dtype, cfg.spatial_merge_size
    rows, cols = grid_coordinates(layout, m)
    pos = resampled_positions(visual.pos_embed.weight, rows, cols, layout).astype(dt)
    x = (_linear(pixels, visual.patch_embed.proj, opts) + pos).astype(dt)                  # [N, D]
    cos, sin = rotary_cos_sin(rows, cols, cfg.head_dim, cfg.rope_theta)
    act = ACTIVATIONS[cfg.hidden_act]
    for p in visual.blocks:
        x = block(x, p, cfg.num_heads, cos, sin, layout.segment, act, opts)
    mp = visual.merger
    x = _layer_norm(x, mp.norm, dt).reshape(-1, m * m * x.shape[-1])                       # [N / m^2, m^2 D]
    h = jax.nn.gelu(_linear(x, mp.linear_fc1, opts).astype(jnp.float32), approximate=False).astype(dt)
    return _linear(h, mp.linear_fc2, opts)
