"""Compiled prefill / decode / sampling over a mesh, and the generation loop.

Shape buckets: prompts are right-padded to a power of two (at least 16) and the batch is the number
of prompts, so one `generate` call compiles prefill once per bucket and decode once; compiled
functions are kept per shape and reused across calls. `traces` counts how often each function was
traced (= compiled).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrun import model, moe
from jaxrun.sharding import param_specs, routed_experts, shardings
from ref.config import FULL

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
ACTIVATIONS = ("w4a16", "w4a4")
ACT_SCALES = ("per-expert", "max")
MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # per generated token, when kept
    mtp_draft_ids: list[int] = field(default_factory=list)  # with mtp: entry i is the MTP head's guess of token i + 1
    mtp_logits: list[np.ndarray] = field(default_factory=list)  # its logits, when kept
    drafts_proposed: int = 0  # speculative: steps that tried an MTP draft
    drafts_accepted: int = 0  # ... and the drafts the model agreed with (each saved a step)

    def mtp_accepted(self) -> tuple[int, int]:
        """(drafts equal to the token that followed, drafts that had a following token)."""
        pairs = list(zip(self.mtp_draft_ids, self.token_ids[1:]))
        return sum(d == t for d, t in pairs), len(pairs)


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


def _sample(logits, key, temperature, top_p, top_k):
    """logits [B, V] f32 -> tokens [B]: argmax (lowest id on ties) where temperature == 0, else
    sampling from the top-k / top-p filtered softmax(logits / temperature). An all-greedy batch skips
    the sort."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        order = jnp.argsort(-logits, axis=-1, stable=True)
        scaled = jnp.take_along_axis(logits, order, -1) / jnp.maximum(temperature, 1e-6)[:, None]
        rank = jnp.arange(logits.shape[-1])[None]
        scaled = jnp.where((top_k[:, None] > 0) & (rank >= top_k[:, None]), -jnp.inf, scaled)
        probs = jax.nn.softmax(scaled, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) | (rank == 0)
        pick = jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1)
        sampled = jnp.take_along_axis(order, pick[:, None], -1)[:, 0]
        return jnp.where(temperature == 0, greedy, sampled).astype(jnp.int32)

    return jax.lax.cond(jnp.all(temperature == 0), lambda: greedy, sample)


class Runner:
    """Parameters placed on a mesh plus their compiled functions."""

    def __init__(self, params, cfg, mesh, precision: str = "f32", dense: str = "replicated",
                 activations: str = "w4a16", act_scale: str = "per-expert"):
        """activations "w4a4": routed-expert GEMM inputs quantized as the engines do, with each
        expert's input scales or (act_scale "max") the layer's largest; the checkpoint needs them."""
        if activations not in ACTIVATIONS or act_scale not in ACT_SCALES:
            raise ValueError(f"activations {activations!r} / act_scale {act_scale!r}: expected one of "
                             f"{list(ACTIVATIONS)} / {list(ACT_SCALES)}")
        if activations == "w4a4" and not all("in_s" in layer["mlp"]["experts"] for layer in params["layers"]):
            raise ValueError("--activations w4a4: the checkpoint's routed experts are not NVFP4 with input scales")
        self.cfg, self.mesh, self.precision, self.dense = cfg, mesh, precision, dense
        self.activations, self.act_scale = activations, act_scale
        self.dt = DTYPES[precision]
        self.specs = param_specs(params, mesh.size, dense)
        self.param_shardings = shardings(self.specs, mesh)
        self.params = jax.device_put(params, self.param_shardings)
        self.exact = moe.exact_decode_needed(params)
        self.rep = NamedSharding(mesh, P())
        self.traces: Counter = Counter()
        self._compiled: dict = {}
        self._ropes: dict = {}
        self.timings = Timings()

    def set_params(self, params) -> None:
        """Swap in other parameters of the same structure and shapes (compiled functions are kept; a
        second set is compiled if only one of the two needs exact NVFP4 decoding)."""
        if jax.tree.structure(params) != jax.tree.structure(self.params):
            raise ValueError("set_params: parameter tree differs from the compiled one")
        self.params = jax.device_put(params, self.param_shardings)
        self.exact = moe.exact_decode_needed(params)

    # -- compiled functions (compiled ahead of time from shapes, so timings never include compiling) --
    def _compile(self, key, fn, args, **jit_kw):
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = jax.jit(fn, **jit_kw).lower(*args).compile()
            self.timings.compile_s += time.perf_counter() - t0
        return self._compiled[key]

    def _routed(self):
        return routed_experts(self.mesh, self.dt, self.exact, self.activations, self.act_scale)

    def _spec(self, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.rep)

    def rope(self, max_len: int):
        if max_len not in self._ropes:
            self._ropes[max_len] = jax.device_put(model.rope_table(self.cfg, max_len, self.dt), self.rep)
        return self._ropes[max_len]

    def prefill_fn(self, B: int, T: int, max_len: int, all_logits: bool = False, with_hidden: bool = False):
        def fn(params, tokens, lengths, rope):
            self.traces["prefill"] += 1
            return model.prefill(params, tokens, lengths, rope, cfg=self.cfg, dt=self.dt, routed=self._routed(),
                                 max_len=max_len, all_logits=all_logits, with_hidden=with_hidden)

        args = (self.params, self._spec((B, T), jnp.int32), self._spec((B,), jnp.int32), self.rope(max_len))
        return self._compile(("prefill", B, T, max_len, all_logits, with_hidden, self.exact), fn, args,
                             in_shardings=(self.param_shardings, self.rep, self.rep, self.rep),
                             out_shardings=(self.rep,) * (3 if with_hidden else 2))

    def decode_fn(self, B: int, max_len: int, with_hidden: bool = False):
        def fn(params, cache, tokens, pos, rope):
            self.traces["decode"] += 1
            return model.decode(params, cache, tokens, pos, rope, cfg=self.cfg, dt=self.dt, routed=self._routed(),
                                with_hidden=with_hidden)

        cache = self._cache_spec(model.cache_shapes(self.cfg, B, max_len, self.dt))
        args = (self.params, cache, self._spec((B,), jnp.int32), self._spec((B,), jnp.int32), self.rope(max_len))
        return self._compile(("decode", B, max_len, with_hidden, self.exact), fn, args,
                             in_shardings=(self.param_shardings, self.rep, self.rep, self.rep, self.rep),
                             out_shardings=(self.rep,) * (3 if with_hidden else 2), donate_argnums=(1,))

    def mtp_prefill_fn(self, B: int, T: int, max_len: int):
        def fn(params, next_tokens, hidden, lengths, rope):
            self.traces["mtp_prefill"] += 1
            return model.mtp_prefill(params, next_tokens, hidden, lengths, rope, cfg=self.cfg, dt=self.dt,
                                     routed=self._routed(), max_len=max_len)

        H = self.cfg.hidden_size
        args = (self.params, self._spec((B, T), jnp.int32), self._spec((B, T, H), self.dt), self._spec((B,), jnp.int32),
                self.rope(max_len))
        return self._compile(("mtp_prefill", B, T, max_len, self.exact), fn, args,
                             in_shardings=(self.param_shardings,) + (self.rep,) * 4, out_shardings=(self.rep, self.rep))

    def mtp_decode_fn(self, B: int, max_len: int):
        def fn(params, cache, next_tokens, hidden, pos, rope):
            self.traces["mtp_decode"] += 1
            return model.mtp_decode(params, cache, next_tokens, hidden, pos, rope, cfg=self.cfg, dt=self.dt,
                                    routed=self._routed())

        cache = self._cache_spec(model.cache_shapes(self.cfg, B, max_len, self.dt, kinds=(FULL,)))
        args = (self.params, cache, self._spec((B,), jnp.int32), self._spec((B, self.cfg.hidden_size), self.dt),
                self._spec((B,), jnp.int32), self.rope(max_len))
        return self._compile(("mtp_decode", B, max_len, self.exact), fn, args,
                             in_shardings=(self.param_shardings,) + (self.rep,) * 5, out_shardings=(self.rep, self.rep),
                             donate_argnums=(1,))

    def verify_fn(self, B: int, max_len: int):
        def fn(params, cache, mtp_cache, tokens, drafts, pos, rope):
            self.traces["verify"] += 1
            return model.verify(params, cache, mtp_cache, tokens, drafts, pos, rope, cfg=self.cfg, dt=self.dt,
                                routed=self._routed())

        cache = self._cache_spec(model.cache_shapes(self.cfg, B, max_len, self.dt))
        mtp_cache = self._cache_spec(model.cache_shapes(self.cfg, B, max_len, self.dt, kinds=(FULL,)))
        vec = self._spec((B,), jnp.int32)
        args = (self.params, cache, mtp_cache, vec, vec, vec, self.rope(max_len))
        return self._compile(("verify", B, max_len, self.exact), fn, args,
                             in_shardings=(self.param_shardings,) + (self.rep,) * 6, out_shardings=(self.rep,) * 6,
                             donate_argnums=(1, 2))

    def _cache_spec(self, shapes):
        return jax.tree.map(lambda a: self._spec(a.shape, a.dtype), shapes)

    def sample_fn(self, B: int):
        V = self.cfg.vocab_size
        args = (self._spec((B, V), jnp.float32), jax.random.PRNGKey(0), self._spec((B,), jnp.float32),
                self._spec((B,), jnp.float32), self._spec((B,), jnp.int32))
        return self._compile(("sample", B), _sample, args)

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, max_len: int, all_logits: bool = False,
                with_hidden: bool = False):
        """tokens [B, T] int32 (T a bucket, <= max_len), lengths [B] -> (logits, cache[, final hidden])
        on device."""
        B, T = tokens.shape
        f = self.prefill_fn(B, T, max_len, all_logits, with_hidden)
        return f(self.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), self.rope(max_len))

    def decode(self, cache, tokens, pos, max_len: int, with_hidden: bool = False):
        """tokens [B], pos [B] (device or host) -> (logits [B, V], cache[, final hidden [B, H]]); the
        cache is donated."""
        f = self.decode_fn(len(pos), max_len, with_hidden)
        return f(self.params, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray(pos, jnp.int32), self.rope(max_len))

    def mtp_prefill(self, next_tokens: np.ndarray, hidden, lengths: np.ndarray, max_len: int):
        """model.mtp_prefill: (draft logits [B, V], MTP cache) on device."""
        B, T = next_tokens.shape
        return self.mtp_prefill_fn(B, T, max_len)(self.params, jnp.asarray(next_tokens, jnp.int32), hidden,
                                                  jnp.asarray(lengths, jnp.int32), self.rope(max_len))

    def mtp_decode(self, cache, next_tokens, hidden, pos, max_len: int):
        """model.mtp_decode: (draft logits [B, V], MTP cache); the cache is donated."""
        return self.mtp_decode_fn(len(pos), max_len)(self.params, cache, jnp.asarray(next_tokens, jnp.int32), hidden,
                                                     jnp.asarray(pos, jnp.int32), self.rope(max_len))

    def verify(self, cache, mtp_cache, tokens, drafts, pos, max_len: int):
        """model.verify (the caches are donated)."""
        return self.verify_fn(len(pos), max_len)(self.params, cache, mtp_cache, jnp.asarray(tokens, jnp.int32),
                                                 jnp.asarray(drafts, jnp.int32), jnp.asarray(pos, jnp.int32),
                                                 self.rope(max_len))

    def sample(self, logits, key, s: Sampling):
        B = logits.shape[0]
        return self.sample_fn(B)(logits, key, jnp.full((B,), s.temperature, jnp.float32),
                                 jnp.full((B,), s.top_p, jnp.float32), jnp.full((B,), s.top_k, jnp.int32))

    # -- generation --------------------------------------------------------------------------------
    def context_for(self, prompts, max_new_tokens: int) -> int:
        longest = max(len(p) for p in prompts)
        return bucket(max(bucket(longest), longest + max_new_tokens), 256)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids=(), max_context: int | None = None, keep_logits: bool = False, on_step=None,
                 mtp: bool = False, speculative: bool = False) -> list[Result]:
        """Prefill all prompts together, then decode them together until each has max_new_tokens or
        produced a stop id (kept as its last token). on_step(results, done [B]) runs after each step and
        may return a bool array [B] of further sequences to stop (e.g. on stop text). mtp: run the MTP
        head beside the model, recording its greedy draft of each next token (Result.mtp_draft_ids).
        speculative (greedy only): each step runs the last token and the MTP head's draft of the next
        one through the model together (model.verify) and keeps the draft when the model agrees, so a
        step emits one or two tokens; the tokens are those of plain greedy decoding."""
        mtp = mtp or speculative
        if mtp and "mtp" not in self.params:
            raise ValueError("--mtp: the checkpoint has no MTP head (mtp.fc.weight)")
        if speculative and sampling.temperature != 0:
            raise ValueError("--speculative: greedy decoding only (--temperature 0)")
        B = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        T = bucket(int(lengths.max()))
        S = max(max_context or self.context_for(prompts, max_new_tokens), T)
        tokens = np.zeros((B, T), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        results = [Result(list(map(int, p))) for p in prompts]
        if max_new_tokens <= 0:
            return results
        key = jax.random.PRNGKey(sampling.seed)
        self.prefill_fn(B, T, S, with_hidden=mtp)                          # compile everything before timing
        self.sample_fn(B)
        if speculative:
            self.verify_fn(B, S)
        else:
            self.decode_fn(B, S, mtp)
        if mtp:
            self.mtp_prefill_fn(B, T, S)
        if mtp and not speculative:
            self.mtp_decode_fn(B, S)
        t0, c0 = time.perf_counter(), time.process_time()
        logits, cache, *hidden = self.prefill(tokens, lengths, S, with_hidden=mtp)
        tok = self.sample(logits, jax.random.fold_in(key, 0), sampling)
        host = np.asarray(tok)
        if mtp:                                        # row t: token t + 1 (the sampled one after the prompt)
            following = np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
            following[np.arange(B), lengths - 1] = host
            draft, mtp_cache = self.mtp_prefill(following, hidden[0], lengths, S)
        self.timings.prefill_s += time.perf_counter() - t0
        self.timings.prefill_cpu_s += time.process_time() - c0
        self.timings.prefill_tokens += int(lengths.sum())
        done = np.zeros(B, bool)
        pos = lengths.copy()
        stop = set(stop_ids)
        emitted, emitted_logits = host[:, None], logits      # [B, n] tokens of this step; logits [B, V] or [B, n, V]
        count = np.ones(B, int)                                            # how many of them each sequence keeps
        t0, c0 = time.perf_counter(), time.process_time()
        for step in range(max_new_tokens):
            for b in np.flatnonzero(~done):
                for i in range(count[b]):
                    results[b].token_ids.append(int(emitted[b, i]))
                    if keep_logits:
                        results[b].logits.append(np.asarray(emitted_logits[b]).reshape(emitted.shape[1], -1)[i])
                    if mtp and not speculative:
                        results[b].mtp_draft_ids.append(int(np.argmax(np.asarray(draft[b]))))
                        if keep_logits:
                            results[b].mtp_logits.append(np.asarray(draft[b]))
                    done[b] |= int(emitted[b, i]) in stop or len(results[b].token_ids) >= max_new_tokens
                    if done[b]:
                        break
            if on_step:
                more = on_step(results, done)
                done |= False if more is None else np.asarray(more, bool)
            if done.all():
                break
            if speculative:
                emitted_logits, g, accepted, cache, mtp_cache, draft = self.verify(
                    cache, mtp_cache, tok, jnp.argmax(draft, axis=-1).astype(jnp.int32), pos, S)
                emitted, accepted = np.asarray(g), np.asarray(accepted)
                count = 1 + accepted.astype(int)
                for b in np.flatnonzero(~done):
                    results[b].drafts_accepted += int(accepted[b])
                    results[b].drafts_proposed += 1
                tok = np.where(accepted, emitted[:, 1], emitted[:, 0]).astype(np.int32)
                pos = pos + count
            else:
                logits, cache, *hidden = self.decode(cache, tok, pos, S, with_hidden=mtp)
                tok = self.sample(logits, jax.random.fold_in(key, step + 1), sampling)
                if mtp:
                    draft, mtp_cache = self.mtp_decode(mtp_cache, tok, hidden[0], pos, S)
                pos = np.minimum(pos + 1, S - 1)
                emitted, emitted_logits = np.asarray(tok)[:, None], logits
            self.timings.decode_tokens += int(count[~done].sum())
        self.timings.decode_s += time.perf_counter() - t0
        self.timings.decode_cpu_s += time.process_time() - c0
        return results
