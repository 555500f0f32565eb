"""ref.checkpoint: both expert layouts read back what synth wrote, scale shapes broadcast, only the
bytes of the requested expert are touched, and broken directories give CheckpointErrors naming the
file and tensor."""
import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from ckpt_edit import copy_checkpoint, edit_json, edit_tensors, shard_of
from ref import checkpoint_layout as layout
from ref.checkpoint import INDEX, SINGLE, DenseWeight, NVFP4Weight, open_checkpoint
from ref.errors import CheckpointError, ConfigError
from ref.safetensors_io import SafetensorsFile, write_safetensors
from ref.synth import ExpertWeights, dense_value

P0 = "model.language_model.layers.0.mlp.experts"


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _same_weight(a, b) -> bool:
    if isinstance(a, DenseWeight):
        return isinstance(b, DenseWeight) and a.weight.dtype == b.weight.dtype and _bytes(a.weight) == _bytes(b.weight)
    return (isinstance(b, NVFP4Weight) and _bytes(a.packed) == _bytes(b.packed)
            and a.weight_scale.dtype == b.weight_scale.dtype and _bytes(a.weight_scale) == _bytes(b.weight_scale)
            and a.weight_scale_2.shape == b.weight_scale_2.shape == () and a.weight_scale_2 == b.weight_scale_2
            and a.input_scale.shape == b.input_scale.shape == () and a.input_scale == b.input_scale)


def test_open_reads_headers_only(tiny_checkpoint, monkeypatch):
    touched = []
    monkeypatch.setattr(SafetensorsFile, "view_bytes", lambda self, b, e, prefetch=False: touched.append((b, e)))
    ckpt = open_checkpoint(tiny_checkpoint)
    assert len(ckpt.names()) > 900 and touched == []
    assert ckpt.has(f"{P0}.3.gate_proj.weight") and not ckpt.has("nonexistent")


def test_both_layouts_read_back_identical_experts(tiny_checkpoint, tiny_checkpoint_fused):
    a, b = open_checkpoint(tiny_checkpoint), open_checkpoint(tiny_checkpoint_fused)
    assert a.expert_layout(0) == "per-expert" and b.expert_layout(0) == "fused"
    assert a.expert_layout("mtp") == "per-expert" and b.expert_layout("mtp") == "fused"
    t = a.config.text
    for layer in layout.expert_layers(a.config):
        for e in range(t.num_experts):
            x, y = a.expert(layer, e), b.expert(layer, e)
            assert all(_same_weight(getattr(x, p), getattr(y, p)) for p in ("gate", "up", "down"))
        assert layer == "mtp" or np.array_equal(a.expert_input_scales(layer), b.expert_input_scales(layer))
    ex = a.expert(2, 7)
    assert ex.gate.shape == ex.up.shape == (t.moe_intermediate_size, t.hidden_size)
    assert ex.down.shape == (t.hidden_size, t.moe_intermediate_size)
    assert a.expert_input_scales("mtp") is None and isinstance(a.expert("mtp", 0).gate, DenseWeight)


def test_experts_are_the_values_synth_generated(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    gen = ExpertWeights(ckpt.config, seed=0, recipe="modelopt-0.37", fast=False)
    for layer, e in ((0, 0), (3, 15), ("mtp", 4)):
        want, got = gen.arrays(layer, e), ckpt.expert(layer, e)
        for proj, part in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            w = getattr(got, part)
            if layer == "mtp":
                assert _bytes(w.weight) == _bytes(want[f"{proj}.weight"])
                continue
            assert _bytes(w.packed) == _bytes(want[f"{proj}.weight"])
            assert _bytes(w.weight_scale) == _bytes(want[f"{proj}.weight_scale"])
            assert w.weight_scale_2 == want[f"{proj}.weight_scale_2"]
        if layer != "mtp":  # tied gate/up: one global scale, one (calibrated) input scale
            assert got.gate.weight_scale_2 == got.up.weight_scale_2 and got.gate.input_scale == got.up.input_scale


def test_dense_tensors_round_trip(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    for name, shape in layout.dense_tensors(ckpt.config).items():
        got = ckpt.tensor(name)
        want = dense_value(name, shape, seed=0)
        assert got.shape == shape and got.dtype == want.dtype and _bytes(got) == _bytes(want), name
    assert ckpt.lm("layers.0.linear_attn.A_log").dtype == np.float32
    assert ckpt.lm("embed_tokens.weight").dtype == ml_dtypes.bfloat16
    assert isinstance(ckpt.linear("lm_head"), DenseWeight)
    assert isinstance(ckpt.linear(f"{P0}.1.up_proj"), NVFP4Weight)


def test_calibrated_input_scales_match_a_forward_pass(tiny_checkpoint):
    from ref import layers as L
    from ref.model import Model
    from ref.nvfp4 import GLOBAL_DIVISOR, dequantize
    from ref.synth import CALIBRATION_PROMPT, _rng
    from ref.tokenizer import load_tokenizer
    ckpt = open_checkpoint(tiny_checkpoint)
    tok, t = load_tokenizer(tiny_checkpoint), ckpt.config.text
    ids = tok.encode(tok.apply_chat_template(CALIBRATION_PROMPT))
    ids += _rng(0, "calibration").integers(0, tok.token_id("<|endoftext|>"), 48).tolist()
    dumps = {}
    Model(ckpt, precision="f32").prefill(ids, dumps=dumps)
    layer = 1
    x = L.rms_norm(dumps[f"layers.{layer}.after_mixer"],
                   ckpt.lm(f"layers.{layer}.post_attention_layernorm.weight").astype(np.float32), t.rms_norm_eps,
                   L.Precision("f32"))
    topk = dumps[f"layers.{layer}.topk_ids"]
    hit = np.unique(topk)
    want = {}
    for e in hit:
        xe, ex = x[(topk == e).any(axis=1)], ckpt.expert(layer, int(e))
        g, u = (xe @ dequantize(m.packed, m.weight_scale, m.weight_scale_2).T for m in (ex.gate, ex.up))
        want[e] = (np.abs(xe).max(), np.abs(L.silu(g) * u).max())
    for e in range(t.num_experts):
        ex = ckpt.expert(layer, e)
        a_in, a_down = want.get(e, (max(v[0] for v in want.values()), max(v[1] for v in want.values())))
        assert ex.gate.input_scale == np.float32(a_in / GLOBAL_DIVISOR)
        assert ex.down.input_scale == np.float32(a_down / GLOBAL_DIVISOR)


@pytest.mark.parametrize("layout_", ["per-expert", "fused"])
def test_reading_one_expert_touches_only_its_bytes(tiny_checkpoint, tiny_checkpoint_fused, monkeypatch, layout_):
    d = tiny_checkpoint if layout_ == "per-expert" else tiny_checkpoint_fused
    ckpt = open_checkpoint(d)
    layer, e, n = 2, 9, ckpt.config.text.num_experts
    p = ckpt.experts_prefix(layer)
    allowed = []  # (file, begin, end) of expert e's bytes
    for name in ckpt.names():
        info = ckpt.file_of(name).info(name)
        if name.startswith(f"{p}.{e}."):
            allowed.append((ckpt.file_of(name).path, info.begin, info.end))
        elif name.startswith((f"{p}.gate_up_proj", f"{p}.down_proj")) and info.shape[:1] == (n,):
            row = info.nbytes // n
            allowed.append((ckpt.file_of(name).path, info.begin + e * row, info.begin + (e + 1) * row))
    touched = []
    real = SafetensorsFile.view_bytes

    def spy(self, begin, end, prefetch=False):
        touched.append((self.path, begin, end))
        return real(self, begin, end, prefetch)

    monkeypatch.setattr(SafetensorsFile, "view_bytes", spy)
    ex = ckpt.expert(layer, e)
    np.asarray([np.sum(w.packed) + np.sum(w.weight_scale.astype(np.float32)) for w in (ex.gate, ex.up, ex.down)])
    assert touched and all(any(f == g and b0 <= b and e1 <= b1 for g, b0, b1 in allowed) for f, b, e1 in touched)
    t = ckpt.config.text
    expert_bytes = 3 * t.moe_intermediate_size * t.hidden_size * (1 / 2 + 1 / 16)
    assert expert_bytes <= sum(e1 - b for _, b, e1 in touched) <= expert_bytes + 64


def _fused_copy(src, dst, edits):
    copy_checkpoint(src, dst)
    edit_tensors(dst, edits)
    return open_checkpoint(dst)


@pytest.mark.parametrize("form", ["[]", "[1]", "[E]", "[E,2]", "bf16[]"])
def test_fused_scale_shapes_broadcast(tiny_checkpoint_fused, tmp_path, form):
    ref = open_checkpoint(tiny_checkpoint_fused)
    n = ref.config.text.num_experts
    g2 = np.linspace(1e-4, 2e-4, n, dtype=np.float32)
    pick = {"[]": lambda v: np.asarray(v[3]), "[1]": lambda v: v[3:4], "[E]": lambda v: v,
            "[E,2]": lambda v: np.stack([v, 2 * v], axis=1), "bf16[]": lambda v: np.asarray(v[3]).astype(ml_dtypes.bfloat16)}[form]
    ckpt = _fused_copy(tiny_checkpoint_fused, tmp_path / "c", {
        f"{P0}.gate_up_proj_weight_scale_2": lambda old: pick(g2), f"{P0}.gate_up_proj_input_scale": lambda old: pick(g2)})
    scalar = {"[]": g2[3], "[1]": g2[3], "bf16[]": np.float32(ml_dtypes.bfloat16(g2[3]))}
    for e in range(n):
        ex = ckpt.expert(0, e)
        gate = scalar.get(form, g2[e])
        up = 2 * g2[e] if form == "[E,2]" else gate
        for w, v in ((ex.gate, gate), (ex.up, up)):
            for s in (w.weight_scale_2, w.input_scale):
                assert s.dtype == np.float32 and s.shape == () and s == np.float32(v)
    scales = ckpt.expert_input_scales(0)
    want = [max(float(ckpt.expert(0, e).gate.input_scale), float(ckpt.expert(0, e).up.input_scale)) for e in range(n)]
    assert scales.shape == (n,) and scales.dtype == np.float32 and np.array_equal(scales, np.float32(want))


def test_bad_fused_scale_shape(tiny_checkpoint_fused, tmp_path):
    ckpt = _fused_copy(tiny_checkpoint_fused, tmp_path / "c",
                       {f"{P0}.down_proj_weight_scale_2": lambda old: np.ones((16, 2), np.float32)})
    with pytest.raises(CheckpointError, match="down_proj_weight_scale_2'.*\\[16, 2\\] is not \\[\\], \\[1\\] or \\[E\\]"):
        ckpt.expert(0, 1)


def test_per_expert_bf16_and_1d_scalars(tiny_checkpoint, tmp_path):
    name = f"{P0}.5.down_proj.weight_scale_2"
    ckpt = _fused_copy(tiny_checkpoint, tmp_path / "c", {name: lambda old: old.reshape(1).astype(ml_dtypes.bfloat16)})
    s = ckpt.expert(0, 5).down.weight_scale_2
    assert s.dtype == np.float32 and s.shape == ()
    assert s == np.float32(ml_dtypes.bfloat16(open_checkpoint(tiny_checkpoint).expert(0, 5).down.weight_scale_2))


def test_single_file_and_text_only_prefix(tiny_checkpoint, tmp_path):
    src = open_checkpoint(tiny_checkpoint)
    d = tmp_path / "flat"
    d.mkdir()
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    flat = dict(cfg["text_config"], architectures=["Qwen3_5MoeForCausalLM"], quantization_config=cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(flat))
    tensors = {n.replace("model.language_model.", "model."): np.array(src.tensor(n))
               for n in src.names() if not n.startswith("model.visual.")}
    write_safetensors(d / SINGLE, tensors)
    ckpt = open_checkpoint(d)
    assert not ckpt.config.multimodal and ckpt.config.text_prefix == "model."
    assert _bytes(ckpt.lm("norm.weight")) == _bytes(src.lm("norm.weight"))
    assert _same_weight(ckpt.expert(3, 2).down, src.expert(3, 2).down)
    assert ckpt.experts_prefix(1) == "model.layers.1.mlp.experts"


# ---- errors ------------------------------------------------------------------------------------

def test_accessor_errors(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        ckpt.tensor("nope")
    with pytest.raises(CheckpointError, match="layer 4 not in 0..3"):
        ckpt.expert(4, 0)
    with pytest.raises(CheckpointError, match="expert 16 not in 0..15"):
        ckpt.expert(0, 16)


def test_missing_shard(tiny_checkpoint, tmp_path):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    victim = shard_of(d, "lm_head.weight")
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim}: shard file missing \\(listed for tensor"):
        open_checkpoint(d)


def test_truncated_shard(tiny_checkpoint, tmp_path):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    victim = shard_of(d, "lm_head.weight")
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=f"{victim}: tensor '.*': data_offsets .* outside"):
        open_checkpoint(d)


def test_index_names_a_tensor_the_shard_lacks(tiny_checkpoint, tmp_path):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    edit_json(d / INDEX, lambda raw: raw["weight_map"].update({"ghost.weight": raw["weight_map"]["lm_head.weight"]}))
    with pytest.raises(CheckpointError, match="tensor 'ghost.weight' is in model.safetensors.index.json but not"):
        open_checkpoint(d)


@pytest.mark.parametrize("bad", ["{oops", '{"weight_map": [1]}', '{"weight_map": {"a": "../../etc/passwd"}}'])
def test_bad_index(tiny_checkpoint, tmp_path, bad):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    (d / INDEX).write_text(bad)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        open_checkpoint(d)


def test_no_weights_and_bad_config(tiny_checkpoint, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json and no model.safetensors"):
        open_checkpoint(d)
    (d / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        open_checkpoint(d)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        open_checkpoint(tmp_path / "absent")


def test_hub_ids_go_through_snapshot_download(tiny_checkpoint, monkeypatch):
    import huggingface_hub
    calls = []

    def fake(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    ckpt = open_checkpoint("someone/tiny-model")
    assert ckpt.directory == tiny_checkpoint and calls[0][0] == "someone/tiny-model"
    assert "*.safetensors" in calls[0][1] and "*.json" in calls[0][1]


def test_hub_offline_gives_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "ref.checkpoint", "check", "nobody/no-such-model"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: nobody/no-such-model: not a directory and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"]


def test_bf16_original_layout(tiny_checkpoint_fused, tmp_path):
    """The BF16 release's form: fused 3-D BF16 experts, no quantization metadata."""
    from ref.checkpoint_check import findings, summary
    from ref.nvfp4 import dequantize
    src = open_checkpoint(tiny_checkpoint_fused)
    t = src.config.text
    d = copy_checkpoint(tiny_checkpoint_fused, tmp_path / "bf16")
    edits = {}
    for i in range(t.num_hidden_layers):
        p = src.experts_prefix(i)
        ex = [src.expert(i, e) for e in range(t.num_experts)]
        deq = [{k: dequantize(w.packed, w.weight_scale, w.weight_scale_2).astype(ml_dtypes.bfloat16)
                for k, w in (("gate", x.gate), ("up", x.up), ("down", x.down))} for x in ex]
        edits[f"{p}.gate_up_proj"] = lambda old, deq=deq: np.stack([np.concatenate([x["gate"], x["up"]]) for x in deq])
        edits[f"{p}.down_proj"] = lambda old, deq=deq: np.stack([x["down"] for x in deq])
        for proj in ("gate_up_proj", "down_proj"):
            edits |= {f"{p}.{proj}_{k}": (lambda old: None) for k in ("weight_scale", "weight_scale_2", "input_scale")}
    edit_tensors(d, edits)
    edit_json(d / "config.json", lambda raw: raw.pop("quantization_config"))
    (d / "hf_quant_config.json").unlink()
    ckpt = open_checkpoint(d)
    assert ckpt.config.quant is None and findings(ckpt) == []
    assert "quantization: none" in summary(ckpt) and "linears: 192 float" in summary(ckpt)
    ex, want = ckpt.expert(2, 11), src.expert(2, 11)
    assert isinstance(ex.gate, DenseWeight) and ex.gate.weight.dtype == ml_dtypes.bfloat16
    assert np.array_equal(ex.up.weight.astype(np.float32),
                          dequantize(want.up.packed, want.up.weight_scale, want.up.weight_scale_2)
                          .astype(ml_dtypes.bfloat16).astype(np.float32))
    assert ckpt.expert_input_scales(2) is None


def test_expert_shapes_checked_against_config(tiny_checkpoint, tmp_path):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    edit_json(d / "config.json", lambda raw: raw["text_config"].update(moe_intermediate_size=16))
    with pytest.raises(CheckpointError, match=f"{P0}.3.gate_proj.weight'.*expert 3 is \\[out, in\\] = \\[32, 64\\], "
                                              f"config implies \\[16, 64\\]"):
        open_checkpoint(d).expert(0, 3)
