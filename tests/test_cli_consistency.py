"""The same input gets the same answer from every CLI that takes it: one line `<prog>: error: ...`,
exit 2, for the same mistakes; the same edge values accepted."""
import pytest

from jaxrun.generate import main as generate
from ref.crosscheck import main as crosscheck
from ref.run import main as ref_run

CLIS = {"jaxrun.generate": (generate, ["--quiet", "--step-timeout", "0"]), "ref.run": (ref_run, [])}


@pytest.mark.parametrize("prog", sorted(CLIS))
@pytest.mark.parametrize("args, words", [
    (["--token-ids", "1,,2"], "--token-ids: empty entry"),
    (["--token-ids", "1,x"], "--token-ids: expected integers"),
    (["--token-ids", ""], "--token-ids: no token ids"),
    (["--token-ids", "1,999999"], "outside the vocabulary"),
    (["--token-ids", "1,2", "--max-new-tokens", "1e9"], "--max-new-tokens"),
    (["--token-ids", "1,2", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--token-ids", "1,2", "--max-new-tokens", "300000"], "exceeds"),
    (["--prompt", ""], "--prompt is empty"),
])
def test_same_mistakes_same_one_line_answer(tiny_checkpoint, capsys, prog, args, words):
    main, extra = CLIS[prog]
    assert main(["--model", str(tiny_checkpoint), *args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:") and words in err[0], err


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_zero_new_tokens_is_accepted(tiny_checkpoint, capsys, prog):
    main, extra = CLIS[prog]
    assert main(["--model", str(tiny_checkpoint), "--token-ids", "1,2,3", "--max-new-tokens", "0", *extra]) == 0


def test_crosscheck_token_ids_follow_the_same_rules(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "l.npy").write_bytes(b"")
    for ids, words in (("1,,2", "--token-ids: empty entry"), ("1,x", "--token-ids: expected integers")):
        assert crosscheck(["--model", str(tiny_checkpoint), "--engine-logits", str(tmp_path / "l.npy"),
                           "--token-ids", ids]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ref.crosscheck: error:") and words in err[0], err
