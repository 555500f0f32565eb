"""jaxrun on 2 and 4 simulated CPU devices (a subprocess, tests/jax_multidevice.py) against ref, and
the PartitionSpec of every parameter (the sharding rules of jaxrun.sharding, as a snapshot)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrun.check import BF16_MAX_KL, BF16_MEAN_KL
from jaxrun.load import describe
from jaxrun.sharding import param_specs
from ref.checkpoint import open_checkpoint
from ref.model import Model

PROMPTS = [[5, 17, 300, 42, 7, 99, 250, 1, 3], [64, 2, 11, 400]]
STEPS, CONTEXT, TOL = 8, 256, 1e-4
E = "expert"

# parameter path (layer index as *) -> (spec with --dense replicated, spec with --dense sharded), N = 4
SNAPSHOT = {
    ".embed_tokens": ((), (E, None)),
    ".layers[*].input_layernorm": ((), ()),
    ".layers[*].linear_attn.A_log": ((), ()),
    ".layers[*].linear_attn.conv1d": ((), (E, None)),
    ".layers[*].linear_attn.dt_bias": ((), ()),
    ".layers[*].linear_attn.in_proj_a.weight": ((), (E, None)),
    ".layers[*].linear_attn.in_proj_b.weight": ((), (E, None)),
    ".layers[*].linear_attn.in_proj_qkv.weight": ((), (E, None)),
    ".layers[*].linear_attn.in_proj_z.weight": ((), (E, None)),
    ".layers[*].linear_attn.norm": ((), ()),
    ".layers[*].linear_attn.out_proj.weight": ((), (None, E)),
    ".layers[*].mlp.experts.down_proj.weight": ((E, None, None), (E, None, None)),
    ".layers[*].mlp.experts.down_proj.weight_scale": ((E, None, None), (E, None, None)),
    ".layers[*].mlp.experts.down_proj.weight_scale_2": ((E,), (E,)),
    ".layers[*].mlp.experts.gate_proj.weight": ((E, None, None), (E, None, None)),
    ".layers[*].mlp.experts.gate_proj.weight_scale": ((E, None, None), (E, None, None)),
    ".layers[*].mlp.experts.gate_proj.weight_scale_2": ((E,), (E,)),
    ".layers[*].mlp.experts.input_scale": ((E, None), (E, None)),
    ".layers[*].mlp.experts.up_proj.weight": ((E, None, None), (E, None, None)),
    ".layers[*].mlp.experts.up_proj.weight_scale": ((E, None, None), (E, None, None)),
    ".layers[*].mlp.experts.up_proj.weight_scale_2": ((E,), (E,)),
    ".layers[*].mlp.gate.weight": ((), ()),
    ".layers[*].mlp.shared_expert.down_proj.weight": ((), (None, E)),
    ".layers[*].mlp.shared_expert.gate_proj.weight": ((), (E, None)),
    ".layers[*].mlp.shared_expert.up_proj.weight": ((), (E, None)),
    ".layers[*].mlp.shared_expert_gate.weight": ((), ()),
    ".layers[*].post_attention_layernorm": ((), ()),
    ".layers[*].self_attn.k_norm": ((), ()),
    ".layers[*].self_attn.k_scale": ((), ()),
    ".layers[*].self_attn.v_scale": ((), ()),
    ".layers[*].self_attn.k_proj.weight": ((), (E, None)),
    ".layers[*].self_attn.o_proj.weight": ((), (None, E)),
    ".layers[*].self_attn.q_norm": ((), ()),
    ".layers[*].self_attn.q_proj.weight": ((), (E, None)),
    ".layers[*].self_attn.v_proj.weight": ((), (E, None)),
    ".lm_head.weight": ((), (E, None)),
    ".mtp.fc.weight": ((), ()),
    ".mtp.layers[*].input_layernorm": ((), ()),
    ".mtp.layers[*].mlp.experts.down_proj.weight": ((E, None, None), (E, None, None)),
    ".mtp.layers[*].mlp.experts.gate_proj.weight": ((E, None, None), (E, None, None)),
    ".mtp.layers[*].mlp.experts.up_proj.weight": ((E, None, None), (E, None, None)),
    ".mtp.layers[*].mlp.gate.weight": ((), ()),
    ".mtp.layers[*].mlp.shared_expert.down_proj.weight": ((), (None, E)),
    ".mtp.layers[*].mlp.shared_expert.gate_proj.weight": ((), (E, None)),
    ".mtp.layers[*].mlp.shared_expert.up_proj.weight": ((), (E, None)),
    ".mtp.layers[*].mlp.shared_expert_gate.weight": ((), ()),
    ".mtp.layers[*].post_attention_layernorm": ((), ()),
    ".mtp.layers[*].self_attn.k_norm": ((), ()),
    ".mtp.layers[*].self_attn.k_scale": ((), ()),
    ".mtp.layers[*].self_attn.v_scale": ((), ()),
    ".mtp.layers[*].self_attn.k_proj.weight": ((), (E, None)),
    ".mtp.layers[*].self_attn.o_proj.weight": ((), (None, E)),
    ".mtp.layers[*].self_attn.q_norm": ((), ()),
    ".mtp.layers[*].self_attn.q_proj.weight": ((), (E, None)),
    ".mtp.layers[*].self_attn.v_proj.weight": ((), (E, None)),
    ".mtp.norm": ((), ()),
    ".mtp.pre_fc_norm_embedding": ((), ()),
    ".mtp.pre_fc_norm_hidden": ((), ()),
    ".norm": ((), ()),
}
# the vision tower: replicated in both layouts
SNAPSHOT |= {f"{m}.{w}": ((), ()) for m in (
    ".visual.patch_embed.proj", ".visual.blocks[*].norm1", ".visual.blocks[*].attn.qkv", ".visual.blocks[*].attn.proj",
    ".visual.blocks[*].norm2", ".visual.blocks[*].mlp.linear_fc1", ".visual.blocks[*].mlp.linear_fc2",
    ".visual.merger.norm", ".visual.merger.linear_fc1", ".visual.merger.linear_fc2") for w in ("weight", "bias")}
SNAPSHOT[".visual.pos_embed.weight"] = ((), ())


def _pattern(path: str) -> str:
    return re.sub(r"\[\d+\]", "[*]", path)


@pytest.mark.parametrize("mode", [0, 1], ids=["replicated", "sharded"])
def test_partition_spec_snapshot(tiny_checkpoint, mode):
    tree = describe(open_checkpoint(tiny_checkpoint))
    specs = param_specs(tree, 4, ("replicated", "sharded")[mode])
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    got = {jax.tree_util.keystr(p): tuple(s) for p, s in flat}
    assert {_pattern(k) for k in got} == set(SNAPSHOT)
    for k, spec in got.items():
        assert spec == SNAPSHOT[_pattern(k)][mode], k


@pytest.fixture(scope="module")
def multidevice(tiny_checkpoint):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    script = Path(__file__).with_name("jax_multidevice.py")
    out = subprocess.run([sys.executable, str(script), str(tiny_checkpoint), json.dumps(PROMPTS), str(STEPS),
                          str(CONTEXT)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_greedy_tokens_identical_on_2_and_4_devices_and_to_ref(tiny_checkpoint, multidevice):
    """f32 runs against ref f64 in the same activation mode (W4A4 with the layer-max input scale is a
    pmax over the devices), plain and speculative decoding alike."""
    assert multidevice["devices"] == 4
    refs = {}
    for run in (r for r in multidevice["runs"] if r["precision"] == "f32"):
        mode = (run["activations"], run["act_scale"])
        if mode not in refs:
            ref = Model(str(tiny_checkpoint), "f64", activations=mode[0], act_scale=mode[1])
            refs[mode] = ref, [ref.generate(p, STEPS) for p in PROMPTS]
        ref, want = refs[mode]
        assert run["tokens"] == want, (run["devices"], run["dense"], mode, run["speculative"])
        assert run["decode_traces"] == 1
        for p, toks, lg in zip(PROMPTS, run["tokens"], run["logits"]):
            full = ref.logits(p + toks)
            assert np.abs(np.array(lg) - full[len(p) - 1:len(p) - 1 + STEPS]).max() <= TOL


def test_bf16_on_4_devices_within_the_documented_bound(tiny_checkpoint, multidevice):
    ref = Model(str(tiny_checkpoint), "f64")
    (run,) = (r for r in multidevice["runs"] if r["precision"] == "bf16")
    for p, toks, lg in zip(PROMPTS, run["tokens"], run["logits"]):
        full = ref.logits(p + toks)[len(p) - 1:len(p) - 1 + STEPS]
        jl = np.array(lg, np.float64)
        lp_ref = full - np.logaddexp.reduce(full, axis=-1, keepdims=True)
        lp_jax = jl - np.logaddexp.reduce(jl, axis=-1, keepdims=True)
        kl = np.sum(np.exp(lp_ref) * (lp_ref - lp_jax), axis=-1)
        assert kl.mean() <= BF16_MEAN_KL and kl.max() <= BF16_MAX_KL


def test_placed_arrays_follow_the_rules(tiny_checkpoint, multidevice):
    cfg = open_checkpoint(tiny_checkpoint).config.text
    for run in multidevice["runs"]:
        n, mode = run["devices"], ("replicated", "sharded").index(run["dense"])
        for path, (spec, shard_shape) in run["placed"].items():
            assert tuple(spec) == SNAPSHOT[_pattern(path)][mode], path
            if ".experts." in path:
                assert shard_shape[0] == cfg.num_experts // n, path             # E/N experts per device
