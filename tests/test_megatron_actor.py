"""The Megatron actor (ascend_rl/workers/megatron/actor.py) makes the FSDP actor's update: the same old log-probs,
losses, gradient norms and weights, in one process and over tensor- and data-parallel ranks (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from test_distributed import fixed_batch  # noqa: E402

from ascend_rl.data.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402
from ascend_rl.distributed.worker_group import ProcessWorkerGroup  # noqa: E402
from ascend_rl.workers.actor import Actor, ActorSettings  # noqa: E402
from ascend_rl.workers.megatron.engine import MegatronEngine, MegatronOptim  # noqa: E402
from ascend_rl.workers.megatron.model import MegatronParallel  # noqa: E402
from ascend_rl.workers.optimizer import OptimSettings  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# Megatron leaves norms out of weight decay (as verl's Megatron engine does) and FSDP does not: no decay here.
SETTINGS = ActorSettings(ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=2, ppo_epochs=2, shuffle=True,
                         loss_agg_mode="token-mean", entropy_coeff=0.01, grad_clip=1.0, balance_batch=False)
LR = 1e-3  # at 1e-2 Adam turns a last-bit gradient difference near zero into 1e-5 of weight
FSDP_OPTIM = OptimSettings(lr=LR, weight_decay=0.0, total_steps=4)
MEGATRON_OPTIM = MegatronOptim(lr=LR, weight_decay=0.0, clip_grad=1.0, total_steps=4, lr_decay_steps=4)


class MegatronActorWorker:
    """A worker process: the CPU patches, then one rank of the Megatron actor."""

    def __init__(self, rank: int, world_size: int, model_dir: str, engine: MegatronEngine,
                 settings: ActorSettings = SETTINGS):
        from ascend_rl.workers.megatron import cpu_patches
        from ascend_rl.workers.megatron.actor import MegatronActor

        cpu_patches.apply()
        self.actor = MegatronActor(model_dir, settings, MEGATRON_OPTIM, engine)

    def log_probs(self, batch):
        return self.actor.log_probs(batch)

    def update(self, batch):
        return self.actor.update(batch)

    def weights(self):
        return {name: tensor.clone() for name, tensor in self.actor.named_weights()}


def run_megatron(model_dir, batch, world: int, parallel: MegatronParallel, settings: ActorSettings = SETTINGS) -> dict:
    group = ProcessWorkerGroup(world, "test_megatron_actor:MegatronActorWorker",
                               dict(model_dir=str(model_dir), engine=MegatronEngine(parallel), settings=settings))
    try:
        log_probs, entropy = group.call_all("log_probs", batch)[0]
        metrics = [group.call_all("update", batch)[0] for _ in range(2)]
        return {"log_probs": log_probs, "entropy": entropy, "metrics": metrics,
                "weights": group.call_all("weights")[0]}
    finally:
        group.close()


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir):
    actor = Actor(str(tiny_model_dir), "cpu", SETTINGS, FSDP_OPTIM)
    batch = fixed_batch(actor)
    log_probs, entropy = actor.log_probs(batch)
    metrics = [actor.update(batch) for _ in range(2)]
    return batch, {"log_probs": log_probs, "entropy": entropy, "metrics": metrics,
                   "weights": dict(actor.named_weights())}


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, fsdp_run):
    return run_megatron(tiny_model_dir, fsdp_run[0], 1, MegatronParallel())


def assert_same_run(mine: dict, theirs: dict, tol: float, mask: torch.Tensor, weight_tol: float = 1e-4) -> None:
    """Log-probs and entropy over the responses' tokens; metrics of both updates; every weight after them
    (Adam moves a weight by about lr whatever its gradient's size, so a near-zero gradient summed in another
    order can move it by a fraction of lr: 1e-4 at lr 1e-3 over 8 steps)."""
    for key in ("log_probs", "entropy"):
        assert torch.allclose(mine[key] * mask, theirs[key] * mask, atol=tol), key
    for m1, m2 in zip(mine["metrics"], theirs["metrics"]):
        assert m1.keys() == m2.keys()
        for key in m2:
            assert m1[key] == pytest.approx(m2[key], rel=tol, abs=tol), key
    assert mine["weights"].keys() == theirs["weights"].keys()
    for name, tensor in theirs["weights"].items():
        assert torch.allclose(mine["weights"][name], tensor, atol=weight_tol), \
            (name, (mine["weights"][name] - tensor).abs().max())


@pytest.mark.timeout(300)
def test_one_megatron_rank_makes_the_fsdp_actors_update(fsdp_run, one_rank):
    assert_same_run(one_rank, fsdp_run[1], 1e-4, fsdp_run[0]["response_mask"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("parallel", [MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True),
                                      MegatronParallel(), MegatronParallel(pipeline_model_parallel_size=2)],
                         ids=["tp2-sp", "dp2", "pp2"])
def test_two_megatron_ranks_make_the_update_of_one(tiny_model_dir, fsdp_run, one_rank, parallel):
    assert_same_run(run_megatron(tiny_model_dir, fsdp_run[0], 2, parallel), one_rank, 1e-5,
                    fsdp_run[0]["response_mask"])


@pytest.mark.timeout(300)
def test_pipeline_stages_pass_micro_batches_of_varying_rows(tiny_model_dir, fsdp_run, one_rank):
    """Micro-batches by a token budget (use_dynamic_bsz): each has its own number of rows, whose shapes the
    stages send ahead; the update is the one of fixed micro-batches (losses use the mini-batch's counts)."""
    from dataclasses import replace

    by_tokens = replace(SETTINGS, ppo_micro_batch_size_per_gpu=None, ppo_max_token_len_per_gpu=40,
                        log_prob_max_token_len=40)
    mine = run_megatron(tiny_model_dir, fsdp_run[0], 2, MegatronParallel(pipeline_model_parallel_size=2), by_tokens)
    # per-micro-batch means (clip fractions, entropy) depend on the split; the loss, gradient and weights do not
    mine["metrics"] = [{k: m[k] for k in ("actor/pg_loss", "actor/grad_norm")} for m in mine["metrics"]]
    theirs = {**one_rank, "metrics": [{k: m[k] for k in ("actor/pg_loss", "actor/grad_norm")}
                                      for m in one_rank["metrics"]]}
    assert_same_run(mine, theirs, 1e-5, fsdp_run[0]["response_mask"])


@pytest.mark.timeout(300)
def test_tp2_sp_with_two_pipeline_stages_makes_the_update_of_one_rank(tiny_model_dir, fsdp_run, one_rank):
    """Four ranks: each stage's hidden states go to the next split over its TP group (sequence parallel)."""
    parallel = MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2)
    assert_same_run(run_megatron(tiny_model_dir, fsdp_run[0], 4, parallel), one_rank, 1e-5,
                    fsdp_run[0]["response_mask"])


@pytest.mark.timeout(300)
def test_tp2_ep2_megatron_moe_makes_the_fsdp_actors_update(tmp_path):
    """A tiny Qwen3-MoE (4 experts, top 2): four ranks at TP 2 × EP 2 (ETP 2, SP) against the FSDP actor on the
    transformers model."""
    model = build_tiny_model(tmp_path / "moe", TinyModelSpec(num_key_value_heads=4, num_experts=4))
    actor = Actor(str(model), "cpu", SETTINGS, FSDP_OPTIM)
    batch = fixed_batch(actor)
    log_probs, entropy = actor.log_probs(batch)
    fsdp = {"log_probs": log_probs, "entropy": entropy, "metrics": [actor.update(batch) for _ in range(2)],
            "weights": dict(actor.named_weights())}
    parallel = MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2,
                                expert_tensor_parallel_size=2)
    assert_same_run(run_megatron(model, batch, 4, parallel), fsdp, 1e-4, batch["response_mask"])
