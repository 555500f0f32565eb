"""The sparse MoE block: routing, the routed-expert sum split over the mesh (each device sums the
experts it holds; decode slots for up to SLOT_TOKENS tokens, a sorted loop for more; a psum
combines), and the shared expert."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrun.matmul import linear, planes_matmul
from jaxrun.nvfp4 import EXACT_SHIFT, activation_values, nvfp4_planes
from jaxrun.options import Options
from jaxrun.params import NVFP4, Experts, SparseMoe
from jaxrun.sharding import expert_axes
from ref.config import TextConfig

EXPERT_TILE = 16  # rows per grouped-matmul step in prefill
SLOT_TOKENS = 2   # up to this many tokens (a decode or speculative step), the routed experts run as unrolled slots


def route(x, p, cfg: TextConfig, opts: Options):
    """x [N, H] -> top-k expert ids [N, k] int32 (ties to the lower id), renormalised weights f32."""
    logits = linear(x, p, opts).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    w, ids = lax.top_k(probs, cfg.num_experts_per_tok)
    return ids.astype(jnp.int32), w / jnp.sum(w, axis=-1, keepdims=True)


def _expert_nvfp4(p: NVFP4, e, take, exact, in_scale):
    """Expert e of stacked NVFP4 weights, ready to decode: (codes, block scales, the global to decode
    with, exact, post), so that W = decode(codes, scales, global) * post. W4A4 (in_scale given): the
    block values e2m1 * scale (global 1) and post = f32(input_scale * global), the products' one factor.
    Else the global itself, and post = 2^-EXACT_SHIFT on the exact path (see nvfp4.nvfp4_planes)."""
    q, s = take(p.weight), take(p.weight_scale)
    if in_scale is not None:
        return q, s, jnp.float32(1), False, in_scale * p.weight_scale_2[e]
    return q, s, p.weight_scale_2[e], exact, jnp.float32(2.0 ** -EXACT_SHIFT if exact else 1)


def _expert_planes(p, e, opts: Options, in_scale=None, apart=False):
    """Expert e (traced index) of stacked weights as (planes, post), W = planes * post, the planes as
    nvfp4_planes (even, odd) [out, in/2], read by a dynamic index (no gather copy). apart (the expert
    loop, with opts.decode_apart): decoding runs as a computation apart (a cond on e >= 0, always
    true); inside the loop XLA then copies the expert's slice out before decoding it, where decoding
    fused with the slicing of the stacked parameter runs much slower on CPU (bench/jax_bench.py)."""
    take = lambda a: lax.dynamic_index_in_dim(a, e, keepdims=False)
    if not isinstance(p, NVFP4):
        w = take(p.weight).astype(jnp.float32)
        return (w[:, 0::2], w[:, 1::2]), jnp.float32(1)
    q, s, g, ex, post = _expert_nvfp4(p, e, take, opts.exact_experts, in_scale)
    decode = lambda q, s, g: nvfp4_planes(q, s, g, ex)
    if apart and opts.decode_apart:
        return lax.cond(e >= 0, decode, decode, q, s, g), post
    return decode(q, s, g), post


def _inputs(h, in_scale):
    """A matmul's input rows: as given (W4A16), or quantized as the engines do (W4A4)."""
    return h if in_scale is None else activation_values(h, in_scale)


def _expert_ffn(h, experts: Experts, e, opts: Options, scales):
    """SwiGLU of expert e on rows h [n, H] -> [n, H] in the compute dtype. scales: None (W4A16) or the
    expert's input scales [gate/up, down] (W4A4)."""
    dt = opts.dtype

    def mm(h, proj, in_scale):
        planes, post = _expert_planes(proj, e, opts, in_scale)
        return (planes_matmul(_inputs(h, in_scale), planes, opts) * post).astype(dt)

    gu, dn = (None, None) if scales is None else (scales[0], scales[1])
    return mm((jax.nn.silu(mm(h, experts.gate_proj, gu)) * mm(h, experts.up_proj, gu)).astype(dt), experts.down_proj, dn)


def _slot_experts(x, ids, wts, experts: Experts, first, e_loc, act, all_local, opts: Options):
    """Decode form of local_experts for N <= SLOT_TOKENS tokens: the distinct experts held here that
    the tokens picked, ascending by id, as S = min(N*k, E_local) unrolled slots. Each slot reads only
    its own expert's packed weights (dynamic index, no gather copy) and runs gate/up/down on the N
    rows as plain matrix products, each row weighted by its routing weight for that expert (0 where
    it did not pick it). Spare slots (fewer distinct experts than S) have weight 0: with
    opts.spare_slots "skip" and the experts split over devices, each slot runs under a cond, so a
    device does the work of its own experts only; otherwise ("repeat", or one device, where only
    tokens sharing experts leave spare slots) a spare slot repeats the first slot's expert, whose
    weights are then still in cache."""
    N, k = ids.shape
    S = min(N * k, e_loc)
    local = ids - first                                                  # [N, k]
    key = jnp.where((local >= 0) & (local < e_loc), local, e_loc)        # experts held elsewhere -> e_loc
    hit = jnp.zeros(e_loc + 1, bool).at[key.reshape(-1)].set(True)[:e_loc]
    e = jnp.nonzero(hit, size=S, fill_value=0)[0]                        # [S] distinct experts, ascending
    live = jnp.arange(S) < jnp.sum(hit)
    w = jnp.sum(jnp.where(key[None] == e[:, None, None], wts[None], 0.0), axis=-1)   # [S, N]
    w = jnp.where(live[:, None], w, 0.0)
    skip = opts.spare_slots == "skip" and not all_local
    if not skip:
        e = jnp.where(live, e, e[0])

    y = jnp.zeros(x.shape, jnp.float32)
    for j in range(S):
        scales = None if act is None else act[e[j]]
        ffn = lambda j=j, scales=scales: _expert_ffn(x, experts, e[j], opts, scales).astype(jnp.float32) * w[j][:, None]
        y = y + (lax.cond(live[j], ffn, lambda: jnp.zeros(x.shape, jnp.float32)) if skip else ffn())
    return y


def _loop_experts(x, ids, wts, experts: Experts, first, e_loc, act, opts: Options):
    """Prefill form of local_experts: the (token, k) pairs held here sorted by expert (stable:
    ascending expert id, then token). A loop visits only the experts that got rows: it decodes that
    expert's packed weights once, and an inner loop runs gate/up/down on its rows, EXPERT_TILE at a
    time, adding the weighted outputs to their tokens. No dropping."""
    N, k = ids.shape
    dt = opts.dtype
    tm = min(N, EXPERT_TILE)
    key = ids.reshape(-1) - first
    key = jnp.where((key >= 0) & (key < e_loc), key, e_loc)             # sentinel sorts last
    order = jnp.argsort(key, stable=True)                                # [N*k]
    tok = jnp.concatenate([order // k, jnp.zeros(tm, order.dtype)])      # padded for the last tile
    w_sorted = jnp.concatenate([wts.reshape(-1)[order], jnp.zeros(tm, wts.dtype)])
    counts = jnp.bincount(key, length=e_loc + 1)[:e_loc]                 # [E_local]
    starts = jnp.cumsum(counts) - counts
    present = jnp.nonzero(counts > 0, size=e_loc, fill_value=0)[0]       # experts with rows, ascending

    def mm(a, w, in_scale):
        return planes_matmul(_inputs(a, in_scale), w[0], opts) * w[1]

    def expert(j, y):
        e = present[j]
        gu, dn = (None, None) if act is None else (act[e, 0], act[e, 1])
        wg, wu, wd = (_expert_planes(proj, e, opts, sc, apart=True)
                      for proj, sc in ((experts.gate_proj, gu), (experts.up_proj, gu), (experts.down_proj, dn)))
        end = starts[e] + counts[e]

        def tile(i, y):
            r0 = starts[e] + i * tm
            tk = lax.dynamic_slice_in_dim(tok, r0, tm)
            xe = x[tk].astype(dt)                                        # [tm, H]
            h = (jax.nn.silu(mm(xe, wg, gu).astype(dt)) * mm(xe, wu, gu).astype(dt)).astype(dt)
            o = mm(h, wd, dn).astype(dt).astype(jnp.float32) * lax.dynamic_slice_in_dim(w_sorted, r0, tm)[:, None]
            return y.at[tk].add(jnp.where((r0 + jnp.arange(tm) < end)[:, None], o, 0.0))

        if tm == N:                                                      # every expert fits one tile
            return tile(0, y)
        return lax.fori_loop(0, (counts[e] + tm - 1) // tm, tile, y)

    return lax.fori_loop(0, jnp.sum(counts > 0), expert, jnp.zeros(x.shape, jnp.float32))


def local_experts(x, ids, wts, experts: Experts, first, opts: Options, act=None, all_local: bool = False):
    """Routed-expert sum over the experts held here (ids first .. first + E_local - 1), others skipped.

    x [N, H], ids [N, k], wts [N, k] f32 -> [N, H] f32. all_local: this device holds every expert.
    act: None (W4A16), or input scales
    [E_local, 2] (gate/up, down) to quantize every routed-expert GEMM input as the engines do (W4A4,
    NVFP4 experts only). Up to SLOT_TOKENS tokens (decode, a speculative step) as decode slots,
    more by the sorted expert loop."""
    nvfp4 = isinstance(experts.down_proj, NVFP4)
    e_loc = experts.down_proj.weight.shape[0]
    opts = opts if nvfp4 else opts.replace(exact_experts=False)
    act = act if nvfp4 else None
    if ids.shape[0] <= SLOT_TOKENS:
        return _slot_experts(x, ids, wts, experts, first, e_loc, act, all_local, opts)
    return _loop_experts(x, ids, wts, experts, first, e_loc, act, opts)


def routed_experts(x, ids, wts, experts: Experts, opts: Options):
    """The routed-expert sum (x [N, H], ids [N, k], weights [N, k]) -> [N, H] f32 over the mesh:
    tokens replicated, experts split over the mesh's expert axes (sharding.expert_axes: every device
    of every process), each device sums its own (local_experts), a psum combines. W4A4: each
    expert's input scales, or (act_scale "max") the layer's largest, a pmax over the devices; experts without input scales (the MTP head's) run W4A16."""
    axes = expert_axes(opts.mesh)

    def local(x, ids, wts, experts):
        e_loc = experts.down_proj.weight.shape[0]
        first = lax.axis_index(axes) * e_loc
        act = None
        if opts.activations == "w4a4" and experts.input_scale is not None:
            act = experts.input_scale                                    # [E_local, 2]
            if opts.act_scale == "max":
                act = jnp.broadcast_to(lax.pmax(jnp.max(act, axis=0), axes), act.shape)
        return lax.psum(local_experts(x, ids, wts, experts, first, opts, act, opts.devices == 1), axes)

    specs = jax.tree.map(lambda a: P(axes, *([None] * (a.ndim - 1))), experts)
    return jax.shard_map(local, mesh=opts.mesh, in_specs=(P(), P(), P(), specs), out_specs=P(),
                         check_vma=False)(x, ids, wts, experts)


def sparse_moe(x, p: SparseMoe, cfg: TextConfig, opts: Options):
    """x [N, H] (normed) -> routed experts + sigmoid(shared_expert_gate(x)) * shared expert(x), [N, H]."""
    dt = opts.dtype
    ids, w = route(x, p.gate, cfg, opts)
    y = routed_experts(x, ids, w, p.experts, opts)
    sh = p.shared_expert
    s = linear((jax.nn.silu(linear(x, sh.gate_proj, opts)) * linear(x, sh.up_proj, opts)).astype(dt),
               sh.down_proj, opts)
    s = (jax.nn.sigmoid(linear(x, p.shared_expert_gate, opts)) * s).astype(dt)
    return (y.astype(dt) + s).astype(dt)
