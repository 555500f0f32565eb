"""jaxrun's routed-expert sum (jaxrun.moe.local_experts) against a float64 recomputation from
ref.nvfp4.dequantize, in both of its forms (decode slots for one or two tokens, the sorted loop for more),
split over two 'devices' by hand, and with global scales tiny enough for decoded weights to be
subnormal (the exact integer decoding, chosen by exact_decode_needed)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxrun.matmul import linear
from jaxrun.moe import local_experts
from jaxrun.options import Options, exact_decode_needed
from jaxrun.params import NVFP4, Experts
from jaxrun.sharding import make_mesh
from ref.modes import Modes
from ref.nvfp4 import dequantize

E, H, I, K = 8, 64, 32, 3
TINY = np.float32(2.0 ** -125)  # a global that makes every decoded weight subnormal


OPTS = Options.for_platform(make_mesh(1), Modes("f32"))


def _experts(rng, tiny: str | None) -> Experts:
    def xlin(name, out, inp):
        s = rng.integers(0x20, 0x48, (E, out, inp // 16), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
        s2 = np.full(E, TINY if name == tiny else 2.0 ** -6, np.float32)
        return NVFP4(rng.integers(0, 256, (E, out, inp // 2), dtype=np.uint8), s, s2)
    return Experts(xlin("gate", I, H), xlin("up", I, H), xlin("down", H, I))


def _oracle(x, ids, wts, experts: Experts):
    """float64 SwiGLU of the float32 weights ref.nvfp4 decodes (subnormals kept), summed in ascending id."""
    w = {n: np.stack([dequantize(p.weight[e], p.weight_scale[e], p.weight_scale_2[e]) for e in range(E)])
         .astype(np.float64) for n, p in zip(("gate", "up", "down"), experts[:3])}
    y = np.zeros((len(x), H))
    for t in range(len(x)):
        for e, g in sorted(zip(ids[t], wts[t])):
            a = w["gate"][e] @ x[t]
            h = a * 0.5 * (1 + np.tanh(a / 2)) * (w["up"][e] @ x[t])                # SiLU without overflow
            y[t] += g * (w["down"][e] @ h)
    return y


def _run(x, ids, wts, experts, exact, shards, skip_spare):
    """local_experts over `shards` equal expert ranges, summed (what the psum over devices does).
    skip_spare: the decode slots' "skip" form (CPU's default), or False for "repeat" (GPU's)."""
    e_loc = E // shards
    opts = OPTS.replace(exact_experts=exact, spare_slots="repeat" if skip_spare is False else "skip")
    y = 0
    for d in range(shards):
        part = jax.tree.map(lambda a: jnp.asarray(a[d * e_loc:(d + 1) * e_loc]), experts)
        y = y + local_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(wts), part, d * e_loc, opts,
                              all_local=shards == 1)
    return np.asarray(y, np.float64)


@pytest.mark.parametrize("tiny", [None, "gate", "down"])
@pytest.mark.parametrize("tokens", [1, 2, 5])
@pytest.mark.parametrize("shards, skip_spare", [(1, None), (2, True), (2, False)])
def test_local_experts_match_float64(tiny, tokens, shards, skip_spare):
    """skip_spare False is the GPU form of the decode slots (spare slots recompute with weight 0)."""
    rng = np.random.default_rng([tokens, shards, len(tiny or "")])
    experts = _experts(rng, tiny)
    x = (rng.standard_normal((tokens, H)) * 2.0 ** 30).astype(np.float32)   # products of subnormal weights stay normal
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]).astype(np.int32)
    wts = rng.dirichlet(np.ones(K), tokens).astype(np.float32)
    exact = exact_decode_needed([experts])
    assert exact == (tiny is not None)
    want = _oracle(x, ids, wts, experts)
    got = _run(x, ids, wts, experts, exact, shards, skip_spare)
    assert np.abs(want).max() > 0
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


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
