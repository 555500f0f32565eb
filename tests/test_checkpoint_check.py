"""`python -m ref.checkpoint check`: exit 0 with a summary for valid checkpoints (lint findings are
warnings), exit 2 with one line per problem naming the file and tensor, never a traceback."""
import re
import subprocess
import sys

import numpy as np
import pytest

from ckpt_edit import copy_checkpoint, edit_json, edit_tensors, edited_copy, shard_of
from ref.checkpoint import open_checkpoint
from ref.checkpoint_check import Finding, lint, main, validate

L0 = "model.language_model.layers.0"
P0 = f"{L0}.mlp.experts"


def run_check(d, capsys, *extra):
    code = main(["check", str(d), *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("which", ["tiny_checkpoint", "tiny_checkpoint_fused"])
def test_valid_checkpoints_pass(which, request, capsys):
    d = request.getfixturevalue(which)
    code, out, err = run_check(d, capsys)
    assert code == 0 and err == ""
    assert "4 layers (1 full_attention, 3 linear_attention)" in out and "16 per layer, top-4" in out
    assert "routed experts" in out and "ok: valid, 0 lint warning(s)" in out
    assert lint(open_checkpoint(d)) == []


def test_module_entry_point(tiny_checkpoint, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ref.checkpoint", "check", str(tiny_checkpoint)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok: valid" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ref.checkpoint", "check", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def _broken(src, tmp_path, edits=None, config=None, quant=None):
    return edited_copy(src, tmp_path / "c", edits, config, quant)


def _nan_bytes(old):
    new = old.copy()
    new.view(np.uint8).reshape(-1)[:3] = 0x7F
    return new


TENSOR_CASES = {
    "missing tensor": ({f"{L0}.linear_attn.in_proj_z.weight": lambda old: None},
                       f"{L0}.linear_attn.in_proj_z.weight': missing"),
    "wrong shape": ({f"{L0}.mlp.gate.weight": lambda old: old[:8]},
                    f"{L0}.mlp.gate.weight': shape \\[8, 64\\], expected \\[16, 64\\]"),
    "wrong dtype": ({"lm_head.weight": lambda old: old.view(np.uint16)}, "lm_head.weight': dtype U16, expected BF16"),
    "NaN global scale": ({f"{P0}.2.up_proj.weight_scale_2": lambda old: np.asarray(np.float32(np.nan))},
                         f"{P0}.2.up_proj.weight_scale_2': scale must be finite and positive, found nan"),
    "negative input scale": ({f"{P0}.2.gate_proj.input_scale": lambda old: -old},
                             f"{P0}.2.gate_proj.input_scale': scale must be finite and positive"),
    "NaN block scale bytes": ({f"{P0}.4.down_proj.weight_scale": _nan_bytes},
                              f"{P0}.4.down_proj.weight_scale': 3 block scale bytes are NaN"),
    "missing input_scale": ({f"{P0}.7.down_proj.input_scale": lambda old: None},
                            f"{P0}.7.down_proj.input_scale': missing"),
    "packed width": ({f"{P0}.1.gate_proj.weight": lambda old: old[:, :16]},
                     f"{P0}.1.gate_proj.weight': shape \\[32, 16\\], expected \\[32, 32\\]"),
    "block scale dtype": ({f"{P0}.1.gate_proj.weight_scale": lambda old: old.view(np.uint8)},
                          f"{P0}.1.gate_proj.weight_scale': dtype U8, expected F8_E4M3"),
    "scale not scalar": ({f"{P0}.1.up_proj.weight_scale_2": lambda old: np.ones(2, np.float32)},
                         f"{P0}.1.up_proj.weight_scale_2': shape \\[2\\], expected one of"),
    "experts gone": ({f"{P0}.{e}.{p}.{k}": (lambda old: None) for e in range(16)
                      for p in ("gate_proj", "up_proj", "down_proj")
                      for k in ("weight", "weight_scale", "weight_scale_2", "input_scale")},
                     "routed experts of layer 0 missing"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_tensor_problems_exit_2(tiny_checkpoint, tmp_path, capsys, case):
    edits, message = TENSOR_CASES[case]
    d = _broken(tiny_checkpoint, tmp_path, edits)
    code, out, err = run_check(d, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and lines, case
    assert all(line.startswith(f"error: {d}/") for line in lines)  # each line names a file in the checkpoint
    assert any(re.search(message, line) for line in lines), (case, lines)


FUSED_CASES = {
    "fused scale shape": ({f"{P0}.down_proj_input_scale": lambda old: np.ones((16, 2), np.float32)},
                          f"{P0}.down_proj_input_scale': shape \\[16, 2\\], expected one of"),
    "fused packed shape": ({f"{P0}.gate_up_proj": lambda old: old[:, :32]},
                           f"{P0}.gate_up_proj': shape \\[16, 32, 32\\], expected \\[16, 64, 32\\]"),
    "fused missing input scale": ({f"{P0}.gate_up_proj_input_scale": lambda old: None},
                                  f"{P0}.gate_up_proj_input_scale': missing"),
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_problems_exit_2(tiny_checkpoint_fused, tmp_path, capsys, case):
    edits, message = FUSED_CASES[case]
    code, out, err = run_check(_broken(tiny_checkpoint_fused, tmp_path, edits), capsys)
    assert code == 2 and re.search(message, err), err


CONFIG_CASES = {
    "unknown quant_algo": (None, lambda q: q["quantization"].update(quant_algo="FP8_BLOCK"),
                           "hf_quant_config.json: field 'quant_algo' is 'FP8_BLOCK'"),
    "missing field": (lambda c: c["text_config"].pop("hidden_size"), None,
                      "config.json: field 'text_config.hidden_size' is missing"),
    "layer_types length": (lambda c: c["text_config"].update(layer_types=["linear_attention"] * 3), None,
                           "field 'text_config.layer_types' has 3 entries but num_hidden_layers is 4"),
    "heads do not divide": (lambda c: c["text_config"].update(num_key_value_heads=3), None,
                            "field 'text_config.num_key_value_heads': 3 does not divide"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_problems_exit_2(tiny_checkpoint, tmp_path, capsys, case):
    config, quant, message = CONFIG_CASES[case]
    d = _broken(tiny_checkpoint, tmp_path, config=config, quant=quant)
    code, out, err = run_check(d, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_config_shape_mismatch_names_tensors(tiny_checkpoint, tmp_path, capsys):
    d = _broken(tiny_checkpoint, tmp_path, config=lambda c: c["text_config"].update(moe_intermediate_size=48))
    code, _, err = run_check(d, capsys)
    assert code == 2 and f"{P0}.0.gate_proj.weight': shape [32, 32], expected [48, 32]" in err


def test_config_disagreeing_with_every_layer_gives_grouped_lines_and_the_cause(tiny_checkpoint, tmp_path, capsys):
    """num_experts wrong in the config: hundreds of tensors disagree, a handful of lines say so, the first
    naming the config field that explains them."""
    d = _broken(tiny_checkpoint, tmp_path, config=lambda c: c["text_config"].update(num_experts=32))
    code, out, err = run_check(d, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) <= 12
    assert lines[0] == f"error: {d}/config.json: likely cause: config says num_experts = 32, the checkpoint has 16 " \
                       f"(5 tensors match num_experts = 16)"
    assert any("(and 63 more like 'model.language_model.layers.*.mlp.experts.*.gate_proj.weight')" in line
               for line in lines)


def test_unreadable_shard_exit_2(tiny_checkpoint, tmp_path, capsys):
    d = copy_checkpoint(tiny_checkpoint, tmp_path / "c")
    shard_of(d, "lm_head.weight").write_bytes(b"\xff" * 16)
    code, out, err = run_check(d, capsys)
    assert code == 2 and "header length" in err and len(err.strip().splitlines()) == 1


# ---- lint: warnings, exit 0 --------------------------------------------------------------------

def _lint_of(src, tmp_path, capsys, **kw):
    d = _broken(src, tmp_path, **kw)
    code, out, err = run_check(d, capsys)
    assert code == 0 and err == "", err
    found = lint(open_checkpoint(d))
    assert validate(open_checkpoint(d)) == [] and all(isinstance(f, Finding) for f in found)
    assert [line for line in out.splitlines() if line.startswith("warning: ")] == [f"warning: {f}" for f in found]
    return found


def test_lint_untied_gate_up(tiny_checkpoint, tmp_path, capsys):
    found = _lint_of(tiny_checkpoint, tmp_path, capsys, edits={
        f"{P0}.3.up_proj.weight_scale_2": lambda old: old * np.float32(4),
        f"{P0}.5.up_proj.input_scale": lambda old: old * np.float32(1.5)})
    msgs = {f.message.split(" not tied")[0]: f for f in found}
    assert set(msgs) == {"layer 0: gate/up weight_scale_2", "layer 0: gate/up input_scale"}
    assert "1/16 experts (worst: expert 3, ratio 4)" in msgs["layer 0: gate/up weight_scale_2"].message
    assert msgs["layer 0: gate/up input_scale"].tensor == f"{P0}.5.up_proj.input_scale"


def test_lint_untied_fused(tiny_checkpoint_fused, tmp_path, capsys):
    def untie(old):
        new = old.copy()
        new[2, 1] *= 3
        return new
    found = _lint_of(tiny_checkpoint_fused, tmp_path, capsys, edits={f"{P0}.gate_up_proj_weight_scale_2": untie})
    assert len(found) == 1 and "worst: expert 2, ratio 3" in found[0].message
    assert found[0].tensor == f"{P0}.gate_up_proj_weight_scale_2" and found[0].file.endswith(".safetensors")


def test_lint_underflowed_block_scales(tiny_checkpoint, tmp_path, capsys):
    def zero(old):
        new = old.copy()
        new[0, :2] = 0
        return new
    found = _lint_of(tiny_checkpoint, tmp_path, capsys, edits={f"{P0}.6.gate_proj.weight_scale": zero})
    assert [f.message for f in found] == ["2 of 128 block scales underflowed to 0 (those blocks decode to 0)"]
    assert lint(open_checkpoint(tmp_path / "c"), block_scales=False) == []


def test_lint_uncalibrated_input_scales(tiny_checkpoint, tmp_path, capsys):
    edits = {f"{P0}.{e}.{p}.input_scale": (lambda old: np.asarray(np.float32(1.0)))
             for e in range(16) for p in ("gate_proj", "up_proj")}
    edits |= {f"{L0.replace('0', '1')}.mlp.experts.{e}.down_proj.input_scale": (lambda old: np.asarray(np.float32(0.01)))
              for e in range(16)}
    found = _lint_of(tiny_checkpoint, tmp_path, capsys, edits=edits)
    assert sorted(f.message for f in found) == [
        "layer 0: 16/16 gate_proj input scales are exactly 1.0 (a default, not a calibrated amax/2688)",
        "layer 1: all 16 experts share one down_proj input scale 0.01 (not calibrated per expert)"]


def test_lint_exclude_list_mismatch(tiny_checkpoint, tmp_path, capsys):
    def exclude(q):
        q["quantization"]["exclude_modules"] = [m for m in q["quantization"]["exclude_modules"] if "self_attn" not in m]
        q["quantization"]["exclude_modules"].append("model.language_model.layers.2.mlp.experts*")
    found = _lint_of(tiny_checkpoint, tmp_path, capsys, quant=exclude)
    nvfp4 = [f"16 module(s) like 'model.language_model.layers.*.mlp.experts.*.{p}' stored NVFP4 but the exclude "
             f"list says BF16" for p in ("down_proj", "gate_proj", "up_proj")]
    bf16 = [f"1 module(s) like 'model.language_model.layers.*.self_attn.{p}' stored BF16 but not in the exclude list "
            f"(expected NVFP4)" for p in ("k_proj", "o_proj", "q_proj", "v_proj")]
    assert sorted(f.message for f in found) == bf16 + nvfp4
    assert {f.tensor for f in found if "NVFP4 but" in f.message} == {f"{P0.replace('0', '2')}.0.{p}" for p in
                                                                     ("gate_proj", "up_proj", "down_proj")}


def test_lint_unexpected_tensors(tiny_checkpoint, tmp_path, capsys):
    found = _lint_of(tiny_checkpoint, tmp_path, capsys, edits={
        f"{P0}.0.gate_proj.weight_scale_2": lambda old: old})  # no-op rewrite keeps it valid
    assert found == []
    d = tmp_path / "c"
    edit_tensors(d, {"lm_head.weight": lambda old: old})
    from ref.safetensors_io import SafetensorsFile, write_safetensors
    path = shard_of(d, "lm_head.weight")
    f = SafetensorsFile(path)
    tensors = {n: np.array(f.tensor(n)) for n in f.tensors} | {
        f"{L0.replace('0', '3')}.self_attn.k_proj.k_scale": np.asarray(np.float32(1.0))}
    write_safetensors(path, tensors)
    edit_json(d / "model.safetensors.index.json", lambda raw: raw["weight_map"].update(
        {f"{L0.replace('0', '3')}.self_attn.k_proj.k_scale": path.name}))
    found = lint(open_checkpoint(d))
    assert [f.message for f in found] == [
        "1 tensor(s) like 'model.language_model.layers.*.self_attn.k_proj.k_scale' not implied by the config"]


def test_kv_cache_scales(tiny_checkpoint, tmp_path, capsys):
    """kv_cache_quant_algo set: every full-attention layer needs k_scale / v_scale scalars; the MTP
    layer only if it has either (ModelOpt leaves the MTP block unquantized)."""
    d = _broken(tiny_checkpoint, tmp_path, quant=lambda q: q["quantization"].update(kv_cache_quant_algo="FP8"))
    code, _, err = run_check(d, capsys)
    assert code == 2 and f"{L0[:-1]}3.self_attn.k_proj.k_scale': missing" in err and "mtp.layers" not in err
    from ref.safetensors_io import SafetensorsFile, write_safetensors
    path = shard_of(d, "lm_head.weight")
    f = SafetensorsFile(path)
    extra = {f"{p}.self_attn.{k}_proj.{k}_scale": np.asarray(np.float32(1.0))
             for p, ks in ((f"{L0[:-1]}3", "kv"), ("mtp.layers.0", "k")) for k in ks}
    write_safetensors(path, {n: np.array(f.tensor(n)) for n in f.tensors} | extra)
    edit_json(d / "model.safetensors.index.json", lambda raw: raw["weight_map"].update({n: path.name for n in extra}))
    code, _, err = run_check(d, capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {path.parent / 'model.safetensors.index.json'}: tensor 'mtp.layers.0.self_attn.v_proj.v_scale': "
        f"missing (the config declares a FP8 KV cache)"]
    extra["mtp.layers.0.self_attn.v_proj.v_scale"] = np.asarray(np.float32(1.0))
    f = SafetensorsFile(path)
    write_safetensors(path, {n: np.array(f.tensor(n)) for n in f.tensors} | extra)
    edit_json(d / "model.safetensors.index.json", lambda raw: raw["weight_map"].update({n: path.name for n in extra}))
    code, out, err = run_check(d, capsys)
    assert code == 0 and "ok: valid, 0 lint warning(s)" in out and "kv cache: FP8" in out
