"""Careless input at the command line: each case exits non-zero with one line naming what is wrong (never a
traceback), and nothing the user already had is written over."""

import json
import shutil

import pytest
from helpers import A, tiny_overrides

from ascend_rl.cli.main import main


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code != 0, err
    assert "Traceback" not in err, err
    problems = [line for line in err.splitlines() if line.startswith(("error:", "ascend-rl data", "ascend-rl sft",
                                                                        "ascend-rl train", "ascend-rl export"))]
    assert len(problems) == 1 and fragment in problems[0], err


def damaged_model(tiny_model_dir, tmp_path, damage: str):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if damage == "config not json":
        (model / "config.json").write_text("{\"model_type\": \"qwen3\",")
    elif damage == "config without model_type":
        (model / "config.json").write_text(json.dumps({"hidden_size": 8}))
    elif damage == "no config":
        (model / "config.json").unlink()
    elif damage == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (model / name).unlink(missing_ok=True)
    elif damage == "no weights":
        (model / "model.safetensors").unlink()
    elif damage == "truncated weights":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) - 1000])
    elif damage == "garbage weights":
        (model / "model.safetensors").write_bytes(b"\xff" * 64)
    return model


MODEL_DAMAGE = {
    "config not json": "config.json: not valid JSON",
    "config without model_type": "config.json: no model_type",
    "no config": "no config.json",
    "no tokenizer": "no usable tokenizer",
    "no weights": "no weights (*.safetensors or pytorch_model*.bin)",
    "truncated weights": "truncated or damaged",
    "garbage weights": "model.safetensors: header of",
}


@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_a_broken_model_directory_is_named(task, tmp_path, capsys, damage):
    model = damaged_model(task[0], tmp_path, damage)
    code, err = run_cli(["train", "--no-progress", *tiny_overrides((model, task[1]), tmp_path / "run")], capsys)
    assert_one_line_error(code, err, MODEL_DAMAGE[damage])
    code, err = run_cli(["sft", "--model", model, "--data", task[1] / "sft.parquet", "--out", tmp_path / "sft"], capsys)
    assert_one_line_error(code, err, MODEL_DAMAGE[damage])
    code, err = run_cli(["serve", "--model-path", model, "--port", "0"], capsys)
    assert_one_line_error(code, err, MODEL_DAMAGE[damage])
    if damage == "no tokenizer":
        assert "--skip-tokenizer-init" in err  # how to serve token ids without one


BAD_TRAIN = {
    "temperature 0": ([f"{A}.rollout.temperature=0"], "rollout.temperature=0 must be > 0"),
    "temperature inf": ([f"{A}.rollout.temperature=inf"], "rollout.temperature=inf must be > 0 and finite"),
    "temperature nan": ([f"{A}.rollout.temperature=nan"], "rollout.temperature=nan: not a number"),
    "greedy rollouts": ([f"{A}.rollout.do_sample=false"], "greedy training rollouts"),
    "negative steps": (["trainer.total_training_steps=-1"], "trainer.total_training_steps=-1 must be null"),
    "string steps": (["trainer.total_training_steps=many"], "trainer.total_training_steps=many must be null"),
    "misspelt key": ([f"{A}.rollout.tempreature=1"], "did you mean"),
    "missing data": (["data.train_files=/nonexistent/train.parquet"], "/nonexistent/train.parquet: no such file"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_train_overrides(task, tmp_path, capsys, case):
    extra, fragment = BAD_TRAIN[case]
    code, err = run_cli(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run", *extra)], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_bad_data_commands(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.parquet").write_text("my own data")
    cases = [
        (["data", "tiny-model", tmp_path / "m", "--layers", "0"], "--layers: must be at least 1, got 0"),
        (["data", "tiny-model", tmp_path / "m", "--heads", "4", "--kv-heads", "3"], "--heads 4 is not a multiple"),
        (["data", "tiny-model", tmp_path / "m", "--hidden-size", "x"], "expected an integer, got 'x'"),
        (["data", "tiny-model", tmp_path / "mine"], "mine exists; ascend-rl data tiny-model writes a new one"),
        (["data", "arithmetic", tmp_path / "a", "--train-size", "-5"], "--train-size: must be at least 1, got -5"),
        (["data", "arithmetic", tmp_path / "mine"], "train.parquet exists; ascend-rl data arithmetic"),
        (["sft", "--model", tmp_path, "--data", "x.parquet", "--out", tmp_path / "mine"], "mine exists"),
        (["sft", "--model", tmp_path, "--data", "x.parquet", "--out", tmp_path / "o", "--lr", "nan"], "--lr: must be"),
        (["export", tmp_path / "nothing", tmp_path / "out"], "neither a global_step_N checkpoint nor a run"),
    ]
    for argv, fragment in cases:
        code, err = run_cli(argv, capsys)
        if argv[0] == "data" and "--" in " ".join(map(str, argv)) and code == 2 and "usage:" in err:
            assert fragment in err and "Traceback" not in err, err  # argparse: usage line + one error line
        else:
            assert_one_line_error(code, err, fragment)
    assert (tmp_path / "mine" / "train.parquet").read_text() == "my own data"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["train.parquet"]
    assert not (tmp_path / "m").exists() and not (tmp_path / "a").exists()


def test_the_embedded_default_never_writes_a_users_data(task, tmp_path, monkeypatch, capsys):
    """`train data.train_files=my.parquet` without a model runs the embedded default on the user's data; its own
    assets stay in the cache and the user's files are read, never written."""
    cache = tmp_path / "cache" / "embedded-v1"
    shutil.copytree(task[0], cache / "tiny-qwen3-sft")  # a warmed-up model in the cache: no SFT in this test
    shutil.copytree(task[1], cache / "arithmetic")
    mine = tmp_path / "my" / "data"
    shutil.copytree(task[1], mine)
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--no-progress", f"data.train_files={mine}/train.parquet", f"data.val_files={mine}/test.parquet",
                 "trainer.total_training_steps=1", "data.train_batch_size=4", f"{A}.actor.ppo_mini_batch_size=4",
                 "trainer.val_before_train=False", "trainer.test_freq=0"])
    assert code == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


@pytest.mark.parametrize("body,fragment", [
    ("import sys\nsys.exit(3)\n", "importing it failed: SystemExit: 3"),
    ("raise ImportError('no module named sympy2')\n", "importing it failed: ImportError: no module named sympy2"),
    ("x = 1\n", "defines no function 'compute_score'"),
])
def test_a_reward_file_that_fails_at_import_is_named(task, tmp_path, capsys, body, fragment):
    reward = tmp_path / "my_reward.py"
    reward.write_text(body)
    code, err = run_cli(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run",
                                                                  f"reward.custom_reward_function.path={reward}")],
                        capsys)
    assert_one_line_error(code, err, fragment)


def test_the_final_line_names_only_what_the_run_wrote(tmp_path):
    from ascend_rl.cli.train_cmd import summary_line
    from ascend_rl.trainer.loop import FitResult

    (tmp_path / "metrics.jsonl").write_text("")
    line = summary_line(FitResult(3, {"val-core/a/acc": 0.1}, {"val-core/a/acc": 0.5}, tmp_path))
    assert line.endswith(f"(metrics.jsonl in {tmp_path})") and "a/acc: 0.100 → 0.500" in line
    (tmp_path / "global_step_3").mkdir()
    assert summary_line(FitResult(3, {}, {}, tmp_path)).endswith(f"(metrics.jsonl, checkpoints in {tmp_path})")


def test_log_level_from_the_environment():
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ascend_rl", "plan", "actor_rollout_ref.model.path=/m", "+data.enable_thinking=1"]
    shown = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ASCEND_RL_LOG_LEVEL": "info"})
    quiet = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ASCEND_RL_LOG_LEVEL": "ERROR"})
    assert "data.enable_thinking: verl 0.9.1 has no such key" in shown.stderr
    assert "enable_thinking" not in quiet.stderr and quiet.returncode == shown.returncode == 0
