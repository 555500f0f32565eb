"""The reference forward pass over a checkpoint: layer streaming, caches, batches, dumps, MTP.

`Model` holds no weights between layers: for each decoder layer it reads that layer's tensors from
the memory-mapped checkpoint (ref.weights wires them to ref.layers' functions) and runs every sequence
of the batch through the layer. The maths lives in ref.layers; this module runs the layers in order
and keeps the caches.

Image prompts (spec/model.md §9.6-9.7, §9.10): `images` (in prompt order) go with the token ids; the
vision encoder (ref.vision_model, its blocks streamed like the decoder's layers) gives the rows that
replace the image-pad embeddings, attention takes the 3-D mRoPE positions, and the Cache carries
`rope_delta`, so every later token (decode, a continued prefill) sits at cache length + rope_delta.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from ref import layers as L
from ref.config import FULL
from ref.image_prompt import mrope_positions, scatter_image_rows
from ref.kvcache import store_state
from ref.modes import Modes
from ref.weights import Weights


@dataclass(frozen=True)
class Cache:
    """Everything a sequence needs to continue: tokens seen, per-layer state (KVCache for full
    attention, DeltaNetState for linear attention), final hidden [H] of the last token (for MTP), and
    the mRoPE offset of every later token (image prompts; 0 for text): token s sits at s + rope_delta."""
    pos: int
    layers: tuple
    hidden: np.ndarray
    rope_delta: int = 0


class Model:
    """Qwen3.5-MoE reference. precision 'f64' | 'f32' | 'bf16'; activations 'w4a16' (weights
    dequantized exactly) | 'w4a4' (routed-expert GEMM inputs quantized as the engines do, with the
    per-expert input scale or the max over the layer's experts: act_scale 'per-expert' | 'max'; the
    inputs of quantized dense linears with input scales too: W8A8, W4A4). The engine-emulation modes
    (ref.modes, spec/model.md §10): kv_cache_dtype 'auto' | 'fp8_e4m3' | 'nvfp4' with kv_engine's store
    rule, kv_prefill 'cache' | 'fresh', state_dtype 'float32' | 'bfloat16'. Model(ckpt, **asdict(modes))."""

    def __init__(self, ckpt, precision: str = "f64", activations: str = "w4a16", act_scale: str = "per-expert",
                 progress: Callable[[str], None] | None = None, *, kv_cache_dtype: str = "auto",
                 kv_engine: str = "vllm", kv_prefill: str = "cache", state_dtype: str = "float32"):
        if isinstance(ckpt, (str, Path)):
            from ref.checkpoint import open_checkpoint
            ckpt = open_checkpoint(ckpt)
        self.modes = Modes(precision, activations, act_scale, kv_cache_dtype, kv_engine, kv_prefill, state_dtype)
        self.ckpt, self.cfg = ckpt, ckpt.config.text
        self.p = L.Precision(precision)
        self.weights = Weights(ckpt, self.p, activations, act_scale, kv_cache_dtype, kv_engine)
        self.progress = progress
        c = self.cfg
        self.rope = L.Rope(c.rotary_dim, c.rope_theta, tuple(c.mrope_section), c.mrope_interleaved)

    # -------------------------------------------------------------------------------------------
    # Public API

    def prefill(self, token_ids, cache: Cache | None = None, dumps: dict | None = None, images=None):
        """Run `token_ids` (after `cache`, if given) -> (logits [T, V], new cache). `dumps`, if a
        dict, receives the per-layer tensors named in the contract (see spec/model.md), and with
        images the vision encoder's (vision.*). `images`: the images of the image-pad runs in
        token_ids, in order (see image_prompt; T counts the expanded pads)."""
        (logits, _, new), = self._forward([token_ids], [cache], [dumps], [images])
        return logits, new

    def image_prompt(self, token_ids, images) -> tuple[list[int], list]:
        """Token ids with one image-pad run per image (a single pad, expanded here, or already the
        image's merged-token count) and the images (files, bytes, Pillow images, PreprocessedImage)
        -> (expanded ids, preprocessed images); see ref.vision_model.image_prompt."""
        from ref.vision_model import image_prompt
        return image_prompt(self.ckpt, token_ids, images)

    @cached_property
    def vision(self):
        """The checkpoint's vision encoder (ref.vision_model.VisionModel) in this model's precision."""
        from ref.vision_model import VisionModel
        return VisionModel(self.ckpt, self.p.name)

    def decode(self, token_id: int, cache: Cache):
        """One token after `cache` -> (logits [V], new cache). A decode step, which differs from a
        one-token prefill only under kv_prefill 'fresh' (a decode always reads its own K/V back from
        the cache)."""
        (logits, _, new), = self._forward([[token_id]], [cache], [None], decode=True)
        return logits[0], new

    def logits(self, token_ids, images=None) -> np.ndarray:
        """Teacher-forced logits [T, V]."""
        return self.prefill(token_ids, images=images)[0]

    def prefill_batch(self, seqs, caches=None, dumps=None, images=None):
        """Several sequences of different lengths through each layer together (weights read once)
        -> (list of logits [T_j, V], list of caches). images: per sequence its images, or None."""
        caches = caches or [None] * len(seqs)
        out = self._forward(seqs, caches, dumps or [None] * len(seqs), images or [None] * len(seqs))
        return [o[0] for o in out], [o[2] for o in out]

    def decode_batch(self, token_ids, caches):
        """One token per sequence (a decode step each) -> (logits [B, V], caches)."""
        out = self._forward([[t] for t in token_ids], caches, [None] * len(token_ids), decode=True)
        return np.stack([o[0][0] for o in out]), [o[2] for o in out]

    def generate(self, token_ids, max_new_tokens: int, stop_ids=(), images=None) -> list[int]:
        """Greedy continuation (argmax, ties to the lower id); stops after a token in stop_ids."""
        if max_new_tokens <= 0:
            return []
        logits, cache = self.prefill(token_ids, images=images)
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

    def mtp_logits(self, token_ids, hidden: np.ndarray | None = None, images=None) -> np.ndarray:
        """Teacher-forced MTP head: row t (t < T-1) predicts token t+2 from the main model's final
        hidden (after the final norm) at t and the embedding of token t+1 (an image row where token
        t+1 is an image pad, as vLLM's multimodal MTP embeds it), at the main model's position of
        token t. `hidden` [T, H] defaults to the main model's own. -> [T-1, V]."""
        c, p = self.cfg, self.p
        if not self.ckpt.has("mtp.fc.weight"):
            raise ValueError("checkpoint has no MTP head (mtp.fc.weight)")
        ids, positions, _, rows = self.prompt_inputs(token_ids, images)
        if len(ids) < 2:
            raise ValueError(f"MTP needs at least 2 tokens, got {len(ids)}")
        if hidden is None:
            (_, hidden, _), = self._forward([ids], [None], [None], [images])
        T, w = len(ids) - 1, self.weights
        m = w.tables["mtp"]
        embeds = self.embed(ids, rows)
        x = L.mtp_input(embeds[1:], np.asarray(hidden, p.dtype)[:T], w.vector(m["pre_fc_norm_embedding"]),
                        w.vector(m["pre_fc_norm_hidden"]), w.linear(m["fc"]), c.rms_norm_eps, p)
        layer = self.layer("mtp")
        h = layer.moe_step(layer.mixer_step(x, positions=positions[:, :T])[0])[0]
        return self.lm_head(L.rms_norm(h, w.vector(m["norm"]), c.rms_norm_eps, p))

    # -------------------------------------------------------------------------------------------
    # Per-step API: the forward pass piece by piece, each step from the residual stream it starts at
    # (the forward pass itself runs on these; ref.crosscheck recomputes an engine's steps with them)

    def layer(self, layer: int | str) -> "Layer":
        """Decoder layer `layer` (0-based), or "mtp" for the MTP head's layer, with its weights wired
        to its two steps (Layer.mixer_step, Layer.moe_step)."""
        return Layer(self, layer)

    def final_norm(self, h: np.ndarray) -> np.ndarray:
        """The last layer's after_moe [T, H] -> final_hidden [T, H] (the final RMSNorm)."""
        norm = self.weights.vector(self.weights.tables["norm"])
        return L.rms_norm(self.p.act(h), norm, self.cfg.rms_norm_eps, self.p)

    def lm_head(self, x: np.ndarray) -> np.ndarray:
        """final_hidden [T, H] -> logits [T, V] (lm_head is read in row blocks, never converted whole)."""
        return L.linear(self.p.act(x), self.weights.linear(self.weights.tables["lm_head"]), self.p)

    def prompt_inputs(self, token_ids, images=None, start: int = 0, rope_delta: int = 0, dumps: dict | None = None):
        """One sequence's input after `start` cached tokens whose mRoPE offset is rope_delta ->
        (ids [T], positions [3, T], the offset after it, image rows [M, H] or None). With images, the
        pads are expanded, the encoder runs (its dumps into `dumps`) and the positions are
        get_rope_index's, continuing the cached ones (their counter stands at start + rope_delta)."""
        if not images:
            ids = self._check_ids(token_ids)
            return ids, L.text_positions(start + rope_delta, len(ids)), rope_delta, None
        ids, pre = self.image_prompt(token_ids, images)
        ids = self._check_ids(ids)
        rows = self.vision.encode(pre, dumps)
        v = self.vision.cfg
        positions, delta = mrope_positions(ids, self.ckpt.config.special_tokens["image_token_id"],
                                           [im.grid for im in pre], v.spatial_merge_size)
        return ids, positions + start + rope_delta, rope_delta + delta, rows

    def embed(self, ids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Embedding rows of ids [T] -> [T, H], the image-pad rows replaced by the encoder's rows, in order."""
        h = self.weights.embedding(ids)
        if rows is None:
            return h
        return scatter_image_rows(h, ids, self.ckpt.config.special_tokens["image_token_id"], self.p.act(rows))

    # -------------------------------------------------------------------------------------------
    # The streaming forward pass

    def _forward(self, seqs, caches, dumps, images=None, decode: bool = False):
        """-> per sequence (logits [T, V], final hidden [T, H], new Cache). decode: a decode step
        (Layer.mixer_step)."""
        c = self.cfg
        images = images or [None] * len(seqs)
        starts = [cache.pos if cache is not None else 0 for cache in caches]
        prompts = [self.prompt_inputs(s, im, start, cache.rope_delta if cache is not None else 0, d)
                   for s, im, start, cache, d in zip(seqs, images, starts, caches, dumps)]
        seqs = [ids for ids, *_ in prompts]
        bounds = np.cumsum([0] + [len(s) for s in seqs])
        h = np.concatenate([self.embed(ids, rows) for ids, _, _, rows in prompts])  # [sum T, H]
        self._dump(dumps, bounds, "embeddings", h)
        states: list[list] = [[] for _ in seqs]
        for i, kind in enumerate(c.layer_types):
            t0 = time.perf_counter()
            layer = self.layer(i)
            parts = []
            for j, cache in enumerate(caches):
                a, st = layer.mixer_step(h[bounds[j]:bounds[j + 1]], cache.layers[i] if cache is not None else None,
                                         starts[j], prompts[j][1], decode)
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
            out.append((logits[lo:hi], final[lo:hi],
                        Cache(starts[j] + len(s), tuple(states[j]), final[hi - 1], prompts[j][2])))
        return out

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
            self.kind = FULL
        elif isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and 0 <= layer < c.num_hidden_layers:
            layer = int(layer)
            self.kind = c.layer_types[layer]
        else:
            raise ValueError(f"layer must be 0..{c.num_hidden_layers - 1} or 'mtp', got {layer!r}")
        self.model, self.index = model, layer
        self.tensors = model.weights.layer_tables(layer)

    def mixer_step(self, h: np.ndarray, state=None, start: int = 0, positions: np.ndarray | None = None,
                   decode: bool = False):
        """The layer's input h [T, H] -> (after_mixer = h + mixer(input_layernorm(h)) [T, H], the
        mixer's new state). `state`: the layer's KVCache (full attention) or DeltaNetState (linear
        attention) after the `start` tokens before h, or None for none (start 0); the state returned
        is as the engine stores it (K/V in the KV-cache dtype, the DeltaNet state in state_dtype).
        `positions` [3, T]: the tokens' mRoPE positions (image prompts, Model._prompt), default text
        positions from start. decode: a decode step (attends to its own stored K/V even under
        kv_prefill 'fresh')."""
        m = self.model
        norm = m.weights.vector(self.tensors["input_layernorm"])
        if positions is None:
            positions = L.text_positions(start, h.shape[0])
        return L.pre_norm_residual(m.p.act(h), norm, m.cfg.rms_norm_eps,
                                   lambda x: self._mixer(x, state, positions, decode), m.p)

    def moe_step(self, a: np.ndarray, topk_ids: np.ndarray | None = None):
        """after_mixer a [T, H] -> (after_moe = a + moe(post_attention_layernorm(a)) [T, H],
        router_logits [T, E], topk_ids [T, k], topk_weights [T, k]). `topk_ids` [T, k], if given,
        forces the experts that run (e.g. an engine's choice), weighted by the router's
        probabilities of them, renormalised; the routing returned is always the router's own."""
        m = self.model
        norm = m.weights.vector(self.tensors["post_attention_layernorm"])
        return L.pre_norm_residual(m.p.act(a), norm, m.cfg.rms_norm_eps, lambda x: self._moe(x, topk_ids), m.p)

    @cached_property
    def _mixer(self):
        """(x [T, H], state, positions [3, T], decode) -> (y, state) with this layer's weights and the
        run's KV-cache and state modes."""
        m, c, w = self.model, self.model.cfg, self.model.weights
        if self.kind == FULL:
            prm, store = w.attention(self.tensors["self_attn"]), w.kv_store(self.index)
            fresh = m.modes.kv_prefill == "fresh"
            return lambda x, cache, positions, decode: L.gated_attention(
                x, prm, c.num_attention_heads, c.num_key_value_heads, positions, m.rope, c.rms_norm_eps, cache, m.p,
                store, fresh and not decode)
        prm = w.deltanet(self.tensors["linear_attn"])
        state_dtype = m.modes.state_dtype

        def deltanet(x, state, positions, decode):
            y, new = L.gated_deltanet(x, prm, c.linear_num_key_heads, c.rms_norm_eps, state, m.p)
            if state_dtype != "float32":  # float32: the compute dtype's state as it is (float64 in f64)
                new = new._replace(recurrent=store_state(new.recurrent, state_dtype))
            return y, new
        return deltanet

    @cached_property
    def _moe(self):
        """(x [T, H], topk_ids=None) -> (y, router logits, ids, weights) with this layer's weights
        (topk_ids forces the experts that run, see L.sparse_moe)."""
        m, w, moe = self.model, self.model.weights, self.tensors["mlp"]
        router, shared, expert = w.linear(moe["gate"]), w.shared_expert(moe), w.expert_fn(self.index)
        return lambda x, topk_ids=None: L.sparse_moe(x, router, m.cfg.num_experts_per_tok, expert, shared, m.p, topk_ids)
