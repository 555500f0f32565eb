"""Readers for what an engine gives back: OpenAI-compatible JSON, logits arrays, layer dumps, a live server.

Everything is normalised to one per-token view (`EngineLogprobs`): the whole token sequence and, at
each position t >= 1, the engine's log p(token_ids[t] | token_ids[:t]) and its top-k alternatives.

JSON shapes understood (exactly as the servers write them):
- vLLM completions, `prompt_logprobs`: per choice, a list with one entry per prompt token, the first
  null, each a `{"<token_id>": {"logprob", "rank", "decoded_token"}}` dict holding the top-k and the
  prompt token itself; ids from `prompt_token_ids` (request with `return_token_ids: true`).
- vLLM chat: the same `prompt_logprobs` / `prompt_token_ids` at response level.
- Legacy completions `logprobs` (vLLM and SGLang): `tokens`, `token_logprobs`, `top_logprobs`
  (`{token_string: logprob}`), covering prompt + completion with `echo: true` (first entry null).
- Chat `choices[].logprobs.content[]`: `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`.
- SGLang native `/generate`: `meta_info.input_token_logprobs` / `output_token_logprobs` as
  `[logprob, token_id, text]` triples, `input_top_logprobs` / `output_top_logprobs` as lists of them.
Token strings become ids from `token_id:N` (vLLM `return_tokens_as_token_ids`), from the chat `bytes`
field, or through the checkpoint tokenizer's vocabulary (raw piece, then byte-level BPE spelling).

Logits: .npy, .npz or .safetensors [T, V]. Layer dumps: .safetensors or .npz with the names
`ref.run --dump-layers` writes, or an alias (see `DUMP_ALIASES`, `VISION_DUMP_ALIASES`).
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ref.errors import FormatError

TokenLookup = Callable[[str, "list[int] | None"], "int | None"]


@dataclass
class EngineLogprobs:
    """One sequence as an engine scored it.

    token_ids [T]: prompt then generated tokens. logprob[t]: engine log p(token_ids[t] | token_ids[:t])
    or None (always None at t=0). top[t]: the engine's top-k {token_id: logprob} at t, or None.
    n_prompt: prompt length. dropped: top-k entries whose token string matched no vocabulary id;
    reported[t]: entries the engine reported at t before those were dropped (None: len(top[t])).
    k: the engine's top-k size, the fewest entries reported at any position (vLLM adds the scored
    token to its top-k when it falls outside, so some positions hold k + 1); top[t] is cut to k.
    """
    token_ids: list[int]
    logprob: list[float | None]
    top: list[dict[int, float] | None]
    n_prompt: int
    source: str
    dropped: int = 0
    reported: list[int | None] | None = None
    k: int = field(init=False)

    def __post_init__(self):
        t = len(self.token_ids)
        if len(self.logprob) != t or len(self.top) != t:
            raise FormatError(f"{self.source}: {t} tokens but {len(self.logprob)} logprobs and "
                              f"{len(self.top)} top-k entries")
        self.top = [_top_k(d) if d else None for d in self.top]
        rep = self.reported or [None] * t
        sizes = [n if n is not None else len(d or ()) for n, d in zip(rep, self.top)]
        sizes = [n for n in sizes if n]
        self.k = min(sizes) if sizes and any(self.top) else 0
        self.top = [dict(sorted(d.items(), key=lambda kv: -kv[1])[:self.k]) if d else None
                    for d in self.top]


def _top_k(entries: dict[int, tuple[float, int | None]] | dict[int, float]) -> dict[int, float]:
    """{id: logprob} of the engine's top-k: with ranks, only ids of ranks 1..m with none missing (vLLM
    adds the prompt token with its own rank, which may lie far outside the top-k)."""
    items = {i: (v if isinstance(v, tuple) else (v, None)) for i, v in entries.items()}
    ranks = sorted(r for _, r in items.values() if r is not None)
    if len(ranks) == len(items):
        m = 0
        while m < len(ranks) and ranks[m] == m + 1:
            m += 1
        return {i: lp for i, (lp, r) in items.items() if r <= m}
    return {i: lp for i, (lp, _) in items.items()}


# --------------------------------------------------------------------------- token strings -> ids

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen byte-level BPE alphabet: each byte as the printable character used in vocab.json."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


BYTE_TO_UNICODE = _bytes_to_unicode()
_TOKEN_ID_RE = re.compile(r"^token_id:(\d+)$")
_BYTES_RE = re.compile(r"^bytes:((?:\\x[0-9a-fA-F]{2})+)$")


def vocab_lookup(token_id: Callable[[str], int | None]) -> TokenLookup:
    """Token string (+ optional raw bytes) -> id using a vocabulary `token_id(piece)` function.

    Tries, in order: `token_id:N`, the raw bytes spelled in the byte-level alphabet, the string as a
    vocabulary piece (special tokens, raw pieces such as "Ġhello"), the string's UTF-8 bytes spelled in
    the byte-level alphabet (decoded text such as " hello"), vLLM's `bytes:\\xNN` spelling."""
    def safe(piece: str) -> int | None:
        try:
            i = token_id(piece)
        except (KeyError, ValueError):
            return None
        return None if i is None else int(i)

    def spell(b: bytes) -> str:
        return "".join(BYTE_TO_UNICODE[x] for x in b)

    def lookup(text: str, raw: list[int] | None = None) -> int | None:
        m = _TOKEN_ID_RE.match(text)
        if m:
            return int(m.group(1))
        if raw:
            i = safe(spell(bytes(raw)))
            if i is not None:
                return i
        i = safe(text)
        if i is None:
            i = safe(spell(text.encode("utf-8")))
        m = _BYTES_RE.match(text)
        if i is None and m:
            i = safe(spell(bytes(int(h, 16) for h in m.group(1).split("\\x")[1:])))
        return i
    return lookup


def ids_only_lookup(text: str, raw: list[int] | None = None) -> int | None:
    """Lookup used without a tokenizer: only `token_id:N` strings resolve."""
    m = _TOKEN_ID_RE.match(text)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- JSON readers

def _lp(x: Any, where: str) -> float | None:
    if x is None:
        return None
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise FormatError(f"{where}: expected a number or null, got {type(x).__name__}")


def _resolve(lookup: TokenLookup, text: Any, raw: Any, where: str) -> int:
    if not isinstance(text, str):
        raise FormatError(f"{where}: expected a token string, got {type(text).__name__}")
    i = lookup(text, raw if isinstance(raw, list) else None)
    if i is None:
        raise FormatError(f"{where}: token {text!r} matches no vocabulary id (pass the checkpoint with "
                          f"its tokenizer, or ask the server for token ids: return_tokens_as_token_ids)")
    return i


def _vllm_prompt_logprobs(pl: list, ids: list[int], where: str) -> tuple[list, list]:
    """vLLM `prompt_logprobs` -> (logprob [T], top [T]) for known prompt ids."""
    if len(pl) != len(ids):
        raise FormatError(f"{where}.prompt_logprobs: {len(pl)} entries but {len(ids)} prompt token ids")
    lps, tops = [], []
    for t, (entry, tok) in enumerate(zip(pl, ids)):
        if entry is None:
            lps.append(None)
            tops.append(None)
            continue
        if not isinstance(entry, dict):
            raise FormatError(f"{where}.prompt_logprobs[{t}]: expected an object or null")
        top = {}
        for key, v in entry.items():
            try:
                tid = int(key)
            except ValueError:
                raise FormatError(f"{where}.prompt_logprobs[{t}]: key {key!r} is not a token id") from None
            if isinstance(v, dict):
                top[tid] = (_lp(v.get("logprob"), f"{where}.prompt_logprobs[{t}][{key}].logprob"),
                            v.get("rank"))
            else:
                top[tid] = (_lp(v, f"{where}.prompt_logprobs[{t}][{key}]"), None)
        lps.append(top[tok][0] if tok in top else None)
        tops.append(top)
    return lps, tops


def _legacy_logprobs(lp: dict, lookup: TokenLookup, where: str) -> tuple[list, list, list, int, list]:
    """Legacy completions `logprobs` -> (ids, logprob, top, dropped, reported sizes). ids[t] is None
    where the token string matches no vocabulary id (exact ids from elsewhere must then fill it)."""
    for key in ("tokens", "token_logprobs"):
        if not isinstance(lp.get(key), list):
            raise FormatError(f"{where}.logprobs.{key}: missing or not a list")
    toks, tlps = lp["tokens"], lp["token_logprobs"]
    tops_raw = lp.get("top_logprobs") or [None] * len(toks)
    if not (len(toks) == len(tlps) == len(tops_raw)):
        raise FormatError(f"{where}.logprobs: tokens/token_logprobs/top_logprobs lengths "
                          f"{len(toks)}/{len(tlps)}/{len(tops_raw)} differ")
    ids = [lookup(s, None) if isinstance(s, str) else None for s in toks]  # None: resolved from ids, or an error
    lps = [_lp(x, f"{where}.logprobs.token_logprobs[{t}]") for t, x in enumerate(tlps)]
    tops, dropped, reported = [], 0, [len(d or ()) for d in tops_raw]
    for t, d in enumerate(tops_raw):
        if d is None:
            tops.append(None)
            continue
        if not isinstance(d, dict):
            raise FormatError(f"{where}.logprobs.top_logprobs[{t}]: expected an object or null")
        top = {}
        for s, x in d.items():
            i = lookup(s, None)
            if i is None:
                dropped += 1
            else:
                top[i] = _lp(x, f"{where}.logprobs.top_logprobs[{t}][{s!r}]")
        tops.append(top)
    return ids, lps, tops, dropped, reported


def _chat_content(content: list, lookup: TokenLookup, where: str) -> tuple[list, list, list, int, list]:
    """Chat `logprobs.content` -> (ids, logprob, top, dropped, reported sizes) for the generated tokens."""
    ids, lps, tops, dropped, reported = [], [], [], 0, []
    for t, c in enumerate(content):
        w = f"{where}.logprobs.content[{t}]"
        if not isinstance(c, dict):
            raise FormatError(f"{w}: expected an object")
        ids.append(_resolve(lookup, c.get("token"), c.get("bytes"), w))
        lps.append(_lp(c.get("logprob"), f"{w}.logprob"))
        top = {}
        reported.append(len(c.get("top_logprobs") or ()))
        for j, a in enumerate(c.get("top_logprobs") or []):
            i = lookup(a.get("token", ""), a.get("bytes")) if isinstance(a, dict) else None
            if i is None:
                dropped += 1
            else:
                top[i] = _lp(a.get("logprob"), f"{w}.top_logprobs[{j}].logprob")
        tops.append(top or None)
    return ids, lps, tops, dropped, reported


def _sglang_triples(rows: list, where: str) -> tuple[list, list]:
    """SGLang `[logprob, token_id, text]` triples -> (ids, logprobs)."""
    ids, lps = [], []
    for t, r in enumerate(rows):
        if not isinstance(r, (list, tuple)) or len(r) < 2 or not isinstance(r[1], int):
            raise FormatError(f"{where}[{t}]: expected [logprob, token_id, text]")
        lps.append(_lp(r[0], f"{where}[{t}][0]"))
        ids.append(r[1])
    return ids, lps


def _sglang_tops(rows: list | None, n: int, where: str) -> list:
    if rows is None:
        return [None] * n
    if len(rows) != n:
        raise FormatError(f"{where}: {len(rows)} entries, expected {n}")
    return [None if r is None else dict(zip(*_sglang_triples(r, f"{where}[{t}]"))) for t, r in enumerate(rows)]


def _read_sglang_native(obj: dict, where: str) -> EngineLogprobs:
    mi = obj["meta_info"]
    w = f"{where}.meta_info"
    in_ids, in_lps = _sglang_triples(mi.get("input_token_logprobs") or [], f"{w}.input_token_logprobs")
    out_ids, out_lps = _sglang_triples(mi.get("output_token_logprobs") or [], f"{w}.output_token_logprobs")
    in_tops = _sglang_tops(mi.get("input_top_logprobs"), len(in_ids), f"{w}.input_top_logprobs")
    out_tops = _sglang_tops(mi.get("output_top_logprobs"), len(out_ids), f"{w}.output_top_logprobs")
    if not in_ids:
        raise FormatError(f"{w}.input_token_logprobs: empty (request with return_logprob=true, "
                          f"logprob_start_len=0)")
    return EngineLogprobs(in_ids + out_ids, in_lps + out_lps, in_tops + out_tops, len(in_ids),
                          "sglang /generate input_token_logprobs")


def _need_prompt(prompt_ids: list[int] | None, where: str) -> list[int]:
    if prompt_ids is None:
        raise FormatError(f"{where}: response holds only generated tokens; the prompt token ids are needed "
                          f"(prompt_token_ids in the response, or --token-ids)")
    return prompt_ids


def read_engine_json(obj: Any, lookup: TokenLookup = ids_only_lookup, token_ids: list[int] | None = None,
                     choice: int = 0, where: str = "response") -> EngineLogprobs:
    """Parse one OpenAI-compatible / SGLang response (already json-loaded) into EngineLogprobs.

    token_ids: the prompt ids when known from elsewhere (the request, --token-ids); checked against
    the response's own ids when both exist."""
    if isinstance(obj, list):  # SGLang /generate with a batch of one
        if not obj:
            raise FormatError(f"{where}: empty list")
        obj = obj[choice]
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("meta_info"), dict):
        rec = _read_sglang_native(obj, where)
        return _check_prompt(rec, token_ids, where)
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        raise FormatError(f"{where}: no 'choices' list and no 'meta_info' (not an OpenAI or SGLang response)")
    if choice >= len(choices):
        raise FormatError(f"{where}: choice {choice} requested but the response has {len(choices)}")
    ch = choices[choice]
    w = f"{where}.choices[{choice}]"
    prompt_ids = ch.get("prompt_token_ids") or obj.get("prompt_token_ids")
    if prompt_ids is not None and token_ids is not None and list(prompt_ids) != list(token_ids):
        raise FormatError(f"{w}.prompt_token_ids: {len(prompt_ids)} ids differ from the given token ids "
                          f"({len(token_ids)})")
    prompt_ids = list(prompt_ids) if prompt_ids is not None else (list(token_ids) if token_ids else None)
    pl = ch.get("prompt_logprobs", obj.get("prompt_logprobs"))
    lp = ch.get("logprobs")
    is_chat = isinstance(ch.get("message"), dict) or isinstance(ch.get("delta"), dict)

    gen_ids, gen_lps, gen_tops, gen_rep, dropped = [], [], [], [], 0
    echo = None  # (logprob, top, reported) of the prompt part of echoed legacy logprobs
    if isinstance(lp, dict) and is_chat:
        gen_ids, gen_lps, gen_tops, dropped, gen_rep = _chat_content(lp.get("content") or [], lookup, w)
    elif isinstance(lp, dict):
        ids, lps, tops, dropped, rep = _legacy_logprobs(lp, lookup, w)
        if lps and lps[0] is None and (prompt_ids is None or len(ids) >= len(prompt_ids)):  # echo: true
            n = len(prompt_ids) if prompt_ids is not None else _echo_prompt_len(obj, ch, ids)
            prompt_ids = prompt_ids if prompt_ids is not None else ids[:n]
            echo = (lps[:n], tops[:n], rep[:n])
            ids, lps, tops, rep = ids[n:], lps[n:], tops[n:], rep[n:]
        gen_ids, gen_lps, gen_tops, gen_rep = ids, lps, tops, rep
    if isinstance(ch.get("token_ids"), list) and gen_ids and list(ch["token_ids"]) != gen_ids:
        if len(ch["token_ids"]) != len(gen_ids):
            raise FormatError(f"{w}.token_ids: {len(ch['token_ids'])} ids for {len(gen_ids)} logprobs")
        gen_ids = list(ch["token_ids"])  # exact ids beat ids recovered from strings
    first = (len(prompt_ids) if echo is not None else 0) + gen_ids.index(None) if None in gen_ids else None
    if prompt_ids is not None and None in prompt_ids:
        first = prompt_ids.index(None)
    if first is not None:
        raise FormatError(f"{w}.logprobs.tokens[{first}]: token {lp['tokens'][first]!r} matches no vocabulary id "
                          f"(give the checkpoint's tokenizer, --token-ids, or ask the server for token ids)")
    if isinstance(pl, list):
        prompt_ids = _need_prompt(prompt_ids, f"{w}.prompt_logprobs")
        p_lps, p_tops = _vllm_prompt_logprobs(pl, prompt_ids, w)
        p_rep, source = [None] * len(prompt_ids), "vllm prompt_logprobs"
    elif echo is not None:
        (p_lps, p_tops, p_rep), source = echo, "completions logprobs (echo)"
    elif gen_ids:
        prompt_ids = _need_prompt(prompt_ids, w)
        n = len(prompt_ids)
        p_lps, p_tops, p_rep, source = [None] * n, [None] * n, [None] * n, "no prompt logprobs"
    else:
        raise FormatError(f"{w}: no prompt_logprobs and no logprobs (request with prompt_logprobs=k, "
                          f"or echo=true with logprobs=k)")
    if gen_ids:
        source += " + chat logprobs" if is_chat else " + completion logprobs"
    rec = EngineLogprobs(prompt_ids + gen_ids, p_lps + gen_lps, p_tops + gen_tops, len(prompt_ids), source,
                         dropped, p_rep + gen_rep)
    return _check_prompt(rec, token_ids, w)


def _echo_prompt_len(obj: dict, ch: dict, ids: list[int]) -> int:
    """Echoed legacy logprobs without prompt ids: the prompt length from `usage`, else from the
    completion's `token_ids`, else all of it."""
    n = (obj.get("usage") or {}).get("prompt_tokens")
    if isinstance(n, int) and 0 < n <= len(ids):
        return n
    gen = ch.get("token_ids")
    return len(ids) - len(gen) if isinstance(gen, list) and len(gen) <= len(ids) else len(ids)


def _check_prompt(rec: EngineLogprobs, token_ids: list[int] | None, where: str) -> EngineLogprobs:
    if token_ids is not None and rec.token_ids[:len(token_ids)] != list(token_ids):
        raise FormatError(f"{where}: the response's token ids differ from the given token ids "
                          f"(first {min(8, len(token_ids))}: {rec.token_ids[:8]} vs {list(token_ids)[:8]})")
    return rec


def load_json_file(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not JSON ({e})") from None


# --------------------------------------------------------------------------- arrays

def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from ref.errors import CheckpointError
    from ref.safetensors_io import SafetensorsFile
    try:
        f = SafetensorsFile(path)
        return {name: np.array(f.tensor(name)) for name in f.tensors}
    except (OSError, CheckpointError) as e:
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from None


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Named arrays of a .safetensors or .npz file (a .npy holds one, named by the file's stem)."""
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix in (".npy", ".npz"):
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise FormatError(f"{path}: not a {path.suffix} file ({e})") from None
        if isinstance(z, np.ndarray):
            return {path.stem: z}
        with z:
            return {n: z[n] for n in z.files}
    raise FormatError(f"{path}: expected .safetensors, .npz or .npy, got {path.suffix or 'no suffix'}")


def read_logits(path: str | Path) -> np.ndarray:
    """Engine logits [T, V] (float64) from .npy, .npz or .safetensors (the one array, or the one
    named `logits`). A leading batch dimension of 1 is dropped."""
    path = Path(path)
    d = _load_arrays(path)
    if "logits" in d:
        a = d["logits"]
    elif len(d) == 1:
        a = next(iter(d.values()))
    else:
        raise FormatError(f"{path}: {len(d)} arrays and none named 'logits'")
    a = _squeeze_batch(a, f"{path}")
    if a.ndim != 2:
        raise FormatError(f"{path}: logits must be [T, vocab], got shape {a.shape}")
    return a.astype(np.float64)


def _squeeze_batch(a: np.ndarray, where: str) -> np.ndarray:
    if a.ndim >= 3 and a.shape[0] == 1:
        return a[0]
    return a


# Canonical dump names (what `ref.run --dump-layers` writes) and the aliases accepted for them.
# Layer prefixes `layers.{i}.`, `layer{i}.`, `layer_{i}.`, `model.layers.{i}.`, `model.language_model.layers.{i}.`
# all mean layer i. HF `hidden_states.{k}` (output_hidden_states) means: k=0 embeddings, 1 <= k < L the
# output of layer k-1 (after_moe), k = L the final norm output (HF normalises the last entry).
DUMP_ALIASES: dict[str, tuple[str, ...]] = {
    "embeddings": ("embeddings", "embed", "embed_tokens", "model.embed_tokens", "inputs_embeds"),
    "final_hidden": ("final_hidden", "final_norm", "norm", "model.norm"),
    "logits": ("logits", "lm_head"),
    "after_mixer": ("after_mixer", "after_attn", "resid_mid", "attn_resid"),
    "after_moe": ("after_moe", "after_mlp", "resid", "output", "out", "hidden"),
    "router_logits": ("router_logits", "moe_router_logits", "gate_logits", "mlp.gate"),
    "topk_ids": ("topk_ids", "moe_topk_idx", "topk_idx", "selected_experts", "topk_indices"),
    "topk_weights": ("topk_weights", "moe_topk_weights", "routing_weights", "topk_probs"),
}
# The vision encoder (ref.run --dump-layers with --image): its output rows, blocks and input embeddings,
# also under transformers' module names (model.visual.*, visual.*).
VISION_DUMP_ALIASES: dict[str, tuple[str, ...]] = {
    "vision.merger": ("vision.merger", "visual.merger", "model.visual.merger", "image_embeds"),
    "vision.patch_embed": ("vision.patch_embed", "visual.patch_embed", "model.visual.patch_embed"),
    "vision.pos_embed": ("vision.pos_embed", "visual.pos_embed", "model.visual.pos_embed"),
}
_VISION_BLOCK_RE = re.compile(r"^(?:model\.)?(?:vision|visual)\.blocks\.(\d+)$")
_LAYER_RE = re.compile(r"^(?:model\.(?:language_model\.)?)?(?:layers\.|layer_?)(\d+)\.(.+)$")
_HS_RE = re.compile(r"^hidden_states\.(\d+)$")
_GLOBAL = {alias: canon for canon in ("embeddings", "final_hidden", "logits") for alias in DUMP_ALIASES[canon]}
_PER_LAYER = {alias: canon for canon in ("after_mixer", "after_moe", "router_logits", "topk_ids", "topk_weights")
              for alias in DUMP_ALIASES[canon]}
_VISION = {alias: canon for canon, aliases in VISION_DUMP_ALIASES.items() for alias in aliases}


def canonical_dump_name(name: str, num_layers: int) -> str | None:
    """Engine dump name -> canonical name, or None when it is not one we compare."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if name in _VISION:
        return _VISION[name]
    m = _VISION_BLOCK_RE.match(name)
    if m:
        return f"vision.blocks.{int(m.group(1))}"
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _PER_LAYER:
        return f"layers.{int(m.group(1))}.{_PER_LAYER[m.group(2)]}"
    m = _HS_RE.match(name)
    if m:
        k = int(m.group(1))
        if k == 0:
            return "embeddings"
        if k < num_layers:
            return f"layers.{k - 1}.after_moe"
        if k == num_layers:
            return "final_hidden"
    return None


def read_dumps(path: str | Path, num_layers: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Engine layer dumps (.safetensors or .npz) -> ({canonical name: array}, [names not understood])."""
    path = Path(path)
    out, ignored = {}, []
    for name, a in _load_arrays(path).items():
        canon = canonical_dump_name(name, num_layers)
        if canon is None:
            ignored.append(name)
            continue
        if canon in out:
            raise FormatError(f"{path}: '{name}' and another tensor both mean '{canon}'")
        out[canon] = _squeeze_batch(a, f"{path}:{name}")
    if not out:
        raise FormatError(f"{path}: no tensor matches a known dump name (e.g. 'layers.0.after_moe'); "
                          f"found {sorted(ignored)[:5]}")
    return out, ignored


# --------------------------------------------------------------------------- live server

class _HTTPRefused(FormatError):
    """The server answered with an HTTP error status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _post(url: str, body: dict, timeout: float) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return _fetch(req, url, timeout)


def _fetch(req: urllib.request.Request | str, url: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace").replace("\n", " ")
        raise _HTTPRefused(f"{url}: HTTP {e.code} ({detail})", e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise FormatError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FormatError(f"{url}: the server's answer is not JSON") from None


def server_model(base: str, timeout: float = 60.0) -> str:
    """The first model id the server lists at /v1/models."""
    obj = _fetch(f"{base}/v1/models", f"{base}/v1/models", timeout)
    try:
        return obj["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise FormatError(f"{base}/v1/models: no model listed; pass --server-model") from None


def image_data_url(path: str | Path) -> str:
    """An image file as a data URL (data:image/<format>;base64,...), the way OpenAI-compatible servers
    take images in chat content parts; the format is Pillow's reading of the file."""
    import base64
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        data = Path(path).read_bytes()
        fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    except (OSError, UnidentifiedImageError) as e:
        raise FormatError(f"{path}: cannot read the image ({getattr(e, 'strerror', None) or e})") from None
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


def query_server_chat(base: str, text: str, image_urls: list[str], top_k: int, model: str | None = None,
                      timeout: float = 600.0) -> Any:
    """Ask a live OpenAI-compatible server for the prompt logprobs of a chat turn with images: one user
    message of image_url parts (data URLs, in order) then the text, POST /v1/chat/completions with
    vLLM's prompt_logprobs and return_token_ids (the server's own template and image-pad expansion give
    the token ids) and one greedy token; returns the raw JSON."""
    base = base.rstrip("/")
    content = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls] + [{"type": "text", "text": text}]
    body = {"model": model or server_model(base, timeout), "messages": [{"role": "user", "content": content}],
            "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": top_k, "prompt_logprobs": top_k,
            "return_token_ids": True, "return_tokens_as_token_ids": True}
    return _post(f"{base}/v1/chat/completions", body, timeout)


def query_server(base: str, token_ids: list[int], top_k: int, api: str = "openai", model: str | None = None,
                 timeout: float = 600.0) -> Any:
    """Ask a live server for prompt logprobs of `token_ids` (plus one greedy token); returns the raw JSON.

    api="openai": POST /v1/completions with echo + logprobs (vLLM and SGLang), and vLLM's
    prompt_logprobs / return_token_ids / return_tokens_as_token_ids, which other servers ignore; a
    server that refuses them (HTTP 400/422) is asked again without them.
    api="sglang": POST /generate with return_logprob, logprob_start_len=0 (exact token ids)."""
    base = base.rstrip("/")
    if api == "sglang":
        body = {"input_ids": list(token_ids), "return_logprob": True, "logprob_start_len": 0,
                "top_logprobs_num": top_k, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        return _post(f"{base}/generate", body, timeout)
    if api != "openai":
        raise FormatError(f"--server-api: expected 'openai' or 'sglang', got {api!r}")
    body = {"model": model or server_model(base, timeout), "prompt": list(token_ids), "max_tokens": 1,
            "temperature": 0.0, "echo": True, "logprobs": top_k}
    extras = {"prompt_logprobs": top_k, "return_token_ids": True, "return_tokens_as_token_ids": True}
    try:
        return _post(f"{base}/v1/completions", {**body, **extras}, timeout)
    except _HTTPRefused as e:  # a strict server rejecting the vLLM fields: ask again with plain OpenAI ones
        if e.code not in (400, 422):
            raise
        return _post(f"{base}/v1/completions", body, timeout)
