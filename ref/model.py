"""The reference forward pass over a checkpoint: layer streaming, caches, batches, dumps, MTP.

`Model` holds no weights between layers: for each decoder layer it reads that layer's tensors from
the memory-mapped checkpoint and runs every sequence of the batch through the layer. Linear weights
reach ref.layers.linear still memory-mapped (BF16) or packed (NVFP4) and are converted a block of
rows at a time, so no weight matrix is ever materialised whole in float64. Routed experts are read
and dequantized only when some token is routed to them, one expert at a time. The maths lives in
ref.layers; this module only wires weights and caches to it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from ref import layers as L
from ref.config import FULL
from ref.nvfp4 import dequantize

ACTIVATIONS = ("w4a16", "w4a4")
ACT_SCALES = ("per-expert", "max")


@dataclass(frozen=True)
class Cache:
    """Everything a sequence needs to continue: tokens seen, per-layer state (KVCache for full
    attention, DeltaNetState for linear attention), final hidden [H] of the last token (for MTP)."""
    pos: int
    layers: tuple
    hidden: np.ndarray


def _is_nvfp4(w) -> bool:
    return hasattr(w, "packed")


class _NVFP4Rows:
    """An NVFP4 weight [out, in] as an array-like whose row slices are dequantized on access:
    exactly (float64, then rounded once to bf16 in bf16 mode) or to float32 in f32 mode."""

    def __init__(self, w, p: L.Precision):
        self.w, self.p, self.shape = w, p, w.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        w = self.w
        exact = dequantize(w.packed[rows], w.weight_scale[rows], w.weight_scale_2,
                           dtype=np.float32 if self.p.name == "f32" else np.float64)
        return self.p.act(exact)

    def read_rows(self, rows: slice, out: np.ndarray) -> np.ndarray:
        """self[rows] written into `out` (compute dtype); f64 and f32 dequantize straight into it."""
        if self.p.name == "bf16":
            out[...] = self[rows]
            return out
        w = self.w
        return dequantize(w.packed[rows], w.weight_scale[rows], w.weight_scale_2, dtype=out.dtype, out=out)


class Model:
    """Qwen3.5-MoE reference. precision 'f64' | 'f32' | 'bf16'; activations 'w4a16' (weights
    dequantized exactly) | 'w4a4' (routed-expert GEMM inputs quantized as the engines do, with the
    per-expert input scale or the max over the layer's experts: act_scale 'per-expert' | 'max')."""

    def __init__(self, ckpt, precision: str = "f64", activations: str = "w4a16", act_scale: str = "per-expert",
                 progress: Callable[[str], None] | None = None):
        if isinstance(ckpt, (str, Path)):
            from ref.checkpoint import open_checkpoint
            ckpt = open_checkpoint(ckpt)
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {list(ACTIVATIONS)}, got {activations!r}")
        if act_scale not in ACT_SCALES:
            raise ValueError(f"act_scale must be one of {list(ACT_SCALES)}, got {act_scale!r}")
        self.ckpt, self.cfg = ckpt, ckpt.config.text
        self.p = L.Precision(precision)
        self.activations, self.act_scale = activations, act_scale
        self.progress = progress
        c = self.cfg
        self.rope = L.Rope(c.rotary_dim, c.rope_theta, tuple(c.mrope_section), c.mrope_interleaved)

    # -------------------------------------------------------------------------------------------
    # Public API

    def prefill(self, token_ids, cache: Cache | None = None, dumps: dict | None = None):
        """Run `token_ids` (after `cache`, if given) -> (logits [T, V], new cache). `dumps`, if a
        dict, receives the per-layer tensors named in the contract (see spec/model.md)."""
        (logits, _, new), = self._forward([token_ids], [cache], [dumps])
        return logits, new

    def decode(self, token_id: int, cache: Cache):
        """One token after `cache` -> (logits [V], new cache)."""
        logits, new = self.prefill([token_id], cache)
        return logits[0], new

    def logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits [T, V]."""
        return self.prefill(token_ids)[0]

    def prefill_batch(self, seqs, caches=None, dumps=None):
        """Several sequences of different lengths through each layer together (weights read once)
        -> (list of logits [T_j, V], list of caches)."""
        caches = caches or [None] * len(seqs)
        out = self._forward(seqs, caches, dumps or [None] * len(seqs))
        return [o[0] for o in out], [o[2] for o in out]

    def decode_batch(self, token_ids, caches):
        """One token per sequence -> (logits [B, V], caches)."""
        logits, caches = self.prefill_batch([[t] for t in token_ids], caches)
        return np.stack([x[0] for x in logits]), caches

    def logits_batch(self, seqs) -> list[np.ndarray]:
        return self.prefill_batch(seqs)[0]

    def generate(self, token_ids, max_new_tokens: int, stop_ids=()) -> list[int]:
        """Greedy continuation (argmax, ties to the lower id); stops after a token in stop_ids."""
        if max_new_tokens <= 0:
            return []
        logits, cache = self.prefill(token_ids)
        return self.continue_greedy(logits[-1], cache, max_new_tokens, stop_ids)

    def continue_greedy(self, last_logits: np.ndarray, cache: Cache, max_new_tokens: int, stop_ids=()) -> list[int]:
        """Greedy tokens after a prefill whose last logits [V] and cache are given."""
        out: list[int] = []
        nxt = int(np.argmax(last_logits))
        while max_new_tokens > 0:
            out.append(nxt)
            if nxt in stop_ids or len(out) >= max_new_tokens:
                break
            last, cache = self.decode(nxt, cache)
            nxt = int(np.argmax(last))
        return out

    def mtp_logits(self, token_ids, hidden: np.ndarray | None = None) -> np.ndarray:
        """Teacher-forced MTP head: row t (t < T-1) predicts token t+2 from the main model's final
        hidden (after the final norm) at t and the embedding of token t+1, at RoPE position t.
        `hidden` [T, H] defaults to the main model's own. -> [T-1, V]."""
        c, p = self.cfg, self.p
        ids = self._check_ids(token_ids)
        if len(ids) < 2:
            raise ValueError(f"MTP needs at least 2 tokens, got {len(ids)}")
        if not self.ckpt.has("mtp.fc.weight"):
            raise ValueError("checkpoint has no MTP head (mtp.fc.weight)")
        if hidden is None:
            (_, hidden, _), = self._forward([ids], [None], [None])
        T = len(ids) - 1
        pre = "mtp."
        x = L.mtp_input(self._embed(ids[1:]), np.asarray(hidden, p.dtype)[:T],
                        self._vec(pre + "pre_fc_norm_embedding.weight"), self._vec(pre + "pre_fc_norm_hidden.weight"),
                        self._linear(pre + "fc"), c.rms_norm_eps, p)
        layer = self.layer("mtp")
        h = layer.moe_step(layer.mixer_step(x)[0])[0]
        return self.lm_head(L.rms_norm(h, self._vec(pre + "norm.weight"), c.rms_norm_eps, p))

    # -------------------------------------------------------------------------------------------
    # Per-step API: the forward pass piece by piece, each step from the residual stream it starts at
    # (the forward pass itself runs on these; ref.crosscheck recomputes an engine's steps with them)

    def layer(self, layer: int | str) -> "Layer":
        """Decoder layer `layer` (0-based), or "mtp" for the MTP head's layer, with its weights wired
        to its two steps (Layer.mixer_step, Layer.moe_step)."""
        return Layer(self, layer)

    def final_norm(self, h: np.ndarray) -> np.ndarray:
        """The last layer's after_moe [T, H] -> final_hidden [T, H] (the final RMSNorm)."""
        return L.rms_norm(self.p.act(h), self._vec(self.ckpt.config.text_prefix + "norm.weight"),
                          self.cfg.rms_norm_eps, self.p)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        """final_hidden [T, H] -> logits [T, V] (lm_head is read in row blocks, never converted whole)."""
        return L.linear(self.p.act(x), self._linear("lm_head"), self.p)

    # -------------------------------------------------------------------------------------------
    # The streaming forward pass

    def _forward(self, seqs, caches, dumps):
        """-> per sequence (logits [T, V], final hidden [T, H], new Cache)."""
        c = self.cfg
        seqs = [self._check_ids(s) for s in seqs]
        bounds = np.cumsum([0] + [len(s) for s in seqs])
        starts = [cache.pos if cache is not None else 0 for cache in caches]
        h = self._embed(np.concatenate(seqs))                                   # [sum T, H]
        self._dump(dumps, bounds, "embeddings", h)
        states: list[list] = [[] for _ in seqs]
        for i, kind in enumerate(c.layer_types):
            t0 = time.perf_counter()
            layer = self.layer(i)
            parts = []
            for j, cache in enumerate(caches):
                a, st = layer.mixer_step(h[bounds[j]:bounds[j + 1]], cache.layers[i] if cache is not None else None,
                                         starts[j])
                parts.append(a)
                states[j].append(st)
            after_mixer = np.concatenate(parts)
            h, router_logits, ids, weights = layer.moe_step(after_mixer)
            for name, value in (("after_mixer", after_mixer), ("after_moe", h), ("router_logits", router_logits),
                                ("topk_ids", ids), ("topk_weights", weights)):
                self._dump(dumps, bounds, f"layers.{i}.{name}", value)
            if self.progress:
                self.progress(f"layer {i + 1}/{c.num_hidden_layers} {kind} {time.perf_counter() - t0:.2f}s")
        final = self.final_norm(h)
        logits = self.lm_head(final)
        self._dump(dumps, bounds, "final_hidden", final)
        self._dump(dumps, bounds, "logits", logits)
        out = []
        for j, s in enumerate(seqs):
            lo, hi = bounds[j], bounds[j + 1]
            out.append((logits[lo:hi], final[lo:hi], Cache(starts[j] + len(s), tuple(states[j]), final[hi - 1])))
        return out

    def _deltanet(self, pre: str):
        c, p = self.cfg, self.p
        a = pre + "linear_attn."
        conv = self._vec(a + "conv1d.weight")
        prm = L.DeltaNetParams(
            in_proj_qkv=self._linear(a + "in_proj_qkv"), in_proj_z=self._linear(a + "in_proj_z"),
            in_proj_b=self._linear(a + "in_proj_b"), in_proj_a=self._linear(a + "in_proj_a"),
            conv1d=conv.reshape(conv.shape[0], conv.shape[-1]), dt_bias=self._vec(a + "dt_bias"),
            A_log=self._vec(a + "A_log"), norm=self._vec(a + "norm.weight"), out_proj=self._linear(a + "out_proj"))
        return lambda x, state, start: L.gated_deltanet(x, prm, c.linear_num_key_heads, c.rms_norm_eps, state, p)

    def _attention(self, pre: str):
        c, p = self.cfg, self.p
        prm = self._attention_params(pre)
        return lambda x, cache, start: L.gated_attention(
            x, prm, c.num_attention_heads, c.num_key_value_heads, L.text_positions(start, x.shape[0]), self.rope,
            c.rms_norm_eps, cache, p)

    def _attention_params(self, pre: str) -> L.AttentionParams:
        a = pre + "self_attn."
        return L.AttentionParams(*(self._linear(a + n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 q_norm=self._vec(a + "q_norm.weight"), k_norm=self._vec(a + "k_norm.weight"))

    def _moe(self, pre: str, layer):
        """The MoE of one layer as a function (x [T, H], topk_ids=None) -> (y, router logits, ids,
        weights); topk_ids forces the experts that run (see L.sparse_moe)."""
        c, p = self.cfg, self.p
        m = pre + "mlp."
        shared = L.SharedExpertParams(self._linear(m + "shared_expert.gate_proj"), self._linear(m + "shared_expert.up_proj"),
                                      self._linear(m + "shared_expert.down_proj"), self._linear(m + "shared_expert_gate"))
        router = self._linear(m + "gate")
        expert = self._expert_fn(layer)
        return lambda x, topk_ids=None: L.sparse_moe(x, router, c.num_experts_per_tok, expert, shared, p, topk_ids)

    def _expert_fn(self, layer):
        """expert(e, rows) for one layer; reads and dequantizes expert e only when called."""
        p, w4a4 = self.p, self.activations == "w4a4"
        layer_max = {}

        def scales(e, ex):
            if self.act_scale == "per-expert":
                return max(float(ex.gate.input_scale), float(ex.up.input_scale)), float(ex.down.input_scale)
            if not layer_max:  # max over the layer's experts, as FlashInfer backends do
                E = self.cfg.num_experts
                layer_max["gate_up"] = float(np.max(self.ckpt.expert_input_scales(layer)))
                layer_max["down"] = max(float(self.ckpt.expert(layer, j).down.input_scale) for j in range(E))
            return layer_max["gate_up"], layer_max["down"]

        def run(e: int, x: np.ndarray) -> np.ndarray:
            ex = self.ckpt.expert(layer, e)
            if w4a4 and _is_nvfp4(ex.gate) and ex.gate.input_scale is not None:
                gu, dn = scales(e, ex)
                return L.swiglu_w4a4(x, ex.gate, ex.up, ex.down, gu, dn, p)
            return L.swiglu(x, self._weight(ex.gate), self._weight(ex.up), self._weight(ex.down), p)

        return run

    # -------------------------------------------------------------------------------------------
    # Weights -> compute dtype

    def _array(self, x: np.ndarray) -> np.ndarray:
        """A stored tensor in the compute dtype (bf16 mode: rounded to bf16, as HF loads it)."""
        if x.dtype == ml_dtypes.bfloat16:
            return x.astype(self.p.dtype)  # exact in every mode
        return self.p.act(x)

    def _vec(self, name: str) -> np.ndarray:
        return self._array(self.ckpt.tensor(name))

    def _weight(self, w):
        """A linear weight [out, in] for L.linear: BF16 stays memory-mapped (linear converts row
        blocks exactly), NVFP4 dequantizes the rows linear asks for, anything else is converted."""
        if _is_nvfp4(w):
            return _NVFP4Rows(w, self.p)
        if w.weight.dtype == ml_dtypes.bfloat16:
            return w.weight
        return self._array(w.weight)

    def _linear(self, module: str):
        return self._weight(self.ckpt.linear(module))

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        table = self.ckpt.tensor(self.ckpt.config.text_prefix + "embed_tokens.weight")
        return self._array(table[ids])                                          # only the rows used

    def _check_ids(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids)
        V = self.cfg.vocab_size
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be a non-empty list of integers, got {token_ids!r:.80}")
        bad = ids[(ids < 0) | (ids >= V)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {V})")
        return ids.astype(np.int64)

    @staticmethod
    def _dump(dumps, bounds, name: str, value: np.ndarray) -> None:
        for j, d in enumerate(dumps):
            if d is not None:
                d[name] = value[bounds[j]:bounds[j + 1]].copy()


class Layer:
    """One decoder layer of a Model (Model.layer(i), or "mtp"): its pre-norm residual block as two
    steps, each taking the residual stream [T, H] where the step starts (mixer_step: one sequence;
    moe_step: any rows), in any float dtype (taken as the model stores activations: the compute
    dtype, bf16-rounded in bf16 mode). Each step reads its weights from the checkpoint on first use;
    they go with the object."""

    def __init__(self, model: Model, layer: int | str):
        c = model.cfg
        if layer == "mtp":
            self.kind, self._pre = FULL, "mtp.layers.0."
        elif isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and 0 <= layer < c.num_hidden_layers:
            layer = int(layer)
            self.kind, self._pre = c.layer_types[layer], f"{model.ckpt.config.text_prefix}layers.{layer}."
        else:
            raise ValueError(f"layer must be 0..{c.num_hidden_layers - 1} or 'mtp', got {layer!r}")
        self.model, self.index = model, layer

    def mixer_step(self, h: np.ndarray, state=None, start: int = 0):
        """The layer's input h [T, H] -> (after_mixer = h + mixer(input_layernorm(h)) [T, H], the
        mixer's new state). `state`: the layer's KVCache (full attention) or DeltaNetState (linear
        attention) after the `start` tokens before h, or None for none (start 0)."""
        m = self.model
        return L.pre_norm_residual(m.p.act(h), self._norm("input_layernorm"), m.cfg.rms_norm_eps,
                                   lambda x: self._mixer(x, state, start), m.p)

    def moe_step(self, a: np.ndarray, topk_ids: np.ndarray | None = None):
        """after_mixer a [T, H] -> (after_moe = a + moe(post_attention_layernorm(a)) [T, H],
        router_logits [T, E], topk_ids [T, k], topk_weights [T, k]). `topk_ids` [T, k], if given,
        forces the experts that run (e.g. an engine's choice), weighted by the router's
        probabilities of them, renormalised; the routing returned is always the router's own."""
        m = self.model
        return L.pre_norm_residual(m.p.act(a), self._norm("post_attention_layernorm"), m.cfg.rms_norm_eps,
                                   lambda x: self._moe(x, topk_ids), m.p)

    def _norm(self, name: str) -> np.ndarray:
        return self.model._vec(self._pre + name + ".weight")

    @cached_property
    def _mixer(self):
        m = self.model
        return m._attention(self._pre) if self.kind == FULL else m._deltanet(self._pre)

    @cached_property
    def _moe(self):
        return self.model._moe(self._pre, self.index)
