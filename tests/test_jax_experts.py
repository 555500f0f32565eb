"""jaxrun's routed-expert sum (jaxrun.moe.local_experts) against a float64 recomputation from
ref.nvfp4.dequantize, in each of its forms (decode slots with "dot" or "fused" products for one or
two tokens; the "sorted" and "ragged" forms for more), split over two 'devices' by hand, with global
scales tiny enough for decoded weights to be subnormal (the exact integer decoding, chosen by
exact_decode_needed), and W4A4 against ref.layers.swiglu_w4a4."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxrun import moe
from jaxrun.matmul import linear
from jaxrun.moe import local_experts
from jaxrun.nvfp4 import e4m3_f32
from jaxrun.options import Options, exact_decode_needed
from jaxrun.params import NVFP4, Experts
from jaxrun.sharding import make_mesh
from ref import layers as L
from ref.checkpoint import NVFP4Weight
from ref.modes import Modes
from ref.nvfp4 import dequantize

E, H, I, K = 8, 64, 32, 3
TINY = np.float32(2.0 ** -125)  # a global that makes every decoded weight subnormal
HOT = 3                         # an expert every token picks

OPTS = Options.for_platform(make_mesh(1), Modes("f32"))
FORMS = {"slots dot": dict(slot_kernel="dot"), "slots fused": dict(slot_kernel="fused"),
         "sorted": dict(expert_kernel="sorted"), "ragged": dict(expert_kernel="ragged")}


def _experts(rng, tiny: str | None) -> Experts:
    def xlin(name, out, inp):
        s = rng.integers(0x20, 0x48, (E, out, inp // 16), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
        s2 = np.full(E, TINY if name == tiny else 2.0 ** -6, np.float32)
        return NVFP4(rng.integers(0, 256, (E, out, inp // 2), dtype=np.uint8), s, s2)
    return Experts(xlin("gate", I, H), xlin("up", I, H), xlin("down", H, I))


def _routing(rng, tokens: int):
    """Top-K ids per token (each includes HOT), Dirichlet weights."""
    ids = np.stack([np.concatenate([[HOT], rng.choice(np.delete(np.arange(E), HOT), K - 1, replace=False)])
                    for _ in range(tokens)]).astype(np.int32)
    return ids, rng.dirichlet(np.ones(K), tokens).astype(np.float32)


def _oracle(x, ids, wts, experts: Experts, act=None):
    """float64 SwiGLU of the float32 weights ref.nvfp4 decodes (subnormals kept), summed in ascending
    id; W4A4 (act [E, 2] input scales): ref.layers.swiglu_w4a4 in float64."""
    w = {n: np.stack([dequantize(p.weight[e], p.weight_scale[e], p.weight_scale_2[e]) for e in range(E)])
         .astype(np.float64) for n, p in zip(("gate", "up", "down"), experts[:3])}
    y = np.zeros((len(x), H))
    for t in range(len(x)):
        for e, g in sorted(zip(ids[t], wts[t])):
            if act is not None:
                ws = [NVFP4Weight(p.weight[e], p.weight_scale[e], p.weight_scale_2[e], None) for p in experts[:3]]
                y[t] += g * L.swiglu_w4a4(x[t:t + 1].astype(np.float64), *ws, act[e, 0], act[e, 1])[0]
                continue
            a = w["gate"][e] @ x[t]
            h = a * 0.5 * (1 + np.tanh(a / 2)) * (w["up"][e] @ x[t])                # SiLU without overflow
            y[t] += g * (w["down"][e] @ h)
    return y


def _run(x, ids, wts, experts, opts, shards, act=None):
    """local_experts over `shards` equal expert ranges (compiled), summed (what the psum over devices does)."""
    e_loc = E // shards
    y = 0
    for d in range(shards):
        part = jax.tree.map(lambda a: jnp.asarray(a[d * e_loc:(d + 1) * e_loc]), experts)
        sc = None if act is None else jnp.asarray(act[d * e_loc:(d + 1) * e_loc])
        f = jax.jit(lambda x, ids, wts, part, sc, first: local_experts(x, ids, wts, part, first, opts, sc,
                                                                        all_local=shards == 1))
        y = y + f(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(wts), part, sc, d * e_loc)
    return np.asarray(y, np.float64)


def _setup(monkeypatch, form):
    """Tokens and options of a form. Capacities at the mean rows per expert (so HOT takes two rounds of
    "sorted" rows, and "ragged" chunks more than one window), "ragged" chunks of 2 experts."""
    monkeypatch.setattr(moe, "CAPACITY_SPREAD", 0.0)
    monkeypatch.setattr(moe, "RAGGED_CHUNK_BYTES", 2 * 3 * H * I * 4)
    return (2 if form.startswith("slots") else 6), OPTS.replace(**FORMS[form])


CASES = [(form, tiny, shards, "skip") for form in FORMS for tiny, shards in ((None, 1), ("gate", 1), ("down", 2))] + \
        [(form, None, 2, "repeat") for form in FORMS if form.startswith("slots")]


@pytest.mark.parametrize("form, tiny, shards, spare", CASES)
def test_local_experts_match_float64(monkeypatch, form, tiny, shards, spare):
    """spare "repeat" is the accelerators' form of the decode slots (spare slots recompute with weight 0);
    "skip" runs each slot under a cond when the experts are split."""
    tokens, opts = _setup(monkeypatch, form)
    rng = np.random.default_rng([tokens, shards, len(tiny or ""), len(form)])
    experts = _experts(rng, tiny)
    x = (rng.standard_normal((tokens, H)) * 2.0 ** 30).astype(np.float32)   # products of subnormal weights stay normal
    ids, wts = _routing(rng, tokens)
    exact = exact_decode_needed([experts])
    assert exact == (tiny is not None)
    want = _oracle(x, ids, wts, experts)
    got = _run(x, ids, wts, experts, opts.replace(exact_experts=exact, spare_slots=spare), shards)
    assert np.abs(want).max() > 0
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_fused_slots_batch_invariant(precision):
    """The accelerators' fused decode slots (fewer slots than experts: one per token and expert) give
    each token the bits it gets alone: no product runs a weight over several tokens' rows."""
    rng = np.random.default_rng(7)
    experts = _experts(rng, None)
    opts = Options.for_platform(OPTS.mesh, Modes(precision), "gpu")
    assert 2 * K < E and opts.slot_kernel == "fused" and opts.slot_tokens >= 2
    for _ in range(3):
        x = rng.standard_normal((2, H)).astype(np.float32)
        ids, wts = _routing(rng, 2)
        both = _run(x, ids, wts, experts, opts, 1)
        alone = np.concatenate([_run(x[t:t + 1], ids[t:t + 1], wts[t:t + 1], experts, opts, 1) for t in range(2)])
        assert np.array_equal(both, alone)


@pytest.mark.parametrize("form", list(FORMS))
def test_w4a4_experts_match_float64(monkeypatch, form):
    """Every routed-expert GEMM input quantized as the engines do, with each expert's input scales."""
    tokens, opts = _setup(monkeypatch, form)
    rng = np.random.default_rng([tokens, len(form)])
    experts = _experts(rng, None)
    x = rng.standard_normal((tokens, H)).astype(np.float32)
    ids, wts = _routing(rng, tokens)
    act = rng.uniform(0.01, 0.05, (E, 2)).astype(np.float32)
    want = _oracle(x, ids, wts, experts, act)
    got = _run(x, ids, wts, experts, opts.replace(activations="w4a4"), 2, act)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_e4m3_f32_every_byte():
    """jaxrun.nvfp4.e4m3_f32 (the scales decoded from their bits) equals ml_dtypes on all 256 bytes."""
    s = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    want = s.astype(np.float32)
    got = np.asarray(jax.jit(e4m3_f32)(s))
    nan = np.isnan(want)
    assert np.array_equal(nan, np.isnan(got))
    assert np.array_equal(want.view(np.uint32)[~nan], got.view(np.uint32)[~nan])


@pytest.mark.parametrize("global_scale", [2.0 ** -6, float(TINY)])
def test_nvfp4_linear_matches_float64(global_scale):
    """A dense linear stored as NVFP4 (matmul.linear): the runtime choice of the exact path for a tiny
    global keeps subnormal weights through the matmul. The weights are captured as constants, so XLA
    folds their decoding at compile time (a bitcast to float4_e2m1fn folded with the nibbles swapped)."""
    rng = np.random.default_rng(7)
    q = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    s = rng.integers(0x20, 0x48, (24, 4), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    g = np.float32(global_scale)
    x = (rng.standard_normal((3, 64)) * 2.0 ** 30).astype(np.float32)
    want = x.astype(np.float64) @ dequantize(q, s, g).astype(np.float64).T
    got = np.asarray(jax.jit(lambda x: linear(x, NVFP4(q, s, g), OPTS))(x), np.float64)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
