"""The seed's Qwen3-30B-A3B Megatron recipe, run as written with only what a CPU needs changed: a tiny Qwen3-MoE
(4 experts, top 2), arithmetic data, short lengths, 4 CPU workers at TP 2 × EP 2 (ETP 2), the native rollout,
fp32. Two GRPO steps; the same run on one process gives the same losses, gradient norms and log-prob gaps; its
checkpoint (a Megatron dist checkpoint and an HF export transformers loads) resumes at TP 1 × EP 2 × PP 2 for a
third."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from test_distributed import VARIED_REWARD  # noqa: E402

from ascend_rl.data.tiny_model import TinyModelSpec, build_tiny_model  # noqa: E402

A = "actor_rollout_ref"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "ascend" / "run_qwen3_30b_a3b_grpo_megatron_sglang_a3.sh"
COMPARED = ("actor/pg_loss", "actor/grad_norm", "actor/kl_loss", "rollout/logprob_diff_mean", "actor/entropy")


def layout(tp: int, ep: int, world: int, pp: int = 1) -> list[str]:
    return [f"trainer.n_gpus_per_node={world}",
            *(f"{A}.{role}.megatron.{key}={size}" for role in ("actor", "ref") for key, size in (
                ("tensor_model_parallel_size", tp), ("expert_model_parallel_size", ep),
                ("expert_tensor_parallel_size", tp), ("pipeline_model_parallel_size", pp)))]


def run(tmp_path: Path, task, model: Path, name: str, command: str, *extra: str) -> subprocess.CompletedProcess:
    _, data = task
    reward = tmp_path / "varied_reward.py"  # an untrained model scores 0 on arithmetic: no advantage, no gradient
    reward.write_text(VARIED_REWARD)
    twin = [f"{A}.model.path={model}", f"data.train_files={data}/train.parquet", f"data.val_files={data}/test.parquet",
            "data.max_prompt_length=32", "data.max_response_length=8", "data.train_batch_size=4",
            f"{A}.actor.ppo_mini_batch_size=4", "trainer.device=cpu", f"{A}.rollout.name=native",
            f"{A}.rollout.tensor_model_parallel_size=1", f"{A}.actor.megatron.use_dist_checkpointing=False",
            f"{A}.ref.megatron.use_dist_checkpointing=False", f"{A}.actor.megatron.dtype=float32",
            "trainer.total_training_steps=2", f"trainer.default_local_dir={tmp_path / name}",
            f"reward.custom_reward_function.path={reward}", *extra]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NVTE_")},  # Megatron checks them per backend
           "WORKSPACE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "ASCEND_RL_COMMAND": command,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(RECIPE), *twin], capture_output=True, env=env, text=True, timeout=540)


def steps(out: Path) -> list[dict]:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in metrics if "actor/grad_norm" in m]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_30b_recipe_cpu_twin_trains_at_tp2_ep2_as_one_process_resumes_at_another_layout_and_exports(tmp_path, task):
    model = build_tiny_model(tmp_path / "model", TinyModelSpec(num_key_value_heads=4, num_experts=4))
    plan = json.loads(run(tmp_path, task, model, "plan", "plan --json", *layout(2, 2, 4)).stdout)
    assert plan["errors"] == [] and plan["missing_inputs"] == [] and plan["unsupported"] == []
    assert (plan["layout"]["train"]["strategy"], plan["layout"]["train"]["tp"]) == ("megatron", 2)
    saving = ["trainer.save_freq=2", f"{A}.actor.megatron.dist_ckpt_optim_fully_reshardable=True"]
    four = run(tmp_path, task, model, "four", "train", *layout(2, 2, 4), *saving)
    assert four.returncode == 0, four.stderr[-3000:]
    one = run(tmp_path, task, model, "one", "train", *layout(1, 1, 1), "trainer.total_training_steps=3",
              "trainer.save_freq=2")
    assert one.returncode == 0, one.stderr[-3000:]
    # the TP 2 × EP 2 checkpoint of step 2 resumes at TP 1 × EP 2 and two pipeline stages (a layer each) for
    # step 3 (not at EP 1: Megatron keeps experts in an optimizer of their own only under expert parallelism)
    resumed = run(tmp_path, task, model, "four", "train", *layout(1, 2, 4, pp=2), "trainer.total_training_steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sharded, whole = steps(tmp_path / "four"), steps(tmp_path / "one")
    assert len(sharded) == len(whole) == 3
    for a, b in zip(sharded, whole):
        assert a["critic/score/mean"] == b["critic/score/mean"]  # the same rollouts
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["actor/grad_norm"] > 0 and a["actor/pg_loss"] != 0 and a["actor/kl_loss"] >= 0
        assert 0 < a["actor/entropy"] < math.log(128)
    assert (tmp_path / "four" / "global_step_2" / "actor" / "dcp" / "model" / "dist_ckpt").is_dir()
    assert_exports_are_the_trained_model(tmp_path / "four" / "global_step_2" / "actor",
                                         tmp_path / "one" / "global_step_2" / "actor", model)


def assert_exports_are_the_trained_model(sharded: Path, whole: Path, initial: Path) -> None:
    """The HF exports of the sharded run and of the one-process run load in transformers as the initial model's
    architecture with the same logits, which two Adam steps at lr 1e-6 moved from the initial ones."""
    import torch
    import transformers

    def logits(path: Path) -> torch.Tensor:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == 4
        return model(torch.arange(3, 30)[None]).logits

    trained = logits(sharded)
    torch.testing.assert_close(trained, logits(whole), atol=1e-5, rtol=0)
    assert 0 < (trained - logits(initial)).abs().max().item() < 1e-2


def test_start_up_names_what_would_stop_megatron_workers(tmp_path):
    """A layout the world or the model does not split into, and an override Megatron has no field for, stop
    `train` at start-up (and show in `plan`) instead of failing inside the workers; MindSpeed's own
    `use_flash_attn` is not one of them."""
    from ascend_rl.config import load_config
    from ascend_rl.preflight import megatron_problems

    model = build_tiny_model(tmp_path / "model", TinyModelSpec(num_key_value_heads=4, num_experts=4))
    cfg = load_config([f"{A}.model.path={model}", f"{A}.actor.strategy=megatron", "trainer.device=cpu",
                       "trainer.n_gpus_per_node=4", f"{A}.actor.megatron.expert_model_parallel_size=3",
                       f"+{A}.actor.megatron.override_transformer_config.use_flash_attn=True",
                       f"+{A}.actor.megatron.override_transformer_config.no_such_field=1"])
    assert megatron_problems(cfg) == [
        f"{A}.actor.megatron: world size 4 is not a multiple of expert_model_parallel_size × "
        "expert_tensor_parallel_size (3 × 1): EP must divide the data-parallel size 4 (trainer.nnodes × "
        "trainer.n_gpus_per_node)",
        f"{A}.model.path={model} on Megatron's layout ({A}.actor.megatron): num_experts (4) is not a multiple of EP 3",
        f"{A}.actor.megatron.override_transformer_config: Megatron has no field no_such_field"]


def test_start_up_names_an_attention_variable_megatron_would_stop_on(monkeypatch):
    """Megatron asserts Transformer Engine's NVTE_*_ATTN variables against the attention backend in every worker
    (which inherits the driver's environment): the clash is named before the workers start."""
    from ascend_rl.config import load_config
    from ascend_rl.preflight import attention_backend_problems

    key = f"{A}.actor.megatron.override_transformer_config.attention_backend"
    cfg = load_config([f"{A}.model.path=/m", f"{A}.actor.strategy=megatron"])  # verl's default backend: flash
    assert attention_backend_problems(cfg, {}) == []
    assert attention_backend_problems(cfg, {"NVTE_FLASH_ATTN": "1", "NVTE_FUSED_ATTN": "0"}) == []
    assert attention_backend_problems(cfg, {"NVTE_FUSED_ATTN": "1"}) == [
        f"NVTE_FUSED_ATTN=1 in the environment, but {key}=flash needs 0 there (or nothing): Megatron stops on it; "
        "unset it"]
    local = load_config([f"{A}.model.path=/m", f"{A}.actor.strategy=megatron", f"{key}=local"])
    assert [p.split("=")[0] for p in attention_backend_problems(local, {"NVTE_FLASH_ATTN": "1"})] == ["NVTE_FLASH_ATTN"]
    odd = load_config([f"{A}.model.path=/m", f"{A}.actor.strategy=megatron", f"{key}=fastest"])
    assert attention_backend_problems(odd, {}) == [f"{key}=fastest: expected one of local, flash, fused, unfused, auto"]
