"""`plan`: layouts of the four NPU recipes, validation rules, lint warnings, environment findings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ascend_rl.config import load_config
from ascend_rl.config.environment import check_environment
from ascend_rl.plan import make_plan

A = "actor_rollout_ref"
ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "ascend"
MODEL = f"{A}.model.path=/models/m"
SMALL = [MODEL, "trainer.n_gpus_per_node=1", f"{A}.rollout.tensor_model_parallel_size=1",
         "data.train_batch_size=8", f"{A}.actor.ppo_mini_batch_size=8", "algorithm.adv_estimator=grpo"]


def plan_of(*overrides, environ=None):
    return make_plan(load_config([*SMALL, *overrides]), environ={} if environ is None else environ)


def run_recipe(script: str, tmp_path: Path) -> dict:
    env = {**os.environ, "ASCEND_RL_COMMAND": "plan --json", "WORKSPACE_HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("ASCEND_RT_VISIBLE_DEVICES", None)
    out = subprocess.run(["bash", str(RECIPES / script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("script,expected", [
    ("run_qwen3_30b_a3b_grpo_megatron_sglang_a3.sh",
     dict(world=16, strategy="megatron", dp=4, tp=4, replicas=4, rollout_tp=4, samples=128, opt_steps=1, micro=32)),
    ("run_qwen2_5_32b_grpo_fsdp_sglang_a2_2nodes.sh",
     dict(world=16, strategy="fsdp", dp=16, tp=1, replicas=4, rollout_tp=4, samples=256, opt_steps=1, micro=16)),
    ("run_qwen3_8b_grpo_fsdp_sglang_1k.sh",
     dict(world=4, strategy="fsdp", dp=1, tp=1, replicas=1, rollout_tp=4, samples=80, opt_steps=1, micro=80)),
    ("run_qwen3_8b_grpo_fsdp_sglang_32k.sh",
     dict(world=8, strategy="fsdp", dp=2, tp=1, replicas=2, rollout_tp=4, samples=80, opt_steps=1, micro=40)),
])
def test_recipe_layouts(script, expected, tmp_path):
    plan = run_recipe(script, tmp_path)
    lay = plan["layout"]
    assert lay["device"] == "npu"
    assert lay["world_size"] == expected["world"]
    assert lay["train"]["strategy"] == expected["strategy"]
    assert lay["train"]["data_parallel"] == expected["dp"]
    assert lay["train"]["tp"] == expected["tp"]
    assert (lay["rollout"]["replicas"], lay["rollout"]["tp"]) == (expected["replicas"], expected["rollout_tp"])
    assert lay["batch"]["samples_per_step"] == expected["samples"]
    assert lay["batch"]["optimizer_steps_per_step"] == expected["opt_steps"]
    assert lay["batch"]["micro_batches_per_mini_batch"] == expected["micro"]
    assert plan["errors"] == []
    assert plan["unsupported"] == []  # nothing the recipe asks for is "not built"
    assert plan["environment"] == []  # the scripts export what the seed makes mandatory
    # paths are built from WORKSPACE_HOME (verl's 8B scripts used the unset $pwd and started at /); what this
    # machine lacks of the NPU stack is named
    assert all(str(tmp_path) in m or "Qwen/" in m or "SGLang is not installed" in m or "MindSpeed" in m
               for m in plan["missing_inputs"])


def test_recipe_8b_1k_is_ulysses_sp4(tmp_path):
    lay = run_recipe("run_qwen3_8b_grpo_fsdp_sglang_1k.sh", tmp_path)["layout"]
    assert (lay["train"]["fsdp_shard"], lay["train"]["ulysses_sp"]) == (4, 4)


def test_recipe_warnings(tmp_path):
    warnings = run_recipe("run_qwen2_5_32b_grpo_fsdp_sglang_a2_2nodes.sh", tmp_path)["warnings"]
    keys = [w.split(":")[0] for w in warnings]
    # use_torch_compile=False and multi_stage_wake_up=True ask for what ascend-rl does anyway: silent
    assert keys == [f"{A}.nccl_timeout", f"{A}.rollout.enable_chunked_prefill", f"{A}.rollout.val_kwargs.do_sample",
                    "data.truncation"]
    assert f"{A}.rollout.engine_kwargs.sglang.chunked_prefill_size" in warnings[1]


def test_recipe_memory_estimate_counts_offload(tmp_path):
    mem = run_recipe("run_qwen3_8b_grpo_fsdp_sglang_1k.sh", tmp_path)["memory"]
    assert mem["parameters"] == 8_000_000_000
    assert set(mem["offloaded"]) == {"actor params", "actor grads", "optimizer states", "ref params"}
    assert mem["rollout_weights_gib"] == pytest.approx(8e9 * 2 / 4 / 2**30, abs=0.01)


def test_memory_from_a_local_config(tiny_model_dir):
    plan = make_plan(load_config([f"{A}.model.path={tiny_model_dir}", "trainer.n_gpus_per_node=2",
                                  f"{A}.rollout.tensor_model_parallel_size=1", "algorithm.adv_estimator=grpo"]), {})
    mem = plan.memory
    assert mem.parameters_source == "config.json"
    assert mem.parameters == 410_368
    # fp32 params sharded over 2 devices + fp32 grads + 2 Adam states
    assert mem.actor_optimizer_gib == pytest.approx(round(410_368 * 8 / 2 / 2**30, 2))


@pytest.mark.parametrize("strategy,per_param", [("fsdp", 4 + 4 + 8), ("megatron", 2 + 4 + 12)])
def test_the_memory_estimate_counts_the_critic_beside_the_actor(tiny_model_dir, strategy, per_param):
    """The critic lives in the actor's workers, sharded as the actor (here one device): its weights, gradients and
    Adam state, in the engine's dtypes; offloaded parts count nothing and are named."""
    section = "megatron" if strategy == "megatron" else "fsdp"
    ppo = [f"{A}.model.path={tiny_model_dir}", "trainer.n_gpus_per_node=1", f"{A}.rollout.tensor_model_parallel_size=1",
           f"{A}.actor.strategy={strategy}", "trainer.device=cpu", "algorithm.adv_estimator=gae",
           "critic.model.path=/nowhere/Qwen2.5-7B"]
    mem = make_plan(load_config(ppo), {}).memory
    assert mem.critic_gib == pytest.approx(7e9 * per_param / 2**30, abs=0.02)  # the size read from the name
    assert mem.train_phase_gib == pytest.approx(mem.critic_gib + mem.actor_params_gib + mem.actor_grads_gib
                                                + mem.actor_optimizer_gib + mem.ref_params_gib, abs=0.01)
    offloaded = [f"critic.{section}.param_offload=True", f"critic.{section}.optimizer_offload=True"]
    mem = make_plan(load_config(ppo + offloaded), {}).memory
    assert mem.critic_gib == 0 and "critic params" in mem.offloaded


@pytest.mark.parametrize("overrides,fragment", [
    (["trainer.n_gpus_per_node=3"], "8 samples per step do not divide over 3 training devices"),
    ([f"{A}.actor.ppo_mini_batch_size=16"], "ppo_mini_batch_size=16 is larger than data.train_batch_size=8"),
    ([f"{A}.actor.ppo_micro_batch_size_per_gpu=3"], "ppo_micro_batch_size_per_gpu=3 does not divide the 8 samples"),
    (["trainer.n_gpus_per_node=4", f"{A}.actor.ulysses_sequence_parallel_size=3"],
     "do not divide into actor_rollout_ref.actor.ulysses_sequence_parallel_size=3"),
    (["trainer.n_gpus_per_node=4", f"{A}.rollout.tensor_model_parallel_size=4", f"{A}.rollout.expert_parallel_size=2"],
     "expert_parallel_size=2 must equal tensor_model_parallel_size × data_parallel_size = 4"),
    (["trainer.n_gpus_per_node=4", f"{A}.rollout.tensor_model_parallel_size=3"],
     "4 devices do not divide into rollout replicas"),
    ([f"{A}.actor.clip_ratio_c=1.0"], "clip_ratio_c=1.0 must be > 1"),
    ([f"{A}.actor.clip_ratio_low=1.5"], "clip_ratio_low=1.5 must be in [0, 1)"),
    ([f"{A}.rollout.temperature=-0.5"], "rollout.temperature=-0.5 must be > 0 and finite"),
    ([f"{A}.rollout.temperature=0"], "rollout.temperature=0 must be > 0 and finite (greedy decoding"),
    ([f"{A}.rollout.temperature=inf"], "rollout.temperature=inf must be > 0 and finite"),
    ([f"{A}.rollout.temperature=nan"], "rollout.temperature=nan: not a number"),
    ([f"{A}.rollout.val_kwargs.temperature=-1"], "val_kwargs.temperature=-1 must be >= 0 and finite"),
    ([f"{A}.actor.optim.lr=inf"], "optim.lr=inf must be >= 0 and finite"),
    (["algorithm.gamma=nan"], "algorithm.gamma=nan: not a number"),
    (["trainer.total_training_steps=-3"], "trainer.total_training_steps=-3 must be null (from trainer.total_epochs)"),
    (["trainer.total_epochs=0"], "trainer.total_epochs=0 must be >= 1"),
    ([f"{A}.rollout.top_p=0"], "rollout.top_p=0 must be in (0, 1]"),
    (["algorithm.adv_estimator=grop"], "algorithm.adv_estimator='grop': expected one of gae, "),
    ([f"{A}.actor.kl_loss_type=k4"], "kl_loss_type='k4': expected one of"),
    (["data.truncation=top"], "data.truncation='top': expected one of error, left, right, middle"),
    (["trainer.resume_mode=resume_path"], "trainer.resume_mode=resume_path needs trainer.resume_from_path"),
    ([f"{A}.model.path=null"], f"{A}.model.path is not set"),
])
def test_validation_rules(overrides, fragment):
    errors = plan_of(*overrides).errors
    assert any(fragment in e for e in errors), errors


def test_unknown_device_is_a_user_error():
    from ascend_rl.errors import UserError

    with pytest.raises(UserError, match="trainer.device='tpu': expected one of cpu, cuda, npu"):
        plan_of("trainer.device=tpu")


def test_megatron_batch_rule():
    errors = plan_of("trainer.n_gpus_per_node=8", f"{A}.actor.strategy=megatron",
                     f"{A}.actor.megatron.tensor_model_parallel_size=2", f"{A}.rollout.n=1",
                     "data.train_batch_size=6", f"{A}.actor.ppo_mini_batch_size=4",
                     f"{A}.actor.ppo_micro_batch_size_per_gpu=1").errors
    assert any("6 samples per step do not divide over Megatron DP 4" in e for e in errors), errors


def test_a_valid_small_config_has_no_errors():
    assert plan_of().errors == []


@pytest.mark.parametrize("overrides,key", [
    ([f"{A}.rollout.name=sglang", f"{A}.rollout.enable_chunked_prefill=False"], f"{A}.rollout.enable_chunked_prefill"),
    ([f"{A}.model.use_liger=True"], f"{A}.model.use_liger"),
    (["data.truncation=left"], "data.truncation"),
    ([f"{A}.rollout.val_kwargs.do_sample=True"], f"{A}.rollout.val_kwargs.do_sample"),
    ([f"{A}.rollout.name=sglang", f"{A}.rollout.max_model_len=4096"], f"{A}.rollout.max_model_len"),
    ([f"{A}.actor.clip_ratio=0.3"], f"{A}.actor.clip_ratio"),
])
def test_each_lint_rule_fires_once(overrides, key):
    warnings = plan_of(*overrides, f"{A}.rollout.n=2").warnings
    assert [w.split(": ")[0] for w in warnings] == [key]


def test_lint_is_silent_where_the_key_matters():
    # True asks for what weight sync always does; False would not be honoured
    two = f"{A}.rollout.n=2"
    assert plan_of(f"{A}.rollout.multi_stage_wake_up=True", two).warnings == []
    assert plan_of("data.truncation=left", "data.filter_overlong_prompts=True", two).warnings == []
    assert plan_of(two).warnings == []


def test_unsupported_features_are_named():
    unsupported = plan_of(f"{A}.actor.strategy=megatron", f"{A}.actor.megatron.context_parallel_size=2",
                          f"{A}.model.lora_rank=8").unsupported
    assert any("Megatron context parallelism" in u for u in unsupported)
    assert any("LoRA" in u for u in unsupported)


def test_train_stops_at_startup_on_unsupported_features(capsys):
    from ascend_rl.cli.main import main

    assert main(["train", *SMALL, f"{A}.actor.strategy=megatron", "trainer.device=cpu", "trainer.logger=[console]",
                 f"{A}.actor.megatron.virtual_pipeline_model_parallel_size=2"]) == 2
    assert "error: Megatron's interleaved (virtual) pipeline" in capsys.readouterr().err


NPU_SGLANG = ["trainer.device=npu", "trainer.n_gpus_per_node=4", f"{A}.rollout.name=sglang"]
GOOD_NPU_ENV = {"HCCL_HOST_SOCKET_PORT_RANGE": "60000-60050", "HCCL_NPU_SOCKET_PORT_RANGE": "61000-61050",
                "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "1", "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}


def env_findings(environ, *extra):
    cfg = load_config([*SMALL, *NPU_SGLANG, *extra])
    return {(f.variable, f.problem) for f in check_environment(cfg, "npu", environ)}


def test_environment_complete_for_npu_sglang():
    assert env_findings(GOOD_NPU_ENV) == set()


def test_environment_missing_variables_are_listed():
    assert env_findings({}) == {
        ("HCCL_HOST_SOCKET_PORT_RANGE", "missing"), ("HCCL_NPU_SOCKET_PORT_RANGE", "missing"),
        ("RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES", "missing"), ("ASCEND_RT_VISIBLE_DEVICES", "missing"),
    }


def test_environment_inconsistencies():
    env = {**GOOD_NPU_ENV, "ASCEND_RT_VISIBLE_DEVICES": "0,1", "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "0"}
    assert env_findings(env) == {("ASCEND_RT_VISIBLE_DEVICES", "inconsistent"),
                                 ("RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES", "inconsistent")}


def test_environment_deepep_needs_bf16_dispatch():
    deepep = f"++{A}.rollout.engine_kwargs.sglang.moe_a2a_backend=deepep"
    assert env_findings(GOOD_NPU_ENV, deepep) == {("SGLANG_DEEPEP_BF16_DISPATCH", "missing")}
    assert env_findings({**GOOD_NPU_ENV, "SGLANG_DEEPEP_BF16_DISPATCH": "1"}, deepep) == set()


def test_environment_not_needed_on_cpu():
    cfg = load_config(SMALL)
    assert check_environment(cfg, "cpu", {}) == []


def test_plan_counts_steps_from_the_data(tmp_path):
    from ascend_rl.data.tasks import write_arithmetic

    paths = write_arithmetic(tmp_path, n_train=100, n_test=10, max_operand=20)
    plan = plan_of(f"data.train_files={paths['train']}", "trainer.total_epochs=3")
    assert plan.total_steps == 3 * (100 // 8)
    assert plan_of(f"data.train_files={paths['train']}", "trainer.total_training_steps=7").total_steps == 7


def test_train_names_every_missing_input(tmp_path, capsys):
    from ascend_rl.cli.main import main

    code = main(["train", *SMALL, f"data.train_files={tmp_path}/t.parquet",
                 f"reward.custom_reward_function.path={tmp_path}/r.py"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: data.train_files: {tmp_path}/t.parquet: no such file" in err
    assert f"error: reward.custom_reward_function.path={tmp_path}/r.py: no such file" in err
    assert "error: actor_rollout_ref.model.path=/models/m: no such directory" in err


def test_unknown_logger_is_a_validation_error():
    assert any("trainer.logger: unknown logger 'mlfow'" in e for e in plan_of("trainer.logger=[console,mlfow]").errors)


def test_plan_of_the_embedded_default_explains_unbuilt_assets(capsys):
    from ascend_rl.cli.main import main

    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "input: embedded default: the tiny model, its SFT warm-up and the arithmetic data are built" in out
    assert "per step       64 prompts × n = 512 samples" in out
    assert "not built" not in out


def test_data_paths_expand_the_home_directory(tmp_path, monkeypatch):
    """verl's default data paths start with `~`: they name the user's home, as in verl."""
    from ascend_rl.config.validate import data_files, missing_inputs
    from ascend_rl.data.tasks import write_arithmetic

    monkeypatch.setenv("HOME", str(tmp_path))
    write_arithmetic(tmp_path / "data", n_train=10, n_test=2, max_operand=9)
    assert data_files("~/data/train.parquet") == [str(tmp_path / "data" / "train.parquet")]
    cfg = load_config([f"{A}.model.path={tmp_path}", "data.train_files='~/data/train.parquet'",
                       "data.val_files=['~/data/test.parquet']"])
    assert not [m for m in missing_inputs(cfg) if "data." in m]


@pytest.mark.parametrize("key,names,ours", [
    ("algorithm.adv_estimator", "ADV_ESTIMATORS", "ADV_ESTIMATORS"),
    (f"{A}.actor.policy_loss.loss_mode", "POLICY_LOSSES", "POLICY_LOSSES"),
])
def test_every_name_verl_registers_is_built_or_listed_as_not_built(key, names, ours):
    """verl 0.9.1's registered names are never "unknown": each is built here or stops train as not built."""
    from ascend_rl.algorithms import registry
    from ascend_rl.config import verl_names

    built = getattr(registry, ours).names()
    base = load_config(list(SMALL))  # composed once; each name set on a copy (a full load per name took 0.7 s)
    for name in getattr(verl_names, names):
        cfg = base.copy()
        OmegaConf.update(cfg, key, name)
        plan = make_plan(cfg, environ={})
        assert not [e for e in plan.errors if key in e], plan.errors
        listed = [u for u in plan.unsupported if repr(name) in u and "is not built yet" in u]
        assert bool(listed) == (name not in built), (name, plan.unsupported)
    assert any("expected one of" in e for e in plan_of(f"{key}=no_such_name").errors)


def test_verls_loggers_and_profiler_tools_are_not_unknown():
    plan = plan_of("trainer.logger=[console,file,mlflow]", "global_profiler.tool=nsys")
    assert not plan.errors, plan.errors
    assert any("verl's loggers file, mlflow is not built yet" in u for u in plan.unsupported)
    assert any("verl's profiler tool 'nsys' is not built yet" in u for u in plan.unsupported)
    assert any("unknown logger 'consle'" in e for e in plan_of("trainer.logger=[consle]").errors)


def test_plan_lists_every_start_up_problem_at_once(tiny_model_dir, tmp_path, monkeypatch):
    """What `train` would stop on one at a time, `plan` names together, each with the key to change: the context
    (from the model's config.json), a logger's package, the reward function's name, a data_source without a
    scorer, an import that fails."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ascend_rl import preflight

    monkeypatch.setitem(preflight.LOGGER_PACKAGES, "tensorboard", "no_such_package_here")
    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "x"}]], "data_source": ["mystery"],
                             "reward_model": [{"ground_truth": "1"}]}), data)
    reward = tmp_path / "reward.py"
    reward.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n    return 1.0\n")
    base = [f"{A}.model.path={tiny_model_dir}", f"data.train_files={data}", "data.val_files=null",
            "trainer.logger=[console,tensorboard]", "data.max_prompt_length=100000"]
    inputs = make_plan(load_config([*SMALL[1:], *base, f"reward.custom_reward_function.path={reward}"])).missing_inputs
    assert any(m.startswith("data.max_prompt_length=100000 + data.max_response_length=") and
               "max_position_embeddings" in m for m in inputs)
    assert any("trainer.logger includes tensorboard but no_such_package_here is not installed" in m for m in inputs)
    assert any("reward.custom_reward_function.name=compute_score: " in m and "defines no function" in m
               for m in inputs)
    # without the custom function, the data's source needs a built-in scorer
    inputs = make_plan(load_config([*SMALL[1:], *base])).missing_inputs
    assert any("no scorer for data_source 'mystery'" in m and "reward.custom_reward_function.path" in m
               for m in inputs)
    reward.write_text("import no_such_module\n")
    inputs = make_plan(load_config([*SMALL[1:], *base, f"reward.custom_reward_function.path={reward}"])).missing_inputs
    assert any("importing it failed: ModuleNotFoundError: No module named 'no_such_module'" in m for m in inputs)


def test_warnings_for_groups_of_one_and_more_workers_than_cores():
    from ascend_rl.plan import machine_warnings

    assert any(w.startswith(f"{A}.rollout.n=1: every group of grpo holds one sample")
               for w in plan_of(f"{A}.rollout.n=1").warnings)
    assert not any("rollout.n=1" in w for w in plan_of(f"{A}.rollout.n=1", "algorithm.adv_estimator=reinforce_plus_plus"
                                                       ).warnings)
    layout = plan_of("trainer.device=cpu", "trainer.n_gpus_per_node=8").layout
    assert machine_warnings(layout, cores=2) == [
        "trainer.n_gpus_per_node=8: 8 CPU worker processes on 2 core(s) share them, slower than fewer; set "
        "trainer.n_gpus_per_node to at most 2"]
    assert machine_warnings(layout, cores=16) == []
