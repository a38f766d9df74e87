"""`ascend-rl sft` and `ascend-rl data`: --help shows every default, and `sft --eval-every N` sets when the
holdout is checked."""

import argparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ascend_rl.sft as sft
from ascend_rl.cli import data_cmd, sft_cmd
from ascend_rl.cli.main import main


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def parsers() -> dict[str, argparse.ArgumentParser]:
    sft_parser, data_parser = argparse.ArgumentParser(prog="ascend-rl sft"), argparse.ArgumentParser(prog="data")
    sft_cmd.add_arguments(sft_parser)
    data_cmd.add_arguments(data_parser)
    return {"sft": sft_parser, **{f"data {name}": p for name, p in subcommands(data_parser).items()}}


@pytest.mark.parametrize("name", ["sft", "data tiny-model", "data arithmetic", "data gsm8k"])
def test_help_shows_every_default(name, capsys):
    parser = parsers()[name]
    with pytest.raises(SystemExit) as done:
        main([*name.split(), "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    for action in parser._actions:
        if action.option_strings and all(action.default is not v for v in (None, False, argparse.SUPPRESS)):
            assert f"(default: {action.default})" in text, action.dest
        elif action.option_strings and action.dest != "help":
            assert action.help and ("default" in action.help or action.required), action.dest  # says it itself


def test_tiny_model_help_says_what_the_tokenizer_covers(tiny_model_dir, capsys):
    from safetensors.torch import load_file

    from ascend_rl.data.tiny_model import CHARS, TinyModelSpec

    with pytest.raises(SystemExit):
        main(["data", "tiny-model", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("printable ASCII (space to ~) and newline", "becomes <unk>", "<|im_end|> (end of a turn, the EOS)",
                     "about 0.4 M parameters", "512 positions"):
        assert fragment in text
    assert [chr(i) for i in range(ord(" "), ord("~") + 1)] + ["\n"] == CHARS
    spec, args = TinyModelSpec(), parsers()["data tiny-model"].parse_args(["out"])
    assert (args.hidden_size, args.layers, args.heads, args.kv_heads, args.intermediate_size) == (
        spec.hidden_size, spec.num_hidden_layers, spec.num_attention_heads, spec.num_key_value_heads,
        spec.intermediate_size)
    assert spec.max_position_embeddings == 512
    count = sum(t.numel() for t in load_file(tiny_model_dir / "model.safetensors").values())
    assert round(count / 1e6, 1) == 0.4


@pytest.fixture
def sft_data(tmp_path):
    rows = [{"prompt": f"reverse: {w}", "response": w[::-1]} for w in ("abc", "bca", "cab", "acb", "bac", "cba")] * 3
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path  # 18 pairs: 4 held out, 14 trained on in batches of 2 → 7 steps an epoch


def record_checks(monkeypatch, accuracy: float) -> list[int]:
    """The steps at which the holdout is checked (each batch built is one step), every check answering
    `accuracy`."""
    steps, checks = [0], []
    collate = sft.collate

    def counting_collate(*args, **kwargs):
        steps[0] += 1
        return collate(*args, **kwargs)

    def fake_exact_match(*args, **kwargs):
        checks.append(steps[0])
        return accuracy

    monkeypatch.setattr(sft, "collate", counting_collate)
    monkeypatch.setattr(sft, "exact_match", fake_exact_match)
    return checks


def test_eval_every_checks_the_holdout_at_its_multiples(tiny_model_dir, sft_data, tmp_path, monkeypatch, caplog):
    checks = record_checks(monkeypatch, accuracy=0.0)
    settings = sft.SFTSettings(str(tiny_model_dir), (str(sft_data),), str(tmp_path / "a"), epochs=2, batch_size=2,
                               holdout=4, stop_at_exact_match=0.5, eval_every=3)
    with caplog.at_level("INFO", logger="ascend_rl.sft"):
        sft.run_sft(settings, progress=False)
    assert checks == [3, 6, 9, 12]  # 14 steps, never reaching the target
    assert "holdout exact match 0.000 at step 12 of 14 (target 0.5 not reached)" in caplog.text


def test_eval_every_from_the_command_line_stops_at_the_first_check_that_reaches_the_target(
        tiny_model_dir, sft_data, tmp_path, monkeypatch, capsys):
    checks = record_checks(monkeypatch, accuracy=0.75)
    out = tmp_path / "b"
    assert main(["sft", "--model", str(tiny_model_dir), "--data", str(sft_data), "--out", str(out), "--epochs", "2",
                 "--batch-size", "2", "--holdout", "4", "--stop-at-exact-match", "0.5", "--eval-every", "5"]) == 0
    assert checks == [5] and (out / "config.json").is_file()
    assert "holdout exact match 0.750 at step 5 of 14 (target 0.5 reached)" in capsys.readouterr().err


def test_eval_every_must_be_at_least_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["sft", "--model", str(tmp_path), "--data", "x.parquet", "--out", str(tmp_path / "o"), "--eval-every", "0"])
    assert done.value.code == 2 and "--eval-every: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_every must be an integer >= 1"):
        sft.SFTSettings("m", ("d",), "o", eval_every=0)
