"""Features ascend-rl does not build yet, each with what to use instead and whether a run uses it: the *not
built* statuses of config/key_status.py's table point here, and lint's start-up list names them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

A = "actor_rollout_ref"


@dataclass(frozen=True)
class Missing:
    """A feature this build lacks: what it is, what to use instead, and whether a run uses it (None: setting
    any of its keys away from the default is using it)."""

    name: str
    instead: str
    in_use: Callable[[DictConfig], bool] | None = None
    off_because: str = ""  # why its keys do nothing when the run does not use it


def critic_in_use(cfg: DictConfig) -> bool:
    """verl's rule: critic.enable, or (unset) the estimator is GAE."""
    enable = cfg.critic.get("enable") if "critic" in cfg else None
    return bool(enable) or (enable is None and cfg.algorithm.adv_estimator == "gae")


def _engine(cfg: DictConfig) -> str:
    return cfg.get("model_engine") or "dp"


def _megatron(cfg: DictConfig) -> bool:
    return _engine(cfg) == "megatron"


_NOT_MEGATRON = "the training engine is not Megatron (model_engine)"
# A Megatron key the table has no row for (a newer verl's): not read, so not built.
MEGATRON = Missing("this Megatron engine setting", f"{A}.actor.strategy=fsdp", _megatron, _NOT_MEGATRON)
MEGATRON_VIRTUAL_PIPELINE = Missing("Megatron's interleaved (virtual) pipeline "
                                    "(megatron.virtual_pipeline_model_parallel_size)",
                                    "virtual_pipeline_model_parallel_size=null (one model chunk per stage)",
                                    _megatron, _NOT_MEGATRON)
MEGATRON_CONTEXT = Missing("Megatron context parallelism (megatron.context_parallel_size, dynamic_context_parallel)",
                           "context_parallel_size=1", _megatron, _NOT_MEGATRON)
MEGATRON_FSDP = Missing("Megatron's own FSDP (megatron.use_megatron_fsdp)", "use_megatron_fsdp=False (Megatron's "
                        "distributed optimizer shards the optimizer state)", _megatron, _NOT_MEGATRON)
MEGATRON_MODEL_OVERRIDE = Missing("megatron.override_mcore_model_config", "the model's HF config.json",
                                  _megatron, _NOT_MEGATRON)
MEGATRON_CRITIC_WEIGHTS = Missing("a Megatron critic's weights from a converted dist checkpoint "
                                  "(critic.megatron.use_dist_checkpointing)",
                                  "critic.model.path (an HF model: its body, and its score head or a fresh one)",
                                  lambda c: _megatron(c) and critic_in_use(c)
                                  and bool(c.critic.get("megatron", {}).get("use_dist_checkpointing")),
                                  "the run has no Megatron critic, or it loads HF weights")
PRECISION_AWARE_OPTIMIZER = Missing("Megatron's precision-aware optimizer (optim.use_precision_aware_optimizer and "
                                    "its state dtypes; Transformer Engine's FusedAdam)",
                                    "use_precision_aware_optimizer=False", _megatron, _NOT_MEGATRON)
MUON = Missing("the Muon optimizer (optim.muon_*, use_layer_wise_distributed_optimizer)", "optim.optimizer=adam",
               _megatron, _NOT_MEGATRON)
TORCHTITAN = Missing("the torchtitan engine (model_engine=torchtitan)", "model_engine=dp",
                     lambda c: _engine(c) == "torchtitan", "the training engine is not torchtitan (model_engine)")
VEOMNI = Missing("the veomni engine (model_engine=veomni)", "model_engine=dp",
                 lambda c: _engine(c) == "veomni", "the training engine is not veomni (model_engine)")
LORA = Missing("LoRA", f"{A}.model.lora_rank=0 (full fine-tuning)",
               lambda c: (c[A].model.lora_rank or 0) > 0 or (c.critic.model.get("lora_rank") or 0) > 0,
               "model.lora_rank is 0 (actor and critic)")
MULTI_TURN = Missing("multi-turn rollouts with tools (rollout.multi_turn)", "single-turn prompts",
                     lambda c: bool(c[A].rollout.multi_turn.enable), "rollout.multi_turn.enable is false")
AGENT_LOOP = Missing("verl's agent loop (rollout.agent)", "single-turn prompts")
REWARD_MODEL = Missing("reward models (reward.reward_model.enable)", "rule rewards or reward.custom_reward_function",
                       lambda c: bool(c.reward.reward_model.enable), "reward.reward_model.enable is false")
REWARD_LOOP_MODULE = Missing("reward managers from a user module (reward.reward_manager.source=importlib)",
                             "reward.custom_reward_function.path", lambda c: c.reward.reward_manager.source != "register",
                             "reward.reward_manager.source is register")
SANDBOX = Missing("sandbox code execution (reward.sandbox_fusion)", "a custom reward function")
DYNAMIC_SAMPLING = Missing("DAPO's dynamic sampling (algorithm.filter_groups)", "algorithm.filter_groups.enable=False",
                           lambda c: bool(c.algorithm.filter_groups.enable), "algorithm.filter_groups.enable is false")
PF_PPO = Missing("PF-PPO reweighting (algorithm.use_pf_ppo)", "algorithm.use_pf_ppo=False",
                 lambda c: bool(c.algorithm.use_pf_ppo), "algorithm.use_pf_ppo is false")
DISTILLATION = Missing("on-policy distillation (distillation.*)", "distillation.enabled=False",
                       lambda c: bool(c.distillation.enabled), "distillation.enabled is false")
TRANSFER_QUEUE = Missing("verl's TransferQueue (transfer_queue.*)", "transfer_queue.enable=False",
                         lambda c: bool(c.transfer_queue.enable), "transfer_queue.enable is false")
V1_TRAINER = Missing("verl's v1 trainer (trainer.use_v1, trainer.v1.*)", "trainer.use_v1=False",
                     lambda c: bool(c.trainer.use_v1), "trainer.use_v1 is false")
SKIP_ROLLOUT = Missing("verl's rollout dump/replay (skip.*)", "generating every step")
MULTIMODAL = Missing("multimodal data (images, video, audio)", "text prompts")
QAT = Missing("quantization-aware training (qat.*)", "qat.enable=False", None)
MTP = Missing("multi-token prediction (model.mtp)", f"{A}.model.mtp.enable=False",
              lambda c: bool(c[A].model.mtp.enable), "model.mtp.enable is false")
PD_DISAGGREGATION = Missing("prefill/decode disaggregation (rollout.disaggregation)",
                            f"{A}.rollout.disaggregation.enabled=False",
                            lambda c: bool(c[A].rollout.disaggregation.enabled), "disaggregation.enabled is false")
ROUTING_REPLAY = Missing("MoE routing replay (rollout.enable_rollout_routing_replay)", "the default (off)")
ROLLOUT_QUANT = Missing("quantized rollouts (rollout.quantization)", "an unquantized rollout")
ROLLOUT_TRACE = Missing("rollout tracing (rollout.trace)", "trainer.logger=tensorboard and validation samples")
CUSTOM_DATASET = Missing("a user dataset class (data.custom_cls)", "parquet in verl's layout (prompt, data_source, "
                         "reward_model.ground_truth)")
HDFS = Missing("copying checkpoints to HDFS (trainer.default_hdfs_dir)", "trainer.default_local_dir on shared storage")
CKPT_CALLBACK = Missing("checkpoint callbacks (trainer.checkpoint_callback_class)", "the default (none)")
ASYNC_CKPT = Missing("asynchronous checkpoint saving (checkpoint.async_save)", "synchronous saving (the default)")
VAL_ONLY = Missing("validation-only runs (trainer.val_only)", "ascend-rl eval")
ROLLOUT_DUMP = Missing("dumping rollouts to files (trainer.rollout_data_dir / validation_data_dir)",
                       "trainer.log_val_generations and metrics.jsonl")
# verl's role profilers act only on global_profiler.steps: with none, their settings do nothing there either.
PROFILE_WORKERS = Missing("per-role profilers (actor/ref/rollout .profiler)", "global_profiler.tool=torch (or npu) "
                          "with global_profiler.steps", lambda c: bool(c.global_profiler.get("steps")),
                          "global_profiler.steps is null: no step is profiled")
CKPT_ENGINE = Missing("verl's checkpoint engines for weight sync (rollout.checkpoint_engine.backend)",
                      f"{A}.rollout.launch.weight_transport")
PROMETHEUS = Missing("Prometheus metrics of the rollout (rollout.prometheus)", "the rollout's metrics in metrics.jsonl",
                     lambda c: bool(c[A].rollout.prometheus.enable), "rollout.prometheus.enable is false")
ONE_INDEXED_LR = Missing("one-indexed LR schedules (optim.zero_indexed_step=False)", "optim.zero_indexed_step=True")
TOOL_DATA = Missing("tool definitions in the data (data.tool_config_path / function_tool_path)", "prompts without tools")
OVERRIDE_HF_CONFIG = Missing("overriding the model's config (model.override_config)",
                             "a copy of the model directory with the changed config.json")
