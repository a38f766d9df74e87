"""The RL loop on a tiny config: stages, metrics, checkpoints, exact resume, failure isolation, errors."""

import json
from pathlib import Path

import pytest
import torch
from helpers import A, fit, read_metrics, tiny_overrides
from safetensors.torch import load_file

from ascend_rl.cli.main import main
from ascend_rl.config import load_config
from ascend_rl.data.tasks import write_arithmetic
from ascend_rl.errors import UserError
from ascend_rl.trainer.components import build_components
from ascend_rl.trainer.loop import RLTrainer


def test_loop_runs_and_logs_verl_metrics(task, tmp_path):
    trainer, result = fit(task, tmp_path / "run", f"{A}.actor.use_kl_loss=True", "trainer.logger=[console,tensorboard]")
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "critic/score/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    expected = {"critic/score/mean", "critic/advantages/max", "response_length/mean", "response_length/clip_ratio",
                "prompt_length/mean", "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/kl_loss",
                "actor/entropy", "actor/grad_norm", "actor/lr", "timing_s/gen", "timing_s/reward",
                "timing_s/old_log_prob", "timing_s/ref", "timing_s/adv", "timing_s/update_actor",
                "timing_s/update_weights", "timing_s/step", "perf/throughput", "training/global_step",
                "rollout/logprob_diff_max", "reward/failures"}
    assert expected <= set(steps[0])
    assert "val-core/arithmetic/acc/mean@1" in steps[1]  # test_freq=2
    assert steps[0]["rollout/logprob_diff_max"] < 1e-4  # engine and trainer agree on log-probs (fp32)
    assert all(r["actor/lr"] == pytest.approx(1e-3) for r in steps)
    assert result.steps == 4 and result.val_after
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_training_changes_the_weights_and_syncs_them_to_the_engine(task, tmp_path):
    trainer, _ = fit(task, tmp_path / "run")
    actor = dict(trainer.c.actor.model.named_parameters())
    engine = dict(trainer.c.engine.model.named_parameters())
    start = load_file(str(Path(task[0]) / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(actor[name], start[name])
    assert torch.equal(actor[name], engine[name])


def test_samples_of_a_prompt_differ_and_are_reproducible(task, tmp_path):
    trainer, _ = fit(task, tmp_path / "a", "trainer.total_training_steps=1", "actor_rollout_ref.rollout.n=8")
    prompts = trainer.c.train_records[:2]
    trainer.sync_weights()
    first = trainer.generate(prompts, step=99)
    trainer.sync_weights()
    again = trainer.generate(prompts, step=99)
    assert torch.equal(first["responses"], again["responses"])
    group = first["responses"][:8]
    assert len({tuple(row.tolist()) for row in group}) > 1
    assert first.uid[:8] == ["99-0"] * 8 and first.uid[8] == "99-1"


def test_exact_resume(task, tmp_path):
    """4 steps straight == 2 steps, stop, resume, 2 more: same weights, same metrics."""
    ckpt = ["trainer.save_freq=2", f"{A}.actor.use_kl_loss=True"]
    straight, _ = fit(task, tmp_path / "straight", *ckpt)
    fit(task, tmp_path / "split", *ckpt, "trainer.total_training_steps=2")
    assert (tmp_path / "split" / "latest_checkpointed_iteration.txt").read_text() == "2"
    resumed, result = fit(task, tmp_path / "split", *ckpt)
    assert result.steps == 4
    a = dict(straight.c.actor.model.named_parameters())
    b = dict(resumed.c.actor.model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)

    def comparable(out):
        return [{k: v for k, v in r.items() if not k.startswith(("timing_s", "perf/"))} for r in read_metrics(out)]

    assert comparable(tmp_path / "straight") == comparable(tmp_path / "split")


def test_checkpoint_is_an_hf_model_and_old_ones_rotate(task, tmp_path):
    fit(task, tmp_path / "run", "trainer.save_freq=1", "trainer.max_actor_ckpt_to_keep=2")
    kept = sorted(p.name for p in (tmp_path / "run").glob("global_step_*"))
    assert kept == ["global_step_3", "global_step_4"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "global_step_4" / "actor")
    assert model.config.model_type == "qwen3"
    assert not list((tmp_path / "run").glob(".global_step_*"))  # no partial saves left behind


def test_a_crash_mid_save_keeps_the_previous_checkpoint(task, tmp_path, monkeypatch):
    from ascend_rl.trainer import checkpoint

    trainer, _ = fit(task, tmp_path / "run", "trainer.save_freq=2")
    trainer.global_step = 6

    def crash(path):
        (path / "actor").mkdir(parents=True)
        (path / "actor" / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="checkpoint of step 6 could not be written .*No space left on device.*"
                                        "earlier checkpoints are kept"):
        checkpoint.save_checkpoint(tmp_path / "run", 6, crash, {})
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "global_step_4"
    assert (tmp_path / "run" / "global_step_4" / "trainer_state.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "global_step" in p.name) == \
        ["global_step_2", "global_step_4"]  # the partial checkpoint is gone


CUSTOM = """
import time
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if extra_info["index"] % 4 == 0:
        raise ValueError("bad sample")
    if extra_info["index"] % 4 == 1:
        time.sleep(30)
    return 1.0
"""


def test_raising_and_hanging_scorers_do_not_stop_training(task, tmp_path):
    (tmp_path / "reward.py").write_text(CUSTOM)
    _, result = fit(task, tmp_path / "run", f"reward.custom_reward_function.path={tmp_path}/reward.py",
                    "reward.timeout_s=0.5", "trainer.total_training_steps=2", "trainer.test_freq=-1")
    rows = [r for r in read_metrics(tmp_path / "run") if "reward/failures" in r]
    assert len(rows) == 2 and all(r["reward/failures"] > 0 for r in rows)
    assert result.steps == 2


@pytest.mark.parametrize("extra,message", [
    ([f"{A}.model.path=/nowhere"], "actor_rollout_ref.model.path=/nowhere: no such directory"),
    (["data.train_files=/nowhere.parquet"], "data.train_files: /nowhere.parquet: no such file"),
    (["reward.custom_reward_function.path=/nowhere.py"], "reward.custom_reward_function.path=/nowhere.py: no such file"),
    (["trainer.resume_mode=resume_path", "trainer.resume_from_path=/tmp"], "trainer.resume_from_path=/tmp: not a checkpoint"),
])
def test_bad_input_is_one_line_and_nonzero(task, tmp_path, capsys, extra, message):
    assert main(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run", *extra)]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err
    assert "Traceback" not in err


def test_custom_reward_without_the_function(task, tmp_path, capsys):
    (tmp_path / "r.py").write_text("def other(): pass\n")
    code = main(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run", f"reward.custom_reward_function.path={tmp_path}/r.py")])
    assert code == 2
    assert "reward.custom_reward_function.name=compute_score" in capsys.readouterr().err


def test_unknown_data_source_stops_at_startup(task, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(task[1]) / "train.parquet").to_pylist()
    for row in rows:
        row["data_source"] = "mystery"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    code = main(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run", f"data.train_files={tmp_path}/t.parquet")])
    assert code == 2
    assert "no scorer for data_source 'mystery'" in capsys.readouterr().err


def test_empty_dataset_is_an_error(task, tmp_path, capsys):
    import pyarrow.parquet as pq

    table = pq.read_table(Path(task[1]) / "train.parquet")
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    code = main(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run", f"data.train_files={tmp_path}/empty.parquet")])
    assert code == 2
    assert "empty.parquet: no rows" in capsys.readouterr().err


def test_sft_cli_warms_up_and_stops_at_the_target(tmp_path, tiny_model_dir, capsys):
    from ascend_rl.sft import exact_match, read_sft_pairs

    write_arithmetic(tmp_path / "d", n_train=200, n_test=10, max_operand=14, seed=0)
    out = tmp_path / "sft"
    code = main(["sft", "--model", str(tiny_model_dir), "--data", str(tmp_path / "d" / "sft.parquet"), "--out", str(out),
                 "--epochs", "40", "--lr", "3e-3", "--batch-size", "32", "--holdout", "40", "--stop-at-exact-match", "0.2"])
    assert code == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    pairs = read_sft_pairs([tmp_path / "d" / "sft.parquet"], tok)
    assert exact_match(AutoModelForCausalLM.from_pretrained(out), tok, pairs[:60]) >= 0.1
    assert main(["sft", "--model", str(tiny_model_dir), "--data", "x.parquet", "--out", str(out),
                 "--stop-at-exact-match", "0.5"]) == 2
    assert "--stop-at-exact-match needs --holdout" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_default_builds_its_assets_and_trains(tmp_path, monkeypatch, capsys):
    """`ascend-rl train` with no config: assets built into the cache, then GRPO (2 steps here)."""
    monkeypatch.setenv("ASCEND_RL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress", "trainer.total_training_steps=2"]) == 0
    cache = tmp_path / "cache" / "embedded-v1"
    assert (cache / "tiny-qwen3-sft" / "model.safetensors").is_file()
    assert (cache / "arithmetic" / "train.parquet").is_file()
    out = capsys.readouterr().out
    assert "validation accuracy before → after 2 steps: arithmetic/acc/mean@1:" in out
    assert (tmp_path / "checkpoints" / "ascend_rl" / "embedded_grpo" / "curves.png").is_file()


def test_kl_in_reward_and_other_estimators(task, tmp_path):
    fit(task, tmp_path / "run", "algorithm.use_kl_in_reward=True", "algorithm.kl_ctrl.type=adaptive",
        "algorithm.adv_estimator=rloo", f"{A}.actor.ppo_epochs=2", f"{A}.actor.loss_agg_mode=seq-mean-token-mean",
        "trainer.total_training_steps=2")
    rows = [r for r in read_metrics(tmp_path / "run") if "critic/score/mean" in r]
    assert all("actor/reward_kl_penalty" in r and "timing_s/ref" in r for r in rows)
    assert rows[0]["actor/reward_kl_penalty_coeff"] == pytest.approx(0.001)
    assert rows[1]["actor/reward_kl_penalty_coeff"] != rows[0]["actor/reward_kl_penalty_coeff"]  # adaptive


def test_wandb_without_wandb_installed_is_a_clear_error(task, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    code = main(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run", "trainer.logger=[console,wandb]")])
    assert code == 2
    assert "trainer.logger includes wandb but wandb is not installed" in capsys.readouterr().err


def test_torch_profiler_traces_the_chosen_steps(task, tmp_path):
    prof = tmp_path / "prof"
    fit(task, tmp_path / "run", "trainer.total_training_steps=2", "global_profiler.tool=torch",
        "global_profiler.steps=[2]", f"global_profiler.save_path={prof}")
    assert sorted(p.name for p in prof.iterdir()) == ["step_2.top_ops.txt", "step_2.trace.json"]
    events = json.loads((prof / "step_2.trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    # one range per stage of the step, and the operators inside them
    assert {"gen", "reward", "old_log_prob", "adv", "update_actor", "update_weights"} <= names
    assert any(n and n.startswith("aten::") for n in names)
    assert "Self CPU" in (prof / "step_2.top_ops.txt").read_text()


def test_npu_profiler_without_torch_npu_is_a_clear_error(task, tmp_path, capsys):
    code = main(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run", "trainer.total_training_steps=1",
                                                          "global_profiler.tool=npu", "global_profiler.steps=[1]")])
    assert code == 2
    assert "global_profiler.tool=npu needs torch_npu" in capsys.readouterr().err


def test_on_policy_steps_skip_the_old_log_prob_pass_with_the_same_update(task, tmp_path):
    """One mini-batch and one epoch: the update's forward supplies the old log-probs, so the separate pass
    is skipped; the update and the metrics are those of the separate pass."""
    on_policy = [f"{A}.actor.ppo_mini_batch_size=4", "trainer.total_training_steps=2"]
    cfg = load_config(tiny_overrides(task, tmp_path / "fast", *on_policy))
    fast = RLTrainer(build_components(cfg, show_progress=False))
    assert not fast.needs_old_log_probs
    fast.fit()
    slow = RLTrainer(build_components(load_config(tiny_overrides(task, tmp_path / "slow", *on_policy)),
                                      show_progress=False))
    slow.needs_old_log_probs = True
    slow.fit()
    rows = {name: [r for r in read_metrics(tmp_path / name) if "critic/score/mean" in r] for name in ("fast", "slow")}
    assert "timing_s/old_log_prob" not in rows["fast"][0] and "timing_s/old_log_prob" in rows["slow"][0]
    for f, s in zip(rows["fast"], rows["slow"]):
        assert f["actor/pg_loss"] == pytest.approx(s["actor/pg_loss"], abs=1e-6)
        assert f["actor/entropy"] == pytest.approx(s["actor/entropy"], rel=1e-4)
        assert f["rollout/logprob_diff_max"] < 1e-4
    # Old log-probs from a separate forward differ from the update's by float noise (~1e-7); Adam turns that
    # into up to a few percent of one step (lr 1e-3) where a gradient is ~0. A logic error would be ~lr.
    for (name, a), (_, b) in zip(fast.c.actor.model.named_parameters(), slow.c.actor.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), (name, (a - b).abs().max().item())


def test_resuming_a_checkpoint_without_its_shards_is_a_clear_error(task, tmp_path):
    import shutil

    from ascend_rl.errors import UserError

    fit(task, tmp_path / "run", "trainer.save_freq=1", "trainer.total_training_steps=1", "trainer.test_freq=0")
    shutil.rmtree(tmp_path / "run" / "global_step_1" / "actor" / "dcp")
    with pytest.raises(UserError, match=r"holds an earlier run \(global_step_1, metrics.jsonl, .*none of its "
                                        r"checkpoints is complete"):
        fit(task, tmp_path / "run", "trainer.total_training_steps=2", "trainer.test_freq=0")
    with pytest.raises(UserError, match=r"global_step_1/actor/dcp/.metadata: missing"):
        fit(task, tmp_path / "run", "trainer.total_training_steps=2", "trainer.test_freq=0",
            "trainer.resume_mode=resume_path", f"trainer.resume_from_path={tmp_path / 'run' / 'global_step_1'}")


def test_prompt_and_response_longer_than_the_context_stop_at_start_up(task, tmp_path):
    from ascend_rl.errors import UserError

    with pytest.raises(UserError, match=r"data.max_prompt_length=500 \+ data.max_response_length=16 exceeds the "
                                        r"rollout context of 512 tokens \(the model's max_position_embeddings"):
        fit(task, tmp_path / "run", "data.max_prompt_length=500", "data.max_response_length=16")


def test_remax_scores_a_greedy_baseline_per_prompt(task, tmp_path):
    """verl's ReMax: one greedy response per prompt, scored like the samples; each sample's advantage is its
    return minus its prompt's baseline score."""
    from ascend_rl.trainer.components import build_components
    from ascend_rl.trainer.loop import RLTrainer

    cfg = load_config(tiny_overrides(task, tmp_path / "run", "algorithm.adv_estimator=remax"))
    trainer = RLTrainer(build_components(cfg, show_progress=False))
    try:
        trainer.sync_weights()  # as fit() does before the first step
        assert "timing_s/gen_max" in trainer.train_step(1)
        prompts = trainer.c.next_prompts()
        batch = trainer.generate(prompts, 2)
        batch.baseline_outputs = trainer.generate_greedy(prompts)
        trainer.compute_rewards(batch)
        greedy = [trainer.c.vocab.decode([o.output_ids])[0] for o in batch.baseline_outputs]
        expected = [s.score for s in trainer.c.rewards.score([p.data_source for p in prompts], greedy,
                                                             [p.ground_truth for p in prompts],
                                                             [p.extra_info for p in prompts])]
        assert batch["reward_baselines"].tolist() == [e for e in expected for _ in range(2)]  # n = 2
        trainer.compute_advantages(batch)
        returns = batch["token_level_rewards"].sum(-1)
        first_token = batch["advantages"][:, 0]
        assert torch.allclose(first_token, returns - batch["reward_baselines"])
    finally:
        trainer.c.close()


def test_the_trainer_computes_the_inputs_lint_says_it_does():
    from ascend_rl.config.lint import TRAINER_INPUTS
    from ascend_rl.trainer.loop import RLTrainer

    assert set(RLTrainer.ESTIMATOR_INPUTS) == set(TRAINER_INPUTS)


def test_ppo_with_a_critic_trains_logs_value_metrics_and_resumes_exactly(task, tmp_path):
    """GAE with a critic (verl's PPO): values before the advantages, the critic's update before the actor's, a
    critic checkpoint beside the actor's, and 4 steps straight == 2 + resume + 2, critic weights included."""
    model, _ = task
    ppo = ["algorithm.adv_estimator=gae", f"critic.model.path={model}", "critic.optim.lr=1e-3",
           "critic.ppo_micro_batch_size_per_gpu=2", "trainer.save_freq=2", "trainer.critic_warmup=2"]
    straight, _ = fit(task, tmp_path / "straight", *ppo)
    rows = [r for r in read_metrics(tmp_path / "straight") if "critic/score/mean" in r]
    for key in ("critic/vf_loss", "critic/vf_clipfrac", "critic/vpred_mean", "critic/grad_norm", "critic/lr",
                "critic/values/mean", "critic/vf_explained_var", "timing_s/values", "timing_s/update_critic"):
        assert all(key in r for r in rows), key
    # verl's warm-up: the actor waits while critic_warmup > step
    assert ["timing_s/update_actor" in r for r in rows] == [False, True, True, True]
    assert (tmp_path / "straight" / "global_step_4" / "critic" / "dcp" / ".metadata").is_file()

    fit(task, tmp_path / "split", *ppo, "trainer.total_training_steps=2")
    resumed, result = fit(task, tmp_path / "split", *ppo)
    assert result.steps == 4
    for role in ("actor", "critic"):
        a = dict(getattr(straight.c, role).model.named_parameters())
        b = dict(getattr(resumed.c, role).model.named_parameters())
        assert all(torch.equal(a[k], b[k]) for k in a), role

    def comparable(out):
        return [{k: v for k, v in r.items() if not k.startswith(("timing_s", "perf/"))} for r in read_metrics(out)]

    assert comparable(tmp_path / "straight") == comparable(tmp_path / "split")


def test_a_run_keeps_its_log_lines_in_train_log(task, tmp_path):
    """ascend-rl's log records (here: a failing scorer's reason) go to the run directory's train.log too."""
    reward = tmp_path / "reward.py"
    reward.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    raise RuntimeError('scorer broke')\n")
    fit(task, tmp_path / "run", f"reward.custom_reward_function.path={reward}", "trainer.total_training_steps=1")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "scorer broke" in log and " WARNING " in log
    assert "held-out accuracy (val-core/...) is of greedy answers" in log  # said once, at the start


def test_token_budget_micro_batches_train(task, tmp_path):
    """verl's use_dynamic_bsz keys reach the actor, the reference and the old-log-prob pass (the same update as
    fixed micro-batches is checked in test_distributed)."""
    trainer, result = fit(task, tmp_path / "run", f"{A}.actor.use_dynamic_bsz=True",
                          f"{A}.actor.ppo_max_token_len_per_gpu=64", f"{A}.rollout.log_prob_use_dynamic_bsz=True",
                          f"{A}.rollout.log_prob_max_token_len_per_gpu=48", f"{A}.actor.use_kl_loss=True",
                          f"{A}.ref.log_prob_use_dynamic_bsz=True", f"{A}.ref.log_prob_max_token_len_per_gpu=48",
                          f"{A}.actor.ppo_epochs=2", "trainer.total_training_steps=2")
    s = trainer.c.actor.settings
    assert (s.ppo_max_token_len_per_gpu, s.log_prob_max_token_len) == (64, 48)
    assert trainer.c.ref.settings.max_token_len == 48
    rows = [r for r in read_metrics(tmp_path / "run") if "actor/pg_loss" in r]
    assert result.steps == 2 and all(r["actor/grad_norm"] == r["actor/grad_norm"] for r in rows)  # finite
