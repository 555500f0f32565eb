"""The pieces of a multi-process run that need no second process: the settings from flags and the
environment, the fingerprint comparison, the scheduler's plans as JSON, the rules table on a 2-D mesh,
the device groups of HLO collectives (hand-worked cases of each notation), the launcher's command and
environment, and its report when a process fails."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrun.collectives import Collective, collectives
from jaxrun.distributed import Settings, checkpoint_fingerprint, disagreement
from jaxrun.launch import command_line, environment
from jaxrun.load import bytes_summary, describe
from jaxrun.scheduler import Plan
from jaxrun.sharding import HOSTS, param_specs, split_count
from ref.checkpoint import open_checkpoint
from ref.cli import UsageError
from ref.distributed_args import ENV, add_distributed_arguments, distributed_environ


def _args(*argv):
    p = argparse.ArgumentParser()
    add_distributed_arguments(p)
    return p.parse_args(list(argv))


def test_settings_from_flags_before_the_environment():
    env = {ENV["coordinator"]: "a:1", ENV["num_processes"]: "2", ENV["process_id"]: "1"}
    s = Settings.resolve(_args("--process-id", "0"), env)
    assert (s.coordinator, s.num_processes, s.process_id, s.active) == ("a:1", 2, 0, True)
    assert not Settings.resolve(_args(), {}).active and not Settings.resolve(_args("--num-processes", "1"), {}).active
    assert Settings.resolve(_args("--distributed", "auto"), {}).active
    assert distributed_environ(_args("--coordinator", "h:9", "--num-processes", "3")) == \
        {ENV["coordinator"]: "h:9", ENV["num_processes"]: "3"}


@pytest.mark.parametrize("argv, env, message", [
    (["--num-processes", "2"], {}, "also give --coordinator and --process-id"),
    (["--num-processes", "2", "--coordinator", "h:1", "--process-id", "2"], {}, "--process-id must be in 0..1"),
    (["--num-processes", "2", "--coordinator", "h", "--process-id", "0"], {}, "--coordinator must be HOST:PORT"),
    (["--num-processes", "0"], {}, "--num-processes must be >= 1"),
    ([], {ENV["num_processes"]: "two"}, "$JAXRUN_NUM_PROCESSES: expected int"),
    (["--distributed", "auto", "--init-timeout", "0.5"], {}, "--init-timeout must be a number of seconds >= 1"),
])
def test_settings_refused(argv, env, message):
    with pytest.raises(UsageError, match=message.replace("$", r"\$").replace(".", r"\.")):
        Settings.resolve(_args(*argv), env)


def test_disagreement_names_each_differing_entry_with_every_process_value():
    same = {"--seed": "0", "checkpoint": "ab"}
    assert disagreement([same, dict(same)]) == ""
    assert disagreement([same, {**same, "--seed": "1"}, same]) == "--seed (process 0: 0, process 1: 1, process 2: 0)"
    assert disagreement([same, {"--seed": "0"}]) == "checkpoint (process 0: ab, process 1: None)"


def test_checkpoint_fingerprint_follows_content_not_path(tiny_checkpoint, tiny_checkpoint_fused, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(tiny_checkpoint)
    assert checkpoint_fingerprint(tiny_checkpoint_fused) != checkpoint_fingerprint(tiny_checkpoint)
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header] ^= 0xFF                                  # the first data byte: the first sample reads it
    shard.write_bytes(bytes(data))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(tiny_checkpoint)


def test_plans_round_trip_through_json():
    plans = [Plan(stop=True), Plan(step=True), Plan(), Plan(step=False, request=7, prompt=(1, 2, 3), all_logits=True,
                                                            sampling=(0.7, 0.9, 5, 2 ** 62 + 1), slot=3),
             Plan(step=True, request=8, sampling=(0.0, 1.0, 0, -5), slot=0)]
    import json
    for plan in plans:
        assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert Plan(step=True).to_json() == {"step": True}


def test_rules_on_a_two_dimensional_mesh(tiny_checkpoint):
    """Experts over host x expert; tensor-parallel dense weights over the local axis only."""
    declared = describe(open_checkpoint(tiny_checkpoint))
    sizes = {HOSTS: 2, "expert": 2}
    for dense in ("replicated", "sharded"):
        specs = param_specs(declared, sizes, dense)
        layer = specs.layers[0]
        assert tuple(layer.mlp.experts.down_proj.weight) == ((HOSTS, "expert"), None, None)
        assert split_count(layer.mlp.experts.down_proj.weight, sizes) == 4
        want = ("expert", None) if dense == "sharded" else ()
        assert tuple(specs.lm_head.weight) == want and tuple(layer.mlp.gate.weight) == ()


HLO = """
  %a = f32[2,64]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %b = f32[2,64]{1,0} all-reduce(%y), channel_id=2, replica_groups=[2,2]<=[4], to_apply=%add
  %c = f32[2,256]{1,0} all-reduce(%z), channel_id=3, replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add
  %d = f32[2,512]{0,1} all-gather(%w), replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=2], \
device_ids=([2,2]T(1,0)) {'axis_1'}, dimensions={1}
  %e = f32[2,1,16]{2,1,0} collective-permute(%v), channel_id=5, source_target_pairs={{0,2},{1,3}}
  %f = bf16[8]{0} add(bf16[8]{0} %p, bf16[8]{0} %q)
"""


def test_collective_groups_in_each_notation():
    """Hand-worked: iota [2,2]<=[4] is {0,1},{2,3}; transposed, {0,2},{1,3}; the mesh form reshapes the
    device order [0,2,1,3] to [1,2,2] and groups along axis_1: {0,1},{2,3}."""
    found = collectives(HLO)
    assert [(c.op, c.groups) for c in found] == [
        ("all-reduce", ((0, 1, 2, 3),)), ("all-reduce", ((0, 1), (2, 3))), ("all-reduce", ((0, 2), (1, 3))),
        ("all-gather", ((0, 1), (2, 3))), ("collective-permute", ((0, 2), (1, 3)))]
    process_of = [0, 0, 1, 1]
    assert [c.crosses(process_of) for c in found] == [True, False, True, False, True]
    assert found[0].nbytes == 2 * 64 * 4 and Collective("all-to-all", "(f32[1,4]{1,0}, s32[2]{0})", ()).nbytes == 24


def test_launch_command_and_environment():
    assert command_line(["jaxrun.generate", "--json"]) == [sys.executable, "-m", "jaxrun.generate", "--json"]
    assert command_line(["tests/x.py", "a"]) == [sys.executable, "tests/x.py", "a"]
    assert command_line(["python", "-m", "jaxrun.serve"]) == ["python", "-m", "jaxrun.serve"]
    env = environment(1, 3, 4567, 2, base={"XLA_FLAGS": "--xla_foo"})
    assert env[ENV["coordinator"]] == "127.0.0.1:4567" and env[ENV["num_processes"]] == "3"
    assert env[ENV["process_id"]] == "1" and env["JAX_LOCAL_DEVICE_IDS"] == "2,3"
    assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=2"


def test_launch_reports_a_failed_process_and_returns_its_status(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\nif os.environ['JAXRUN_PROCESS_ID'] == '1':\n"
                      "    print('follower says why', file=sys.stderr); sys.exit(5)\nprint('leader ok')\n")
    r = subprocess.run([sys.executable, "-m", "jaxrun.launch", "-n", "2", "--", str(script)], capture_output=True,
                       text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert r.returncode == 5 and r.stdout == "leader ok\n"
    assert "jaxrun.launch: process 1 ended with exit status 5; its last lines:" in r.stderr
    assert "  [1] follower says why" in r.stderr


def test_bytes_summary():
    assert bytes_summary([876584]) == "876.6 kB of the checkpoint"
    assert bytes_summary([116_500_000_000, 116_400_000_000]) == "116.5 + 116.4 GB of the checkpoint (per process)"
    assert bytes_summary([0]) == "0 B of the checkpoint"
