"""The vision encoder on one 1024 x 1024 image with the 397B tower's shape (random weights): ref and
jaxrun time per image, against the machine's matmul bound measured in the same run.

    python bench/vision_bench.py [--blocks 1] [--size 1024] [--skip-ref]

The tower is Qwen3.5-397B's (ref.config.QWEN35_397B.vision: 27 blocks of width 1152, 16 heads, MLP
4304, 2 x 2 merger to 4096) and the image goes through Qwen3.5's processor settings (1024 x 1024 stays:
a 64 x 64 patch grid, 4096 patches, 1024 merged tokens). Timing the whole tower would take minutes on
a small CPU, so each side times `--blocks` blocks and the rest of the encoder (patch embedding,
position table, merger) apart, and the per-image time is scaled: rest + 27 x per-block (the output
says so). The bound is the machine's dense matmul rate measured now (XLA float32 for jaxrun; NumPy's
BLAS in the reference's dtype, float64, for ref); the encoder's FLOPs count its matmuls (the linears,
and q kᵀ and p v of the attention within the image).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np

from timing import best_of


def encoder_flops(v, n: int) -> tuple[float, float]:
    """(FLOPs outside the blocks, FLOPs per block) of one image of n patches (one attention segment)."""
    D, I, K = v.hidden_size, v.intermediate_size, v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    m2 = v.spatial_merge_size ** 2
    per_block = 2 * n * D * (3 * D + D + 2 * I) + 2 * 2 * n * n * D
    rest = 2 * n * K * D + 2 * (n // m2) * (m2 * D) * (m2 * D + v.out_hidden_size)
    return float(rest), float(per_block)


def random_image(size: int):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def bench_ref(v, pixels, grid, blocks: int) -> tuple[float, float]:
    """(seconds outside the blocks, seconds per block) of ref.vision in f64."""
    from ref import vision as V
    from ref.layers import Precision
    p, rng = Precision("f64"), np.random.default_rng(1)
    D, I, m = v.hidden_size, v.intermediate_size, v.spatial_merge_size
    lin = lambda o, i: V.Linear(rng.standard_normal((o, i)) * i ** -0.5, rng.standard_normal(o) * 0.02)
    norm = lambda d: V.LayerNorm(1 + 0.1 * rng.standard_normal(d), 0.1 * rng.standard_normal(d))
    block = V.VisionBlockParams(norm(D), lin(3 * D, D), lin(D, D), norm(D), lin(I, D), lin(D, I))
    merger = V.MergerParams(norm(D), lin(m * m * D, m * m * D), lin(v.out_hidden_size, m * m * D))
    patch = lin(D, pixels.shape[1])
    table = rng.standard_normal((v.num_position_embeddings, D))
    grids = [grid]
    rest = best_of(lambda: V.vision_encoder(pixels, grids, patch, table, [], merger, v.num_heads, m, v.rope_theta,
                                          V.ACTIVATIONS[v.hidden_act], p), repeat=1)
    x = rng.standard_normal((len(pixels), D))
    cos, sin = V.vision_rope_cos_sin(grids, m, v.head_dim, v.rope_theta, p)
    bounds = V.cu_seqlens(grids)
    run = lambda: [V.vision_block(x, block, v.num_heads, cos, sin, bounds, V.ACTIVATIONS[v.hidden_act], p)
                   for _ in range(blocks)]
    return rest, best_of(run, repeat=1) / blocks


def bench_jax(v, pixels, grid, blocks: int) -> tuple[float, float, float]:
    """(seconds outside the blocks, seconds per block, compile seconds) of jaxrun.vision in f32, one device."""
    import jax
    import jax.numpy as jnp
    from jaxrun import vision as JV
    from jaxrun.options import Options
    from jaxrun.params import declare_visual, init
    from jaxrun.sharding import make_mesh
    from ref.config import QWEN35_397B
    from ref.modes import Modes

    opts = Options.for_platform(make_mesh(1), Modes("f32"))
    declared = declare_visual(QWEN35_397B)
    visual = init(jax.random.key(0), declared._replace(blocks=declared.blocks[:blocks]), jnp.float32)
    n = JV.patch_bucket(len(pixels))
    padded = np.zeros((n, pixels.shape[1]), np.float32)
    padded[:len(pixels)] = pixels
    layout = JV.patch_layout([grid], n, v.spatial_merge_size)
    t0 = time.perf_counter()
    outside = jax.jit(functools.partial(JV.encode, cfg=v, opts=opts)).lower(visual._replace(blocks=()), padded,
                                                                            layout).compile()
    rows, cols = JV.grid_coordinates(layout, v.spatial_merge_size)
    cos, sin = JV.rotary_cos_sin(rows, cols, v.head_dim, v.rope_theta)
    act = JV.ACTIVATIONS[v.hidden_act]

    def stack(x, bs):
        for b in bs:
            x = JV.block(x, b, v.num_heads, cos, sin, layout.segment, act, opts)
        return x

    x = jnp.asarray(np.random.default_rng(1).standard_normal((n, v.hidden_size)), jnp.float32)
    inside = jax.jit(stack).lower(x, visual.blocks[:blocks]).compile()
    compile_s = time.perf_counter() - t0
    rest = best_of(lambda: outside(visual._replace(blocks=()), padded, layout).block_until_ready(), repeat=3)
    per = best_of(lambda: inside(x, visual.blocks[:blocks]).block_until_ready(), repeat=3) / blocks
    return rest, per, compile_s


def matmul_bounds() -> tuple[float, float]:
    """(XLA float32 FLOP/s, NumPy float64 FLOP/s) of a 1024^3 matrix product, measured now."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
    xla = 2 * 1024 ** 3 / best_of(lambda: mm(a).block_until_ready(), repeat=5)
    b = np.ones((1024, 1024))
    blas = 2 * 1024 ** 3 / best_of(lambda: b @ b, repeat=5)
    return xla, blas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=1, help="blocks timed (the per-image time is scaled to 27)")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    ap.add_argument("--skip-ref", action="store_true", help="time jaxrun only")
    a = ap.parse_args(argv)
    from ref.config import QWEN35_397B
    from ref.image import preprocess

    v = QWEN35_397B.vision
    image = preprocess(random_image(a.size), QWEN35_397B.preprocessor, "random image")
    n = len(image.pixel_values)
    rest_flops, block_flops = encoder_flops(v, n)
    total_flops = rest_flops + v.depth * block_flops
    xla, blas = matmul_bounds()
    print(f"397B vision tower ({v.depth} blocks, width {v.hidden_size}, {v.num_heads} heads, MLP "
          f"{v.intermediate_size}) on a {a.size}x{a.size} image: grid {image.grid}, {n} patches, "
          f"{image.merged_tokens(v.spatial_merge_size)} merged tokens, {total_flops / 1e9:.0f} GFLOP")
    print(f"timed: {a.blocks} block(s) and the rest of the encoder apart; per image = rest + {v.depth} x per block")
    print(f"matmul bound now: XLA f32 {xla / 1e9:.1f} GFLOP/s, NumPy f64 {blas / 1e9:.1f} GFLOP/s")
    rest, per, compile_s = bench_jax(v, image.pixel_values, image.grid, a.blocks)
    jt = rest + v.depth * per
    print(f"  jaxrun f32: {jt:7.2f} s/image (rest {rest:.2f} s, {per:.3f} s/block; compile {compile_s:.1f} s) "
          f"= {total_flops / jt / 1e9:.1f} GFLOP/s, {total_flops / jt / xla:.0%} of the XLA f32 bound")
    if not a.skip_ref:
        rest, per = bench_ref(v, image.pixel_values.astype(np.float64), image.grid, a.blocks)
        rt = rest + v.depth * per
        print(f"  ref f64   : {rt:7.2f} s/image (rest {rest:.2f} s, {per:.3f} s/block) "
              f"= {total_flops / rt / 1e9:.1f} GFLOP/s, {total_flops / rt / blas:.0%} of the NumPy f64 bound; "
              f"jaxrun is {rt / jt:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
