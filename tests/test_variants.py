"""Checkpoint variants (ref.synth --variant): NVIDIA's mixed FP8/NVFP4 "-V2" layout and
compressed-tensors NVFP4. Readers give the normalised forms, decoded values are what the writer
quantized (checked against the independent oracles), configs round-trip, and the linter catches
each corruption with one line (exit 2) or one warning (exit 0)."""
import dataclasses
import json
import re

import ml_dtypes
import numpy as np
import pytest

from ckpt_edit import copy_checkpoint, edit_json, edit_tensors, edited_copy
from nvfp4_oracle import ct_weight, e2m1_value, e4m3_value, fp8_per_tensor_byte
from ref import nvfp4
from ref.checkpoint import DenseWeight, FP8Weight, NVFP4Weight, open_checkpoint
from ref.checkpoint_check import lint, main
from ref.config import load_config, parse_config, config_dict, hf_quant_config_dict
from ref.errors import CheckpointError
from ref.fp8 import dequantize_fp8
from ref.synth import dense_value, write_checkpoint
from ref.synth_variants import CT_IGNORE, quantized_dense

F32 = np.float32
L0, L3 = "model.language_model.layers.0", "model.language_model.layers.3"


@pytest.fixture(scope="module")
def mixed(tiny_checkpoint_mixed):
    return tiny_checkpoint_mixed


@pytest.fixture(scope="module")
def ct(tiny_checkpoint_ct):
    return tiny_checkpoint_ct


def run_check(d, capsys):
    code = main(["check", str(d)])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def _copy(src, tmp_path, edits=None, config=None, quant=None):
    return edited_copy(src, tmp_path / "c", edits, config, quant)


# ---- writing, reading, decoding ----------------------------------------------------------------

@pytest.mark.parametrize("which", ["mixed", "ct"])
def test_variants_are_valid_without_warnings(which, request, capsys):
    code, out, err = run_check(request.getfixturevalue(which), capsys)
    assert code == 0 and err == [] and "ok: valid, 0 lint warning(s)" in out
    assert ("MIXED_PRECISION" in out and "quant_method modelopt_mixed" in out and "kv cache: FP8" in out) \
        if which == "mixed" else ("compressed-tensors" in out and "kv cache: unquantized" in out)


def test_configs_round_trip(mixed, ct):
    # config.json (with hf_quant_config.json) alone: no preprocessor file, no preprocessor
    m, c = (dataclasses.replace(load_config(d), preprocessor=None) for d in (mixed, ct))
    assert m.quant.method == "modelopt_mixed" and m.quant.quant_algo == "MIXED_PRECISION"
    assert {a for _, a in m.quant.quantized_layers} == {"FP8", "NVFP4"} and m.quant.kv_cache_quant_algo == "FP8"
    assert parse_config(config_dict(m)) == m and parse_config(config_dict(m), hf_quant_config_dict(m.quant)) == m
    raw = json.loads((mixed / "config.json").read_text())["quantization_config"]
    fp8_group = next(g for g in raw["config_groups"].values() if g["weights"]["num_bits"] == 8)
    assert f"{L0}.linear_attn.in_proj_qkv" in fp8_group["targets"] and raw["quantized_layers"][
        f"{L3}.self_attn.q_proj"] == {"quant_algo": "FP8"}
    assert c.quant.method == "compressed-tensors" and c.quant.exclude_modules == CT_IGNORE
    assert parse_config(config_dict(c)) == c and not (ct / "hf_quant_config.json").exists()


def test_readers_give_normalised_forms(mixed, ct):
    m, c = open_checkpoint(mixed), open_checkpoint(ct)
    for module in (f"{L0}.linear_attn.in_proj_qkv", f"{L3}.self_attn.o_proj", f"{L0}.mlp.shared_expert.down_proj"):
        w = m.linear(module)
        assert isinstance(w, FP8Weight) and w.weight_e4m3.dtype == ml_dtypes.float8_e4m3fn
        assert w.weight_scale.shape == () and w.input_scale.shape == () and not hasattr(w, "weight")
        v = c.linear(module)
        assert isinstance(v, NVFP4Weight) and v.shape == w.shape and v.input_global_scale.shape == ()
        assert float(v.weight_scale_2) == float(nvfp4.invert_global_scale(c.tensor(module + ".weight_global_scale")))
        assert float(v.input_scale) == float(nvfp4.invert_global_scale(v.input_global_scale))
    for reader in (m, c):
        assert isinstance(reader.linear(f"{L0}.linear_attn.in_proj_a"), DenseWeight)
        assert isinstance(reader.expert(0, 3).up, NVFP4Weight) and reader.expert_input_scales(1).shape == (16,)
    assert m.kv_scales(3)[2] == "checkpoint" and c.kv_scales(3)[2] == "default 1.0"


def test_fp8_decodes_the_written_values(mixed):
    """Every FP8 module: codes = e4m3(w / weight_scale) of the BF16 source (oracle), scale = tied
    amax / 448, input scales tied across the pieces engines fuse."""
    ckpt = open_checkpoint(mixed)
    cfg, kinds = ckpt.config, quantized_dense(ckpt.config, "modelopt-mixed")
    fused = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
             "v_proj": ("q_proj", "k_proj", "v_proj"), "in_proj_qkv": ("in_proj_qkv", "in_proj_z"),
             "in_proj_z": ("in_proj_qkv", "in_proj_z"), "gate_proj": ("gate_proj", "up_proj"),
             "up_proj": ("gate_proj", "up_proj")}
    shapes = {n[:-len(".weight")]: s for n, s in __import__("ref.checkpoint_layout").checkpoint_layout
              .dense_tensors(cfg).items()}
    for module in kinds:
        parent, leaf = module.rsplit(".", 1)
        group = [f"{parent}.{x}" for x in fused.get(leaf, (leaf,))]
        src = {g: dense_value(g + ".weight", shapes[g], 0).astype(F32) for g in group}
        amax = max(float(np.abs(v).max()) for v in src.values())
        w = ckpt.linear(module)
        assert float(w.weight_scale) == float(F32(F32(amax) / F32(448)))
        head = src[module].reshape(-1)[:256]                    # the oracle is slow: a prefix of each module
        want = [fp8_per_tensor_byte(float(v), float(w.weight_scale), "divide") for v in head]
        assert w.weight_e4m3.view(np.uint8).reshape(-1)[:head.size].tolist() == want
        decoded = dequantize_fp8(w.weight_e4m3, w.weight_scale)
        assert np.all(np.abs(decoded - src[module]) <= np.abs(src[module]) / 16 + 2.0 ** -10 * float(w.weight_scale))
        assert len({float(ckpt.linear(g).input_scale) for g in group}) == 1


def test_ct_decodes_the_written_values(ct):
    """compressed-tensors modules and experts: bytes from the independent recipe oracle, values
    decoded through vLLM's inverted global within one E2M1 step of the BF16 source."""
    ckpt = open_checkpoint(ct)
    shapes = {n[:-len(".weight")]: s for n, s in __import__("ref.checkpoint_layout").checkpoint_layout
              .dense_tensors(ckpt.config).items()}
    for module in (f"{L0}.linear_attn.out_proj", f"{L3}.self_attn.o_proj", f"{L0}.mlp.shared_expert.down_proj"):
        src = dense_value(module + ".weight", shapes[module], 0).astype(F32)
        codes, sbytes, g = ct_weight(src)
        w = ckpt.linear(module)
        assert np.array_equal(nvfp4.unpack_e2m1(w.packed), codes) and np.array_equal(w.weight_scale.view(np.uint8),
                                                                                    sbytes)
        assert float(ckpt.tensor(module + ".weight_global_scale")[0]) == float(g)
        dq = nvfp4.dequantize(w.packed, w.weight_scale, w.weight_scale_2, dtype=np.float64)
        factor = np.repeat((np.vectorize(e4m3_value)(sbytes).astype(F32) * w.weight_scale_2).astype(F32), 16,
                           axis=1).astype(np.float64)                   # fp32(fp32(scale) * weight_scale_2)
        assert np.array_equal(dq, np.vectorize(e2m1_value)(codes) * factor)
        assert np.all(np.abs(dq - src) <= factor + 1e-12)       # within one E2M1 step (at most 2 x factor / 2)
    e = ckpt.expert(2, 5)
    assert e.gate.weight_scale_2 == e.up.weight_scale_2                   # gate/up share the global


def test_variant_fast_and_fused(tmp_path, capsys):
    d = write_checkpoint(tmp_path / "f", "tiny", seed=1, expert_layout="fused", variant="modelopt-mixed", fast=True)
    code, out, _ = run_check(d, capsys)
    assert code == 0 and "fused layout" in out
    with pytest.raises(CheckpointError, match="per-expert"):
        write_checkpoint(tmp_path / "g", "tiny", expert_layout="fused", variant="compressed-tensors")
    assert main is not None and not (tmp_path / "g").exists()


# ---- KV scales -----------------------------------------------------------------------------------

def test_kv_scale_rules(mixed, tmp_path):
    k, v = f"{L3}.self_attn.k_proj.k_scale", f"{L3}.self_attn.v_proj.v_scale"
    ckpt = open_checkpoint(mixed)
    ks, vs, src = ckpt.kv_scales(3)
    assert src == "checkpoint" and ks == ckpt.tensor(k) and vs == ckpt.tensor(v)
    with pytest.raises(CheckpointError, match="not a full-attention layer"):
        ckpt.kv_scales(0)
    only_k = open_checkpoint(_copy(mixed, tmp_path / "k", {v: lambda old: None}))
    assert only_k.kv_scales(3) == (ks, ks, "k_scale for both")
    only_v = open_checkpoint(_copy(mixed, tmp_path / "v", {k: lambda old: None}))
    with pytest.raises(CheckpointError, match="v_scale but no k_scale"):
        only_v.kv_scales(3)
    bad = open_checkpoint(_copy(mixed, tmp_path / "n", {k: lambda old: np.asarray(F32(0))}))
    with pytest.raises(CheckpointError, match="finite and positive"):
        bad.kv_scales(3)
    ct_names = _copy(mixed, tmp_path / "ct", {k: lambda old: None, v: lambda old: None})
    edit_tensors(ct_names, {f"{L3}.self_attn.q_norm.weight": lambda old: old})   # keep shard readable
    from ref.safetensors_io import SafetensorsFile, write_safetensors
    from ckpt_edit import shard_of
    path = shard_of(ct_names, f"{L3}.self_attn.q_norm.weight")
    f = SafetensorsFile(path)
    extra = {f"{L3}.self_attn.k_scale": np.ones(1, F32) * 2, f"{L3}.self_attn.v_scale": np.ones(1, F32) * 3}
    write_safetensors(path, {n: np.array(f.tensor(n)) for n in f.tensors} | extra)
    edit_json(ct_names / "model.safetensors.index.json", lambda raw: raw["weight_map"].update(
        {n: path.name for n in extra}))
    assert open_checkpoint(ct_names).kv_scales(3) == (2.0, 3.0, "checkpoint")


# ---- the linter on corrupted copies --------------------------------------------------------------

E3 = f"{L0}.mlp.experts.3"
MIXED_ERRORS = {
    "FP8 weight_scale missing": ({f"{L0}.linear_attn.in_proj_z.weight_scale": lambda old: None},
                                 "in_proj_z.weight': FP8 weight without its '.*in_proj_z.weight_scale' \\(missing\\)"),
    "FP8 input_scale missing": ({f"{L3}.self_attn.o_proj.input_scale": lambda old: None},
                                "o_proj.input_scale': missing"),
    "FP8 scale inverted": ({f"{L3}.self_attn.v_proj.weight_scale": lambda old: np.asarray(1 / old)},
                           "v_proj.weight_scale': weights decode up to .* the global scale looks inverted"),
    "NVFP4 global inverted": ({f"{E3}.up_proj.weight_scale_2": lambda old: np.asarray(1 / old)},
                              "experts.3.up_proj.weight_scale_2': weights decode up to"),
    "CT names on a ModelOpt expert": ({f"{E3}.down_proj.weight_global_scale": lambda old: None},
                                      None),
    "FP8 per-channel scale": ({f"{L0}.mlp.shared_expert.up_proj.weight_scale": lambda old: np.ones(2, F32)},
                              "shared_expert.up_proj.weight_scale': shape \\[2\\], expected one of"),
    "k_scale missing": ({f"{L3}.self_attn.k_proj.k_scale": lambda old: None}, "k_proj.k_scale': missing"),
}


def _add_tensor(d, near, name, value):
    from ckpt_edit import shard_of
    from ref.safetensors_io import SafetensorsFile, write_safetensors
    path = shard_of(d, near)
    f = SafetensorsFile(path)
    write_safetensors(path, {n: np.array(f.tensor(n)) for n in f.tensors} | {name: value})
    edit_json(d / "model.safetensors.index.json", lambda raw: raw["weight_map"].update({name: path.name}))


@pytest.mark.parametrize("case", sorted(MIXED_ERRORS))
def test_mixed_corruptions_exit_2(mixed, tmp_path, capsys, case):
    edits, message = MIXED_ERRORS[case]
    if message is None:  # a compressed-tensors global next to ModelOpt names
        d = copy_checkpoint(mixed, tmp_path / "c")
        _add_tensor(d, f"{E3}.down_proj.weight", f"{E3}.down_proj.weight_global_scale", np.ones(1, F32))
        message = "mixes conventions: ModelOpt '.*experts.3.down_proj.weight_scale_2' next to '.*weight_global_scale'"
    else:
        d = _copy(mixed, tmp_path, edits)
    code, out, lines = run_check(d, capsys)
    assert code == 2 and out == "" and lines and all(x.startswith(f"error: {d}/") for x in lines)
    assert len(lines) == 1 and re.search(message, lines[0]), lines


def test_fp8_modules_missing_from_quantized_layers(mixed, tmp_path, capsys):
    q = f"{L3}.self_attn.q_proj"

    def drop(layers):
        return {n: a for n, a in layers.items() if n != q}
    d = _copy(mixed, tmp_path, config=lambda c: c["quantization_config"].update(
        quantized_layers=drop(c["quantization_config"]["quantized_layers"])),
        quant=lambda h: h["quantization"].update(quantized_layers=drop(h["quantization"]["quantized_layers"])))
    code, _, lines = run_check(d, capsys)
    assert code == 2 and len(lines) == 1
    assert f"tensor '{q}': 1 module(s) like 'model.language_model.layers.*.self_attn.q_proj' stored FP8 but " \
           f"quantization_config.quantized_layers does not list them" in lines[0]
    wrong = _copy(mixed, tmp_path / "w", config=lambda c: c["quantization_config"]["quantized_layers"].update(
        {q: {"quant_algo": "NVFP4", "group_size": 16}}), quant=lambda h: h["quantization"]["quantized_layers"].update(
        {q: {"quant_algo": "NVFP4", "group_size": 16}}))
    code, _, lines = run_check(wrong, capsys)
    assert code == 2 and len(lines) == 1 and "stored FP8 but quantized_layers says NVFP4" in lines[0]
    other = _copy(mixed, tmp_path / "o", config=lambda c: c["quantization_config"]["quantized_layers"].update(
        {q: {"quant_algo": "FP8_PB_WO"}}))
    code, _, lines = run_check(other, capsys)
    assert code == 2 and len(lines) == 1 and "'FP8_PB_WO'; this reader supports ['FP8', 'NVFP4']" in lines[0]


def test_untied_fused_fp8_scales_lint(mixed, tmp_path, capsys):
    k = f"{L3}.self_attn.k_proj.weight_scale"
    d = _copy(mixed, tmp_path, {k: lambda old: np.asarray(old * F32(0.5))})
    code, out, lines = run_check(d, capsys)
    assert code == 0 and lines == []
    found = lint(open_checkpoint(d))
    assert len(found) == 1 and found[0].tensor == k
    assert "q_proj/k_proj/v_proj weight_scales differ (ratio 2)" in found[0].message


CT_ERRORS = {
    "global not inverted": ({f"{L0}.linear_attn.in_proj_qkv.weight_global_scale": lambda old: 1 / old},
                            "in_proj_qkv.weight_global_scale': weights decode up to"),
    "expert global not inverted": ({f"{E3}.gate_proj.weight_global_scale": lambda old: 1 / old},
                                   "experts.3.gate_proj.weight_global_scale': weights decode up to"),
    "global missing": ({f"{L3}.self_attn.k_proj.weight_global_scale": lambda old: None},
                       "k_proj.weight_global_scale': missing"),
}


@pytest.mark.parametrize("case", sorted(CT_ERRORS))
def test_ct_corruptions_exit_2(ct, tmp_path, capsys, case):
    edits, message = CT_ERRORS[case]
    code, out, lines = run_check(_copy(ct, tmp_path, edits), capsys)
    assert code == 2 and out == "" and len(lines) == 1 and re.search(message, lines[0]), lines


def test_ct_checkpoint_with_modelopt_tensors(ct, mixed, tmp_path, capsys):
    """One module in ModelOpt form inside a compressed-tensors checkpoint, and a ModelOpt
    hf_quant_config.json next to a compressed-tensors config: both mixes of conventions."""
    module = f"{L0}.mlp.shared_expert.gate_proj"
    d = copy_checkpoint(ct, tmp_path / "c")
    w = dense_value(module + ".weight", (32, 64), 0).astype(F32)
    packed, scale, g2 = nvfp4.quantize_weight(w)
    edit_tensors(d, {module + ".weight_packed": lambda old: None, module + ".weight_global_scale": lambda old: None,
                     module + ".input_global_scale": lambda old: None, module + ".weight_scale": lambda old: scale})
    for name, value in ((module + ".weight", packed), (module + ".weight_scale_2", g2),
                        (module + ".input_scale", np.asarray(F32(0.01)))):
        _add_tensor(d, module + ".weight_scale", name, value)
    code, _, lines = run_check(d, capsys)
    assert code == 2 and len(lines) == 1
    assert "1 module(s) like 'model.language_model.layers.*.mlp.shared_expert.gate_proj' use modelopt tensor names " \
           "but the config is compressed-tensors" in lines[0]
    e = copy_checkpoint(ct, tmp_path / "e")
    (e / "hf_quant_config.json").write_text((mixed / "hf_quant_config.json").read_text())
    code, _, lines = run_check(e, capsys)
    assert code == 2 and len(lines) == 1 and "mixes conventions" in lines[0] and "hf_quant_config.json" in lines[0]


def test_ct_ignore_list_mismatch_lint(ct, tmp_path, capsys):
    d = _copy(ct, tmp_path, config=lambda c: c["quantization_config"].update(
        ignore=c["quantization_config"]["ignore"] + [r"re:.*self_attn\.o_proj$"]))
    code, out, lines = run_check(d, capsys)
    assert code == 0 and lines == []
    found = lint(open_checkpoint(d))
    assert [f.message for f in found] == [
        "1 module(s) like 'model.language_model.layers.*.self_attn.o_proj' stored NVFP4 but the ignore list says BF16"]


def test_reader_errors_name_the_module(mixed, ct, tmp_path):
    fp8 = f"{L0}.linear_attn.in_proj_qkv"
    d = _copy(mixed, tmp_path / "m", {fp8 + ".weight_scale": lambda old: None})
    with pytest.raises(CheckpointError, match=f"FP8 weight without '{re.escape(fp8)}.weight_scale'"):
        open_checkpoint(d).linear(fp8)
    per_channel = _copy(mixed, tmp_path / "p", {fp8 + ".weight_scale": lambda old: np.ones(3, F32)})
    with pytest.raises(CheckpointError, match="per-tensor"):
        open_checkpoint(per_channel).linear(fp8)
    e = _copy(ct, tmp_path / "c", {f"{E3}.up_proj.weight_global_scale": lambda old: None})
    with pytest.raises(CheckpointError, match=f"no '{re.escape(E3)}.up_proj.weight_global_scale'"):
        open_checkpoint(e).expert(0, 3)
    z = _copy(ct, tmp_path / "z", {f"{E3}.up_proj.input_global_scale": lambda old: old * 0})
    with pytest.raises(CheckpointError, match="global_scale: expected a positive finite"):
        open_checkpoint(z).expert(0, 3)
