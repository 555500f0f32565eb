"""ref.config: both config forms, both RoPE spellings, layer_types fallback, quantization metadata,
and a ConfigError naming the file and field for each missing or contradictory value."""
import copy
import dataclasses
import json

import pytest

from ref.config import FULL, LINEAR, QWEN35_397B, config_dict, hf_quant_config_dict, load_config, parse_config, \
    preprocessor_config_dict
from ref.errors import ConfigError
from ref.synth import PRESETS, preset_config


@pytest.mark.parametrize("preset", PRESETS)
def test_written_config_parses_back_identical(preset):
    cfg = preset_config(preset)
    pre = preprocessor_config_dict(cfg.preprocessor)
    assert parse_config(config_dict(cfg), hf_quant_config_dict(cfg.quant), preprocessor_raw=pre) == cfg
    # quantization_config alone carries the same facts; no preprocessor file, no preprocessor
    assert parse_config(config_dict(cfg)) == dataclasses.replace(cfg, preprocessor=None)


def test_397b_dimensions():
    t = QWEN35_397B.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_experts, t.num_experts_per_tok) == (4096, 60, 512, 10)
    assert t.full_attention_layers == tuple(range(3, 60, 4)) and t.rotary_dim == 64
    assert (t.linear_key_dim, t.linear_value_dim, t.linear_conv_dim) == (2048, 8192, 12288)
    assert t.eos_token_ids == (248046,) and QWEN35_397B.special_tokens["image_token_id"] == 248056
    sliced = preset_config("397b", layers=4)
    assert sliced.text.layer_types == (LINEAR, LINEAR, LINEAR, FULL)
    assert sliced.text.hidden_size == 4096 and sliced.text.vocab_size == 248320


def test_tiny_preset_is_the_contract():
    t = preset_config("tiny").text
    assert t.layer_types == (LINEAR, LINEAR, LINEAR, FULL) and t.hidden_size == 64 and t.vocab_size == 512
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, t.shared_expert_intermediate_size) == \
        (16, 4, 32, 32)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rotary_dim) == (4, 2, 32, 8)
    assert t.mrope_section == (2, 1, 1) and t.mtp_num_hidden_layers == 1
    assert (t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_conv_kernel_dim) == \
        (2, 4, 16, 4)
    assert preset_config("tiny").vision.depth == 2


def _raw():
    return config_dict(preset_config("tiny"))


def test_flat_text_config_and_old_rope_fields():
    raw = _raw()
    text = raw["text_config"]
    rope = text.pop("rope_parameters")
    flat = dict(text, rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
                rope_scaling={"mrope_section": rope["mrope_section"], "mrope_interleaved": True})
    cfg = parse_config(flat)
    assert not cfg.multimodal and cfg.text_prefix == "model." and cfg.vision is None and cfg.quant is None
    assert cfg.text == preset_config("tiny").text


def test_layer_types_from_interval():
    raw = _raw()
    del raw["text_config"]["layer_types"]
    raw["text_config"]["full_attention_interval"] = 2
    assert parse_config(raw).text.layer_types == (LINEAR, FULL, LINEAR, FULL)


def test_load_config_reads_both_files(tmp_path):
    cfg = preset_config("tiny")
    (tmp_path / "config.json").write_text(json.dumps(config_dict(cfg)))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(hf_quant_config_dict(cfg.quant)))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_dict(cfg.preprocessor)))
    assert load_config(tmp_path) == cfg


def _edit(fn):
    raw = copy.deepcopy(_raw())
    fn(raw)
    return raw


ERRORS = {
    "layer_types length": (lambda r: r["text_config"].update(layer_types=[LINEAR] * 5),
                           "field 'text_config.layer_types' has 5 entries but num_hidden_layers is 4"),
    "unknown layer type": (lambda r: r["text_config"].update(layer_types=[LINEAR, "mamba", LINEAR, FULL]),
                           "unknown layer types ['mamba']"),
    "missing hidden_size": (lambda r: r["text_config"].pop("hidden_size"), "field 'text_config.hidden_size' is missing"),
    "wrong type": (lambda r: r["text_config"].update(num_experts="16"), "field 'text_config.num_experts' must be int"),
    "not positive": (lambda r: r["text_config"].update(vocab_size=0), "field 'text_config.vocab_size' must be positive"),
    "kv heads": (lambda r: r["text_config"].update(num_key_value_heads=3), "3 does not divide num_attention_heads 4"),
    "linear heads": (lambda r: r["text_config"].update(linear_num_key_heads=3), "3 does not divide linear_num_value"),
    "top-k": (lambda r: r["text_config"].update(num_experts_per_tok=17), "17 exceeds num_experts 16"),
    "mrope": (lambda r: r["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]), "sums to 6, expected"),
    "rope type": (lambda r: r["text_config"]["rope_parameters"].update(rope_type="yarn"), "only 'default' RoPE"),
    "unknown quant_algo": (lambda r: r["quantization_config"].update(quant_algo="INT4_AWQ"),
                           "field 'quant_algo' is 'INT4_AWQ'"),
    "quant method": (lambda r: r["quantization_config"].update(quant_method="gptq"), "only 'modelopt'"),
    "tied embeddings": (lambda r: r["text_config"].update(tie_word_embeddings=True), "tied embeddings"),
    "no interval": (lambda r: r["text_config"].pop("layer_types") and r["text_config"].pop("full_attention_interval"),
                    "field 'text_config.full_attention_interval' is missing"),
    "text_config not object": (lambda r: r.update(text_config=[1]), "text_config. must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_config_errors_name_the_field(case):
    fn, message = ERRORS[case]
    with pytest.raises(ConfigError) as e:
        parse_config(_edit(fn))
    assert message in str(e.value) and str(e.value).startswith("config.json: ")


def test_quant_file_errors(tmp_path):
    cfg = preset_config("tiny")
    (tmp_path / "config.json").write_text(json.dumps(config_dict(cfg)))
    q = hf_quant_config_dict(cfg.quant)
    q["quantization"]["quant_algo"] = "W4A8_AWQ"
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(q))
    with pytest.raises(ConfigError, match="hf_quant_config.json: field 'quant_algo' is 'W4A8_AWQ'"):
        load_config(tmp_path)
    q["quantization"].update(quant_algo="NVFP4", group_size=32)
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(q))
    with pytest.raises(ConfigError, match="field 'group_size' is 32; NVFP4 uses 16"):
        load_config(tmp_path)
    (tmp_path / "hf_quant_config.json").write_text("[")
    with pytest.raises(ConfigError, match="hf_quant_config.json: not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="config.json: file not found"):
        load_config(tmp_path / "nowhere")
