"""verl's decoupled rollout correction in the trainer: rejection of tokens whose engine log-prob strays from the
old policy's (algorithm.rollout_correction.rollout_rs), importance-sampling weights for the policy loss
(rollout_is), and the rollout_corr/* metrics."""

import pytest
import torch
from helpers import fit, read_metrics, tiny_overrides

from ascend_rl.config import load_config
from ascend_rl.trainer.loop import RLTrainer, old_log_probs_needed, rollout_correction

RC = "algorithm.rollout_correction"


def test_rejection_needs_the_old_log_probs_and_not_in_bypass_mode(task, tmp_path):
    on_policy = ["data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2"]
    plain = load_config(tiny_overrides(task, tmp_path, *on_policy))
    assert not old_log_probs_needed(plain) and rollout_correction(plain) is None
    rs = load_config(tiny_overrides(task, tmp_path, *on_policy, f"{RC}.rollout_rs=token_k1",
                                    f"{RC}.rollout_rs_threshold=2.0"))
    assert old_log_probs_needed(rs)
    assert rollout_correction(rs) == {"rollout_is": None, "rollout_is_threshold": 2.0,
                                      "rollout_is_batch_normalize": False, "rollout_rs": "token_k1",
                                      "rollout_rs_threshold": 2.0}


def test_rejected_tokens_leave_the_response_mask_and_metrics_say_how_many():
    trainer = RLTrainer.__new__(RLTrainer)  # the stage alone, without components
    trainer.correction = {"rollout_rs": "token_k1", "rollout_rs_threshold": 2.0}  # keep ratios in [1/2, 2]
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.0], [0.4, 0.4, 0.0, 0.0]]).clamp(min=1e-9))
    rollout = torch.log(torch.tensor([[0.5, 0.1, 0.9, 0.0], [0.4, 0.41, 0.0, 0.0]]).clamp(min=1e-9))
    batch = {"response_mask": mask, "old_log_probs": old * mask, "rollout_log_probs": rollout * mask,
             "advantages": 0.5 * mask}
    metrics = trainer.correct_rollout(batch)
    # ratio old/rollout: 1, 5 (rejected), 0.56, 1, 0.98
    assert batch["response_mask"].tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    assert batch["advantages"].tolist() == [[0.5, 0, 0.5, 0], [0.5, 0.5, 0, 0]]
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(1 / 5)
    assert metrics["rollout_corr/kl"] == pytest.approx(((rollout - old) * mask).sum().item() / 5, abs=1e-6)
    assert "rollout_is_weights" not in batch


def test_truncated_is_weights_go_to_the_policy_loss():
    trainer = RLTrainer.__new__(RLTrainer)
    trainer.correction = {"rollout_is": "token", "rollout_is_threshold": 2.0}  # TIS: ρ truncated at 2
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.log(torch.tensor([[0.5, 0.5, 0.9, 1.0]]))
    rollout = torch.log(torch.tensor([[0.5, 0.1, 0.6, 1.0]]))
    batch = {"response_mask": mask, "old_log_probs": old, "rollout_log_probs": rollout, "advantages": mask}
    metrics = trainer.correct_rollout(batch)
    assert batch["rollout_is_weights"][0].tolist() == pytest.approx([1.0, 2.0, 1.5, 0.0])
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(4.5 / 3)
    assert batch["response_mask"] is mask  # no rejection asked


def test_a_run_with_is_weights_scales_the_policy_loss(task, tmp_path):
    """Weights of 1 (engine and trainer agree in fp32) leave the update as it was; the metric says so."""
    fit(task, tmp_path / "plain", "trainer.total_training_steps=1")
    fit(task, tmp_path / "tis", f"{RC}.rollout_is=token", "trainer.total_training_steps=1")
    plain, tis = read_metrics(tmp_path / "plain")[0], read_metrics(tmp_path / "tis")[0]
    assert tis["rollout_corr/rollout_is_mean"] == pytest.approx(1.0, abs=1e-4)
    assert tis["actor/pg_loss"] == pytest.approx(plain["actor/pg_loss"], abs=1e-5)


def test_a_run_with_rejection_logs_the_correction_metrics(task, tmp_path):
    fit(task, tmp_path / "run", f"{RC}.rollout_rs=token_k1", f"{RC}.rollout_rs_threshold=2.0",
        "trainer.total_training_steps=2")
    rows = [r for r in read_metrics(tmp_path / "run") if "rollout_corr/kl" in r]
    assert len(rows) == 2
    # fp32 engine and trainer agree, so nothing is rejected
    assert all(r["rollout_corr/rollout_rs_masked_fraction"] == 0 for r in rows)


def test_the_actor_multiplies_the_policy_loss_by_the_weights(tiny_model_dir):
    from test_distributed import fixed_batch

    from ascend_rl.workers.actor import Actor, ActorSettings
    from ascend_rl.workers.optimizer import OptimSettings

    settings = ActorSettings(ppo_mini_batch_size=16, ppo_micro_batch_size_per_gpu=8)
    losses = []
    for weight in (1.0, 2.0):
        actor = Actor(str(tiny_model_dir), "cpu", settings, OptimSettings(lr=0.0, total_steps=1))
        batch = fixed_batch(actor)
        batch["rollout_is_weights"] = torch.full_like(batch["advantages"], weight) * batch["response_mask"]
        losses.append(actor.update(batch)["actor/pg_loss"])
    assert losses[1] == pytest.approx(2 * losses[0], rel=1e-5) and losses[0] != 0


# --- bypass mode: the engine's log-probs are the old policy's ------------------------------------------------

def test_bypass_mode_skips_the_old_log_prob_pass_and_takes_the_bypass_loss(task, tmp_path, caplog):
    from ascend_rl.algorithms import policy_loss_kwargs, policy_loss_mode

    cfg = load_config(tiny_overrides(task, tmp_path, f"{RC}.bypass_mode=True", f"{RC}.rollout_rs=token_k1",
                                     f"{RC}.rollout_rs_threshold=2.0"))
    assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size < cfg.data.train_batch_size  # decoupled would need them
    assert not old_log_probs_needed(cfg) and rollout_correction(cfg) is None  # the loss applies rs per micro-batch
    actor = cfg.actor_rollout_ref.actor
    assert policy_loss_mode(actor, cfg.algorithm) == "bypass_mode"
    assert policy_loss_kwargs(actor, cfg.algorithm)["rollout_correction"]["rollout_rs"] == "token_k1"
    gspo = load_config(tiny_overrides(task, tmp_path, f"{RC}.bypass_mode=True",
                                      "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"))
    with caplog.at_level("WARNING"):
        assert policy_loss_mode(gspo.actor_rollout_ref.actor, gspo.algorithm) == "bypass_mode"  # as verl overwrites it
    assert "replaces actor.policy_loss.loss_mode=gspo" in caplog.text
    assert policy_loss_mode(actor, load_config(tiny_overrides(task, tmp_path)).algorithm) == "vanilla"


def test_a_bypass_run_trains_against_the_engines_log_probs(task, tmp_path, monkeypatch):
    """A bf16 engine and an fp32 trainer disagree a little: in bypass mode the loss's ratio sees that gap
    (rollout_corr/kl from the bypass loss), and no old-log-prob pass runs; the decoupled run has one."""
    from ascend_rl import platform

    monkeypatch.setattr(platform, "cpu_units", lambda dtype: ["amx_bf16"])  # bf16 rollout on any CPU
    bf16_engine = "actor_rollout_ref.rollout.dtype=bfloat16"
    fit(task, tmp_path / "bypass", bf16_engine, f"{RC}.bypass_mode=True", "trainer.total_training_steps=1")
    fit(task, tmp_path / "decoupled", bf16_engine, "trainer.total_training_steps=1")
    bypass, decoupled = read_metrics(tmp_path / "bypass")[0], read_metrics(tmp_path / "decoupled")[0]
    assert "timing_s/old_log_prob" not in bypass and "timing_s/old_log_prob" in decoupled
    assert abs(bypass["rollout_corr/kl"]) > 1e-6  # π_θ against π_rollout: bf16 against fp32
    assert torch.isfinite(torch.tensor(bypass["actor/pg_loss"]))
