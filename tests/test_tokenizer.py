"""ref.tokenizer over the synthetic tokenizer: byte-level round trips, Qwen special tokens at Qwen's
ids, the ChatML template with and without thinking, and clear errors."""
import json
import shutil
import unicodedata

import pytest
from hypothesis import given, strategies as st

from ref.errors import CheckpointError
from ref.synth_tokenizer import SPECIAL_TOKENS, build_tokenizer, tokenizer_config
from ref.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@given(st.text(max_size=200))
def test_decode_encode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_special_tokens_are_single_ids_in_qwen_order(tok):
    base = tok.token_id("<|endoftext|>")
    assert base == 512 - 32
    for i, (t, _) in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(t) == base + i and tok.encode(t) == [base + i] and tok.decode([base + i]) == t
    assert tok.token_id("<|im_end|>") - base == 248046 - 248044 and tok.token_id("</think>") - base == 248069 - 248044
    assert tok.eos_token_ids == (tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>"))
    assert tok.encode("<|im_start|>user\nhi")[0] == tok.token_id("<|im_start|>")


def test_real_special_token_ids(tmp_path):
    (tmp_path / "tokenizer.json").write_text(build_tokenizer(248044, 300))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(248044)))
    big = load_tokenizer(tmp_path)
    assert big.token_id("<|im_end|>") == 248046 and big.token_id("<|image_pad|>") == 248056
    assert big.token_id("<think>") == 248068 and big.vocab_size == 248070
    assert big.eos_token_ids == (248046,)  # no generation_config.json: the tokenizer's eos_token
    text = "Hello, world! 123"
    assert big.decode(big.encode(text)) == text and max(big.encode(text)) < 300


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    body = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n")
    assert tok.apply_chat_template(msgs) == body + "<|im_start|>assistant\n<think>\n"
    assert tok.apply_chat_template(msgs, enable_thinking=False) == body + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == body
    vision = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert tok.apply_chat_template(vision, add_generation_prompt=False) == \
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
    ids = tok.encode(tok.apply_chat_template(msgs))
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-2:] == [tok.token_id("<think>"), tok.encode("\n")[0]]


def test_chat_template_jinja_file_wins_and_errors(tiny_checkpoint, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, d / name)
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}"
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}{{ {'a': 1}|tojson }}")
    t = load_tokenizer(d)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == 'user:x|{"a": 1}'
    with pytest.raises(CheckpointError, match="chat template failed: one message only"):
        t.apply_chat_template([{"role": "user", "content": "x"}] * 2)
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no chat template"):
        load_tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(CheckpointError, match="no token '<nope>'"):
        t.token_id("<nope>")
    (d / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot load"):
        load_tokenizer(d)
    with pytest.raises(CheckpointError, match="tokenizer.json: file not found"):
        load_tokenizer(tmp_path)


def test_build_is_deterministic():
    assert build_tokenizer(480, 480) == build_tokenizer(480, 480)
