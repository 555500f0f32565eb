"""The reference's weight wiring: checkpoint tensors -> the arguments of ref.layers' functions.

ref.layers is pure maths over arrays in the compute dtype; this module decides where each array comes
from and how it reaches the compute dtype:
- vectors, norms and embedding rows are converted when read (bf16 mode: rounded to bf16, as HF loads
  them);
- a linear weight stays as stored (memory-mapped BF16, or packed NVFP4) in a `StreamedWeight`, which
  ref.layers multiplies like an array (`x @ w.T`) while it converts one block of rows at a time into
  a reused buffer (the blocks spread over ref.parallel's threads): no weight matrix is ever
  materialised whole in float64;
- routed experts are read and dequantized only when some token is routed to them, one at a time;
- quantized dense linears (FP8 per tensor, NVFP4) are dequantized exactly (W8A16 / W4A16), or under
  activations "w4a4" multiply the engines' quantized inputs (W8A8 with the static input_scale, W4A4
  with the input global) when the checkpoint has input scales (spec/nvfp4.md §6, §11, §13);
- each full-attention layer's KV store (kv_store) rounds K and V through the run's KV-cache dtype
  with the layer's checkpoint scales (ref.kvcache, Checkpoint.kv_scales).
Names come from ref.checkpoint_layout, the project's one table of tensor names.
"""
from __future__ import annotations

import threading
from typing import Callable

import ml_dtypes
import numpy as np

from ref import checkpoint_layout as layout
from ref import kvcache
from ref import layers as L
from ref import parallel
from ref.checkpoint import FP8Weight, NVFP4Weight
from ref.fp8 import dequantize_fp8, quantize_fp8
from ref.nvfp4 import dequantize, quantize_activation, row_decoder

ROW_BLOCK_BYTES = 1 << 23       # weight rows converted at a time (float64 bytes)
FEW_ROWS_BLOCK_BYTES = 1 << 21  # at most this for fewer than MANY_ROWS input rows (decode): the block
MANY_ROWS = 32                  # then stays in the core's cache from its conversion to its product
BF16_CHUNK = 1 << 20            # BF16 values widened at a time (bf16_into's float32 bits buffer)


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


class QuantizedInputWeight(StreamedWeight):
    """A weight whose GEMM takes quantized inputs, as the engines' W8A8 / W4A4 kernels do: `x @ w.T`
    quantizes x with `quantize(x)` -> its exact values (e4m3, or e2m1 * block scale), multiplies them
    with the weight's stored values read by `read_rows` (e4m3 codes, or e2m1 * block scale) and scales
    the sum once by the float32 `alpha` (input and weight scales)."""

    def __init__(self, shape, read_rows, p: L.Precision, quantize: Callable[[np.ndarray], np.ndarray],
                 alpha: np.float32):
        super().__init__(shape, read_rows, p)
        self.quantize, self.alpha = quantize, alpha

    def right_product(self, x: np.ndarray) -> np.ndarray:
        acc = super().right_product(self.quantize(x).astype(self.p.dtype))
        return acc * self.p.dtype(self.alpha)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("a weight that multiplies quantized inputs (W8A8 / W4A4) has no matrix of its own")


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


def bf16_into(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """BF16 values src [..., k] -> out (C-contiguous float32 or float64, same shape), exactly: each
    value's 16 bits become the high half of a float32 (bit for bit the value), then widened, at
    most BF16_CHUNK values at a time through a reused buffer. Three vectorised NumPy passes (widen
    the bits, shift, float32 -> float64) take fewer cycles than ml_dtypes' bfloat16 cast."""
    k = src.shape[-1] if src.ndim else 1
    s2, o2 = src.reshape(-1, k).view(np.uint16), out.reshape(-1, k)   # [R, k]
    step = max(1, BF16_CHUNK // k)
    for r0 in range(0, s2.shape[0], step):
        r1 = min(s2.shape[0], r0 + step)
        bits = _scratch((r1 - r0) * k, np.uint32).reshape(r1 - r0, k)
        np.copyto(bits, s2[r0:r1])
        np.left_shift(bits, 16, out=bits)
        np.copyto(o2[r0:r1], bits.view(np.float32))
    return out


def stored_weight(w: np.ndarray, p: L.Precision) -> StreamedWeight:
    """A stored (e.g. memory-mapped BF16) matrix whose rows convert exactly to the compute dtype."""
    def read_rows(rows: slice, out: np.ndarray) -> np.ndarray:
        if w.dtype == ml_dtypes.bfloat16:
            return bf16_into(w[rows], out)
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


def fp8_weight(w: FP8Weight, p: L.Precision) -> StreamedWeight:
    """A per-tensor FP8 weight, W8A16: rows dequantized exactly (e4m3 * weight_scale) and rounded once
    to the compute dtype (bf16 mode: to bf16)."""
    def read_rows(rows: slice, out: np.ndarray) -> np.ndarray:
        out[...] = p.act(dequantize_fp8(w.weight_e4m3[rows], w.weight_scale))
        return out
    return StreamedWeight(w.shape, read_rows, p)


def fp8_w8a8_weight(w: FP8Weight, p: L.Precision) -> QuantizedInputWeight:
    """A per-tensor FP8 weight with a static input_scale, W8A8 (ref.fp8.fp8_linear): inputs quantized by
    vLLM's static scaled_fp8_quant ("reciprocal"), the e4m3 products summed, alpha =
    fp32(input_scale * weight_scale)."""
    def read_rows(rows: slice, out: np.ndarray) -> np.ndarray:
        np.copyto(out, w.weight_e4m3[rows].astype(np.float32))               # e4m3 values, exact
        return out
    quantize = lambda x: quantize_fp8(x, w.input_scale, "reciprocal").astype(np.float32)  # noqa: E731
    return QuantizedInputWeight(w.shape, read_rows, p, quantize, np.float32(w.input_scale * w.weight_scale))


def nvfp4_w4a4_weight(w: NVFP4Weight, p: L.Precision) -> QuantizedInputWeight:
    """A dense NVFP4 weight with an input scale, W4A4 (ref.nvfp4.nvfp4_matmul): inputs quantized by the
    engines' quantizer with G = the stored input_global_scale (compressed-tensors, vLLM's dense path)
    or fp32(1 / input_scale) (ModelOpt); block values multiplied, alpha = fp32(input_scale *
    weight_scale_2)."""
    def read_rows(rows: slice, out: np.ndarray) -> np.ndarray:
        return dequantize(w.packed[rows], w.weight_scale[rows], np.float32(1), dtype=out.dtype, out=out)

    def quantize(x):
        codes, scales = quantize_activation(x, w.input_scale, sign="cuda", global_scale=w.input_global_scale)
        return dequantize(codes, scales, np.float32(1), dtype=np.float64)     # e2m1 * block scale, exact
    return QuantizedInputWeight(w.shape, read_rows, p, quantize, np.float32(w.input_scale * w.weight_scale_2))


class Weights:
    """A checkpoint's tensors in the form ref.layers takes them, for one precision and activations mode
    (and KV-cache dtype and store rule for the attention layers' kv_store)."""

    def __init__(self, ckpt, p: L.Precision, activations: str = "w4a16", act_scale: str = "per-expert",
                 kv_cache_dtype: str = "auto", kv_engine: str = "vllm"):
        self.ckpt, self.p, self.activations, self.act_scale = ckpt, p, activations, act_scale
        self.kv_cache_dtype, self.kv_engine = kv_cache_dtype, kv_engine
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
        """A linear weight (ref.checkpoint's DenseWeight / NVFP4Weight / FP8Weight) for ref.layers: BF16,
        NVFP4 and FP8 streamed by row blocks (quantized inputs under "w4a4" when the weight has an input
        scale), anything else converted."""
        quantized_inputs = self.activations == "w4a4" and getattr(w, "input_scale", None) is not None
        if isinstance(w, NVFP4Weight):
            return nvfp4_w4a4_weight(w, self.p) if quantized_inputs else nvfp4_weight(w, self.p)
        if isinstance(w, FP8Weight):
            return fp8_w8a8_weight(w, self.p) if quantized_inputs else fp8_weight(w, self.p)
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

    def kv_store(self, layer: int | str) -> Callable | None:
        """(k, v) [T, nKV, D] -> what attention reads back from full-attention layer `layer`'s (or the
        MTP layer's, "mtp") KV cache, in the compute dtype: stored in the run's KV-cache dtype with the
        layer's scales (Checkpoint.kv_scales) by the run's store rule; None for "auto" (kept as computed)."""
        if self.kv_cache_dtype == "auto":
            return None
        k_scale, v_scale, _ = self.ckpt.kv_scales(layer)
        dtype, engine, p = self.kv_cache_dtype, self.kv_engine, self.p

        def store(k: np.ndarray, v: np.ndarray):
            return (kvcache.kv_read(k, k_scale, dtype, engine).astype(p.dtype),
                    kvcache.kv_read(v, v_scale, dtype, engine).astype(p.dtype))
        return store

    def quantized_input_steps(self, layer: int | str) -> tuple[bool, bool]:
        """(mixer, moe): whether the layer's mixer / MoE step runs a GEMM on quantized inputs in this
        activations mode (W8A8 / W4A4 dense linears, W4A4 routed experts)."""
        if self.activations != "w4a4":
            return False, False
        t = self.layer_tables(layer)
        has_input_scale = lambda tensor: getattr(  # noqa: E731
            self.ckpt.linear(tensor.name[:-len(".weight")], prefetch=False), "input_scale", None) is not None
        mixer = next(v for k, v in t.items() if k in ("self_attn", "linear_attn"))
        moe = t["mlp"]
        dense_moe = [moe["gate"], moe["shared_expert_gate"], *moe["shared_expert"].values()]
        return (any(has_input_scale(x) for x in mixer.values() if x.linear),
                any(has_input_scale(x) for x in dense_moe) or self.ckpt.expert_input_scales(layer) is not None)

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
