"""The Qwen3.5-MoE text decoder as small pure NumPy functions, one per module (spec/model.md).

Every function takes plain arrays and a `Precision`; nothing here knows where weights come from.
Weights use the nn.Linear layout [out, in] and are already in the compute dtype (ref.weights wires
them from the checkpoint). `p.act(x)` marks each point where Hugging Face's bf16 path stores a bf16 tensor: it rounds to
bf16 in "bf16" mode and only casts to the compute dtype in "f64" / "f32" mode.

Shapes: T new tokens, S cached + new tokens, H hidden, E experts, k experts per token,
nH / nKV attention heads of D dims, Hk / Hv DeltaNet key / value heads of dk / dv dims, C conv channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from ref import nvfp4

CHUNK = 64  # chunk length of the chunked gated delta rule


@dataclass(frozen=True)
class Precision:
    """'f64': float64 throughout; 'f32': float32 throughout; 'bf16': float32 compute, activations
    rounded to bf16 where HF's bf16 path rounds (norms, softmax, DeltaNet state stay float32)."""
    name: str = "f64"

    def __post_init__(self):
        if self.name not in ("f64", "f32", "bf16"):
            raise ValueError(f"precision must be 'f64', 'f32' or 'bf16', got {self.name!r}")

    @property
    def dtype(self) -> type:
        return np.float64 if self.name == "f64" else np.float32

    def act(self, x) -> np.ndarray:
        """An activation as stored by the model: bf16-rounded in bf16 mode, else the compute dtype."""
        if self.name == "bf16":  # one correct rounding, also from float64
            return np.asarray(nvfp4.round_to_bf16(x), np.float32)
        return x.astype(self.dtype, copy=False) if isinstance(x, np.ndarray) else np.asarray(x, self.dtype)


F64 = Precision("f64")


# ------------------------------------------------------------------------------------------------
# Elementwise helpers (compute dtype in, compute dtype out)

def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e) for x >= 0, else e / (1 + e), with e = exp(-|x|) (no overflow either side)."""
    e = np.exp(-np.abs(x))
    d = 1 + e
    out = np.divide(e, d, out=e)                                    # x < 0
    np.divide(1, d, out=d)
    np.copyto(out, d, where=x >= 0)
    return out.astype(x.dtype, copy=False)


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def softplus(x: np.ndarray) -> np.ndarray:
    """torch.nn.functional.softplus (beta 1, threshold 20): x above 20, else log(1 + e^x)."""
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))).astype(x.dtype)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def linear(x: np.ndarray, w, p: Precision = F64) -> np.ndarray:
    """x [..., in] @ w[out, in].T -> [..., out], one rounding of the result. `w` is an array in the compute
    dtype, or anything that multiplies like one (ref.weights.StreamedWeight converts a stored weight
    a block of rows at a time)."""
    return p.act(x @ w.T)


# ------------------------------------------------------------------------------------------------
# Norms

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, p: Precision = F64) -> np.ndarray:
    """Zero-centred RMSNorm over the last axis: x / rms(x) * (1 + w), rounded once."""
    xf = x.astype(p.dtype)
    y = xf * (1 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + eps))
    return p.act(y * (1 + w))


def gated_rms_norm(x: np.ndarray, z: np.ndarray, w: np.ndarray, eps: float, p: Precision = F64) -> np.ndarray:
    """DeltaNet output norm over the last axis: plain weight, norm first, then * silu(z)."""
    xf = x.astype(p.dtype)
    xn = p.act(xf * (1 / np.sqrt(np.mean(xf * xf, axis=-1, keepdims=True) + eps)))
    return p.act(p.act(w * xn) * silu(z.astype(p.dtype)))


def l2norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """x / sqrt(sum(x^2) + eps) over the last axis (eps inside the square root)."""
    return x * (1 / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps))


# ------------------------------------------------------------------------------------------------
# Gated DeltaNet

class DeltaNetParams(NamedTuple):
    in_proj_qkv: np.ndarray  # [C, H], C = 2*Hk*dk + Hv*dv, rows q heads | k heads | v heads
    in_proj_z: np.ndarray    # [Hv*dv, H]
    in_proj_b: np.ndarray    # [Hv, H]
    in_proj_a: np.ndarray    # [Hv, H]
    conv1d: np.ndarray       # [C, K] depthwise, no bias (checkpoint [C, 1, K])
    dt_bias: np.ndarray      # [Hv]
    A_log: np.ndarray        # [Hv]
    norm: np.ndarray         # [dv] plain weight
    out_proj: np.ndarray     # [H, Hv*dv]


class DeltaNetState(NamedTuple):
    conv: np.ndarray       # [K-1, C] last K-1 pre-conv inputs
    recurrent: np.ndarray  # [Hv, dk, dv] state S


def causal_conv1d_silu(x: np.ndarray, w: np.ndarray, state: np.ndarray, p: Precision = F64):
    """Depthwise causal conv (window = K-1 previous inputs + current) then SiLU.
    x [T, C], w [C, K], state [K-1, C] -> (out [T, C], new state [K-1, C])."""
    T, K = x.shape[0], w.shape[1]
    window = np.concatenate([state.astype(p.dtype), x.astype(p.dtype)])  # [T+K-1, C]
    acc = np.zeros_like(window[:T])
    for j in range(K):  # w[:, K-1] multiplies the current token
        acc += w[:, j] * window[j:j + T]
    return p.act(silu(p.act(acc))), window[T:]


def deltanet_gates(b: np.ndarray, a: np.ndarray, A_log: np.ndarray, dt_bias: np.ndarray, p: Precision = F64):
    """b, a [T, Hv] -> beta = sigmoid(b) (stored), g = -exp(A_log) * softplus(a + dt_bias) (compute)."""
    beta = p.act(sigmoid(b.astype(p.dtype)))
    g = -np.exp(A_log.astype(p.dtype)) * softplus(a.astype(p.dtype) + dt_bias)
    return beta, g


def delta_rule_recurrent(q, k, v, g, beta, state):
    """Gated delta rule, one token at a time. q, k [T, Hv, dk] (normalised, q scaled), v [T, Hv, dv],
    g, beta [T, Hv], state [Hv, dk, dv] -> (o [T, Hv, dv], state)."""
    S = state.copy()
    o = np.empty(v.shape, S.dtype)
    for t in range(v.shape[0]):
        S *= np.exp(g[t])[:, None, None]                           # decay
        kv = (k[t][:, None, :] @ S)[:, 0]                          # [Hv, dv] = S^T k
        delta = (v[t] - kv) * beta[t][:, None]                     # [Hv, dv]
        S += k[t][:, :, None] * delta[:, None, :]                  # S += k delta^T
        o[t] = (q[t][:, None, :] @ S)[:, 0]                        # reads the updated state
    return o, S


def delta_rule_chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same rule over chunks of `chunk` tokens (WY form). Arguments and result as
    delta_rule_recurrent. T is zero-padded to a multiple of `chunk`; padded steps have g = 0,
    beta = 0, k = 0, so they neither decay nor write the state, and their outputs are dropped."""
    T, Hv, dk = k.shape
    dv = v.shape[2]
    n = -(-T // chunk)

    def blocks(x):  # [T, Hv, ...] -> [Hv, n, chunk, ...]
        x = np.moveaxis(x, 1, 0)
        x = np.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(Hv, n, chunk, *x.shape[2:])

    q, k, v, g, beta = map(blocks, (q, k, v, g, beta))
    gam = np.cumsum(g, axis=-1)                                     # [Hv, n, C] within each chunk
    lower = np.tril(np.ones((chunk, chunk), bool))
    diff = np.where(lower, gam[..., :, None] - gam[..., None, :], 0)
    decay = np.where(lower, np.exp(diff), 0)                        # Γ[r, s] = exp(γ_r - γ_s), s <= r
    A = np.tril(beta[..., :, None] * (k @ np.swapaxes(k, -1, -2)) * decay, -1)  # strict lower
    # Solve (I + A) X = [beta v | beta exp(γ) k] by forward substitution.
    X = np.concatenate([beta[..., None] * v, (beta * np.exp(gam))[..., None] * k], axis=-1)
    for i in range(1, chunk):
        X[..., i, :] -= (A[..., i:i + 1, :i] @ X[..., :i, :])[..., 0, :]
    U, W = X[..., :dv], X[..., dv:]                                 # [Hv, n, C, dv], [Hv, n, C, dk]
    S = state.copy()
    o = np.empty((Hv, n, chunk, dv), S.dtype)
    for c in range(n):
        qc, kc, gc = q[:, c], k[:, c], gam[:, c]
        vnew = U[:, c] - W[:, c] @ S                                # [Hv, C, dv]
        o[:, c] = (qc * np.exp(gc)[..., None]) @ S + ((qc @ np.swapaxes(kc, -1, -2)) * decay[:, c]) @ vnew
        last = gc[:, -1]                                            # [Hv]
        S = np.exp(last)[:, None, None] * S + np.swapaxes(kc * np.exp(last[:, None] - gc)[..., None], -1, -2) @ vnew
    o = o.reshape(Hv, n * chunk, dv)[:, :T]
    return np.moveaxis(o, 0, 1), S


def gated_deltanet(x: np.ndarray, prm: DeltaNetParams, n_k_heads: int, eps: float,
                   state: DeltaNetState | None = None, p: Precision = F64, algorithm: str = "auto"):
    """Gated DeltaNet mixer. x [T, H] (post input norm) -> (y [T, H], DeltaNetState).
    algorithm 'auto' follows HF: recurrent for one token continuing a state, chunked otherwise."""
    T = x.shape[0]
    Hv, dv = prm.A_log.shape[0], prm.norm.shape[0]
    C, K = prm.conv1d.shape
    key_dim = (C - Hv * dv) // 2
    Hk, dk, r = n_k_heads, key_dim // n_k_heads, Hv // n_k_heads
    mixed = linear(x, prm.in_proj_qkv, p)                           # [T, C]
    z = linear(x, prm.in_proj_z, p).reshape(T, Hv, dv)
    b = linear(x, prm.in_proj_b, p)                                 # [T, Hv]
    a = linear(x, prm.in_proj_a, p)                                 # [T, Hv]
    conv_state = state.conv if state is not None else np.zeros((K - 1, C), p.dtype)
    mixed, conv_state = causal_conv1d_silu(mixed, prm.conv1d, conv_state, p)
    q = mixed[:, :key_dim].reshape(T, Hk, dk)
    k = mixed[:, key_dim:2 * key_dim].reshape(T, Hk, dk)
    v = mixed[:, 2 * key_dim:].reshape(T, Hv, dv)
    beta, g = deltanet_gates(b, a, prm.A_log, prm.dt_bias, p)
    q = np.repeat(l2norm(q) * dk ** -0.5, r, axis=1)                # [T, Hv, dk]: v-head h <- k-head h // r
    k = np.repeat(l2norm(k), r, axis=1)
    S0 = state.recurrent if state is not None else np.zeros((Hv, dk, dv), p.dtype)
    if algorithm == "auto":
        algorithm = "recurrent" if state is not None and T == 1 else "chunked"
    rule = {"recurrent": delta_rule_recurrent, "chunked": delta_rule_chunked}[algorithm]
    o, S = rule(q, k, v, g, beta, S0.astype(p.dtype))
    y = gated_rms_norm(p.act(o), z, prm.norm, eps, p).reshape(T, Hv * dv)
    return linear(y, prm.out_proj, p), DeltaNetState(conv_state, S)


# ------------------------------------------------------------------------------------------------
# Gated softmax attention

class AttentionParams(NamedTuple):
    q_proj: np.ndarray  # [nH*2D, H], per head rows [query (D) | gate (D)]
    k_proj: np.ndarray  # [nKV*D, H]
    v_proj: np.ndarray  # [nKV*D, H]
    o_proj: np.ndarray  # [H, nH*D]
    q_norm: np.ndarray  # [D] (1 + w)
    k_norm: np.ndarray  # [D] (1 + w)


class KVCache(NamedTuple):
    k: np.ndarray  # [S, nKV, D] after norm and RoPE
    v: np.ndarray  # [S, nKV, D]


class Rope(NamedTuple):
    rotary_dim: int
    theta: float
    mrope_section: tuple[int, ...]
    interleaved: bool = True


def text_positions(start: int, T: int) -> np.ndarray:
    """Positions of T text tokens after `start` earlier ones: three equal rows (t, h, w) [3, T]."""
    return np.broadcast_to(np.arange(start, start + T), (3, T)).copy()


def rope_cos_sin(positions: np.ndarray, rope: Rope, p: Precision = F64):
    """positions [3, T] -> cos, sin [T, rotary_dim] (multimodal sections merged, halves duplicated)."""
    dt, rd = p.dtype, rope.rotary_dim
    inv_freq = (1 / dt(rope.theta) ** (np.arange(0, rd, 2).astype(dt) / dt(rd))).astype(dt)  # [rd/2]
    freqs = positions.astype(dt)[:, :, None] * inv_freq                                      # [3, T, rd/2]
    axis = np.zeros(rd // 2, int)                 # which position row drives frequency j
    if rope.interleaved:                          # j = 1, 4, 7.. -> h; j = 2, 5, 8.. -> w
        for row in (1, 2):
            axis[row:rope.mrope_section[row] * 3:3] = row
    else:                                         # contiguous sections t | h | w
        s0, s1 = rope.mrope_section[0], rope.mrope_section[0] + rope.mrope_section[1]
        axis[s0:s1], axis[s1:] = 1, 2
    f = freqs[axis, :, np.arange(rd // 2)].T                                                 # [T, rd/2]
    emb = np.concatenate([f, f], axis=-1)
    return p.act(np.cos(emb)), p.act(np.sin(emb))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, p: Precision = F64) -> np.ndarray:
    """Rotate-half RoPE on the first rotary_dim dims of each head. x [T, n, D], cos/sin [T, rd]."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    rot = np.concatenate([-xr[..., rd // 2:], xr[..., :rd // 2]], axis=-1)
    y = p.act(p.act(xr * cos[:, None, :]) + p.act(rot * sin[:, None, :]))
    return np.concatenate([y, xp], axis=-1)


def gated_attention(x: np.ndarray, prm: AttentionParams, n_heads: int, n_kv_heads: int,
                    positions: np.ndarray, rope: Rope, eps: float,
                    cache: KVCache | None = None, p: Precision = F64,
                    kv_store: Callable | None = None, fresh: bool = False):
    """Causal GQA softmax attention with a sigmoid output gate. x [T, H], positions [3, T]
    -> (y [T, H], KVCache with S = cached + T entries).
    kv_store(k, v) -> (k, v): what attention reads back from the KV cache for keys (after norm and
    RoPE) and values [T, nKV, D] (None: kept as computed); the cache holds what it returns. fresh: the
    new tokens attend to their own K/V as computed and to the cached ones as stored (SGLang's ragged
    prefill); otherwise to their own as stored (written, then read)."""
    T, D = x.shape[0], prm.q_norm.shape[0]
    qg = linear(x, prm.q_proj, p).reshape(T, n_heads, 2 * D)
    q, gate = qg[..., :D], qg[..., D:].reshape(T, n_heads * D)
    k = linear(x, prm.k_proj, p).reshape(T, n_kv_heads, D)
    v = linear(x, prm.v_proj, p).reshape(T, n_kv_heads, D)
    q, k = rms_norm(q, prm.q_norm, eps, p), rms_norm(k, prm.k_norm, eps, p)
    cos, sin = rope_cos_sin(positions, rope, p)
    q, k = apply_rope(q, cos, sin, p), apply_rope(k, cos, sin, p)
    k_stored, v_stored = (k, v) if kv_store is None else kv_store(k, v)
    if not fresh:
        k, v = k_stored, v_stored
    if cache is not None:
        k, v = np.concatenate([cache.k, k]), np.concatenate([cache.v, v])
        k_stored, v_stored = np.concatenate([cache.k, k_stored]), np.concatenate([cache.v, v_stored])
    S, past = k.shape[0], k.shape[0] - T
    group = n_heads // n_kv_heads                                   # q-head h uses kv-head h // group
    kh = np.repeat(k, group, axis=1).transpose(1, 2, 0)             # [nH, D, S]
    vh = np.repeat(v, group, axis=1).transpose(1, 0, 2)             # [nH, S, D]
    scores = p.act(p.act(q.transpose(1, 0, 2) @ kh) * D ** -0.5)    # [nH, T, S]
    causal = np.arange(S)[None, :] <= past + np.arange(T)[:, None]  # [T, S]
    w = p.act(softmax(np.where(causal, scores, -np.inf)))
    o = p.act(w @ vh).transpose(1, 0, 2).reshape(T, n_heads * D)
    o = p.act(o * p.act(sigmoid(gate)))
    return linear(o, prm.o_proj, p), KVCache(k_stored, v_stored)


# ------------------------------------------------------------------------------------------------
# Sparse MoE

class SharedExpertParams(NamedTuple):
    gate_proj: np.ndarray  # [Is, H]
    up_proj: np.ndarray    # [Is, H]
    down_proj: np.ndarray  # [H, Is]
    gate: np.ndarray       # [1, H] shared_expert_gate


def route(x: np.ndarray, w: np.ndarray, k: int, p: Precision = F64):
    """Router: logits [T, E] (stored), softmax over all experts, top-k sorted by probability with
    ties to the lower expert id, renormalised -> (logits, ids [T, k] int32, weights [T, k])."""
    logits = linear(x, w, p)
    probs = softmax(logits.astype(p.dtype))
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return logits, ids.astype(np.int32), _renormalised(probs, ids, p)


def _renormalised(probs: np.ndarray, ids: np.ndarray, p: Precision) -> np.ndarray:
    """The probabilities [T, E] of the experts ids [T, k], renormalised over them -> weights [T, k]."""
    top = np.take_along_axis(probs, ids, axis=-1)
    return p.act(top / np.sum(top, axis=-1, keepdims=True))


def swiglu(x: np.ndarray, gate_w: np.ndarray, up_w: np.ndarray, down_w: np.ndarray, p: Precision = F64):
    """down(silu(gate(x)) * up(x)). x [n, H], gate/up [I, H], down [H, I] -> [n, H]."""
    h = p.act(p.act(silu(linear(x, gate_w, p))) * linear(x, up_w, p))
    return linear(h, down_w, p)


def nvfp4_linear_w4a4(x: np.ndarray, w, input_scale, p: Precision = F64) -> np.ndarray:
    """Engine W4A4 linear: ref.nvfp4.nvfp4_matmul quantizes x [n, in] with quantize_activation(x,
    input_scale) and multiplies the codes with the NVFP4 weight `w` exactly -> [n, out], stored."""
    return p.act(nvfp4.nvfp4_matmul(x, w.packed, w.weight_scale, w.weight_scale_2, input_scale=input_scale))


def swiglu_w4a4(x: np.ndarray, gate, up, down, gate_up_scale, down_scale, p: Precision = F64):
    """SwiGLU expert with every GEMM input quantized to NVFP4 (gate and up share one input scale)."""
    gt = nvfp4_linear_w4a4(x, gate, gate_up_scale, p)
    h = p.act(p.act(silu(gt)) * nvfp4_linear_w4a4(x, up, gate_up_scale, p))
    return nvfp4_linear_w4a4(h, down, down_scale, p)


def shared_expert(x: np.ndarray, prm: SharedExpertParams, p: Precision = F64) -> np.ndarray:
    """sigmoid(shared_expert_gate(x)) * SwiGLU(x). x [T, H] -> [T, H]."""
    s = swiglu(x, prm.gate_proj, prm.up_proj, prm.down_proj, p)
    return p.act(p.act(sigmoid(linear(x, prm.gate, p))) * s)


def sparse_moe(x: np.ndarray, router_w: np.ndarray, k: int, expert: Callable[[int, np.ndarray], np.ndarray],
               shared: SharedExpertParams, p: Precision = F64, topk_ids: np.ndarray | None = None):
    """Routed experts summed in ascending expert id, plus the gated shared expert.
    x [T, H]; expert(e, rows [n, H]) -> [n, H] -> (y [T, H], router logits, top-k ids, top-k weights).
    topk_ids [T, k], when given, forces the experts that run (e.g. an engine's choice), weighted by
    the router's probabilities of them, renormalised; the routing returned is still the router's own."""
    logits, ids, weights = route(x, router_w, k, p)
    run_ids, run_weights = ids, weights
    if topk_ids is not None:
        run_ids = np.asarray(topk_ids, np.int64).reshape(ids.shape)
        run_weights = _renormalised(softmax(logits.astype(p.dtype)), run_ids, p)
    y = np.zeros(x.shape, p.dtype)
    for e in np.unique(run_ids):                                    # ascending expert id
        tok, slot = np.nonzero(run_ids == e)
        out = p.act(expert(int(e), x[tok]) * run_weights[tok, slot][:, None])
        y[tok] = p.act(y[tok] + out)
    return p.act(y + shared_expert(x, shared, p)), logits, ids, weights


# ------------------------------------------------------------------------------------------------
# Decoder layer, MTP input

def pre_norm_residual(h: np.ndarray, norm: np.ndarray, eps: float, f: Callable[[np.ndarray], tuple],
                      p: Precision = F64):
    """One half of a decoder layer: h + f(rms_norm(h)), stored. f(x [T, H]) -> (y [T, H], *extras)
    -> (h + y [T, H], *extras). A decoder layer is the mixer's (input_layernorm, giving after_mixer),
    then the MoE's (post_attention_layernorm, giving after_moe)."""
    y, *extras = f(rms_norm(h, norm, eps, p))
    return (p.act(h + y), *extras)


def mtp_input(embeds: np.ndarray, hidden: np.ndarray, norm_embedding: np.ndarray, norm_hidden: np.ndarray,
              fc: np.ndarray, eps: float, p: Precision = F64) -> np.ndarray:
    """MTP head input: fc([norm(embedding of token t+1) | norm(final hidden at t)]). [T, H] -> [T, H]."""
    c = np.concatenate([rms_norm(embeds, norm_embedding, eps, p), rms_norm(hidden, norm_hidden, eps, p)], axis=-1)
    return linear(c, fc, p)
