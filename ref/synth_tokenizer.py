"""A small Qwen-style tokenizer for synthetic checkpoints (ref.synth).

Byte-level BPE with Qwen3.5's normalizer, pre-tokenizer regex and decoder, trained on a
fixed text so it is deterministic; the vocabulary is padded with unreachable filler entries so that
Qwen's 26 special tokens land at `special_base` (248044 in the real model), in Qwen's order.
"""
from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# (token, special) in Qwen3.5's id order, starting at 248044.
SPECIAL_TOKENS = [(t, t.startswith("<|")) for t in (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>")]
SPECIAL_ID = {t: i for i, (t, _) in enumerate(SPECIAL_TOKENS)}  # offset from special_base

# ChatML, thinking on by default: the generation prompt opens a <think> block, or closes an empty one.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part.type == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif part.type == 'text' -%}{{ part.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message.role + '\\n' }}{{ render(message.content) }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}{{ '<think>\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model reads tokens and predicts the next one.
Hello! How are you today? I am fine, thank you. What is two plus two? Two plus two is four.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159. Quantized weights use four bits and a scale.
def main():
    return sum(x * x for x in range(10))

Experts are chosen by a router; the shared expert always runs. Attention looks back at the past,
and the linear attention keeps a state. Le café était très bon. Ünïcödé, 中文, 日本語, emoji ✓.
"""


def build_tokenizer(special_base: int, bpe_size: int) -> str:
    """tokenizer.json text: BPE with up to `bpe_size` learned entries, fillers up to `special_base`."""
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(bpe_size, special_base), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True) * 4, trainer)
    raw = json.loads(tok.to_str())
    vocab = raw["model"]["vocab"]
    if len(vocab) > special_base:
        raise ValueError(f"BPE vocabulary of {len(vocab)} does not fit below special_base {special_base}")
    vocab.update({f"<|synth_filler_{i}|>": i for i in range(len(vocab), special_base)})
    raw["added_tokens"] = [{"id": special_base + i, "content": t, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": special}
                           for i, (t, special) in enumerate(SPECIAL_TOKENS)]
    return json.dumps(raw, ensure_ascii=False)


def tokenizer_config(special_base: int) -> dict:
    decoder = {str(special_base + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": special}
               for i, (t, special) in enumerate(SPECIAL_TOKENS)}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "chat_template": CHAT_TEMPLATE, "errors": "replace", "model_max_length": 262144,
            "tokenizer_class": "Qwen2Tokenizer", "split_special_tokens": False}
