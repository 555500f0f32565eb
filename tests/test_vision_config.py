"""ref.config for the image path: preprocessor_config.json in the forms real checkpoints ship it,
checked against vision_config; the vision RoPE base; what ref.synth writes."""
import json

import pytest

from ref.config import QWEN35_PREPROCESSOR, PreprocessorConfig, config_dict, load_config, parse_config, \
    parse_preprocessor_config, preprocessor_config_dict
from ref.errors import ConfigError
from ref.synth import PRESETS, preset_config

# Qwen/Qwen3.5 checkpoints' preprocessor_config.json, verbatim
QWEN35_FILE = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
               "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
               "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}


def test_real_file_parses():
    assert parse_preprocessor_config(QWEN35_FILE) == QWEN35_PREPROCESSOR
    assert QWEN35_PREPROCESSOR.factor == 32
    assert preprocessor_config_dict(QWEN35_PREPROCESSOR) == QWEN35_FILE


def test_older_fields_and_defaults():
    old = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "resample": 3, "rescale_factor": 0.00392156862745098, "do_rescale": True, "do_normalize": True}
    assert parse_preprocessor_config(old) == PreprocessorConfig(min_pixels=3136, max_pixels=12845056)
    assert parse_preprocessor_config({}) == PreprocessorConfig()  # transformers' Qwen2-VL defaults
    both = dict(QWEN35_FILE, min_pixels=1024)                     # min_pixels wins over size, as in transformers
    assert parse_preprocessor_config(both).min_pixels == 1024
    assert parse_preprocessor_config(dict(QWEN35_FILE, image_mean=0.5)).image_mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("edit, message", [
    (dict(size={"longest_edge": 100}), "field 'size.shortest_edge' is missing"),
    (dict(size={"shortest_edge": 100, "longest_edge": 10}), "shortest_edge (min pixels) 100 exceeds longest_edge"),
    (dict(patch_size="16"), "field 'patch_size' must be int"),
    (dict(merge_size=0), "field 'merge_size' must be positive"),
    (dict(do_resize=False), "field 'do_resize' is false"),
    (dict(image_std=[0.5, 0, 0.5]), "field 'image_std' has a zero"),
    (dict(image_mean=["a"]), "field 'image_mean' must be a number or a list of numbers"),
    (dict(resample=9), "field 'resample' is 9"),
])
def test_errors_name_file_and_field(edit, message):
    with pytest.raises(ConfigError) as e:
        parse_preprocessor_config(dict(QWEN35_FILE, **edit), "dir/preprocessor_config.json")
    assert str(e.value).startswith("dir/preprocessor_config.json: ") and message in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (dict(patch_size=14), "field 'patch_size' is 14 but config.json says vision_config.patch_size = 16"),
    (dict(merge_size=3), "field 'merge_size' is 3 but config.json says vision_config.spatial_merge_size = 2"),
    (dict(temporal_patch_size=1), "'temporal_patch_size' is 1 but config.json says vision_config.temporal_patch_size"),
    (dict(image_mean=[0.5, 0.5]), "field 'image_mean' has 2 values but config.json says vision_config.in_channels = 3"),
])
def test_checked_against_vision_config(edit, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        parse_config(config_dict(preset_config("397b")), preprocessor_raw=dict(QWEN35_FILE, **edit))


def test_files_in_a_directory(tmp_path):
    cfg = preset_config("tiny")
    (tmp_path / "config.json").write_text(json.dumps(config_dict(cfg)))
    assert load_config(tmp_path).preprocessor is None
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": QWEN35_FILE}))
    assert load_config(tmp_path).preprocessor == QWEN35_PREPROCESSOR   # the combined file, when alone
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_dict(cfg.preprocessor)))
    assert load_config(tmp_path).preprocessor == cfg.preprocessor      # preprocessor_config.json first
    (tmp_path / "preprocessor_config.json").write_text("[1]")
    with pytest.raises(ConfigError, match="preprocessor_config.json: top level must be a JSON object"):
        load_config(tmp_path)


def test_vision_rope_base():
    raw = config_dict(preset_config("tiny"))
    assert raw["vision_config"]["rope_parameters"] == {"rope_type": "axial", "rope_theta": 10000.0}
    raw["vision_config"]["rope_parameters"]["rope_theta"] = 5000
    assert parse_config(raw).vision.rope_theta == 5000.0
    del raw["vision_config"]["rope_parameters"]
    assert parse_config(raw).vision.rope_theta == 10000.0                # the default when a config has none
    raw["vision_config"]["rope_parameters"] = {"rope_type": "default"}
    with pytest.raises(ConfigError, match="field 'vision_config.rope_parameters.rope_type' is 'default'"):
        parse_config(raw)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_have_real_shaped_vision(preset):
    cfg = preset_config(preset)
    v, pp = cfg.vision, cfg.preprocessor
    assert (pp.patch_size, pp.temporal_patch_size, pp.merge_size) == (v.patch_size, v.temporal_patch_size,
                                                                      v.spatial_merge_size) == (16, 2, 2)
    if preset == "397b":
        assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size,
                v.num_position_embeddings) == (27, 1152, 16, 4304, 4096, 48 * 48) and pp == QWEN35_PREPROCESSOR
    assert v.out_hidden_size == cfg.text.hidden_size and not v.deepstack_visual_indexes


def test_synth_writes_the_real_format(tiny_checkpoint):
    written = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert set(written) == set(QWEN35_FILE) and written["image_processor_type"] == "Qwen2VLImageProcessorFast"
    assert load_config(tiny_checkpoint).preprocessor == preset_config("tiny").preprocessor
