"""The sparse MoE block: routing, the routed-expert sum over the experts one device holds (decode
slots for one token, a sorted loop for more), the shared expert."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrun.matmul import dot, linear, planes_matmul
from jaxrun.nvfp4 import EXACT_SHIFT, activation_values, nvfp4_planes, tiny_global
from ref.config import TextConfig


def route(x, p, cfg: TextConfig, dt):
    """x [N, H] -> top-k expert ids [N, k] int32 (ties to the lower id), renormalised weights f32."""
    logits = linear(x, p, dt).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    w, ids = lax.top_k(probs, cfg.num_experts_per_tok)
    return ids.astype(jnp.int32), w / jnp.sum(w, axis=-1, keepdims=True)


EXPERT_TILE = 16  # rows per grouped-matmul step in prefill
SLOT_TOKENS = 2   # up to this many tokens (a decode or speculative step), the routed experts run as unrolled slots


def _expert_nvfp4(p, e, take, exact, in_scale):
    """Expert e of an NVFP4 xlin, ready to decode: (q, s, the global to decode with, exact, post), so
    that W = decode(q, s, global) * post. W4A4 (in_scale given): the block values e2m1 * scale (global
    1) and post = f32(input_scale * global), the products' one factor. Else the global itself, and
    post = 2^-EXACT_SHIFT on the exact path (see nvfp4.nvfp4_planes)."""
    q, s = take(p["q"]), take(p["s"])
    if in_scale is not None:
        return q, s, jnp.float32(1), False, in_scale * p["s2"][e]
    return q, s, p["s2"][e], exact, jnp.float32(2.0 ** -EXACT_SHIFT if exact else 1)


def _expert_planes(p, e, exact, in_scale=None, apart=False):
    """Expert e (traced index) of an xlin as (planes, post), W = planes * post, the planes as
    nvfp4_planes (even, odd) [out, in/2], read by a dynamic index (no gather copy). apart (the expert
    loop, on CPU): decoding runs as a computation apart (a cond on e >= 0, always true); inside the
    loop XLA then copies the expert's slice out before decoding it, where decoding fused with the
    slicing of the stacked parameter measured about 3x slower."""
    take = lambda a: lax.dynamic_index_in_dim(a, e, keepdims=False)
    if "w" in p:
        w = take(p["w"]).astype(jnp.float32)
        return (w[:, 0::2], w[:, 1::2]), jnp.float32(1)
    q, s, g, ex, post = _expert_nvfp4(p, e, take, exact, in_scale)
    decode = lambda q, s, g: nvfp4_planes(q, s, g, ex)
    if apart and jax.default_backend() == "cpu":
        return lax.cond(e >= 0, decode, decode, q, s, g), post
    return decode(q, s, g), post


def _inputs(h, in_scale):
    """A matmul's input rows: as given (W4A16), or quantized as the engines do (W4A4)."""
    return h if in_scale is None else activation_values(h, in_scale)


def _expert_ffn(h, experts, e, dt, exact, scales):
    """SwiGLU of expert e on rows h [n, H] -> [n, H] in dt. scales: None (W4A16) or the expert's
    input scales [gate/up, down] (W4A4)."""
    def mm(h, name, in_scale):
        planes, post = _expert_planes(experts[name], e, exact, in_scale)
        return (planes_matmul(_inputs(h, in_scale), planes, dt) * post).astype(dt)

    gu, dn = (None, None) if scales is None else (scales[0], scales[1])
    return mm((jax.nn.silu(mm(h, "gate", gu)) * mm(h, "up", gu)).astype(dt), "down", dn)


def exact_decode_needed(params) -> bool:
    """Whether the routed experts' NVFP4 decoding must form its products in integers: on CPU, when
    some expert's global scale is tiny enough for a decoded value to be subnormal (tiny_global).
    Read from the concrete parameters, so the compiled functions specialise on it (no runtime cond)."""
    if jax.default_backend() != "cpu":
        return False
    layers = params["layers"] + ([params["mtp"]["layer"]] if "mtp" in params else [])
    globals_ = [layer["mlp"]["experts"][n]["s2"] for layer in layers for n in ("gate", "up", "down")
                if "s2" in layer["mlp"]["experts"][n]]
    return bool(globals_) and bool(tiny_global(jnp.concatenate([jnp.ravel(g) for g in globals_])))


def _slot_experts(x, ids, wts, experts, first, e_loc, dt, all_local, exact, act, skip_spare):
    """Decode form of local_experts for N <= SLOT_TOKENS tokens: the distinct experts held here that
    the tokens picked, ascending by id, as S = min(N*k, E_local) unrolled slots. Each slot reads only
    its own expert's packed weights (dynamic index, no gather copy) and runs gate/up/down on the N
    rows as plain matrix products, each row weighted by its routing weight for that expert (0 where
    it did not pick it). Spare slots (fewer distinct experts than S) have weight 0. With skip_spare
    (default on CPU) and the experts split over devices, each slot runs under a cond, so a device
    does the work of its own experts only; otherwise (GPU, where a cond waits for its predicate on
    the host; one device, where only tokens sharing experts leave spare slots) a spare slot repeats
    the first slot's expert, whose weights are then still in cache."""
    N, k = ids.shape
    S = min(N * k, e_loc)
    local = ids - first                                                  # [N, k]
    key = jnp.where((local >= 0) & (local < e_loc), local, e_loc)        # experts held elsewhere -> e_loc
    hit = jnp.zeros(e_loc + 1, bool).at[key.reshape(-1)].set(True)[:e_loc]
    e = jnp.nonzero(hit, size=S, fill_value=0)[0]                        # [S] distinct experts, ascending
    live = jnp.arange(S) < jnp.sum(hit)
    w = jnp.sum(jnp.where(key[None] == e[:, None, None], wts[None], 0.0), axis=-1)   # [S, N]
    w = jnp.where(live[:, None], w, 0.0)
    if skip_spare is None:
        skip_spare = jax.default_backend() == "cpu"
    skip = skip_spare and not all_local
    if not skip:
        e = jnp.where(live, e, e[0])

    y = jnp.zeros(x.shape, jnp.float32)
    for j in range(S):
        scales = None if act is None else act[e[j]]
        ffn = lambda j=j, scales=scales: _expert_ffn(x, experts, e[j], dt, exact, scales).astype(jnp.float32) * w[j][:, None]
        y = y + (lax.cond(live[j], ffn, lambda: jnp.zeros(x.shape, jnp.float32)) if skip else ffn())
    return y


def local_experts(x, ids, wts, experts, first, dt, all_local=False, exact=False, act=None, skip_spare=None):
    """Routed-expert sum over the experts held here (ids first .. first + E_local - 1), others skipped.

    x [N, H], ids [N, k], wts [N, k] f32 -> [N, H] f32. all_local: this device holds every expert;
    exact: decode NVFP4 products in integers (exact_decode_needed). act: None (W4A16), or input
    scales [E_local, 2] (gate/up, down) to quantize every routed-expert GEMM input as the engines do
    (W4A4, NVFP4 experts only). skip_spare: see _slot_experts.
    Up to SLOT_TOKENS tokens (decode, a speculative step): _slot_experts. Otherwise the (token, k) pairs held here are
    sorted by expert (stable: ascending expert id, then token). A loop visits only the experts that
    got rows: it decodes that expert's packed weights once, and an inner loop runs gate/up/down on
    its rows, tm at a time, adding the weighted outputs to their tokens. No dropping."""
    N, k = ids.shape
    nvfp4 = "q" in experts["down"]
    e_loc = experts["down"]["q" if nvfp4 else "w"].shape[0]
    exact = exact and nvfp4
    act = act if nvfp4 else None
    if N <= SLOT_TOKENS:
        return _slot_experts(x, ids, wts, experts, first, e_loc, dt, all_local, exact, act, skip_spare)
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
        return planes_matmul(_inputs(a, in_scale), w[0], dt) * w[1]

    def expert(j, y):
        e = present[j]
        gu, dn = (None, None) if act is None else (act[e, 0], act[e, 1])
        wg, wu, wd = (_expert_planes(experts[n], e, exact, sc, apart=True) for n, sc in (("gate", gu), ("up", gu), ("down", dn)))
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


def moe(x, p, cfg: TextConfig, dt, routed):
    """x [N, H] (normed) -> [N, H]. `routed(x, ids, weights, experts)` is the (sharded) expert sum."""
    ids, w = route(x, p["router"], cfg, dt)
    y = routed(x, ids, w, p["experts"])
    sh = p["shared"]
    s = linear((jax.nn.silu(linear(x, sh["gate"], dt)) * linear(x, sh["up"], dt)).astype(dt), sh["down"], dt)
    s = (jax.nn.sigmoid(linear(x, p["shared_gate"], dt)) * s).astype(dt)
    return (y.astype(dt) + s).astype(dt)
