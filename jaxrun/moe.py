"""The sparse MoE block: routing, the routed-expert sum split over the mesh (each device sums the
experts it holds; a psum combines), and the shared expert.

The routed experts held here run in one of these forms (the backend options choose, jaxrun.options):
- decode slots, for up to opts.slot_tokens tokens (a decode or speculative step): the distinct experts
  the tokens picked, each decoded once and run on every token. "dot" products (CPU) decode the
  slots' weights together and multiply them by batched dots; "fused" products (accelerators) fuse
  the decoding into a multiply-reduce that reads only the packed bytes (with fewer slots than experts
  held, one slot per (token, expert) pair running its token's row: no weight reused across rows,
  which XLA would decode into a copy first, and each token's bits as it gets alone); with the
  experts split over devices on CPU, a slot without an expert here is skipped under a cond.
- for more tokens, the (token, expert) pairs sorted by expert, then either "sorted" (CPU): a loop over
  the experts that got rows, each decoded once and run on its rows as plain 2-D matrix products,
  `capacity` rows at a time; or "ragged" (accelerators): experts decoded in chunks to the compute
  dtype, each chunk's contiguous rows multiplied by grouped matrix products (lax.ragged_dot).
No dropping; each token's expert outputs are summed in ascending expert id.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxrun.matmul import dot, linear
from jaxrun.nvfp4 import EXACT_SHIFT, activation_values, factor_planes, nvfp4_factors, nvfp4_planes
from jaxrun.options import Options
from jaxrun.params import NVFP4, Experts, SparseMoe
from jaxrun.sharding import expert_axes
from ref.config import TextConfig

CAPACITY_SPREAD = 1.5     # rows per product: the mean rows per expert plus this many standard deviations
RAGGED_CHUNK_BYTES = 1 << 28  # "ragged": decoded weights per chunk of experts, in the compute dtype


def route(x, p, cfg: TextConfig, opts: Options):
    """x [N, H] -> top-k expert ids [N, k] int32 (ties to the lower id), renormalised weights f32."""
    logits = linear(x, p, opts).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    w, ids = lax.top_k(probs, cfg.num_experts_per_tok)
    return ids.astype(jnp.int32), w / jnp.sum(w, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# Experts' weights, decoded

PROJS = ("gate_proj", "up_proj", "down_proj")


class Packed(NamedTuple):
    """Selected experts' packed weights, ready to decode, per projection (gate, up, down): the codes,
    and either the block factors f32(scale * global) (the fast path) or the E4M3 scales and globals
    (`exact`: decoded with integer products), and a factor per output row (`post`) so that the
    weights are decode(...) * post."""
    codes: tuple         # [..., out, in/2] uint8 each
    factors: tuple       # [..., out, in/16] float32 each, or the E4M3 scales (exact)
    globals_: tuple      # [..., out] float32 each (the exact path's)
    post: tuple          # [..., out] float32 each
    exact: bool


class Matrix(NamedTuple):
    """One projection of selected experts decoded for products: W = planes * post[..., :, None]."""
    planes: tuple        # (even, odd) columns [..., out, in/2] float32 (nvfp4.factor_planes)
    post: jax.Array      # [..., out]


class Decoded(NamedTuple):
    gate: Matrix
    up: Matrix
    down: Matrix


def _projection(p, take, in_scale, exact: bool):
    """One projection of the experts `take` selects -> (codes, scales, global, post), global and post
    per output row [..., out]. W4A4 (in_scale [...] given): the block values e2m1 * scale (global 1)
    and post = f32(input_scale * global), the products' one factor. Else the expert's global, and
    post 2^-EXACT_SHIFT on the exact path (nvfp4_planes returns the values times 2^EXACT_SHIFT).
    The E4M3 scales are taken as their bytes (e4m3_f32 reads the bits): XLA:CPU gathers E4M3 as a
    float16 copy otherwise."""
    q, s, g = take(p.weight), take(lax.bitcast_convert_type(p.weight_scale, jnp.uint8)), take(p.weight_scale_2)
    rows = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32)[..., None], q.shape[:-1])
    if in_scale is not None:
        return q, s, rows(1.0), rows(in_scale * g)
    return q, s, rows(g), rows(2.0 ** -EXACT_SHIFT if exact else 1.0)


def _pack(experts: Experts, take, opts: Options, scales=None) -> Packed:
    """The NVFP4 experts `take` selects (a function of a stacked [E, ...] array: a dynamic index, a
    slice or a gather), scales None (W4A16) or their input scales [..., 2] (W4A4: gate/up, down).
    With opts.decode_apart the factors are computed in a computation of their own (a cond with equal
    branches), so the decoding reads them instead of converting the E4M3 scale again for every value
    (XLA:CPU fuses them otherwise)."""
    ex = opts.exact_experts
    q, s, s2, post = zip(*(_projection(getattr(experts, name), take, None if scales is None else scales[..., i // 2],
                                       ex) for i, name in enumerate(PROJS)))
    if ex:
        return Packed(q, s, s2, post, True)
    factors = lambda s, s2: tuple(nvfp4_factors(a, b) for a, b in zip(s, s2))
    f = lax.cond(s2[0].ravel()[0] >= 0, factors, factors, s, s2) if opts.decode_apart else factors(s, s2)
    return Packed(q, f, s2, post, False)


def _unpack(pk: Packed, pick=lambda a: a) -> Decoded:
    """The experts `pick` selects from pk (an index or static slice of its leading axis; default all)
    decoded, float32."""
    return Decoded(*(Matrix(nvfp4_planes(pick(q), pick(f), pick(g), True) if pk.exact else factor_planes(pick(q), pick(f)),
                            pick(post)) for q, f, g, post in zip(pk.codes, pk.factors, pk.globals_, pk.post)))


def _experts_source(experts: Experts, take, opts: Options, scales=None):
    """The experts `take` selects, packed once (codes gathered, factors computed) -> decode(pick), the
    Decoded experts `pick` selects among them (an index or slice of the leading axis; identity: all).
    Dense experts (the MTP head's) are read as they are."""
    if isinstance(experts.down_proj, NVFP4):
        pk = _pack(experts, take, opts, scales)
        return lambda pick=lambda a: a: _unpack(pk, pick)

    def matrix(p, pick):
        w = pick(take(p.weight)).astype(jnp.float32)
        return Matrix((w[..., 0::2], w[..., 1::2]), jnp.ones(w.shape[:-1], jnp.float32))
    return lambda pick=lambda a: a: Decoded(*(matrix(getattr(experts, name), pick) for name in PROJS))


def _planes(h, in_scale=None):
    """A product's input rows [..., K] as even and odd column planes: as given (W4A16), or quantized as
    the engines do (W4A4; in_scale broadcastable to [..., 1]) first."""
    h = h if in_scale is None else activation_values(h, in_scale)
    return h[..., 0::2], h[..., 1::2]


def _product(eq, w, a, opts: Options):
    """Planes w (even, odd) times input planes a -> float32 (the even columns' sum plus the odd ones')."""
    dt = opts.dtype
    return dot(eq, w[0].astype(dt), a[0].astype(dt), opts) + dot(eq, w[1].astype(dt), a[1].astype(dt), opts)


# ------------------------------------------------------------------------------------------------
# Decode slots

def _fused_product(w, a, dt):
    """Planes w (even, odd) [S, O, K/2] (rounded to dt first, as `linear` rounds weights) times input
    planes a [S, N, K/2] -> [S, N, O] float32 as one multiply-reduce over both planes (a variadic
    reduce: XLA fuses the decoding into it, so only the packed bytes are read, and XLA:CPU does not
    hand it to a library as a plain sum)."""
    f32 = lambda v: v.astype(dt).astype(jnp.float32)
    prods = tuple(f32(wp)[:, None] * f32(ap)[:, :, None] for wp, ap in zip(w, a))
    even, odd = lax.reduce(prods, (jnp.float32(0), jnp.float32(0)), lambda u, v: (u[0] + v[0], u[1] + v[1]), (3,))
    return even + odd


def _slot_ffn(x, d: Decoded, scales, opts: Options):
    """SwiGLU of every row x [N, H] (or each slot's own rows [S, N, H]) through each of S decoded
    experts (d's leading axis S) -> [S, N, H] float32 (rounded to the compute dtype). scales: None or
    the experts' input scales [S, 2]."""
    dt = opts.dtype
    S = d.down.post.shape[0]
    if opts.slot_kernel == "fused":
        mm = lambda m, a: _fused_product(m.planes, a, dt) * m.post[:, None]
    else:
        mm = lambda m, a: _product("sok,snk->sno", m.planes, a, opts) * m.post[:, None]
    sc = (lambda i: None) if scales is None else (lambda i: scales[:, i, None, None])
    xs = _planes(jnp.broadcast_to(x.astype(dt), (S,) + x.shape[-2:]), sc(0))   # [S, N, H/2] each
    h = (jax.nn.silu(mm(d.gate, xs).astype(dt)) * mm(d.up, xs).astype(dt)).astype(dt)   # [S, N, I]
    return mm(d.down, _planes(h, sc(1))).astype(dt).astype(jnp.float32)


def _slot_experts(x, ids, wts, experts: Experts, first, e_loc, act, all_local, opts: Options):
    """Decode slots for N <= opts.slot_tokens tokens: the distinct experts held here that the tokens
    picked, ascending by id, as S = min(N*k, E_local) slots, each reading only its own expert's
    packed weights and running on all N rows, each row weighted by its routing weight for that
    expert (0 where it did not pick it). Spare slots (fewer distinct experts than S) have weight 0:
    with opts.spare_slots "skip" and the experts split over devices, a slot runs under a cond, so a
    device does the work of its own experts only; otherwise ("repeat", or one device, where only
    tokens sharing experts leave spare slots) a spare slot repeats the first slot's expert; with as
    many slots as experts held, each expert has its slot, read in place. "dot" slots (CPU) run one
    after the other, each expert's decoded weights used while in cache; "fused" slots run together."""
    N, k = ids.shape
    S = min(N * k, e_loc)
    local = ids - first                                                  # [N, k]
    key = jnp.where((local >= 0) & (local < e_loc), local, e_loc)        # experts held elsewhere -> e_loc
    skip = opts.spare_slots == "skip" and not all_local
    if opts.slot_kernel == "fused" and not skip and S < e_loc:
        return _pair_slots(x, key, wts, experts, e_loc, act, opts)
    hit = jnp.zeros(e_loc + 1, bool).at[key.reshape(-1)].set(True)[:e_loc]
    if S == e_loc and not skip:                                          # a slot for every expert held
        e, live, take = jnp.arange(e_loc), hit, lambda a: a
    else:
        e = jnp.nonzero(hit, size=S, fill_value=0)[0]                    # [S] distinct experts, ascending
        live = jnp.arange(S) < jnp.sum(hit)
        if not skip:
            e = jnp.where(live, e, e[0])
        take = lambda a: a[e]
    w = jnp.sum(jnp.where(key[None] == e[:, None, None], wts[None], 0.0), axis=-1)   # [S, N]
    w = jnp.where(live[:, None], w, 0.0)

    sc = None if act is None else act[e]                                # [S, 2]
    source = _experts_source(experts, take, opts, sc)
    if opts.slot_kernel == "fused" and not skip:
        o = _slot_ffn(x, source(), sc, opts)
        slot = lambda j: o[j]
    else:
        one = lambda a, j: a[j:j + 1]
        ffn = lambda j: _slot_ffn(x, source(lambda a: one(a, j)), None if sc is None else one(sc, j), opts)[0]
        zero = jnp.zeros(x.shape, jnp.float32)
        slot = lambda j: lax.cond(live[j], lambda: ffn(j), lambda: zero) if skip else ffn(j)
    y = jnp.zeros(x.shape, jnp.float32)
    for j in range(S):                                                   # ascending expert id
        y = y + slot(j) * w[j][:, None]
    return y


def _pair_slots(x, key, wts, experts: Experts, e_loc, act, opts: Options):
    """"fused" decode slots with fewer slots than experts held: one slot per (token, expert) pair,
    N*k slots each running its own token's row (each a multiply-reduce without reuse of a weight
    across rows, which every backend fuses with the decoding, so only the packed bytes are read; the
    distinct-expert slots of _slot_experts would run every row through each expert, and XLA then
    writes the decoded weights out). key [N, k]: local expert ids, e_loc for experts held elsewhere
    (weight 0, recomputing local expert 0). Each token's outputs summed in ascending expert id."""
    N, k = key.shape
    order = jnp.argsort(key, axis=-1)                                    # ascending expert id per token
    e = jnp.take_along_axis(key, order, axis=-1)                         # [N, k]
    live = e < e_loc
    w = jnp.where(live, jnp.take_along_axis(wts, order, axis=-1), 0.0)   # [N, k]
    e = jnp.where(live, e, 0).reshape(-1)                                # [N*k]
    sc = None if act is None else act[e]                                 # [N*k, 2]
    d = _experts_source(experts, lambda a: a[e], opts, sc)()
    rows = jnp.repeat(x, k, axis=0)[:, None]                             # [N*k, 1, H]: each pair's row
    o = _slot_ffn(rows, d, sc, opts).reshape(N, k, -1)                   # [N, k, H]
    y = jnp.zeros(x.shape, jnp.float32)
    for j in range(k):
        y = y + o[:, j] * w[:, j, None]
    return y


# ------------------------------------------------------------------------------------------------
# Many tokens: the pairs sorted by expert

class _Sorted(NamedTuple):
    token: jax.Array     # [N*k + 1] token of each sorted pair; the last entry N (a zero row)
    weight: jax.Array    # [N*k + 1] its routing weight; the last 0
    expert: jax.Array    # [N*k] its local expert, e_loc for experts held elsewhere (sorted last)
    counts: jax.Array    # [E_local] pairs per local expert
    starts: jax.Array    # [E_local] first sorted position of each
    order: jax.Array     # [N*k] the pair (token * k + j) at each sorted position


def _sort_pairs(ids, wts, first, e_loc) -> _Sorted:
    """The (token, k) pairs held here sorted by expert (stable: ascending expert id, then token)."""
    N, k = ids.shape
    key = ids.reshape(-1) - first
    key = jnp.where((key >= 0) & (key < e_loc), key, e_loc)             # held elsewhere: sorted last
    order = jnp.argsort(key, stable=True)                                # [N*k]
    counts = jnp.bincount(key, length=e_loc + 1)[:e_loc]
    pad = lambda a, v: jnp.concatenate([a, jnp.full(1, v, a.dtype)])
    return _Sorted(pad(order // k, N), pad(wts.reshape(-1)[order], 0), key[order], counts,
                   jnp.cumsum(counts) - counts, order)


def _capacity(pairs: int, experts: int, bound: int) -> int:
    """Rows per product: the mean rows per expert plus CAPACITY_SPREAD standard deviations (uniform
    routing), a multiple of 4, at most `bound` rounded up to 4."""
    mean = pairs / experts
    c = 4 * math.ceil((mean + CAPACITY_SPREAD * math.sqrt(mean)) / 4)
    return max(4, min(c, 4 * math.ceil(bound / 4)))


def _sorted_experts(x, ids, wts, experts: Experts, first, e_loc, act, opts: Options):
    """"sorted" form: a loop over the experts held here that got rows; each is decoded once, then runs
    gate/up/down on its rows, C at a time (C = _capacity; an expert with more rows takes further
    rounds), as 2-D matrix products with the weights on the left, adding the weighted outputs to
    their tokens (in ascending expert id)."""
    N, k = ids.shape
    H, dt = x.shape[1], opts.dtype
    C = _capacity(N * k, e_loc * opts.devices, N)
    srt = _sort_pairs(ids, wts, first, e_loc)
    xz = jnp.concatenate([x.astype(dt), jnp.zeros((1, H), dt)])         # [N + 1, H], row N zero
    xp = _planes(xz)
    present = jnp.nonzero(srt.counts > 0, size=e_loc, fill_value=0)[0]   # experts with rows, ascending
    source = _experts_source(experts, lambda a: a, opts, act)          # packed once, decoded per expert

    def expert(j, y):
        e = present[j]
        sc = None if act is None else act[e]                            # [2]
        d = source(lambda a: lax.dynamic_index_in_dim(a, e, keepdims=False))

        def rows(r, y):
            rank = r * C + jnp.arange(C)
            p = jnp.where(rank < srt.counts[e], srt.starts[e] + rank, N * k)   # [C] sorted positions
            t = srt.token[p]                                             # padding -> the zero row
            X = (xp[0][t], xp[1][t]) if sc is None else _planes(xz[t], sc[0])   # [C, H/2] each
            mm = lambda m: (_product("ok,ck->oc", m.planes, X, opts) * m.post[:, None]).astype(dt)   # [I, C]
            h = (jax.nn.silu(mm(d.gate)) * mm(d.up)).astype(dt).T        # [C, I]
            o = _product("ok,ck->co", d.down.planes, _planes(h, None if sc is None else sc[1]), opts)   # [C, H]
            o = (o * d.down.post).astype(dt).astype(jnp.float32)
            return y.at[t].add(o * srt.weight[p][:, None])

        return lax.fori_loop(0, (srt.counts[e] + C - 1) // C, rows, y)

    y = lax.fori_loop(0, jnp.sum(srt.counts > 0), expert, jnp.zeros((N + 1, H), jnp.float32))
    return y[:N]


def _chunk_experts(experts: Experts, e_loc: int, itemsize: int) -> int:
    """Experts per "ragged" chunk: the largest divisor of e_loc whose decoded weights fit RAGGED_CHUNK_BYTES."""
    per = 3 * experts.down_proj.weight.shape[-2] * experts.gate_proj.weight.shape[-2] * itemsize
    g = max(1, min(e_loc, RAGGED_CHUNK_BYTES // per))
    while e_loc % g:
        g -= 1
    return g


_RAGGED = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
                                        rhs_group_dimensions=[0])   # rows [R, K] x weights [G, out, K]


def _ragged_experts(x, ids, wts, experts: Experts, first, e_loc, act, opts: Options):
    """"ragged" form: the sorted pairs' rows gathered once; experts decoded G at a time into the compute
    dtype (the planes side by side: one grouped product per projection); each chunk's rows, contiguous
    in sorted order, multiplied in windows of R rows by grouped products (lax.ragged_dot: each row by
    its own expert's weights, rows past the chunk's ignored); the outputs kept per sorted pair, then
    each token's summed in ascending expert id."""
    N, k = ids.shape
    H, dt = x.shape[1], opts.dtype
    Nk = N * k
    G = _chunk_experts(experts, e_loc, jnp.dtype(dt).itemsize)
    R = _capacity(Nk * G, e_loc * opts.devices, Nk)
    srt = _sort_pairs(ids, wts, first, e_loc)
    row_e = jnp.minimum(srt.expert, e_loc - 1)                          # [Nk] each sorted row's expert (clamped)
    side = lambda p: jnp.concatenate(p, axis=-1)                         # planes side by side
    xs = side(_planes(x.astype(dt)[srt.token[:Nk]], None if act is None else act[row_e, 0][:, None]))  # [Nk, H]
    xs = jnp.concatenate([xs, jnp.zeros((R, H), dt)])                   # windows past the end read zeros
    ws = jnp.concatenate([srt.weight[:Nk], jnp.zeros(R, jnp.float32)])
    rows_e = jnp.concatenate([row_e, jnp.zeros(R, row_e.dtype)])
    wide = jnp.float32 if opts.widen_bf16_dots else dt                   # as matmul.dot widens bf16 on CPU
    mm = lambda a, w, gs: lax.ragged_dot_general(a.astype(dt).astype(wide), side(w).astype(dt).astype(wide), gs,
                                                 _RAGGED, precision=lax.Precision.HIGHEST,
                                                 preferred_element_type=jnp.float32)

    def chunk(j, out):
        e0 = j * G
        sc = None if act is None else lax.dynamic_slice_in_dim(act, e0, G)
        d = _experts_source(experts, lambda a: lax.dynamic_slice_in_dim(a, e0, G), opts, sc)()
        cnt = lax.dynamic_slice_in_dim(srt.counts, e0, G)
        lo0 = srt.starts[e0]
        first_row = lo0 + jnp.cumsum(cnt) - cnt                           # [G]

        def window(r, out):
            lo = lo0 + r * R
            gs = jnp.maximum(jnp.minimum(first_row + cnt, lo + R) - jnp.maximum(first_row, lo), 0)   # [G]
            re = jnp.clip(lax.dynamic_slice_in_dim(rows_e, lo, R) - e0, 0, G - 1)                       # [R]
            xw = lax.dynamic_slice_in_dim(xs, lo, R)                                                    # [R, H]
            up = lambda m, a: (mm(a, m.planes, gs) * m.post[re]).astype(dt)                             # [R, out]
            h = (jax.nn.silu(up(d.gate, xw)) * up(d.up, xw)).astype(dt)                                # [R, I]
            o = up(d.down, side(_planes(h, None if sc is None else sc[re, 1][:, None]))).astype(jnp.float32)   # [R, H]
            o = o * lax.dynamic_slice_in_dim(ws, lo, R)[:, None]
            return lax.dynamic_update_slice_in_dim(out, lax.dynamic_slice_in_dim(out, lo, R) + o, lo, 0)

        return lax.fori_loop(0, (jnp.sum(cnt) + R - 1) // R, window, out)

    out = lax.fori_loop(0, e_loc // G, chunk, jnp.zeros((Nk + R, H), jnp.float32))
    at = jnp.zeros(Nk, jnp.int32).at[srt.order].set(jnp.arange(Nk, dtype=jnp.int32)).reshape(N, k)
    at = jnp.take_along_axis(at, jnp.argsort(ids, axis=1, stable=True), axis=1)   # [N, k] by ascending id
    y = jnp.zeros((N, H), jnp.float32)
    for j in range(k):
        y = y + out[at[:, j]]
    return y


def local_experts(x, ids, wts, experts: Experts, first, opts: Options, act=None, all_local: bool = False):
    """Routed-expert sum over the experts held here (ids first .. first + E_local - 1), others skipped.

    x [N, H], ids [N, k], wts [N, k] f32 -> [N, H] f32. all_local: this device holds every expert.
    act: None (W4A16), or input scales [E_local, 2] (gate/up, down) to quantize every routed-expert
    GEMM input as the engines do (W4A4, NVFP4 experts only). Up to opts.slot_tokens tokens as decode
    slots, more by opts.expert_kernel."""
    nvfp4 = isinstance(experts.down_proj, NVFP4)
    e_loc = experts.down_proj.weight.shape[0]
    opts = opts if nvfp4 else opts.replace(exact_experts=False)
    act = act if nvfp4 else None
    if ids.shape[0] <= opts.slot_tokens:
        return _slot_experts(x, ids, wts, experts, first, e_loc, act, all_local, opts)
    if opts.expert_kernel == "ragged":
        return _ragged_experts(x, ids, wts, experts, first, e_loc, act, opts)
    return _sorted_experts(x, ids, wts, experts, first, e_loc, act, opts)


def routed_experts(x, ids, wts, experts: Experts, opts: Options):
    """The routed-expert sum (x [N, H], ids [N, k], weights [N, k]) -> [N, H] f32 over the mesh:
    tokens replicated, experts split over the mesh's expert axes (sharding.expert_axes: every device
    of every process), each device sums its own (local_experts), a psum combines. W4A4: each
    expert's input scales, or (act_scale "max") the layer's largest, a pmax over the devices;
    experts without input scales (the MTP head's) run W4A16."""
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
