"""ref.synth: deterministic, in the real layout, never half-written, refuses to clobber."""
import json
import os

import pytest

import ref.synth as synth
from ref.checkpoint import INDEX, SINGLE, open_checkpoint
from ref.checkpoint_check import findings
from ref.errors import CheckpointError, ConfigError
from ref.safetensors_io import SafetensorsFile
from ref.synth import main, parse_size, write_checkpoint
from ref.tokenizer import load_tokenizer

EXPECTED_FILES = {"config.json", "hf_quant_config.json", "generation_config.json", "preprocessor_config.json",
                  "tokenizer.json", "tokenizer_config.json", INDEX}


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_fixture_layout(tiny_checkpoint):
    names = set(os.listdir(tiny_checkpoint))
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert EXPECTED_FILES <= names and len(shards) > 1
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    index = json.loads((tiny_checkpoint / INDEX).read_text())
    total = sum(t.nbytes for s in shards for t in SafetensorsFile(tiny_checkpoint / s).tensors.values())
    assert index["metadata"]["total_size"] == total and set(index["weight_map"].values()) == set(shards)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"] and cfg["model_type"] == "qwen3_5_moe"
    assert cfg["quantization_config"]["quant_algo"] == "NVFP4" and "text_config" in cfg and "vision_config" in cfg
    q = json.loads((tiny_checkpoint / "hf_quant_config.json").read_text())
    assert q["producer"] == {"name": "modelopt", "version": "0.37.0"} and q["quantization"]["group_size"] == 16
    assert "lm_head" in q["quantization"]["exclude_modules"]
    gen = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    tok = load_tokenizer(tiny_checkpoint)
    assert gen["eos_token_id"] == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]
    assert open_checkpoint(tiny_checkpoint).config.text.eos_token_ids == (tok.token_id("<|im_end|>"),)
    assert cfg["image_token_id"] == tok.token_id("<|image_pad|>")
    assert not [p for p in tiny_checkpoint.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_deterministic_per_seed(tiny_checkpoint, tmp_path):
    again = write_checkpoint(tmp_path / "again", "tiny", seed=0)
    assert _files(again) == _files(tiny_checkpoint)
    other = write_checkpoint(tmp_path / "other", "tiny", seed=1, fast=True)
    a, b = open_checkpoint(tiny_checkpoint), open_checkpoint(other)
    assert a.lm("norm.weight").tobytes() != b.lm("norm.weight").tobytes()
    assert a.expert(0, 0).gate.packed.tobytes() != b.expert(0, 0).gate.packed.tobytes()


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("recipe", ["modelopt-0.37", "modelopt-0.45"])
def test_fast_and_recipes_are_valid(tmp_path, layout, recipe):
    d = write_checkpoint(tmp_path / "c", "tiny", seed=3, expert_layout=layout, recipe=recipe, fast=True,
                         shard_size=10 ** 9)
    assert (d / SINGLE).exists() and not (d / INDEX).exists()
    ckpt = open_checkpoint(d)
    assert findings(ckpt) == []
    assert ckpt.config.quant.producer == {"modelopt-0.37": "modelopt 0.37.0", "modelopt-0.45": "modelopt 0.45.0"}[recipe]
    scales = ckpt.expert_input_scales(1)
    assert scales.shape == (16,) and (scales > 0).all()


def test_layers_option(tmp_path):
    d = write_checkpoint(tmp_path / "c", "tiny", layers=2, fast=True)
    ckpt = open_checkpoint(d)
    assert ckpt.config.text.num_hidden_layers == 2 and findings(ckpt) == []
    with pytest.raises(ConfigError, match="--layers must be positive"):
        write_checkpoint(tmp_path / "d", "tiny", layers=0)


def test_refuses_non_empty_directory(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty \\(use --force"):
        write_checkpoint(d, "tiny", fast=True)
    with pytest.raises(CheckpointError, match="refusing to replace a non-empty directory without config.json"):
        write_checkpoint(d, "tiny", fast=True, force=True)
    assert os.listdir(d) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_checkpoint(empty, "tiny", fast=True)
    write_checkpoint(empty, "tiny", seed=5, fast=True, force=True)  # replaces a checkpoint
    assert open_checkpoint(empty).lm("norm.weight").tobytes() != open_checkpoint(
        write_checkpoint(tmp_path / "s0", "tiny", fast=True)).lm("norm.weight").tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "empty", "s0"]


def test_never_half_written(tmp_path, monkeypatch):
    def boom(*a, **kw):
        raise OSError("disk full")
    monkeypatch.setattr(synth, "calibrate", boom)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path / "c", "tiny")
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "c"), "--fast", "--expert-layout", "fused", "--shard-size", "100KB"]) == 0
    out = capsys.readouterr().out
    assert "wrote model-00001-of-" in out and out.strip().endswith(f"wrote {tmp_path / 'c'}")
    assert open_checkpoint(tmp_path / "c").expert_layout(0) == "fused"
    assert main([str(tmp_path / "c"), "--fast"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "Traceback" not in err


def test_calibration_reports_routing_and_norms(tmp_path):
    lines = []
    write_checkpoint(tmp_path / "c", "tiny", seed=2, log=lines.append)
    stats = [line for line in lines if line.startswith("layer ")]
    assert len(stats) == 4 and all("router entropy" in s and "hidden RMS" in s for s in stats)
    for s in stats:  # routing spread but not uniform, activations O(1)
        entropy = float(s.split("router entropy ")[1].split()[0])
        rms = float(s.split("hidden RMS ")[1])
        assert 0.5 < entropy < 2.7 and 0.3 < rms < 10


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("256KiB") == 256 * 1024 and parse_size("4096") == 4096
    assert parse_size("1.5MB") == 1_500_000
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_cached_checkpoint_is_written_once(tmp_path, monkeypatch, capsys):
    from ref.synth import cached_checkpoint
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = cached_checkpoint("tiny")
    assert first == tmp_path / "qwen35-nvfp4-spec" / "tiny" and (first / "config.json").is_file()
    assert "writing the tiny synthetic checkpoint" in capsys.readouterr().err
    stamp = (first / "config.json").stat().st_mtime_ns
    assert cached_checkpoint("tiny") == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""
