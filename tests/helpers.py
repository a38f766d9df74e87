"""Shared by the trainer-level tests: the tiny config every run starts from."""

import json
from pathlib import Path

from ascend_rl.config import load_config
from ascend_rl.trainer.components import build_components
from ascend_rl.trainer.loop import RLTrainer

A = "actor_rollout_ref"


def tiny_overrides(task, out: Path, *extra):
    model, data = task
    return [f"{A}.model.path={model}", f"data.train_files={data}/train.parquet", f"data.val_files={data}/test.parquet",
            "data.train_batch_size=4", "data.max_prompt_length=32", "data.max_response_length=4",
            f"{A}.rollout.n=2", f"{A}.rollout.tensor_model_parallel_size=1", f"{A}.actor.ppo_mini_batch_size=2",
            f"{A}.actor.ppo_micro_batch_size_per_gpu=2", f"{A}.actor.optim.lr=1e-3", "algorithm.adv_estimator=grpo",
            "trainer.n_gpus_per_node=1", "trainer.device=cpu", "trainer.logger=[console]", "trainer.total_epochs=1",
            "trainer.total_training_steps=4", "trainer.val_before_train=False", "trainer.test_freq=2",
            f"trainer.default_local_dir={out}", "reward.num_workers=1", *FP32, *extra]


# verl's defaults compute in bf16, which a CPU with bf16 units now honours; these tests check fp32's exactness
# (tests/test_cpu_bf16.py runs the bf16 path)
FP32 = (f"{A}.actor.fsdp_config.dtype=float32", f"{A}.ref.fsdp_config.dtype=float32", f"{A}.rollout.dtype=float32",
        "critic.fsdp.dtype=float32")


def fit(task, out, *extra):
    cfg = load_config(tiny_overrides(task, out, *extra))
    trainer = RLTrainer(build_components(cfg, show_progress=False))
    return trainer, trainer.fit()


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
