"""python -m ref.run: outputs, dumps, generation, and one-line exit-2 errors without output files."""
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from ref.checkpoint import open_checkpoint
from ref.model import Model
from ref.run import main
from ref.tokenizer import load_tokenizer

IDS = [3, 141, 59, 26, 5, 35, 89, 79]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Model(open_checkpoint(tiny_checkpoint))


def test_logits_dumps_and_greedy_tokens(tiny_checkpoint, model, tmp_path, capsys):
    out, dump = tmp_path / "logits.npy", tmp_path / "layers.safetensors"
    rc = main(["--model", str(tiny_checkpoint), "--token-ids", ",".join(map(str, IDS)), "--logits-out", str(out),
               "--dump-layers", str(dump), "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert rc == 0
    logits = np.load(out)
    assert logits.dtype == np.float64
    np.testing.assert_array_equal(logits, model.logits(IDS))
    dumps = load_file(str(dump))
    np.testing.assert_array_equal(dumps["logits"], logits)
    assert "layers.3.topk_ids" in dumps and dumps["layers.3.topk_ids"].dtype == np.int32
    want = model.generate(IDS, 3, stop_ids=model.cfg.eos_token_ids)
    assert f"generated ids: {','.join(map(str, want))}" in captured.out
    assert "generated text:" in captured.out
    assert "ref.run: 100%" in captured.err and "linear_attention" not in captured.err  # a bar, not lines
    main(["--model", str(tiny_checkpoint), "--token-ids", "1,2", "--verbose"])
    assert "layer 4/4" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.safetensors", "logits.npy"]


def test_prompt_with_chat_template_and_bf16(tiny_checkpoint, tmp_path):
    out = tmp_path / "l.npy"
    assert main(["--model", str(tiny_checkpoint), "--prompt", "hello", "--chat", "--precision", "bf16",
                 "--logits-out", str(out)]) == 0
    tok = load_tokenizer(tiny_checkpoint)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True))
    logits = np.load(out)
    assert logits.shape == (len(ids), 512) and logits.dtype == np.float32


@pytest.mark.parametrize("args,message", [
    (["--token-ids", "1,2,99999"], "outside the vocabulary"),
    (["--token-ids", "1,x"], "--token-ids: expected integers"),
    (["--prompt", ""], "empty"),
    (["--token-ids", "1", "--precision", "fp8"], "invalid choice"),
    (["--token-ids", "1", "--max-new-tokens", "-1"], "max-new-tokens"),
    (["--token-ids", "1", "--chat"], "--chat needs --prompt"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(tiny_checkpoint, tmp_path, capsys, args, message):
    out = tmp_path / "l.npy"
    assert main(["--model", str(tiny_checkpoint), *args, "--logits-out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unreadable_model_from_the_command_line(tmp_path):
    out = tmp_path / "l.npy"
    r = subprocess.run([sys.executable, "-m", "ref.run", "--model", str(tmp_path / "missing"), "--token-ids", "1",
                        "--logits-out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == "" and not out.exists()


def test_greedy_stops_at_generation_config_eos(tiny_checkpoint, model, capsys):
    tok = load_tokenizer(tiny_checkpoint)
    stop = set(tok.eos_token_ids) - set(model.cfg.eos_token_ids)  # only generation_config.json names it
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True))
    free = model.generate(ids, 8)
    first = next(i for i, t in enumerate(free) if t in stop)  # this prompt reaches <|endoftext|> early
    assert main(["--model", str(tiny_checkpoint), "--prompt", "Hello there", "--chat", "--max-new-tokens", "8"]) == 0
    assert f"generated ids: {','.join(map(str, free[:first + 1]))}\n" in capsys.readouterr().out
