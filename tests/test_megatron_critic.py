"""The Megatron critic (ascend_rl/workers/megatron/critic.py) in the actor's workers: the FSDP critic's values
(the same seeded head) and updates, in one process and over tensor- (with sequence parallelism) and
pipeline-parallel ranks (gloo, CPU)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from test_distributed import fixed_batch  # noqa: E402
from test_megatron_actor import FSDP_OPTIM, MEGATRON_OPTIM, SETTINGS  # noqa: E402

from ascend_rl.distributed.actor_group import ActorGroup  # noqa: E402
from ascend_rl.distributed.worker_group import ProcessWorkerGroup  # noqa: E402
from ascend_rl.workers.actor import Actor  # noqa: E402
from ascend_rl.workers.critic import CriticSettings, CriticSpec  # noqa: E402
from ascend_rl.workers.megatron.actor import MegatronActorSpec  # noqa: E402
from ascend_rl.workers.megatron.critic import MegatronCriticSpec  # noqa: E402
from ascend_rl.workers.megatron.engine import MegatronEngine  # noqa: E402
from ascend_rl.workers.megatron.model import MegatronParallel  # noqa: E402
from ascend_rl.workers.optimizer import OptimSettings  # noqa: E402
from ascend_rl.workers.trained import Batching  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CRITIC = CriticSettings(Batching(8, 2, ppo_epochs=2, shuffle=True), 3)


@pytest.fixture(scope="module")
def fsdp_critic(tiny_model_dir):
    """The FSDP critic in this process: a batch with returns, its values, and its two updates."""
    batch = fixed_batch(Actor(str(tiny_model_dir), "cpu", SETTINGS, FSDP_OPTIM))
    optim = OptimSettings(lr=1e-3, weight_decay=0.0, total_steps=4)
    critic = CriticSpec(str(tiny_model_dir), CRITIC, optim).build("cpu")
    values = critic.values(batch)
    batch["values"] = values
    batch["returns"] = (values + torch.randn(values.shape, generator=torch.Generator().manual_seed(1))) \
        * batch["response_mask"]
    metrics = [critic.update(batch) for _ in range(2)]
    return batch, {"values": values, "metrics": metrics, "after": critic.values(batch)}


def megatron_critic_run(model_dir, batch, world: int, parallel: MegatronParallel) -> dict:
    engine = MegatronEngine(parallel)
    actor = MegatronActorSpec(str(model_dir), SETTINGS, MEGATRON_OPTIM, engine)
    critic = MegatronCriticSpec(str(model_dir), CRITIC, MEGATRON_OPTIM, engine)
    group = ActorGroup(partial(ProcessWorkerGroup, world), "cpu", actor, critic=critic)
    try:
        values = group.critic.values(batch)
        metrics = [group.critic.update(batch) for _ in range(2)]
        return {"values": values, "metrics": metrics, "after": group.critic.values(batch)}
    finally:
        group.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,parallel", [
    (1, MegatronParallel()),
    (2, MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True)),
    (2, MegatronParallel(pipeline_model_parallel_size=2)),
], ids=["one-rank", "tp2-sp", "pp2"])
def test_the_megatron_critic_makes_the_fsdp_critics_values_and_updates(tiny_model_dir, fsdp_critic, world, parallel):
    batch, fsdp = fsdp_critic
    mine = megatron_critic_run(tiny_model_dir, batch, world, parallel)
    mask = batch["response_mask"]
    assert torch.allclose(mine["values"] * mask, fsdp["values"] * mask, atol=1e-5)
    for m1, m2 in zip(mine["metrics"], fsdp["metrics"]):
        for key in ("critic/vf_loss", "critic/grad_norm", "critic/vf_clipfrac", "critic/vpred_mean"):
            assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-6), key
    assert mine["metrics"][1]["critic/vf_loss"] < mine["metrics"][0]["critic/vf_loss"]  # it fits the returns
    assert torch.allclose(mine["after"] * mask, fsdp["after"] * mask, atol=1e-4)
    assert not torch.allclose(mine["after"] * mask, mine["values"] * mask, atol=1e-3)


MEGATRON_PPO = ("actor_rollout_ref.actor.strategy=megatron", "algorithm.adv_estimator=gae",
                "actor_rollout_ref.actor.megatron.dtype=float32", "critic.megatron.dtype=float32",
                "trainer.save_freq=2", "actor_rollout_ref.actor.megatron.dist_ckpt_optim_fully_reshardable=True",
                "critic.megatron.dist_ckpt_optim_fully_reshardable=True")


def layout(pp: int) -> list[str]:
    return [f"trainer.n_gpus_per_node={pp}", *(f"{section}.megatron.pipeline_model_parallel_size={pp}" for section in (
        "actor_rollout_ref.actor", "actor_rollout_ref.ref", "critic"))]


def run_steps(task, out, *extra) -> list[dict]:
    """The tiny job of tests/helpers.py on Megatron's tree (its FSDP dtype keys are not in that tree)."""
    from helpers import FP32, read_metrics, tiny_overrides
    from test_distributed import VARIED_REWARD

    from ascend_rl.config import load_config
    from ascend_rl.trainer.components import build_components
    from ascend_rl.trainer.loop import RLTrainer

    reward = out.parent / "varied_reward.py"
    reward.write_text(VARIED_REWARD)
    fsdp_only = [o for o in FP32 if "fsdp" in o]
    overrides = [o for o in tiny_overrides(task, out, "trainer.test_freq=0",
                                           f"reward.custom_reward_function.path={reward}", *extra)
                 if o not in fsdp_only]
    RLTrainer(build_components(load_config(overrides), show_progress=False)).fit()
    return [r for r in read_metrics(out) if "critic/score/mean" in r]


@pytest.mark.timeout(600)
def test_ppo_with_a_megatron_critic_on_two_pipeline_stages_trains_and_resumes_as_one_process(task, tmp_path):
    """Two PPO steps at PP 2 equal one process's; their checkpoint resumes in one process for a third."""
    model = f"critic.model.path={task[0]}"
    one = run_steps(task, tmp_path / "one", *MEGATRON_PPO, model, *layout(1), "trainer.total_training_steps=3")
    two = run_steps(task, tmp_path / "two", *MEGATRON_PPO, model, *layout(2), "trainer.total_training_steps=2")
    (tmp_path / "two" / "metrics.jsonl").write_text("")
    two += run_steps(task, tmp_path / "two", *MEGATRON_PPO, model, *layout(1), "trainer.total_training_steps=3")
    assert [r["step"] for r in two] == [1, 2, 3] and len(one) == 3
    for a, b in zip(one, two):
        assert a["critic/score/mean"] == b["critic/score/mean"]  # the same rollouts
        for key in ("critic/vf_loss", "critic/grad_norm", "critic/values/mean", "actor/pg_loss", "actor/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["critic/vf_loss"] > 0 and a["critic/grad_norm"] > 0
    assert (tmp_path / "two" / "global_step_2" / "critic" / "dcp" / "model" / "dist_ckpt").is_dir()


def test_a_megatron_critic_needs_a_megatron_actor_on_its_layout():
    from ascend_rl.config import load_config
    from ascend_rl.plan import make_plan

    def errors(*overrides):
        base = ["actor_rollout_ref.model.path=/m", "critic.model.path=/m", "algorithm.adv_estimator=gae",
                "actor_rollout_ref.actor.strategy=megatron", "trainer.device=cpu"]
        return make_plan(load_config([*base, *overrides]), environ={}).errors

    assert any("critic.strategy=fsdp with actor_rollout_ref.actor.strategy=megatron: the critic runs in the "
               "actor's workers" in e for e in errors("critic.strategy=fsdp"))
    assert any(e.startswith("critic.megatron.tensor_model_parallel_size=2 differs from "
                            "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1")
               for e in errors("critic.megatron.tensor_model_parallel_size=2"))
    assert any(e.startswith("critic.megatron.override_transformer_config.attention_backend=local differs from "
                            "the actor's (flash)")
               for e in errors("critic.megatron.override_transformer_config.attention_backend=local"))
    assert errors() == []
