"""OpenAI-compatible request bodies -> engine Requests, and engine results -> response bodies.

Follows the OpenAI API and vLLM's documented extensions (prompt_logprobs, return_tokens_as_token_ids,
return_token_ids, stop_token_ids, ignore_eos, top_k, chat_template_kwargs, include_reasoning), field
for field as ref.engine_io reads them. Every invalid request becomes an `APIError` with the OpenAI
error body; nothing here touches the engine or the network. Chat images come as `image_url` content
parts holding data URLs (base64 PNG, JPEG...; an http(s) URL is refused: no network): they are decoded
and preprocessed here (ref.image, the checkpoint's settings), the prompt's image pads expanded to
their merged-token counts, and the images travel in `Request.images`.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from jaxrun.chat_output import prompt_ends_reasoning, token_bytes
from jaxrun.engine_api import PromptLogprobs, Request, SamplingParams, TokenLogprob
from ref.errors import CheckpointError, ImageError
from ref.image import preprocess
from ref.image_prompt import expand_image_pads, merged_counts

MIN_LOGPROB = -9999.0          # what -inf becomes in JSON (OpenAI and vLLM)
INT64 = 2 ** 63
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


class APIError(Exception):
    """A request the server refuses (or fails): HTTP status and the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


# --------------------------------------------------------------------------- request bodies

# Fields a client may send only with their neutral value: the engine has no such feature.
_NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
            "min_p": (0, 0.0), "min_tokens": (0,), "use_beam_search": (False,), "best_of": (1,),
            "logit_bias": ({},), "suffix": ("",), "bad_words": ([],), "allowed_token_ids": ([],),
            "logprob_token_ids": ([],), "truncate_prompt_tokens": (), "prompt_embeds": (),
            "structured_outputs": (), "guided_json": (), "guided_regex": (), "guided_choice": (),
            "guided_grammar": (), "continue_final_message": (False,)}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")     # unknown fields are ignored, as vLLM does
    neutral: ClassVar[dict[str, tuple]] = _NEUTRAL

    def check_supported(self) -> None:
        """A 400 for a field of a feature the engine does not have, sent with a non-neutral value."""
        extra = self.model_extra or {}
        for name in self.neutral.keys() & extra.keys():
            value = extra[name]
            if value is not None and value not in self.neutral[name]:
                raise bad_request(f"{name}={json.dumps(value)[:60]} is not supported by this server", name)
        rf = extra.get("response_format")
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind not in (None, "text"):
            raise bad_request(f"response_format {kind!r} is not supported by this server (only 'text')",
                              "response_format")


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _Common(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class ChatBody(_Common):
    neutral: ClassVar[dict[str, tuple]] = {**_NEUTRAL, "echo": (False,)}
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    include_reasoning: bool = True
    parallel_tool_calls: bool = True


def parse_body(raw: bytes, kind: type[_Body]) -> _Body:
    """Request bytes -> the validated body, or a 400 naming the field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"malformed JSON in the request body: {e}") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'), default=str)[:80]})"
        raise bad_request(f"{where}: {err['msg']}{got}" if where else err["msg"],
                          str(err["loc"][0]) if err["loc"] else None) from None
    body.check_supported()
    return body


# --------------------------------------------------------------------------- what the server knows

@dataclass(frozen=True)
class ServingConfig:
    """The server's fixed facts: model names (the first is reported), the engine's limits, the
    tokenizer (None: token-id prompts only), end-of-sequence ids, default sampling (the checkpoint's
    generation_config), and which output parsers run."""
    model_names: tuple[str, ...]
    vocab_size: int
    max_context: int
    tokenizer: Any = None
    eos_token_ids: frozenset[int] = frozenset()
    default_sampling: tuple[tuple[str, float], ...] = ()
    max_logprobs: int = 20
    max_n: int = 16
    reasoning_parser: str | None = "qwen3"
    tool_parser: str | None = "qwen3_coder"
    preprocessor: Any = None             # ref.config.PreprocessorConfig: the model takes images (with image_token_id)
    image_token_id: int | None = None

    @property
    def takes_images(self) -> bool:
        return self.preprocessor is not None and self.image_token_id is not None

    def default(self, name: str, fallback: float) -> float:
        return dict(self.default_sampling).get(name, fallback)


def generation_defaults(directory: str | Path) -> tuple[tuple[str, float], ...]:
    """temperature / top_p / top_k from a checkpoint's generation_config.json (vLLM applies them to
    requests that leave them out)."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return ()
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return tuple((k, cfg[k]) for k in ("temperature", "top_p", "top_k") if isinstance(cfg.get(k), (int, float)))


# --------------------------------------------------------------------------- plans: what to submit, how to answer

@dataclass(frozen=True)
class OutputOptions:
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    logprobs: int | None = None          # top-N per generated token (chat: top_logprobs)
    prompt_logprobs: int | None = None   # vLLM prompt_logprobs field
    echo: bool = False
    tokens_as_ids: bool = False          # "token_id:N" token strings
    return_token_ids: bool = False
    stops: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special: bool = True
    user_stop_ids: frozenset[int] = frozenset()
    discard_output: bool = False         # echo with max_tokens 0: the one generated token is dropped


@dataclass(frozen=True)
class ChoicePlan:
    index: int
    prompt_index: int
    prompt_ids: tuple[int, ...]
    prompt_text: str | None
    request: Request


@dataclass(frozen=True)
class Plan:
    kind: str                            # "completion" | "chat"
    model: str
    choices: tuple[ChoicePlan, ...]
    options: OutputOptions
    thinking: bool = False               # chat: the output starts inside a think block
    tools: tuple | None = None           # chat: tools whose calls are parsed
    include_reasoning: bool = True
    parallel_tool_calls: bool = True     # chat: False keeps only the first call


def _check_model(body: _Common, cfg: ServingConfig) -> str:
    if body.model is not None and body.model not in cfg.model_names:
        raise APIError(404, f"The model `{body.model}` does not exist.", "model")
    return cfg.model_names[0]


def _sampling(body: _Common, cfg: ServingConfig) -> SamplingParams:
    t = body.temperature if body.temperature is not None else cfg.default("temperature", 1.0)
    p = body.top_p if body.top_p is not None else cfg.default("top_p", 1.0)
    k = body.top_k if body.top_k is not None else int(cfg.default("top_k", 0))
    if not (math.isfinite(t) and t >= 0):
        raise bad_request(f"temperature must be >= 0, got {t}", "temperature")
    if not (0 < p <= 1):
        raise bad_request(f"top_p must be in (0, 1], got {p}", "top_p")
    if k < -1:
        raise bad_request(f"top_k must be -1 (off), 0 (off) or positive, got {k}", "top_k")
    if body.seed is not None and not -INT64 <= body.seed < INT64:
        raise bad_request(f"seed must fit in 64 bits, got {body.seed}", "seed")
    return SamplingParams(float(t), float(p), max(k, 0), body.seed)


def _check_ids(ids: list[int], cfg: ServingConfig, param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < cfg.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary 0..{cfg.vocab_size - 1}", param)


def _need_tokenizer(cfg: ServingConfig, what: str, param: str, hint: str = ""):
    if cfg.tokenizer is None:
        raise bad_request(f"{what} needs a tokenizer, and this model has none (no tokenizer.json in the "
                          f"checkpoint){hint}", param)
    return cfg.tokenizer


_IDS_HINT = "; send the prompt as token ids to /v1/completions"


def _logprobs_count(n: int | None, cfg: ServingConfig, param: str) -> int | None:
    if n is not None and not 0 <= n <= cfg.max_logprobs:
        raise bad_request(f"{param} must be in 0..{cfg.max_logprobs}, got {n}", param)
    return n


def _max_tokens(requested: int | None, default: int | None, prompt_len: int, cfg: ServingConfig,
                prompt_param: str) -> int:
    """The max_tokens to submit (default: 16 for completions, the rest of the context for chat)."""
    if prompt_len >= cfg.max_context:
        raise bad_request(f"This model's maximum context length is {cfg.max_context} tokens. However, your "
                          f"request has {prompt_len} input tokens. Please reduce the length of the input.",
                          prompt_param)
    n = requested if requested is not None else (default if default is not None else cfg.max_context - prompt_len)
    if n < 1:
        raise bad_request(f"max_tokens must be at least 1 (0 only with echo), got {n}", "max_tokens")
    if prompt_len + n > cfg.max_context:
        raise bad_request(f"'max_tokens' or 'max_completion_tokens' is too large: {n}. This model's maximum "
                          f"context length is {cfg.max_context} tokens and your request has {prompt_len} input "
                          f"tokens ({n} > {cfg.max_context} - {prompt_len}).", "max_tokens")
    return n


def _common_options(body: _Common, cfg: ServingConfig) -> tuple[OutputOptions, frozenset[int]]:
    """Options shared by both endpoints, and the stop ids every choice ends on."""
    if not 1 <= body.n <= cfg.max_n:
        raise bad_request(f"n must be in 1..{cfg.max_n}, got {body.n}", "n")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options can only be given with stream=true", "stream_options")
    prompt_lp = _logprobs_count(body.prompt_logprobs, cfg, "prompt_logprobs")
    if prompt_lp is not None and body.stream:
        raise bad_request("prompt_logprobs are not available when stream=true", "prompt_logprobs")
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    if stops:
        _need_tokenizer(cfg, "stop strings", "stop", "; use stop_token_ids")
    user_ids = list(body.stop_token_ids or ())
    _check_ids(user_ids, cfg, "stop_token_ids")
    so = body.stream_options
    opts = OutputOptions(stream=body.stream, include_usage=bool(so and so.include_usage),
                         continuous_usage=bool(so and so.continuous_usage_stats), prompt_logprobs=prompt_lp,
                         tokens_as_ids=body.return_tokens_as_token_ids or cfg.tokenizer is None,
                         return_token_ids=body.return_token_ids, stops=stops,
                         include_stop=body.include_stop_str_in_output, skip_special=body.skip_special_tokens,
                         user_stop_ids=frozenset(user_ids))
    eos = frozenset() if body.ignore_eos else cfg.eos_token_ids
    return opts, eos | frozenset(user_ids)


def _choices(prompts: list[tuple[list[int], str | None]], body: _Common, cfg: ServingConfig,
             max_tokens: Callable[[int], int], stop_ids: frozenset[int], logprobs: int | None,
             prompt_logprobs: int | None, images: tuple = ()) -> tuple[ChoicePlan, ...]:
    sampling = _sampling(body, cfg)
    out = []
    for p, (ids, text) in enumerate(prompts):
        n_tokens = max_tokens(len(ids))
        for j in range(body.n):
            s = sampling if sampling.seed is None or j == 0 else \
                SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k,
                               (sampling.seed + j + INT64) % (2 * INT64) - INT64)
            req = Request(tuple(ids), n_tokens, s, stop_ids, logprobs, prompt_logprobs, images)
            out.append(ChoicePlan(p * body.n + j, p, tuple(ids), text, req))
    return tuple(out)


def completion_plan(body: CompletionBody, cfg: ServingConfig) -> Plan:
    model = _check_model(body, cfg)
    opts, stop_ids = _common_options(body, cfg)
    prompt = body.prompt
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items:
        raise bad_request("prompt must not be empty", "prompt")
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            tok = _need_tokenizer(cfg, "a text prompt", "prompt", _IDS_HINT)
            ids = tok.encode(item)
            text = item
        else:
            ids, text = list(item), None
            _check_ids(ids, cfg, "prompt")
        if not ids:
            raise bad_request(f"prompt {i} is empty", "prompt")
        prompts.append((ids, text))
    logprobs = _logprobs_count(body.logprobs, cfg, "logprobs")
    zero = body.echo and body.max_tokens == 0
    opts = replace(opts, logprobs=logprobs, echo=body.echo, discard_output=zero)
    # echo with logprobs reports the prompt's logprobs too: the engine computes the larger top-N
    engine_prompt_lp = opts.prompt_logprobs
    if body.echo and logprobs is not None:
        engine_prompt_lp = max(logprobs, engine_prompt_lp or 0)
    budget = (lambda n: 1) if zero else (lambda n: _max_tokens(body.max_tokens, 16, n, cfg, "prompt"))
    choices = _choices(prompts, body, cfg, budget, stop_ids, logprobs, engine_prompt_lp)
    if body.echo and cfg.tokenizer is not None:
        choices = tuple(c if c.prompt_text is not None else
                        ChoicePlan(c.index, c.prompt_index, c.prompt_ids, cfg.tokenizer.decode(c.prompt_ids), c.request)
                        for c in choices)
    return Plan("completion", model, choices, opts)


# --------------------------------------------------------------------------- chat messages -> prompt

_MEDIA_PARTS = {"image_url": "image", "image": "image", "input_image": "image", "image_pil": "image",
                "image_embeds": "image", "video_url": "video", "video": "video", "input_audio": "audio",
                "audio_url": "audio"}


_DATA_URL = re.compile(r"^data:(image/[\w.+-]+)?(;[^,;]*)*?;base64,", re.IGNORECASE)


def media_part(part: dict, where: str, cfg: ServingConfig | None = None, images: list | None = None) -> dict:
    """An image / video / audio content part -> the template's part ({"type": "image"}); the image,
    decoded from its data URL and preprocessed with the model's settings, is appended to `images`.
    Only `image_url` parts with data URLs are taken (an http(s) URL is not fetched: no network)."""
    kind = _MEDIA_PARTS[part["type"]]
    if kind != "image" or cfg is None or not cfg.takes_images:
        raise bad_request(f"{where}: {kind} input not supported by this model/server"
                          + (" (no vision tower)" if kind == "image" else ""), "messages")
    if part["type"] != "image_url":
        raise bad_request(f"{where}: content parts of type {part['type']!r} are not supported; send images as "
                          f"{{'type': 'image_url', 'image_url': {{'url': 'data:image/png;base64,...'}}}}", "messages")
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str):
        raise bad_request(f"{where}.image_url: expected {{'url': 'data:image/...;base64,...'}}", "messages")
    if url.lower().startswith(("http://", "https://")):
        raise bad_request(f"{where}.image_url: image URLs are not fetched (this server has no network access); "
                          f"send the image inline as a data URL (data:image/png;base64,...)", "messages")
    head = _DATA_URL.match(url)
    if head is None:
        raise bad_request(f"{where}.image_url: expected a base64 data URL (data:image/png;base64,...), got "
                          f"{url[:40]!r}", "messages")
    try:
        data = base64.b64decode(url[head.end():], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}.image_url: the data URL is not valid base64", "messages") from None
    try:
        images.append(preprocess(data, cfg.preprocessor, name=where))
    except ImageError as e:
        raise bad_request(str(e), "messages") from None
    return {"type": "image"}


def _content(content: Any, where: str, cfg: ServingConfig | None = None,
             images: list | None = None) -> str | list[dict] | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content: expected a string or a list of content parts", "messages")
    parts = []
    for j, part in enumerate(content):
        w = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in _MEDIA_PARTS:
            parts.append(media_part(part, w, cfg, images))
        else:
            raise bad_request(f"{w}: unknown content part {json.dumps(part)[:80]} (expected type 'text')", "messages")
    return parts


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """Assistant tool calls with their JSON-string arguments parsed (the template iterates them)."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls: expected a list", "messages")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where}.tool_calls[{j}]: expected {{'function': {{'name', 'arguments'}}}}", "messages")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise bad_request(f"{where}.tool_calls[{j}].function.arguments: not valid JSON ({e})",
                                  "messages") from None
        if not isinstance(args, dict):
            raise bad_request(f"{where}.tool_calls[{j}].function.arguments: expected a JSON object", "messages")
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def template_messages(messages: list[dict], cfg: ServingConfig | None = None, images: list | None = None) -> list[dict]:
    """OpenAI chat messages -> the messages the chat template renders; their images (ref.image
    PreprocessedImage, in order) are appended to `images` (cfg: whether and how the model takes them)."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m.get("role"), str):
            raise bad_request(f"{where}.role: expected a string", "messages")
        msg = {"role": m["role"], "content": _content(m.get("content"), where, cfg, images)}
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], where)
        reasoning = m.get("reasoning_content", m.get("reasoning"))
        if isinstance(reasoning, str):
            msg["reasoning_content"] = reasoning
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


_RESERVED_TEMPLATE_ARGS = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


def chat_plan(body: ChatBody, cfg: ServingConfig) -> Plan:
    model = _check_model(body, cfg)
    tok = _need_tokenizer(cfg, "chat", "messages", _IDS_HINT)
    opts, stop_ids = _common_options(body, cfg)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    top = _logprobs_count(body.top_logprobs, cfg, "top_logprobs")
    opts = replace(opts, logprobs=(top or 0) if body.logprobs else None)
    tc = body.tool_choice
    if tc not in (None, "auto", "none"):
        raise bad_request(f"tool_choice {json.dumps(tc)[:60]} is not supported by this server (only 'auto' "
                          f"and 'none')", "tool_choice")
    kwargs = dict(body.chat_template_kwargs or {})
    if _RESERVED_TEMPLATE_ARGS & set(kwargs):
        raise bad_request(f"chat_template_kwargs may not set {sorted(_RESERVED_TEMPLATE_ARGS & set(kwargs))}",
                          "chat_template_kwargs")
    enable_thinking = kwargs.pop("enable_thinking", True)
    images: list = []
    try:
        text = tok.apply_chat_template(template_messages(body.messages, cfg, images), body.add_generation_prompt,
                                       enable_thinking=enable_thinking, tools=body.tools, **kwargs)
    except CheckpointError as e:
        raise bad_request(str(e), "messages") from None
    ids = tok.encode(text)
    if images:                       # each image's pad becomes its merged-token count
        try:
            ids = expand_image_pads(ids, merged_counts([im.grid for im in images], cfg.preprocessor.merge_size),
                                    cfg.image_token_id, [im.source for im in images])
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    budget = lambda n: _max_tokens(requested, None, n, cfg, "messages")  # noqa: E731
    choices = _choices([(ids, text)], body, cfg, budget, stop_ids, opts.logprobs, opts.prompt_logprobs,
                       tuple(images))
    thinking = cfg.reasoning_parser == "qwen3" and enable_thinking is not False and not prompt_ends_reasoning(text)
    tools = tuple(body.tools) if body.tools and tc != "none" and cfg.tool_parser == "qwen3_coder" else None
    return Plan("chat", model, choices, opts, thinking, tools, body.include_reasoning, body.parallel_tool_calls)


# --------------------------------------------------------------------------- logprobs in the response formats

def clamp(lp: float) -> float:
    return max(lp, MIN_LOGPROB)


class TokenStrings:
    """Token id -> the string a response shows: 'token_id:N' when asked (or without a tokenizer), else
    the token decoded on its own; and its raw bytes (chat logprobs)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tok, self.as_ids = tokenizer, as_ids or tokenizer is None
        self._text: dict[int, str] = {}

    def decoded(self, i: int) -> str | None:
        if self.tok is None:
            return None
        if i not in self._text:
            self._text[i] = self.tok.decode([i])
        return self._text[i]

    def __call__(self, i: int) -> str:
        return f"token_id:{i}" if self.as_ids else self.decoded(i)

    def bytes(self, i: int) -> list[int]:
        s = self(i)
        return list(s.encode("utf-8")) if self.as_ids else token_bytes(self.tok.piece(i), s)


def legacy_logprobs(ids: list[int], entries: list[TokenLogprob | None], n: int, names: TokenStrings,
                    offset: int = 0) -> dict:
    """Completions `logprobs`: tokens, token_logprobs, top_logprobs ({token: logprob}: the token itself,
    then the top n, as OpenAI's 'up to logprobs + 1'), text_offset (the lengths of the token strings
    before each, from `offset`: vLLM's rule, continued across stream chunks so they add up)."""
    tokens, lps, tops, offsets = [], [], [], []
    for i, e in zip(ids, entries):
        s = names(i)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if e is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(clamp(e.logprob))
        top = {s: clamp(e.logprob)}
        for j, lp in e.top[:n]:
            top.setdefault(names(j), clamp(lp))
        tops.append(top)
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens, "top_logprobs": tops}


def chat_logprobs(ids: list[int], entries: list[TokenLogprob], n: int, names: TokenStrings) -> dict:
    """Chat `logprobs.content`: per token {token, logprob, bytes, top_logprobs: the n most likely}."""
    def item(i, lp):
        return {"token": names(i), "logprob": clamp(lp), "bytes": names.bytes(i)}
    return {"content": [{**item(i, e.logprob), "top_logprobs": [item(j, lp) for j, lp in e.top[:n]]}
                        for i, e in zip(ids, entries)]}


def vllm_prompt_logprobs(pl: PromptLogprobs, n: int, names: TokenStrings) -> list[dict | None]:
    """vLLM `prompt_logprobs`: per prompt token None (the first) or {"<id>": {logprob, rank,
    decoded_token}} holding the prompt token first, then the top n with ranks 1..n."""
    out = []
    for e in pl.entries:
        if e is None:
            out.append(None)
            continue
        top_rank = {j: r + 1 for r, (j, _) in enumerate(e.top[:n])}
        rank = e.rank if e.rank is not None else top_rank.get(e.token_id)
        d = {str(e.token_id): {"logprob": clamp(e.logprob), "rank": rank, "decoded_token": names.decoded(e.token_id)}}
        for j, lp in e.top[:n]:
            d.setdefault(str(j), {"logprob": clamp(lp), "rank": top_rank[j], "decoded_token": names.decoded(j)})
        out.append(d)
    return out


# --------------------------------------------------------------------------- response envelopes

def new_id(kind: str) -> str:
    return f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict], chunk: bool, **extra) -> dict:
    obj = {"completion": "text_completion", "chat": "chat.completion.chunk" if chunk else "chat.completion"}[kind]
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices, **extra}


def model_list(cfg: ServingConfig, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "jaxrun",
                                        "root": cfg.model_names[0], "parent": None,
                                        "max_model_len": cfg.max_context} for name in cfg.model_names]}
