"""No lost data: damaged checkpoints fall back to the last complete one, nothing a run did not create or
resume is overwritten, a crafted state file runs no code, export ships only what training saved."""

import logging
import pickle
import shutil

import pytest
from helpers import fit, read_metrics

from ascend_rl.cli.main import main
from ascend_rl.errors import UserError
from ascend_rl.trainer import checkpoint


@pytest.fixture(scope="module")
def saved_run(task, tmp_path_factory):
    """Two steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("saved") / "run"
    fit(task, out, "trainer.total_training_steps=2", "trainer.save_freq=1", "trainer.test_freq=0")
    return out


@pytest.fixture()
def run(saved_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    return copy


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated shard": ("actor/dcp/__0_0.distcp", truncate, "bytes, "),
    "truncated trainer state": ("trainer_state.pt", truncate, "bytes, "),
    "truncated HF weights": ("actor/model.safetensors", truncate, "bytes, "),
    "flipped byte in HF weights": ("actor/model.safetensors", flip_a_byte, "checksum mismatch"),
    "missing shard metadata": ("actor/dcp/.metadata", lambda p: p.unlink(), "missing"),
    "missing manifest": ("manifest.json", lambda p: p.unlink(), None),
    "garbage manifest": ("manifest.json", lambda p: p.write_text("{not json"), "unreadable"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run, kind, caplog):
    name, damage, reason = DAMAGE[kind]
    damage(run / "global_step_2" / name)
    with caplog.at_level(logging.WARNING, logger="ascend_rl"):
        assert checkpoint.checkpoint_to_resume("auto", run, None) == run / "global_step_1"
    if reason is not None:  # a checkpoint without a manifest never finished saving: skipped without a word
        assert f"skipping checkpoint global_step_2: {run / 'global_step_2' / name}" in caplog.text
        assert reason in caplog.text and "falling back to the previous one" in caplog.text
        with pytest.raises(UserError, match=f"trainer.resume_from_path=.*global_step_2.*{name}"):
            checkpoint.checkpoint_to_resume("resume_path", run, str(run / "global_step_2"))


@pytest.mark.parametrize("tracker", [None, "", "7", "1", "garbage"])
def test_resume_finds_the_newest_complete_checkpoint_whatever_the_tracker_says(run, tracker):
    path = run / checkpoint.TRACKER
    path.unlink()
    if tracker is not None:
        path.write_text(tracker)
    assert checkpoint.checkpoint_to_resume("auto", run, None) == run / "global_step_2"


def test_resuming_after_damage_continues_from_the_fallback(task, run):
    truncate(run / "global_step_2" / "trainer_state.pt")
    _, result = fit(task, run, "trainer.total_training_steps=3", "trainer.save_freq=1", "trainer.test_freq=0")
    assert result.resumed_step == 1 and result.steps == 3
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert checkpoint.verify(run / "global_step_2") is None  # re-saved whole
    assert (run / checkpoint.TRACKER).read_text() == "3"


@pytest.mark.parametrize("mode", ["disable", "auto"])
def test_a_fresh_run_never_overwrites_an_earlier_one(task, run, mode):
    if mode == "auto":  # auto with nothing complete to resume
        for step in (1, 2):
            (run / f"global_step_{step}" / checkpoint.MANIFEST).unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds an earlier run .*global_step_1, global_step_2, metrics.jsonl.*"
                                        "a fresh run would overwrite it"):
        fit(task, run, "trainer.total_training_steps=2", "trainer.save_freq=1", f"trainer.resume_mode={mode}")
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_a_finished_run_is_not_trained_again(task, run):
    before = (run / "metrics.jsonl").read_bytes()
    _, result = fit(task, run, "trainer.total_training_steps=2", "trainer.save_freq=1")
    assert result.resumed_step == result.steps == 2
    assert (run / "metrics.jsonl").read_bytes() == before


def test_re_saving_a_step_that_fails_keeps_the_old_one_and_a_valid_tracker(run, monkeypatch):
    from pathlib import Path

    real_rename = Path.rename

    def failing_rename(self, target):
        if self.name.endswith(".partial"):
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(UserError, match="checkpoint of step 2 could not be written"):
        checkpoint.save_checkpoint(run, 2, lambda path: (path / "actor").mkdir(parents=True), {})
    assert checkpoint.verify(run / "global_step_2") is None
    assert (run / checkpoint.TRACKER).read_text() == "2"
    assert sorted(p.name for p in run.iterdir() if "global_step" in p.name) == ["global_step_1", "global_step_2"]


def test_a_crafted_state_file_runs_no_code(run, tmp_path):
    """trainer_state.pt is loaded with weights_only=True: a pickle that calls a function is refused, even when
    whoever planted it also rewrote the manifest."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    (run / "global_step_2" / "trainer_state.pt").write_bytes(pickle.dumps(Exploit()))
    checkpoint.write_manifest(run / "global_step_2", 2)
    with pytest.raises(UserError, match="trainer_state.pt: cannot load"):
        checkpoint.load_state(run / "global_step_2")
    assert not marker.exists()


def test_the_output_directory_must_be_writable(task, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="trainer.default_local_dir=.*file: exists and is not a directory"):
        fit(task, tmp_path / "file")
    with pytest.raises(UserError, match="trainer.default_local_dir=.*file/run: cannot write there"):
        fit(task, tmp_path / "file" / "run")
    assert (tmp_path / "file").read_text() == "mine"


def test_export_verifies_what_it_ships(run, tmp_path, capsys):
    assert main(["export", str(run), str(tmp_path / "good")]) == 0
    assert (tmp_path / "good" / "model.safetensors").read_bytes() == \
        (run / "global_step_2" / "actor" / "model.safetensors").read_bytes()
    assert not (tmp_path / "good" / "dcp").exists()

    truncate(run / "global_step_2" / "actor" / "model.safetensors")
    assert main(["export", str(run / "global_step_2"), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "cannot export" in err and "model.safetensors" in err and "truncated" in err
    assert not (tmp_path / "bad").exists()
    # from the run directory, the damaged newest checkpoint is skipped for the complete one
    assert main(["export", str(run), str(tmp_path / "fallback")]) == 0
    assert "skipping checkpoint global_step_2" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "good")]) == 2  # never over an existing directory
    assert "exists; ascend-rl export writes a new one" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_a_clear_error(task, run, tmp_path):
    from ascend_rl.data.tiny_model import TinyModelSpec, build_tiny_model

    other = build_tiny_model(tmp_path / "wider", TinyModelSpec(hidden_size=64, intermediate_size=128))
    with pytest.raises(UserError, match=r"cannot resume from .*global_step_2: its model or optimizer state does "
                                        r"not fit this run's model"):
        fit((other, task[1]), tmp_path / "new", "trainer.resume_mode=resume_path",
            f"trainer.resume_from_path={run / 'global_step_2'}")


def test_a_read_only_output_directory_stops_at_start_up(tmp_path, monkeypatch):
    import os
    import tempfile

    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:  # a real read-only directory (root writes anywhere, so it gets the kernel's answer below)
        locked.chmod(0o500)
    else:
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(UserError, match=r"trainer.default_local_dir=.*locked: cannot write there \(Permission denied\)"):
        checkpoint.check_run_dir(locked)
