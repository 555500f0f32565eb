"""Tokenizer and chat template of a checkpoint directory, without transformers.

tokenizer.json is run by the `tokenizers` library; the chat template (tokenizer_config.json
`chat_template`, or `chat_template.jinja`) is rendered with jinja2 the way transformers does it
(sandboxed, trim_blocks, lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from ref.errors import CheckpointError


class Tokenizer:
    """encode / decode / chat template over one checkpoint's tokenizer files."""

    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None, eos_token_ids: tuple[int, ...],
                 special: dict[str, str | None], source: str):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.bos_token, self.eos_token = special.get("bos_token"), special.get("eos_token")
        self.source = source
        self._template = _environment().from_string(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:  # entries incl. added tokens (may be fewer than embedding rows)
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised, no BOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def piece(self, token_id: int) -> str | None:
        """The vocabulary entry of an id as stored (byte-level spelling, e.g. "Ġhello"), None if unknown."""
        return self._tok.id_to_token(int(token_id))

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"{self.source}: no token {token!r} in the vocabulary")
        return i

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = True, **kwargs) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
        if self._template is None:
            raise CheckpointError(f"{self.source}: no chat template (tokenizer_config.json 'chat_template' "
                                  f"or chat_template.jinja)")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, bos_token=self.bos_token,
                                         eos_token=self.eos_token, **kwargs)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"{self.source}: chat template failed: {e}") from None


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def _token_text(x) -> str | None:
    return x.get("content") if isinstance(x, dict) else x


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        tok = _HFTokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed files
        raise CheckpointError(f"{path}: cannot load ({e})") from None
    cfg_path = directory / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        template = jinja_path.read_text(encoding="utf-8")
    special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token")}
    eos: list[int] = []
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        ids = _read_json(gen_path).get("eos_token_id")
        eos = list(ids) if isinstance(ids, list) else [ids] if isinstance(ids, int) else []
    if not eos and special["eos_token"] and tok.token_to_id(special["eos_token"]) is not None:
        eos = [tok.token_to_id(special["eos_token"])]
    return Tokenizer(tok, template, tuple(eos), special, str(directory))
