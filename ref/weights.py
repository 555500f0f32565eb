"""The reference's weight wiring: checkpoint tensors -> the arguments of ref.layers' functions.

ref.layers is pure maths over arrays in the compute dtype; this module decides where each array comes
from and how it reaches the compute dtype:
- vectors, norms and embedding rows are converted when read (bf16 mode: rounded to bf16, as HF loads
  them);
- a linear weight stays as stored (memory-mapped BF16, or packed NVFP4) in a `StreamedWeight`, which
  ref.layers multiplies like an array (`x @ w.T`) while it converts one block of rows at a time into
  a reused buffer (the blocks spread over ref.parallel's threads): no weight matrix is ever
  materialised whole in float64;
- routed experts are read and dequantized only when some token is routed to them, one at a time.
Names come from ref.checkpoint_layout, the project's one table of tensor names.
"""
from __future__ import annotations

import threading
from typing import Callable

import ml_dtypes
import numpy as np

from ref import checkpoint_layout as layout
from ref import layers as L
from ref import parallel
from ref.checkpoint import NVFP4Weight
from ref.nvfp4 import dequantize, row_decoder

ROW_BLOCK_BYTES = 1 << 23       # weight rows converted at a time (float64 bytes)
FEW_ROWS_BLOCK_BYTES = 1 << 21  # at most this for fewer than MANY_ROWS input rows (decode): the block
MANY_ROWS = 32                  # then stays in the core's cache from its conversion to its product


class StreamedWeight:
    """A linear weight [out, in] as stored, multiplied a block of rows at a time: `x @ w.T` gives
    x [..., in] @ W.T -> [..., out] in the compute dtype (what ref.layers.linear writes), each block
    converted by `read_rows(rows, out)` into a buffer of the thread that multiplies it. The blocks
    depend only on the shapes and run on ref.parallel's threads, so the result does not depend on
    the number of threads."""

    __array_ufunc__ = None  # `x @ w.T` defers to _Transposed.__rmatmul__

    def __init__(self, shape: tuple[int, int], read_rows: Callable[[slice, np.ndarray], np.ndarray], p: L.Precision):
        self.shape, self.read_rows, self.p = tuple(shape), read_rows, p

    @property
    def T(self) -> "_Transposed":
        return _Transposed(self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole matrix in the compute dtype (to inspect or edit it; the forward pass never asks)."""
        n, k = self.shape
        w = self.read_rows(slice(0, n), np.empty((n, k), self.p.dtype))
        return w if dtype is None else w.astype(dtype)

    def block_rows(self, m: int) -> int:
        """Weight rows per block for a product with m input rows."""
        n, k = self.shape
        size = ROW_BLOCK_BYTES if m >= MANY_ROWS else min(ROW_BLOCK_BYTES, FEW_ROWS_BLOCK_BYTES)
        return min(n, max(1, size // (8 * k)))

    def right_product(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T in the compute dtype (unrounded)."""
        n, k = self.shape
        rows = self.block_rows(int(np.prod(x.shape[:-1])))
        out = np.empty(x.shape[:-1] + (n,), self.p.dtype)

        def block(i: int) -> None:
            lo, hi = i * rows, min(n, (i + 1) * rows)
            w = _scratch(rows * k, self.p.dtype)[:(hi - lo) * k].reshape(hi - lo, k)
            out[..., lo:hi] = x @ self.read_rows(slice(lo, hi), w).T

        parallel.for_each(-(-n // rows), block)
        return out


_buffers = threading.local()


def _scratch(size: int, dtype) -> np.ndarray:
    """A 1-D buffer of at least `size` items of dtype, one per thread and dtype, reused (no fresh pages
    per block)."""
    key = np.dtype(dtype).str
    pool = _buffers.__dict__.setdefault("by_dtype", {})
    buf = pool.get(key)
    if buf is None or buf.size < size:
        buf = pool[key] = np.empty(size, dtype)
    return buf[:size]


class _Transposed:
    __array_ufunc__ = None

    def __init__(self, w: StreamedWeight):
        self.w = w

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        return self.w.right_product(np.asarray(x, self.w.p.dtype))


def stored_weight(w: np.ndarray, p: L.Precision) -> StreamedWeight:
    """A stored (e.g. memory-mapped BF16) matrix whose rows convert exactly to the compute dtype."""
    def read_rows(rows: slice, out: np.ndarray) -> np.ndarray:
        np.copyto(out, w[rows])
        return out
    return StreamedWeight(w.shape, read_rows, p)


def nvfp4_weight(w: NVFP4Weight, p: L.Precision) -> StreamedWeight:
    """An NVFP4 weight whose rows are dequantized when read: exactly in f64 and f32 (straight into the
    buffer), and in bf16 mode exactly then rounded once to bf16."""
    if p.name == "bf16":
        def read_rows(rows: slice, out: np.ndarray) -> np.ndarray:
            out[...] = p.act(dequantize(w.packed[rows], w.weight_scale[rows], w.weight_scale_2, dtype=np.float64))
            return out
        return StreamedWeight(w.shape, read_rows, p)
    return StreamedWeight(w.shape, row_decoder(w.packed, w.weight_scale, w.weight_scale_2, p.dtype), p)


class Weights:
    """A checkpoint's tensors in the form ref.layers takes them, for one precision and activations mode."""

    def __init__(self, ckpt, p: L.Precision, activations: str = "w4a16", act_scale: str = "per-expert"):
        self.ckpt, self.p, self.activations, self.act_scale = ckpt, p, activations, act_scale
        self.cfg = ckpt.config
        self.tables = layout.model_tensors(self.cfg)  # the names of every module's tensors

    def layer_tables(self, layer: int | str) -> dict:
        """The tensor table of decoder layer `layer` (or the MTP head's, "mtp")."""
        return self.tables["mtp"]["layers"][0] if layer == "mtp" else self.tables["layers"][layer]

    # -- single tensors --------------------------------------------------------------------------
    def array(self, x: np.ndarray) -> np.ndarray:
        """A stored tensor in the compute dtype (bf16 mode: rounded to bf16, as HF loads it)."""
        if x.dtype == ml_dtypes.bfloat16:
            return x.astype(self.p.dtype)  # exact in every mode
        return self.p.act(x)

    def vector(self, t: layout.Tensor) -> np.ndarray:
        return self.array(self.ckpt.tensor(t.name)).reshape(t.shape)

    def weight(self, w):
        """A linear weight (ref.checkpoint's DenseWeight / NVFP4Weight) for ref.layers: BF16 and NVFP4
        streamed by row blocks, anything else converted."""
        if isinstance(w, NVFP4Weight):
            return nvfp4_weight(w, self.p)
        if w.weight.dtype == ml_dtypes.bfloat16:
            return stored_weight(w.weight, self.p)
        return self.array(w.weight)

    def linear(self, t: layout.Tensor):
        return self.weight(self.ckpt.linear(t.name[:-len(".weight")]))

    def embedding(self, ids: np.ndarray) -> np.ndarray:
        """Rows ids [T] of the embedding table -> [T, H] (only the rows used are read)."""
        table = self.ckpt.tensor(self.tables["embed_tokens"].name)
        return self.array(table[ids])

    # -- modules ----------------------------------------------------------------------------------
    def deltanet(self, a: dict) -> L.DeltaNetParams:
        """`linear_attn` of a layer table (checkpoint_layout.gated_deltanet)."""
        conv = self.ckpt.tensor(a["conv1d"].name)
        return L.DeltaNetParams(
            **{n: self.linear(a[n]) for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")},
            conv1d=self.array(conv.reshape(conv.shape[0], conv.shape[-1])), dt_bias=self.vector(a["dt_bias"]),
            A_log=self.vector(a["A_log"]), norm=self.vector(a["norm"]))

    def attention(self, a: dict) -> L.AttentionParams:
        """`self_attn` of a layer table (checkpoint_layout.gated_attention)."""
        return L.AttentionParams(*(self.linear(a[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 q_norm=self.vector(a["q_norm"]), k_norm=self.vector(a["k_norm"]))

    def shared_expert(self, m: dict) -> L.SharedExpertParams:
        s = m["shared_expert"]
        return L.SharedExpertParams(self.linear(s["gate_proj"]), self.linear(s["up_proj"]),
                                    self.linear(s["down_proj"]), self.linear(m["shared_expert_gate"]))

    def expert_fn(self, layer) -> Callable[[int, np.ndarray], np.ndarray]:
        """expert(e, rows [n, H]) -> [n, H] for one layer's routed experts (ref.layers.sparse_moe); reads
        and dequantizes expert e only when called. W4A4: the GEMM inputs quantized as the engines do,
        with the expert's input scales or the layer's largest (act_scale "max")."""
        p, w4a4, ckpt = self.p, self.activations == "w4a4", self.ckpt
        layer_max = {}

        def scales(ex):
            if self.act_scale == "per-expert":
                return max(float(ex.gate.input_scale), float(ex.up.input_scale)), float(ex.down.input_scale)
            if not layer_max:  # max over the layer's experts, as FlashInfer backends do
                E = self.cfg.text.num_experts
                layer_max["gate_up"] = float(np.max(ckpt.expert_input_scales(layer)))
                layer_max["down"] = max(float(ckpt.expert(layer, j, prefetch=False).down.input_scale)
                                        for j in range(E))
            return layer_max["gate_up"], layer_max["down"]

        def run(e: int, x: np.ndarray) -> np.ndarray:
            ex = ckpt.expert(layer, e)
            if w4a4 and isinstance(ex.gate, NVFP4Weight) and ex.gate.input_scale is not None:
                return L.swiglu_w4a4(x, ex.gate, ex.up, ex.down, *scales(ex), p)
            return L.swiglu(x, self.weight(ex.gate), self.weight(ex.up), self.weight(ex.down), p)

        return run
