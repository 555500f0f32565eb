"""Compiled prefill, decode and speculative steps over a mesh (sampling compiled into them), and the
generation loop, which queues each step before the host reads the previous one's tokens.

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
from jaxrun.sampling import Sampling, sample, speculative_choice
from jaxrun.sharding import param_specs, routed_experts, shardings
from ref.config import FULL

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
ACTIVATIONS = ("w4a16", "w4a4")
ACT_SCALES = ("per-expert", "max")
MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


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
        self._sampling: dict = {}
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
        """The compiled fn for key; args: a function giving the argument specs (built only to compile)."""
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = jax.jit(fn, **jit_kw).lower(*args()).compile()
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

        args = lambda: (self.params, self._spec((B, T), jnp.int32), self._spec((B,), jnp.int32), self.rope(max_len))
        return self._compile(("prefill", B, T, max_len, all_logits, with_hidden, self.exact), fn, args,
                             in_shardings=(self.param_shardings, self.rep, self.rep, self.rep),
                             out_shardings=(self.rep,) * (3 if with_hidden else 2))

    def decode_fn(self, B: int, max_len: int, mtp: bool = False):
        """One decode step with its sampling (and with mtp the MTP head's draft of the token after),
        compiled as one function: (params, cache, mtp_cache, tokens [B], pos [B], rope, key, step,
        temperature, top_p, top_k) -> {"tokens": [B, 1] the sampled tokens, "logits" [B, V], "next",
        "pos" (+1, capped), "cache"[, "draft" [B, V], "draft_ids", "mtp_cache"]}."""
        def fn(params, cache, mtp_cache, tokens, pos, rope, key, step, temperature, top_p, top_k):
            self.traces["decode"] += 1
            logits, cache, *hidden = model.decode(params, cache, tokens, pos, rope, cfg=self.cfg, dt=self.dt,
                                                  routed=self._routed(), with_hidden=mtp)
            nxt = sample(logits, jax.random.fold_in(key, step), temperature, top_p, top_k)
            out = {"tokens": nxt[:, None], "logits": logits, "next": nxt, "pos": jnp.minimum(pos + 1, max_len - 1),
                   "cache": cache}
            if mtp:
                out["draft"], out["mtp_cache"] = model.mtp_decode(params, mtp_cache, nxt, hidden[0], pos, rope,
                                                                  cfg=self.cfg, dt=self.dt, routed=self._routed())
                out["draft_ids"] = jnp.argmax(out["draft"], axis=-1).astype(jnp.int32)
            return out

        def args():
            vec = self._spec((B,), jnp.int32)
            return (self.params, self._cache_spec(B, max_len), self._cache_spec(B, max_len, (FULL,)) if mtp else None,
                    vec, vec, self.rope(max_len), jax.random.PRNGKey(0), self._spec((), jnp.int32),
                    self._spec((B,), jnp.float32), self._spec((B,), jnp.float32), vec)

        return self._compile(("decode", B, max_len, mtp, self.exact), fn, args,
                             in_shardings=(self.param_shardings,) + (self.rep,) * 10, out_shardings=self.rep,
                             donate_argnums=(1, 2))

    def mtp_prefill_fn(self, B: int, T: int, max_len: int, drafts: int = 0):
        """model.mtp_prefill -> (draft logits [B, V], MTP cache), with drafts > 0 also that many chained
        greedy drafts [B, drafts] (model.mtp_chain) for the first speculative step."""
        def fn(params, next_tokens, hidden, lengths, rope):
            self.traces["mtp_prefill"] += 1
            kw = dict(cfg=self.cfg, dt=self.dt, routed=self._routed())
            logits, cache, h = model.mtp_prefill(params, next_tokens, hidden, lengths, rope, max_len=max_len, **kw)
            if not drafts:
                return logits, cache
            first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            chain, cache = model.mtp_chain(params, cache, first, h, lengths - 1, rope, count=drafts, **kw)
            return logits, cache, chain

        H = self.cfg.hidden_size
        args = lambda: (self.params, self._spec((B, T), jnp.int32), self._spec((B, T, H), self.dt),
                        self._spec((B,), jnp.int32), self.rope(max_len))
        return self._compile(("mtp_prefill", B, T, max_len, drafts, self.exact), fn, args,
                             in_shardings=(self.param_shardings,) + (self.rep,) * 4, out_shardings=self.rep)

    def verify_fn(self, B: int, max_len: int, K: int):
        """One speculative step with K drafts (model.verify with sampling.speculative_choice), compiled
        with its bookkeeping: (params, cache, mtp_cache, tokens [B], drafts [B, K], pos [B], rope, key,
        step, temperature, top_p, top_k) -> {"tokens": [B, K+1] the chosen tokens, "logits" [B, K+1, V],
        "count" [B] (1 + drafts accepted: the tokens kept), "next" (the last kept token), "pos" (+count,
        capped), "drafts" [B, K] (the next ones), "cache", "mtp_cache"}."""
        def fn(params, cache, mtp_cache, tokens, drafts, pos, rope, key, step, temperature, top_p, top_k):
            self.traces["verify"] += 1
            choose = lambda logits, drafts: speculative_choice(logits, drafts, jax.random.fold_in(key, step),
                                                               temperature, top_p, top_k)
            logits, chosen, n, cache, mtp_cache, nxt = model.verify(
                params, cache, mtp_cache, tokens, drafts, pos, rope, cfg=self.cfg, dt=self.dt, routed=self._routed(),
                choose=choose)
            return {"tokens": chosen, "logits": logits, "count": n + 1, "next": chosen[jnp.arange(B), n],
                    "pos": jnp.minimum(pos + n + 1, max_len - 1), "cache": cache, "mtp_cache": mtp_cache,
                    "drafts": nxt}

        def args():
            vec = self._spec((B,), jnp.int32)
            return (self.params, self._cache_spec(B, max_len), self._cache_spec(B, max_len, (FULL,)), vec,
                    self._spec((B, K), jnp.int32), vec, self.rope(max_len), jax.random.PRNGKey(0),
                    self._spec((), jnp.int32), self._spec((B,), jnp.float32), self._spec((B,), jnp.float32), vec)

        return self._compile(("verify", B, max_len, K, self.exact), fn, args,
                             in_shardings=(self.param_shardings,) + (self.rep,) * 11, out_shardings=self.rep,
                             donate_argnums=(1, 2))

    def _cache_spec(self, B: int, max_len: int, kinds=None):
        shapes = model.cache_shapes(self.cfg, B, max_len, self.dt, kinds)
        return jax.tree.map(lambda a: self._spec(a.shape, a.dtype), shapes)

    def sample_fn(self, B: int):
        V = self.cfg.vocab_size
        args = lambda: (self._spec((B, V), jnp.float32), jax.random.PRNGKey(0), self._spec((B,), jnp.float32),
                        self._spec((B,), jnp.float32), self._spec((B,), jnp.int32))
        return self._compile(("sample", B), sample, args)

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, max_len: int, all_logits: bool = False,
                with_hidden: bool = False):
        """tokens [B, T] int32 (T a bucket, <= max_len), lengths [B] -> (logits, cache[, final hidden])
        on device."""
        B, T = tokens.shape
        f = self.prefill_fn(B, T, max_len, all_logits, with_hidden)
        return f(self.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), self.rope(max_len))

    def decode(self, state: dict, max_len: int, key, step: int, s: Sampling) -> dict:
        """One decode_fn step from state {"cache", "next", "pos"[, "mtp_cache"]} (device arrays; the
        caches are donated): tokens sampled with fold_in(key, step)."""
        mtp = "mtp_cache" in state
        f = self.decode_fn(len(state["pos"]), max_len, mtp)
        return f(self.params, state["cache"], state.get("mtp_cache"), state["next"], state["pos"], self.rope(max_len),
                 key, np.int32(step), *self._sampling_arrays(len(state["pos"]), s))

    def mtp_prefill(self, next_tokens: np.ndarray, hidden, lengths: np.ndarray, max_len: int, drafts: int = 0):
        """mtp_prefill_fn's outputs, on device."""
        B, T = next_tokens.shape
        return self.mtp_prefill_fn(B, T, max_len, drafts)(self.params, jnp.asarray(next_tokens, jnp.int32), hidden,
                                                          jnp.asarray(lengths, jnp.int32), self.rope(max_len))

    def verify(self, state: dict, max_len: int, key, step: int, s: Sampling) -> dict:
        """One verify_fn step from state {"cache", "mtp_cache", "next", "drafts" [B, K], "pos"} (the
        caches are donated), its random choices from fold_in(key, step)."""
        drafts = jnp.asarray(state["drafts"], jnp.int32)
        B, K = drafts.shape
        return self.verify_fn(B, max_len, K)(
            self.params, state["cache"], state["mtp_cache"], jnp.asarray(state["next"], jnp.int32), drafts,
            state["pos"], self.rope(max_len), key, np.int32(step), *self._sampling_arrays(B, s))

    def _sampling_arrays(self, B: int, s: Sampling):
        key = (B, s.temperature, s.top_p, s.top_k)
        if key not in self._sampling:
            self._sampling[key] = (jnp.full((B,), s.temperature, jnp.float32), jnp.full((B,), s.top_p, jnp.float32),
                                    jnp.full((B,), s.top_k, jnp.int32))
        return self._sampling[key]

    def sample(self, logits, key, s: Sampling):
        return self.sample_fn(logits.shape[0])(logits, key, *self._sampling_arrays(logits.shape[0], s))

    # -- generation --------------------------------------------------------------------------------
    @staticmethod
    def positions_needed(prompts, max_new_tokens: int, speculative: int = 0) -> int:
        """Cache positions a generation writes: the longest prompt, the new tokens, and with K drafts
        2K more (a speculative step writes its drafts, then the MTP head's chain, past its last token)."""
        return max(len(p) for p in prompts) + max_new_tokens + 2 * int(speculative)

    def context_for(self, prompts, max_new_tokens: int, speculative: int = 0) -> int:
        """The cache length generate uses by default: positions_needed, rounded up to a multiple of 256."""
        return bucket(max(bucket(max(len(p) for p in prompts)), self.positions_needed(prompts, max_new_tokens,
                                                                                       speculative)), 256)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids=(), max_context: int | None = None, keep_logits: bool = False, on_step=None,
                 mtp: bool = False, speculative: int = 0) -> list[Result]:
        """Prefill all prompts together, then decode them together until each has max_new_tokens or
        produced a stop id (kept as its last token). on_step(results, done [B]) runs after each step and
        may return a bool array [B] of further sequences to stop (e.g. on stop text). mtp: run the MTP
        head beside the model, recording its greedy draft of each next token (Result.mtp_draft_ids).
        speculative K (True = 1): each step runs the last token and K greedy drafts of the tokens after
        it (the MTP head, chained) through the model together (model.verify) and keeps a prefix of the
        drafts by sampling.speculative_choice, so a step emits 1 .. K+1 tokens, distributed as plain
        sampling's (greedy: the same tokens, drafts kept while the model agrees). Each step is queued
        on the device before the host reads the previous step's tokens, so the host's bookkeeping
        overlaps the device's work; a step queued when every sequence has ended is dropped."""
        K = int(speculative)
        mtp = mtp or K > 0
        if mtp and "mtp" not in self.params:
            raise ValueError("--mtp: the checkpoint has no MTP head (mtp.fc.weight)")
        B = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        T = bucket(int(lengths.max()))
        S = max(max_context or self.context_for(prompts, max_new_tokens, K), T)
        needed = self.positions_needed(prompts, max_new_tokens, K)
        if needed > S:
            raise ValueError(f"{needed} cache positions needed (prompt, new tokens, 2 per draft) exceed the context "
                             f"of {S}")
        tokens = np.zeros((B, T), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        results = [Result(list(map(int, p))) for p in prompts]
        if max_new_tokens <= 0:
            return results
        key = jax.random.PRNGKey(sampling.seed)
        self.prefill_fn(B, T, S, with_hidden=mtp)                          # compile everything before timing
        self.sample_fn(B)
        if K:
            self.verify_fn(B, S, K)
        else:
            self.decode_fn(B, S, mtp)
        if mtp:
            self.mtp_prefill_fn(B, T, S, K)
        t0, c0 = time.perf_counter(), time.process_time()
        logits, cache, *hidden = self.prefill(tokens, lengths, S, with_hidden=mtp)
        tok = self.sample(logits, jax.random.fold_in(key, 0), sampling)
        state = {"cache": cache, "next": tok, "pos": jnp.asarray(lengths)}
        first = {"tokens": tok[:, None], "logits": logits}
        if mtp:                                        # row t: token t + 1 (the sampled one after the prompt)
            following = np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
            following[np.arange(B), lengths - 1] = np.asarray(tok)
            first["draft"], state["mtp_cache"], *chain = self.mtp_prefill(following, hidden[0], lengths, S, K)
            if K:
                state["drafts"] = chain[0]
            else:
                state["draft_ids"] = first["draft_ids"] = jnp.argmax(first["draft"], axis=-1).astype(jnp.int32)
        drafts = mtp and not K                                             # recorded per token
        wanted = ("tokens", "count") + ("logits",) * keep_logits + ("draft_ids",) * drafts \
            + ("draft",) * (drafts and keep_logits)
        to_host = lambda out: {k: np.asarray(out[k]) for k in wanted if k in out}
        emitted = to_host(first)
        self.timings.prefill_s += time.perf_counter() - t0
        self.timings.prefill_cpu_s += time.process_time() - c0
        self.timings.prefill_tokens += int(lengths.sum())
        advance = self.verify if K else self.decode
        done = np.zeros(B, bool)
        t0, c0 = time.perf_counter(), time.process_time()
        for step in range(1, max_new_tokens + 1):
            # the next step is queued before this one's tokens are read
            out = advance(state, S, key, step, sampling) if step < max_new_tokens else None
            if out is not None:
                state = {k: out[k] for k in ("cache", "mtp_cache", "next", "pos", "draft_ids", "drafts") if k in out}
            new = self._emit(results, done, emitted, stop_ids, max_new_tokens)
            if step > 1:
                self.timings.decode_tokens += new
            if on_step:
                more = on_step(results, done)
                done |= False if more is None else np.asarray(more, bool)
            if done.all() or out is None:
                break
            emitted = to_host(out)
            if K:
                for b in np.flatnonzero(~done):
                    results[b].record_step(int(emitted["count"][b]) - 1, K)
        self.timings.decode_s += time.perf_counter() - t0
        self.timings.decode_cpu_s += time.process_time() - c0
        return results

    @staticmethod
    def _emit(results, done, emitted, stop_ids, max_new_tokens: int) -> int:
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
