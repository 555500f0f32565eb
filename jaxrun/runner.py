"""Compiled prefill, decode and speculative steps over a mesh, on a typed decode state of B slots, and
the generation loop, which queues each step before the host reads the previous one's tokens.

The pieces a scheduler drives (jaxrun.scheduler; `generate` is the simplest driver):
- `start(prompts)`: prefill prompts (in chunks, continuing the cache) and choose each one's first
  token -> (DecodeState of those sequences, the StepOut of the first token);
- `step(state)`: one decode or speculative step of every slot -> (state, StepOut);
- `insert(state, rows, slots)`: put started sequences into slots of a larger state (a finished
  sequence's slot is simply overwritten by the next one: evicting is the host forgetting it).

Image prompts: `start` / `Prefill` / `generate` take each prompt's images (ref.image.PreprocessedImage,
in prompt order; the prompt's image pads are expanded to their merged-token counts if they are not
yet). The images of a prefill are encoded together (jaxrun.vision, one compiled encoder per patch
bucket); the chunks take their tokens' 3-D positions and image rows, and each slot of the
DecodeState carries its `rope_delta`, the position offset of every later token (decode, speculative
and MTP steps).

Shape buckets: prompt chunks are right-padded to a power of two (at least MIN_BUCKET), so a few
compiled prefills serve every prompt; compiled functions are kept per shape and reused across calls.
`traces` counts how often each function was traced (= compiled).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrun import model
from jaxrun.layers import rope_table
from jaxrun.options import Options, exact_decode_needed
from jaxrun.params import KVCache, Params, abstract, declare_cache
from jaxrun.sampling import Sampling, sample, seed_key, speculative_choice
from jaxrun.vision import PatchLayout, encode, patch_bucket, patch_layout
from ref.config import FULL, Config
from ref.image_prompt import expand_image_pads, merged_counts, mrope_positions
from ref.modes import Modes

MIN_BUCKET = 16


_CACHE_HITS = [0]  # compiled functions loaded from JAX's persistent compilation cache, in this process
jax.monitoring.register_event_listener(
    lambda event, **_: _CACHE_HITS.__setitem__(0, _CACHE_HITS[0] + (event == "/jax/compilation_cache/cache_hits")))


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


# ------------------------------------------------------------------------------------------------
# Decode state and step outputs (pytrees of device arrays, leading axis: the B slots)

class SlotSampling(NamedTuple):
    temperature: jax.Array   # [B] float32, 0 = greedy
    top_p: jax.Array         # [B] float32
    top_k: jax.Array         # [B] int32, 0 = off


class DecodeState(NamedTuple):
    cache: tuple             # per layer DeltaNetCache | KVCache
    mtp_cache: tuple | None  # (KVCache,) of the MTP layer, with the MTP head
    tokens: jax.Array        # [B] int32: each slot's last chosen token (the next step's input)
    pos: jax.Array           # [B] int32: its position
    drafts: jax.Array | None  # [B, K] the next speculative step's drafts
    keys: jax.Array          # [B, 2] uint32: each slot's PRNG key (from its seed)
    steps: jax.Array         # [B] int32: tokens chosen so far (the fold_in index of the next choice)
    sampling: SlotSampling
    rope_delta: jax.Array    # [B] int32: mRoPE offset of an image prompt's later tokens (position = pos + it)


class StepOut(NamedTuple):
    tokens: jax.Array        # [B, n] the chosen tokens (n = 1, or K + 1 in a speculative step)
    count: jax.Array | None  # [B] how many of them are emitted (speculative), else all
    logits: jax.Array        # [B, V] or [B, K+1, V] float32
    draft_ids: jax.Array | None     # [B] with the MTP head (not speculative): its draft of the token after
    draft_logits: jax.Array | None  # [B, V] the logits of that draft


class Chunk(NamedTuple):
    """A prefill chunk's results."""
    logits: jax.Array        # [B, V] at each row's last real token, or [B, T, V] (all_logits)
    cache: tuple
    mtp_cache: tuple | None
    hidden: jax.Array | None  # [B, H] final-normed hidden at the last real token (with the MTP head)


# ------------------------------------------------------------------------------------------------
# Results and timings of generate

@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # per generated token, when kept
    mtp_draft_ids: list[int] = field(default_factory=list)  # with mtp: entry i is the MTP head's guess of token i + 1
    mtp_logits: list[np.ndarray] = field(default_factory=list)  # its logits, when kept
    speculative_steps: int = 0  # speculative: steps taken with K drafts each
    accepted_at: list[int] = field(default_factory=list)  # [K]: steps that kept their i-th draft

    @property
    def drafts_proposed(self) -> int:
        return self.speculative_steps * len(self.accepted_at)

    @property
    def drafts_accepted(self) -> int:  # each saved a step
        return sum(self.accepted_at)

    def record_step(self, kept: int, K: int) -> None:
        """A speculative step with K drafts that kept the first `kept` of them."""
        self.accepted_at = self.accepted_at or [0] * K
        for i in range(kept):
            self.accepted_at[i] += 1
        self.speculative_steps += 1

    def mtp_accepted(self) -> tuple[int, int]:
        """(drafts equal to the token that followed, drafts that had a following token)."""
        pairs = list(zip(self.mtp_draft_ids, self.token_ids[1:]))
        return sum(d == t for d, t in pairs), len(pairs)


def speculative_stats(results: list[Result]) -> dict:
    """The engines' speculative-decoding figures over results: per-position acceptance rates (the share
    of steps that kept their i-th draft) and the mean acceptance length (tokens per step: 1 + kept drafts)."""
    at = [sum(col) for col in zip(*(r.accepted_at for r in results if r.accepted_at))]
    accepted, proposed = sum(r.drafts_accepted for r in results), sum(r.drafts_proposed for r in results)
    steps = sum(r.speculative_steps for r in results)
    return {"drafts_proposed": proposed, "drafts_accepted": accepted, "steps": steps,
            "acceptance_per_position": [a / steps for a in at] if steps else [],
            "mean_acceptance_length": 1 + accepted / steps if steps else None}


@dataclass
class Timings:
    compile_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_cpu_s: float = 0.0  # process CPU time (all threads), steadier than wall time on a shared machine
    decode_cpu_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0

    def as_dict(self) -> dict:
        rate = lambda n, s: n / s if s > 0 else None
        return {"compile_s": self.compile_s, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "prefill_tokens": self.prefill_tokens, "decode_tokens": self.decode_tokens,
                "prefill_tok_s": rate(self.prefill_tokens, self.prefill_s),
                "decode_tok_s": rate(self.decode_tokens, self.decode_s)}


# ------------------------------------------------------------------------------------------------

class Runner:
    """Parameters placed on a mesh plus their compiled functions."""

    def __init__(self, params: Params, cfg, mesh, precision: str = "f32", activations: str = "w4a16",
                 act_scale: str = "per-expert", options: Options | None = None, *, kv_cache_dtype: str = "auto",
                 kv_engine: str = "vllm", kv_prefill: str = "cache", state_dtype: str = "float32"):
        """params: placed on `mesh` (jaxrun.load.load, or jaxrun.load.place for random ones); cfg: the
        TextConfig, or the whole Config (needed for image prompts: the vision config and the image-pad
        id). activations "w4a4": routed-expert GEMM inputs quantized as the engines do, with each
        expert's input scales or (act_scale "max") the layer's largest; the checkpoint needs them (and
        quantized dense linears with input scales run W8A8 / W4A4). The KV-cache dtype and store rule,
        the prefill's K/V and the DeltaNet state dtype as ref.modes says (Runner(..., **asdict(modes))).
        options: the backend choices (default: Options.build for the mesh's platform and these modes;
        given, they carry the modes)."""
        self.opts = options or Options.build(
            mesh, Modes(precision, activations, act_scale, kv_cache_dtype, kv_engine, kv_prefill, state_dtype), params)
        if self.opts.activations == "w4a4" and any(layer.mlp.experts.input_scale is None for layer in params.layers):
            raise ValueError("--activations w4a4: the checkpoint's routed experts are not NVFP4 with input scales")
        self.config = cfg if isinstance(cfg, Config) else None
        cfg = cfg.text if isinstance(cfg, Config) else cfg
        self.cfg, self.mesh = cfg, mesh
        self.param_shardings = jax.tree.map(lambda a: _placed(a, mesh), params)
        self.params = params
        self.rep = NamedSharding(mesh, P())
        self.traces: Counter = Counter()
        self.on_compile = None  # e.g. a progress line per compiled function
        self.initial_new_tokens = 256  # generate's caches start with room for this many, then double
        self._compiled: dict = {}
        self._ropes: dict = {}
        self.timings = Timings()

    def set_params(self, params: Params) -> None:
        """Swap in other parameters of the same structure and shapes (compiled functions are kept; a
        second set is compiled if only one of the two needs exact NVFP4 decoding)."""
        if jax.tree.structure(params) != jax.tree.structure(self.params):
            raise ValueError("set_params: parameter tree differs from the compiled one")
        self.params = jax.device_put(params, self.param_shardings)
        self.opts = self.opts.replace(exact_experts=self.opts.flushes_subnormals and exact_decode_needed(params))

    @property
    def has_mtp(self) -> bool:
        return self.params.mtp is not None

    @property
    def has_vision(self) -> bool:
        return self.params.visual is not None and self.config is not None and self.config.vision is not None

    def image_prompts(self, prompts: list[list[int]], images) -> list[list[int]]:
        """The prompts with each image's pad run expanded to its merged-token count (a run already of
        that length is kept); ValueError naming the image and both counts, or no vision tower."""
        if not images or not any(images):
            return [list(p) for p in prompts]
        if not self.has_vision:
            raise ValueError("image prompts: the runner has no vision tower (a checkpoint with model.visual.*, "
                             "and Runner(cfg=the whole Config))")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        m, pad = self.config.vision.spatial_merge_size, self.config.special_tokens["image_token_id"]
        return [expand_image_pads(p, merged_counts([im.grid for im in ims], m), pad, [im.source for im in ims])
                if ims else list(p) for p, ims in zip(prompts, images)]

    # -- compiled functions (compiled ahead of time from shapes, so timings never include compiling) --
    def _compile(self, key, fn, args, **jit_kw):
        """The compiled fn for key (with the options); args: a function giving the argument specs.
        on_compile(name, None) before and on_compile(name, (seconds, from the persistent cache)) after."""
        key = key + (self.opts,)
        if key not in self._compiled:
            if self.on_compile:
                self.on_compile(key[0], None)
            t0, hits = time.perf_counter(), _CACHE_HITS[0]
            self._compiled[key] = jax.jit(fn, **jit_kw).lower(*args()).compile()
            seconds = time.perf_counter() - t0
            self.timings.compile_s += seconds
            if self.on_compile:
                self.on_compile(key[0], (seconds, _CACHE_HITS[0] > hits))
        return self._compiled[key]

    def _spec(self, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.rep)

    def _declared_cache(self, B: int, max_len: int, kinds=None):
        return declare_cache(self.cfg, B, max_len, kinds, self.opts.kv_cache_dtype, self.opts.state_dtype)

    def _cache_spec(self, B: int, max_len: int, kinds=None):
        shapes = abstract(self._declared_cache(B, max_len, kinds), self.opts.dtype)
        return jax.tree.map(lambda a: self._spec(a.shape, a.dtype), shapes)

    def _state_spec(self, B: int, max_len: int, mtp: bool, K: int) -> DecodeState:
        vec, f32 = self._spec((B,), jnp.int32), self._spec((B,), jnp.float32)
        return DecodeState(self._cache_spec(B, max_len), self._cache_spec(B, max_len, (FULL,)) if mtp else None,
                           vec, vec, self._spec((B, K), jnp.int32) if K else None, self._spec((B, 2), jnp.uint32), vec,
                           SlotSampling(f32, f32, vec), vec)

    def rope(self, max_len: int):
        if max_len not in self._ropes:
            self._ropes[max_len] = jax.device_put(rope_table(self.cfg, max_len, self.opts.dtype), self.rep)
        return self._ropes[max_len]

    def zeros_fn(self, B: int, max_len: int, kinds=None):
        """Fresh caches (zeros) for B sequences, made on the devices."""
        shapes = abstract(self._declared_cache(B, max_len, kinds), self.opts.dtype)
        fn = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        return self._compile(("zeros", B, max_len, kinds), fn, lambda: (), out_shardings=self.rep)

    def chunk_fn(self, B: int, T: int, max_len: int, mtp: bool, all_logits: bool = False, images: bool = False):
        """One prefill chunk (model.prefill, and with mtp the MTP head's rows whose next token is known):
        (params, cache, mtp_cache, tokens [B, T], following [B] (the token after each row's last real
        one, -1 where it is not known yet), pos [B], lengths [B], rope[, mm]) -> Chunk. images: the
        chunk of an image prompt; mm = (positions [B, 3, T] the tokens' mRoPE positions, rows
        [B, T+1, H] and is_image [B, T+1] the image rows of its tokens and of each row's following
        token (at index lengths[b]))."""
        cfg, opts = self.cfg, self.opts

        def fn(params, cache, mtp_cache, tokens, following, pos, lengths, rope, mm=None):
            self.traces["prefill"] += 1
            positions, here, after = None, None, None
            if mm is not None:
                positions, rows, is_image = mm
                here, after = (rows[:, :T], is_image[:, :T]), (rows[:, 1:], is_image[:, 1:])
            pre = model.prefill(params, cache, tokens, pos, lengths, rope, cfg=cfg, opts=opts, all_logits=all_logits,
                                with_hidden=mtp, positions=positions, image_rows=here)
            if not mtp:
                return Chunk(pre.logits, pre.cache, None, None)
            rows = jnp.arange(tokens.shape[0])
            nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
            nxt = nxt.at[rows, lengths - 1].set(jnp.maximum(following, 0))                # row t: token t + 1
            known = jnp.where(following >= 0, lengths, lengths - 1)                       # MTP rows to run
            mtp_cache = model.mtp_prefill(params, mtp_cache, nxt, pre.hidden, pos, known, rope, cfg=cfg, opts=opts,
                                          positions=positions, next_rows=after)
            return Chunk(pre.logits, pre.cache, mtp_cache, pre.hidden[rows, lengths - 1])

        vec = self._spec((B,), jnp.int32)

        def args():
            out = (self.params, self._cache_spec(B, max_len), self._cache_spec(B, max_len, (FULL,)) if mtp else None,
                   self._spec((B, T), jnp.int32), vec, vec, vec, self.rope(max_len))
            if images:
                out += ((self._spec((B, 3, T), jnp.int32), self._spec((B, T + 1, cfg.hidden_size), opts.dtype),
                         self._spec((B, T + 1), jnp.bool_)),)
            return out

        return self._compile(("prefill", B, T, max_len, mtp, all_logits, images), fn, args,
                             in_shardings=(self.param_shardings,) + (self.rep,) * (8 if images else 7),
                             out_shardings=self.rep, donate_argnums=(1, 2))

    def vision_fn(self, N: int):
        """The vision encoder on N patches (a bucket, jaxrun.vision.patch_bucket): (visual params, pixels
        [N, C*T*P*P] float32, segment [N], index [N], grid [N, 2]) -> merged rows [N / m^2, H]."""
        vcfg, opts = self.config.vision, self.opts
        width = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2

        def fn(visual, pixels, segment, index, grid):
            self.traces["vision"] += 1
            return encode(visual, pixels, PatchLayout(segment, index, grid), cfg=vcfg, opts=opts)

        vec = self._spec((N,), jnp.int32)
        args = lambda: (self.params.visual, self._spec((N, width), jnp.float32), vec, vec,
                        self._spec((N, 2), jnp.int32))
        return self._compile(("vision", N), fn, args, in_shardings=(self.param_shardings.visual,) + (self.rep,) * 4,
                             out_shardings=self.rep)

    def encode_images(self, images) -> jax.Array:
        """Images (ref.image.PreprocessedImage, in order) -> their merged rows [sum of merged tokens, H]
        on the devices, in the compute dtype: one call of the encoder compiled for their patch bucket."""
        if not self.has_vision:
            raise ValueError("image prompts: the runner has no vision tower")
        pixels = np.concatenate([im.pixel_values for im in images])
        N = patch_bucket(len(pixels))
        padded = np.zeros((N, pixels.shape[1]), np.float32)
        padded[:len(pixels)] = pixels
        layout = patch_layout([im.grid for im in images], N, self.config.vision.spatial_merge_size)
        rows = self.vision_fn(N)(self.params.visual, padded, *layout)
        return rows[:sum(merged_counts([im.grid for im in images], self.config.vision.spatial_merge_size))]

    def first_fn(self, B: int, max_len: int, mtp: bool, K: int):
        """The first token after the prompts, with its sampling: (params, the last Chunk's cache,
        mtp_cache, logits and hidden, lengths [B], keys [B, 2], SlotSampling, rope, rope_delta [B], last
        [B, 3] the last prompt token's position) -> (DecodeState, StepOut). With mtp, also the MTP
        head's draft after it (speculative: its K chained drafts), from the prompt's last row."""
        cfg, opts = self.cfg, self.opts

        def fn(params, cache, mtp_cache, logits, hidden, lengths, keys, sampling, rope, delta, last):
            self.traces["first"] += 1
            steps = jnp.zeros_like(lengths)
            tok = sample(logits, _step_keys(keys, steps), *sampling)
            drafts = draft_ids = draft_logits = None
            if mtp:
                draft_logits, mtp_cache, hm = model.mtp_decode(params, mtp_cache, tok, hidden, lengths - 1, rope,
                                                               cfg=cfg, opts=opts, positions=last[:, :, None])
                first = jnp.argmax(draft_logits, axis=-1).astype(jnp.int32)
                if K:
                    drafts, mtp_cache = model.mtp_chain(params, mtp_cache, first, hm, lengths - 1, rope, cfg=cfg,
                                                        opts=opts, count=K, delta=delta)
                    draft_logits = None
                else:
                    draft_ids = first
            state = DecodeState(cache, mtp_cache, tok, lengths, drafts, keys, steps + 1, sampling, delta)
            return state, StepOut(tok[:, None], None, logits, draft_ids, draft_logits)

        def args():
            H, V, vec, f32 = self.cfg.hidden_size, self.cfg.vocab_size, self._spec((B,), jnp.int32), \
                self._spec((B,), jnp.float32)
            return (self.params, self._cache_spec(B, max_len), self._cache_spec(B, max_len, (FULL,)) if mtp else None,
                    self._spec((B, V), jnp.float32), self._spec((B, H), self.opts.dtype) if mtp else None, vec,
                    self._spec((B, 2), jnp.uint32), SlotSampling(f32, f32, vec), self.rope(max_len), vec,
                    self._spec((B, 3), jnp.int32))

        return self._compile(("first", B, max_len, mtp, K), fn, args,
                             in_shardings=(self.param_shardings,) + (self.rep,) * 10, out_shardings=self.rep,
                             donate_argnums=(1, 2))

    def decode_fn(self, B: int, max_len: int, mtp: bool = False, active: int | None = None):
        """One decode step with its sampling (and with mtp the MTP head's draft of the token after),
        compiled as one function: (params, DecodeState) -> (DecodeState, StepOut); with `active`, of
        the first `active` slots only (first_slots)."""
        cfg, opts = self.cfg, self.opts

        def fn(params, state: DecodeState, rope):
            self.traces["decode"] += 1
            logits, cache, hidden = model.decode(params, state.cache, state.tokens, state.pos, rope, cfg=cfg, opts=opts,
                                                 delta=state.rope_delta)
            nxt = sample(logits, _step_keys(state.keys, state.steps), *state.sampling)
            draft_ids = draft_logits = None
            mtp_cache = state.mtp_cache
            if mtp:
                draft_logits, mtp_cache, _ = model.mtp_decode(params, mtp_cache, nxt, hidden, state.pos, rope,
                                                              cfg=cfg, opts=opts, delta=state.rope_delta)
                draft_ids = jnp.argmax(draft_logits, axis=-1).astype(jnp.int32)
            state = state._replace(cache=cache, mtp_cache=mtp_cache, tokens=nxt,
                                   pos=jnp.minimum(state.pos + 1, max_len - 1), steps=state.steps + 1)
            return state, StepOut(nxt[:, None], None, logits, draft_ids, draft_logits)

        args = lambda: (self.params, self._state_spec(B, max_len, mtp, 0), self.rope(max_len))
        return self._compile(("decode", B, max_len, mtp) + ((active,) if active else ()), first_slots(fn, active), args,
                             in_shardings=(self.param_shardings, self.rep, self.rep), out_shardings=self.rep,
                             donate_argnums=(1,))

    def verify_fn(self, B: int, max_len: int, K: int, active: int | None = None):
        """One speculative step with K drafts (model.verify with sampling.speculative_choice), compiled
        with its bookkeeping: (params, DecodeState) -> (DecodeState, StepOut with count = 1 + drafts
        accepted: the tokens kept); with `active`, of the first `active` slots only (first_slots)."""
        cfg, opts = self.cfg, self.opts

        def fn(params, state: DecodeState, rope):
            self.traces["verify"] += 1
            B = state.tokens.shape[0]
            keys = _step_keys(state.keys, state.steps)
            choose = lambda logits, drafts: speculative_choice(logits, drafts, keys, *state.sampling)
            v = model.verify(params, state.cache, state.mtp_cache, state.tokens, state.drafts, state.pos, rope,
                             cfg=cfg, opts=opts, choose=choose, delta=state.rope_delta)
            n = v.accepted
            state = state._replace(cache=v.cache, mtp_cache=v.mtp_cache, tokens=v.chosen[jnp.arange(B), n],
                                   pos=jnp.minimum(state.pos + n + 1, max_len - 1), drafts=v.drafts,
                                   steps=state.steps + 1)
            return state, StepOut(v.chosen, n + 1, v.logits, None, None)

        args = lambda: (self.params, self._state_spec(B, max_len, True, K), self.rope(max_len))
        return self._compile(("verify", B, max_len, K) + ((active,) if active else ()), first_slots(fn, active), args,
                             in_shardings=(self.param_shardings, self.rep, self.rep), out_shardings=self.rep,
                             donate_argnums=(1,))

    def grow_fn(self, B: int, max_len: int, new_len: int, mtp: bool, K: int):
        """(state with max_len cache positions) -> the same state with new_len (the new ones zero)."""
        def pad(c):
            widen = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, new_len - max_len), (0, 0)))   # [B, nKV, S, D]
            return KVCache(widen(c.k), widen(c.v)) if isinstance(c, KVCache) else c

        def fn(state):
            self.traces["grow"] += 1
            mtp_cache = None if state.mtp_cache is None else tuple(map(pad, state.mtp_cache))
            return state._replace(cache=tuple(map(pad, state.cache)), mtp_cache=mtp_cache)

        return self._compile(("grow", B, max_len, new_len, mtp, K), fn, lambda: (self._state_spec(B, max_len, mtp, K),),
                             in_shardings=(self.rep,), out_shardings=self.rep)

    def insert_fn(self, B: int, n: int, max_len: int, mtp: bool, K: int):
        """(state of B slots, state of n sequences, slots [n]) -> the state with those slots replaced."""
        def fn(big, rows, slots):
            self.traces["insert"] += 1
            return jax.tree.map(lambda a, b: a.at[slots].set(b), big, rows)

        args = lambda: (self._state_spec(B, max_len, mtp, K), self._state_spec(n, max_len, mtp, K),
                        self._spec((n,), jnp.int32))
        return self._compile(("insert", B, n, max_len, mtp, K), fn, args, in_shardings=(self.rep,) * 3,
                             out_shardings=self.rep, donate_argnums=(0,))

    def empty_state(self, B: int, max_len: int, mtp: bool = False, K: int = 0) -> DecodeState:
        """B free slots (zero caches, greedy, token 0 at position 0): a step runs them harmlessly."""
        zeros = lambda a: jnp.zeros(a.shape, a.dtype)
        spec = jax.tree.map(zeros, self._state_spec(B, max_len, mtp, K))
        return jax.device_put(spec, self.rep)

    # -- steps on device arrays -------------------------------------------------------------------
    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, max_len: int, all_logits: bool = False):
        """Teacher-forced: tokens [B, T] int32 (T a bucket, <= max_len), lengths [B] -> (logits [B, T, V]
        (all_logits) or [B, V] at each last token, cache), from a fresh cache."""
        B, T = tokens.shape
        chunk = self.chunk_fn(B, T, max_len, False, all_logits)(
            self.params, self.zeros_fn(B, max_len)(), None, jnp.asarray(tokens, jnp.int32),
            jnp.full(B, -1, jnp.int32), jnp.zeros(B, jnp.int32), jnp.asarray(lengths, jnp.int32), self.rope(max_len))
        return chunk.logits, chunk.cache

    def start(self, prompts: list[list[int]], max_len: int, sampling: Sampling | list[Sampling], mtp: bool = False,
              K: int = 0, images=None) -> tuple[DecodeState, StepOut]:
        """Prefill the prompts together and choose each one's first token (with its own seed and
        settings) -> (DecodeState of len(prompts) sequences, StepOut of the first token). images: per
        prompt its images (or None)."""
        job = Prefill(self, prompts, max_len, mtp, images=images)
        while not job.advance():
            pass
        return job.finish(sampling, K)

    def step(self, state: DecodeState, max_len: int, active: int | None = None) -> tuple[DecodeState, StepOut]:
        """One decode step (or, with drafts in the state, a speculative one) of every slot, or of the
        first `active` slots only (the others keep their state; the StepOut has `active` rows); the
        state is donated."""
        B = state.tokens.shape[0]
        active = active if active is not None and active < B else None
        if state.drafts is not None:
            return self.verify(state, max_len, active)
        return self.decode_fn(B, max_len, state.mtp_cache is not None, active)(self.params, state, self.rope(max_len))

    def verify(self, state: DecodeState, max_len: int, active: int | None = None) -> tuple[DecodeState, StepOut]:
        """One speculative step from the state's drafts (the state is donated)."""
        B, K = state.drafts.shape
        state = state._replace(drafts=jnp.asarray(state.drafts, jnp.int32))
        return self.verify_fn(B, max_len, K, active)(self.params, state, self.rope(max_len))

    def grow(self, state: DecodeState, max_len: int, new_len: int) -> DecodeState:
        """The state with its attention caches extended from max_len to new_len positions (donated)."""
        B = state.tokens.shape[0]
        K = 0 if state.drafts is None else state.drafts.shape[1]
        return self.grow_fn(B, max_len, new_len, state.mtp_cache is not None, K)(state)

    def insert(self, state: DecodeState, rows: DecodeState, slots, max_len: int) -> DecodeState:
        """rows (a DecodeState of n sequences, e.g. from start) into `slots` [n] of state (donated)."""
        B, n = state.tokens.shape[0], rows.tokens.shape[0]
        K = 0 if state.drafts is None else state.drafts.shape[1]
        f = self.insert_fn(B, n, max_len, state.mtp_cache is not None, K)
        return f(state, rows, jnp.asarray(slots, jnp.int32))

    # -- generation --------------------------------------------------------------------------------
    @staticmethod
    def positions_needed(prompts, max_new_tokens: int, speculative: int = 0) -> int:
        """Cache positions a generation writes: the longest prompt, the new tokens, and with K drafts
        2K more (a speculative step writes its drafts, then the MTP head's chain, past its last token)."""
        return max(len(p) for p in prompts) + max_new_tokens + 2 * int(speculative)

    @staticmethod
    def context_for(prompts, max_new_tokens: int, speculative: int = 0) -> int:
        """The cache length generate uses by default: positions_needed, rounded up to a multiple of 256."""
        return bucket(max(bucket(max(len(p) for p in prompts)), Runner.positions_needed(prompts, max_new_tokens,
                                                                                         speculative)), 256)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids=(), max_context: int | None = None, keep_logits: bool = False, on_step=None,
                 mtp: bool = False, speculative: int = 0, images=None, progress=None) -> list[Result]:
        """Prefill all prompts together, then decode them together until each has max_new_tokens or
        produced a stop id (kept as its last token). on_step(results, done [B]) runs after each step and
        may return a bool array [B] of further sequences to stop (e.g. on stop text). mtp: run the MTP
        head beside the model, recording its greedy draft of each next token (Result.mtp_draft_ids).
        speculative K (True = 1): each step runs the last token and K greedy drafts of the tokens after
        it (the MTP head, chained) through the model together (model.verify) and keeps a prefix of the
        drafts by sampling.speculative_choice, so a step emits 1 .. K+1 tokens, distributed as plain
        sampling's (greedy: the same tokens, drafts kept while the model agrees). Each step is queued
        on the device before the host reads the previous step's tokens, so the host's bookkeeping
        overlaps the device's work; a step queued when every sequence has ended is dropped. images: per
        prompt its images (ref.image.PreprocessedImage, in prompt order) or None; Result.prompt_token_ids
        then hold the expanded image pads. progress(what): called (once everything is compiled) before
        each step the host then waits for, naming it and its compiled functions
        (jaxrun.watchdog.Watchdog.phase)."""
        K = int(speculative)
        mtp = mtp or K > 0
        if mtp and not self.has_mtp:
            raise ValueError("--mtp: the checkpoint has no MTP head (mtp.fc.weight)")
        prompts = self.image_prompts(prompts, images)
        final = self._context(prompts, max_new_tokens, max_context, K)
        S = min(final, self.context_for(prompts, min(max_new_tokens, self.initial_new_tokens), K))
        results = [Result(list(map(int, p))) for p in prompts]
        if max_new_tokens <= 0:
            return results
        self._compile_ahead(prompts, S, mtp, K, images)
        progress = progress or (lambda what: None)
        where = f"on {self.mesh.size} {self.mesh.devices.flat[0].platform} device(s)"
        progress(f"prefill of {len(prompts)} x {bucket(max(map(len, prompts)))} tokens, context {S} (compiled "
                 f"'prefill', 'first') {where}")
        t0, c0 = time.perf_counter(), time.process_time()
        state, first = self.start(prompts, S, sampling, mtp, K, images)
        done = np.zeros(len(prompts), bool)
        self._emit(results, done, self._to_host(first, keep_logits), stop_ids, max_new_tokens)
        self.timings.prefill_s += time.perf_counter() - t0
        self.timings.prefill_cpu_s += time.process_time() - c0
        self.timings.prefill_tokens += sum(len(p) for p in prompts)
        t0, c0 = time.perf_counter(), time.process_time()
        _ask(on_step, results, done)
        kind = "verify" if K else "decode"
        step_progress = lambda n: progress(f"{kind} step {n} (compiled '{kind}') {where}")
        compiled = self.timings.compile_s
        self._decode_loop(state, results, done, (S, final), K, stop_ids, max_new_tokens, keep_logits, on_step,
                          step_progress)
        self.timings.decode_s += time.perf_counter() - t0 - (self.timings.compile_s - compiled)  # grown caches
        self.timings.decode_cpu_s += time.process_time() - c0
        return results

    def _context(self, prompts, max_new_tokens: int, max_context: int | None, K: int) -> int:
        """The cache length of a generation; ValueError when its positions do not fit."""
        S = max(max_context or self.context_for(prompts, max_new_tokens, K), bucket(max(len(p) for p in prompts)))
        needed = self.positions_needed(prompts, max_new_tokens, K)
        if needed > S:
            raise ValueError(f"{needed} cache positions needed (prompt, new tokens, 2 per draft) exceed the context "
                             f"of {S}")
        return S

    def _compile_ahead(self, prompts, S: int, mtp: bool, K: int, images=None) -> None:
        """Compile every function a generation runs before anything is timed."""
        B, T = len(prompts), bucket(max(len(p) for p in prompts))
        self.zeros_fn(B, S)
        if mtp:
            self.zeros_fn(B, S, (FULL,))
        with_images = bool(images) and any(images)
        if with_images:
            self.vision_fn(patch_bucket(sum(len(im.pixel_values) for ims in images if ims for im in ims)))
        self.chunk_fn(B, T, S, mtp, images=with_images)
        self.first_fn(B, S, mtp, K)
        if K:
            self.verify_fn(B, S, K)
        else:
            self.decode_fn(B, S, mtp)

    @staticmethod
    def _to_host(out: StepOut, keep_logits: bool) -> dict:
        """What the host reads of a step: its tokens (and count), and where kept the logits and drafts."""
        host = {"tokens": np.asarray(out.tokens)}
        if out.count is not None:
            host["count"] = np.asarray(out.count)
        if out.draft_ids is not None:
            host["draft_ids"] = np.asarray(out.draft_ids)
        if keep_logits:
            host["logits"] = np.asarray(out.logits)
            if out.draft_logits is not None:
                host["draft"] = np.asarray(out.draft_logits)
        return host

    def _decode_loop(self, state: DecodeState, results, done, contexts: tuple[int, int], K: int, stop_ids,
                     max_new_tokens: int, keep_logits: bool, on_step, progress) -> None:
        """Steps until every sequence has ended; each is queued before the previous one's tokens are read.
        contexts (S, final): the caches start with S positions and double (up to final) before a step
        could write past them, so attention costs what the sequences need, not what they might."""
        (S, final), longest = contexts, max(len(r.prompt_token_ids) for r in results)
        pending = None
        for n in range(1, max_new_tokens):
            if done.all():
                break
            while longest + (n - 1) * (K + 1) + 2 * K >= S and S < final:  # the last position step n may write
                state, S = self.grow(state, S, min(2 * S, final)), min(2 * S, final)
            progress(n)
            state, out = self.step(state, S)                               # queued; the host goes on
            if pending is not None:
                self._after_step(results, done, pending, stop_ids, max_new_tokens, K, on_step)
                if done.all():                                               # the queued step is dropped
                    return
            pending = self._to_host(out, keep_logits)
        if pending is not None and not done.all():
            self._after_step(results, done, pending, stop_ids, max_new_tokens, K, on_step)

    def _after_step(self, results, done, emitted: dict, stop_ids, max_new_tokens: int, K: int, on_step) -> None:
        """A step's host side: speculative counts, its tokens appended, on_step asked."""
        if K:
            for b in np.flatnonzero(~done):
                results[b].record_step(int(emitted["count"][b]) - 1, K)
        self.timings.decode_tokens += self._emit(results, done, emitted, stop_ids, max_new_tokens)
        _ask(on_step, results, done)

    @staticmethod
    def _emit(results, done, emitted: dict, stop_ids, max_new_tokens: int) -> int:
        """Append one step's tokens (host arrays: "tokens" [B, n], "count" [B] of them kept (default
        all), and where present "logits" [B, V] or [B, n, V], the MTP "draft_ids" [B] and "draft"
        logits) to the live sequences, marking those that end; -> tokens appended."""
        tokens = emitted["tokens"]
        count = emitted.get("count", np.full(len(tokens), tokens.shape[1]))
        new = 0
        for b in np.flatnonzero(~done):
            r = results[b]
            for i in range(count[b]):
                r.token_ids.append(int(tokens[b, i]))
                new += 1
                if "logits" in emitted:
                    r.logits.append(emitted["logits"][b].reshape(tokens.shape[1], -1)[i])
                if "draft_ids" in emitted:
                    r.mtp_draft_ids.append(int(emitted["draft_ids"][b]))
                if "draft" in emitted:
                    r.mtp_logits.append(emitted["draft"][b])
                done[b] |= int(tokens[b, i]) in stop_ids or len(r.token_ids) >= max_new_tokens
                if done[b]:
                    break
        return new


class Prefill:
    """Prompts being prefilled together, one chunk at a time (a scheduler interleaves the chunks of a
    long prompt with decode steps). Each chunk is right-padded to a bucket; with several prompts,
    every prompt must fit the first chunk (their chunks would not line up). With images, the prompts
    are expanded (`prompts` holds the expanded ids), the images encoded at once, and each chunk
    takes its slice of the 3-D positions and image rows; a chunk may end inside an image."""

    def __init__(self, runner: Runner, prompts: list[list[int]], max_len: int, mtp: bool = False,
                 chunk: int | None = None, all_logits: bool = False, images=None):
        """all_logits: keep every prompt position's logits (host, `prompt_logits` [B, T, V] float32: row
        t predicts token t + 1), for prompt logprobs. images: per prompt its images (or None)."""
        prompts = runner.image_prompts(prompts, images)
        self.runner, self.prompts, self.max_len, self.mtp, self.all_logits = runner, prompts, max_len, mtp, all_logits
        self.prompt_logits: list[np.ndarray] = []
        self.lengths = np.array([len(p) for p in prompts], np.int32)
        longest = int(self.lengths.max())
        self.size = min(chunk or bucket(longest), bucket(longest))
        if len(prompts) > 1 and self.size < longest:
            raise ValueError("Prefill: several prompts are prefilled in one chunk")
        if longest > max_len:
            raise ValueError(f"Prefill: a prompt of {longest} tokens exceeds the context of {max_len}")
        B = len(prompts)
        self.cache = runner.zeros_fn(B, max_len)()
        self.mtp_cache = runner.zeros_fn(B, max_len, (FULL,))() if mtp else None
        self.done_tokens, self.last = 0, None
        self.deltas = np.zeros(B, np.int32)
        self.last_positions = np.repeat(self.lengths[:, None] - 1, 3, axis=1).astype(np.int32)   # [B, 3]
        self.mm = self._image_inputs(images) if images and any(images) else None

    def _image_inputs(self, images):
        """-> (positions [B, 3, L], image rows [B, L, H] on the devices, is_image [B, L]) over the whole
        prompts plus one chunk of slack (L = longest + size + 1); sets deltas and last_positions."""
        r, B = self.runner, len(self.prompts)
        L = int(self.lengths.max()) + self.size + 1
        positions = np.zeros((B, 3, L), np.int32)
        is_image = np.zeros((B, L), bool)
        pad, m = r.config.special_tokens["image_token_id"], r.config.vision.spatial_merge_size
        at = []                                                           # (prompt, position) of each image row
        for b, (ids, ims) in enumerate(zip(self.prompts, images)):
            n = len(ids)
            pos, self.deltas[b] = mrope_positions(ids, pad, [im.grid for im in ims or ()], m)
            positions[b, :, :n] = pos
            self.last_positions[b] = pos[:, -1]
            if ims:
                where = np.flatnonzero(np.asarray(ids) == pad)
                is_image[b, where] = True
                at += [(b, t) for t in where]
        rows = r.encode_images([im for ims in images if ims for im in ims])               # [M, H]
        bi, ti = (jnp.asarray(np.array(x, np.int32)) for x in zip(*at))
        full = jnp.zeros((B, L, r.cfg.hidden_size), rows.dtype).at[bi, ti].set(rows)
        return positions, full, is_image

    def advance(self) -> bool:
        """Run the next chunk; True when the prompts are fully prefilled."""
        r, lo = self.runner, self.done_tokens
        B = len(self.prompts)
        n = np.clip(self.lengths - lo, 0, self.size).astype(np.int32)     # real tokens of each row here
        tokens = np.zeros((B, bucket(int(n.max()))), np.int32)
        following = np.full(B, -1, np.int32)
        for b, p in enumerate(self.prompts):
            tokens[b, :n[b]] = p[lo:lo + n[b]]
            if lo + n[b] < len(p):
                following[b] = p[lo + n[b]]
        T = tokens.shape[1]
        f = r.chunk_fn(B, T, self.max_len, self.mtp, self.all_logits, images=self.mm is not None)
        extra = ()
        if self.mm is not None:                                          # this chunk's slice, and the next token's row
            positions, rows, is_image = self.mm
            following_row = np.minimum(lo + n, self.lengths)              # index lengths[b] in the T + 1 rows
            take = np.minimum(lo + np.arange(T + 1)[None, :], following_row[:, None])     # [B, T + 1]
            img = np.take_along_axis(is_image, take, axis=1)
            img[np.arange(T + 1)[None, :] > n[:, None]] = False
            sel = jnp.asarray(take.astype(np.int32))
            extra = ((jnp.asarray(positions[:, :, lo:lo + T]), jnp.take_along_axis(rows, sel[:, :, None], axis=1),
                      jnp.asarray(img)),)
        self.last = f(r.params, self.cache, self.mtp_cache, jnp.asarray(tokens), jnp.asarray(following),
                      jnp.full(B, lo, jnp.int32), jnp.asarray(n), r.rope(self.max_len), *extra)
        self.cache, self.mtp_cache = self.last.cache, self.last.mtp_cache
        if self.all_logits:                                              # [B, T, V]: keep the real rows
            self.prompt_logits.append(np.asarray(self.last.logits)[:, :int(n.max())])
            self.last = self.last._replace(logits=self.last.logits[jnp.arange(B), jnp.asarray(np.maximum(n, 1) - 1)])
        self.done_tokens += self.size
        return self.done_tokens >= int(self.lengths.max())

    def finish(self, sampling: Sampling | list[Sampling], K: int = 0) -> tuple[DecodeState, StepOut]:
        """The first token of each prompt (its own seed and settings; K: speculative drafts to start
        with) -> (DecodeState, StepOut)."""
        r, B = self.runner, len(self.prompts)
        samplings = sampling if isinstance(sampling, list) else [sampling] * B
        keys = jnp.asarray(np.stack([seed_key(s.seed) for s in samplings]))
        slot = SlotSampling(jnp.asarray([s.temperature for s in samplings], jnp.float32),
                            jnp.asarray([s.top_p for s in samplings], jnp.float32),
                            jnp.asarray([s.top_k for s in samplings], jnp.int32))
        f = r.first_fn(B, self.max_len, self.mtp, K)
        c = self.last
        return f(r.params, c.cache, c.mtp_cache, c.logits, c.hidden, jnp.asarray(self.lengths), keys, slot,
                 r.rope(self.max_len), jnp.asarray(self.deltas), jnp.asarray(self.last_positions))


def _ask(on_step, results, done) -> None:
    """on_step(results, done) may end further sequences (a bool array [B])."""
    if on_step:
        more = on_step(results, done)
        done |= False if more is None else np.asarray(more, bool)


def _placed(a, mesh):
    """The sharding of a parameter placed on mesh; ValueError for one that is not."""
    sharding = getattr(a, "sharding", None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh != mesh:
        raise ValueError("Runner: the parameters must be placed on the runner's mesh (jaxrun.load.load or "
                         "jaxrun.load.place)")
    return sharding


def first_slots(fn, n: int | None):
    """A step fn(params, state, rope) -> (state, out) run on the first n slots of the state only: every
    state leaf is batch-first; the other slots keep their state, out has n rows. (A server with few
    busy slots, kept at the low indices, then pays for those alone.)"""
    if not n:
        return fn

    def run(params, state: DecodeState, rope):
        part, out = fn(params, jax.tree.map(lambda a: a[:n], state), rope)
        return jax.tree.map(lambda whole, p: whole.at[:n].set(p), state, part), out
    return run


def _step_keys(keys, steps):
    """Each slot's key for its next choice: fold_in(its key, its step count) [B, 2]."""
    return jax.vmap(jax.random.fold_in)(keys, steps)

