"""What each of verl's config keys does here: exactly one status per leaf key, in one table.

- *honoured*: read, by the module named (`Honoured.reader`, relative to the package);
- *no effect here*: accepted and ignored; a lint warning says why when a run sets it away from verl's default;
- *not built*: belongs to a feature this build lacks (config/features.py). Set away from verl's default, it stops
  `train` at start-up (plan lists it) naming the feature and what to use instead, unless the feature is off in
  this run (a LoRA key while lora_rank is 0): then, as in verl, the key has no effect, and lint says so.

The table is ordered and the first pattern that matches a key wins (`*` matches across dots).
`docs/config-keys.md` is generated from it (scripts/config_keys_doc.py); tests/test_key_status.py checks that
every leaf of verl's trees has a status and that each honoured key's reader mentions it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cache

from omegaconf import DictConfig, OmegaConf

from ascend_rl.config import schema
from ascend_rl.config.features import (
    AGENT_LOOP,
    ASYNC_CKPT,
    CKPT_CALLBACK,
    CKPT_ENGINE,
    CUSTOM_DATASET,
    DISTILLATION,
    DYNAMIC_SAMPLING,
    HDFS,
    LORA,
    MEGATRON,
    MEGATRON_CONTEXT,
    MEGATRON_CRITIC_WEIGHTS,
    MEGATRON_FSDP,
    MEGATRON_MODEL_OVERRIDE,
    MEGATRON_VIRTUAL_PIPELINE,
    MTP,
    MULTI_TURN,
    MULTIMODAL,
    MUON,
    ONE_INDEXED_LR,
    OVERRIDE_HF_CONFIG,
    PD_DISAGGREGATION,
    PF_PPO,
    PRECISION_AWARE_OPTIMIZER,
    PROFILE_WORKERS,
    PROMETHEUS,
    QAT,
    REWARD_LOOP_MODULE,
    REWARD_MODEL,
    ROLLOUT_DUMP,
    ROLLOUT_QUANT,
    ROLLOUT_TRACE,
    ROUTING_REPLAY,
    SANDBOX,
    SKIP_ROLLOUT,
    TOOL_DATA,
    TORCHTITAN,
    TRANSFER_QUEUE,
    V1_TRAINER,
    VAL_ONLY,
    VEOMNI,
    Missing,
)
from ascend_rl.config.legacy import new_name

A = "actor_rollout_ref"


@dataclass(frozen=True)
class Honoured:
    reader: str  # module path below ascend_rl/
    needle: str | None = None  # the name the reader uses, when not the key's last part

    kind = "honoured"


@dataclass(frozen=True)
class NoEffect:
    why: str
    matches: tuple = ()  # values that ask for what ascend-rl does anyway: set to one, a key is silent

    kind = "no effect here"


@dataclass(frozen=True)
class NotBuilt:
    feature: Missing

    kind = "not built"


Status = Honoured | NoEffect | NotBuilt


FSDP1 = "FSDP2 (fully_shard) shards each decoder layer; FSDP1's wrapping options do not apply"
NOT_VLLM = "only vLLM/TensorRT-LLM read it"
SGLANG_KW = f"+{A}.rollout.engine_kwargs.sglang"
KERNELS = "no fused or compiled kernels are used; the model runs as transformers defines it"
ENTROPY_CHUNKS = "entropy is computed in one pass over the micro-batch's logits"
TURBO = "verl's FSDP turbo settings; FSDP2 here takes param/reduce dtypes only"
LOGPROB_MICRO = "the global (all-rank) micro-batch is verl's deprecated spelling; use log_prob_micro_batch_size_per_gpu"


def _h(reader: str, needle: str | None = None) -> Honoured:
    return Honoured(reader, needle)


def _n(why: str, *matches) -> NoEffect:
    return NoEffect(why, matches)


def _x(feature: Missing) -> NotBuilt:
    return NotBuilt(feature)


_SPECS = "trainer/actor_specs.py"


def _megatron_engine_rows(M: str) -> tuple[tuple[str, Status], ...]:
    """A Megatron engine's section (`M`: the actor's or the critic's `*.megatron`)."""
    return (
        *((f"{M}.{k}", _h(_SPECS)) for k in (
            "tensor_model_parallel_size", "sequence_parallel", "expert_model_parallel_size",
            "expert_tensor_parallel_size", "dtype", "seed", "use_distributed_optimizer", "use_dist_checkpointing",
            "dist_checkpointing_path", "override_ddp_config", "dist_ckpt_optim_fully_reshardable")),
        (f"{M}.distrib_optim_fully_reshardable_mem_efficient", _n("the fully reshardable state is always gathered "
                                                                  "the memory-efficient way (over gloo)")),
        (f"{M}.dist_checkpointing_prefix", _n("verl 0.9.1 does not read it either: a converted checkpoint's keys "
                                              "are the model's own")),
        (f"{M}.override_transformer_config*", _h(_SPECS, "override_transformer_config")),
        (f"{M}.pipeline_model_parallel_size", _h(_SPECS)),
        (f"{M}.virtual_pipeline_model_parallel_size", _x(MEGATRON_VIRTUAL_PIPELINE)),
        (f"{M}.context_parallel_size", _x(MEGATRON_CONTEXT)),
        (f"{M}.dynamic_context_parallel", _x(MEGATRON_CONTEXT)),
        (f"{M}.max_seqlen_per_dp_cp_rank", _x(MEGATRON_CONTEXT)),
        (f"{M}.use_megatron_fsdp", _x(MEGATRON_FSDP)),
        (f"{M}.override_mcore_model_config", _x(MEGATRON_MODEL_OVERRIDE)),
        (f"{M}.router_replay*", _x(ROUTING_REPLAY)),
        (f"{M}.qat", _x(QAT)),
        (f"{M}.entropy_from_logits_*", _n("entropy comes from the logits at the response positions only")),
        (f"{M}.*mbridge", _n("ascend-rl converts HF weights with its own converter (workers/megatron/convert.py: "
                             "Qwen2/2.5, Qwen3, Qwen3-MoE, Llama; exact both ways)")),
        (f"{M}.use_remove_padding", _n("rows are left-aligned and right-padded (BSHD): packed (THD) sequences "
                                       "need Transformer Engine's attention")),
        (f"{M}.pad_*", _n("rows are padded to the micro-batch's longest (a multiple of TP under sequence "
                          "parallelism)")),
        (f"{M}.forward_only", _n("verl sets it per role; the reference is forward-only here too")),
        *((f"{M}.{k}", _h(_SPECS)) for k in ("param_offload", "grad_offload", "optimizer_offload")),
    )


M = f"{A}.actor.megatron"
# Megatron's tree (model_engine=megatron): the actor's engine and the critic's, on the actor's layout (validated).
# The reference runs in the actor's engine.
MEGATRON_ROWS: tuple[tuple[str, Status], ...] = (
    (f"{A}.*.megatron", _n("the Megatron engine's section: its keys have their own statuses")),
    *((f"{A}.ref.megatron.{k}", _h("config/validate.py")) for k in (
        "tensor_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
        "pipeline_model_parallel_size", "context_parallel_size")),
    (f"{A}.ref.megatron.use_dist_checkpointing", _h(_SPECS)),
    (f"{A}.ref.megatron.dist_checkpointing_path", _h(_SPECS)),
    (f"{A}.ref.megatron.param_offload", _h(_SPECS)),
    (f"{A}.ref.megatron.*", _n("the reference policy runs in the actor's Megatron engine, on its layout")),
    *_megatron_engine_rows(M),
    ("critic.megatron", _n("the Megatron engine's section: its keys have their own statuses")),
    *((f"critic.megatron.{k}", _x(MEGATRON_CRITIC_WEIGHTS)) for k in ("use_dist_checkpointing",
                                                                      "dist_checkpointing_path")),
    *_megatron_engine_rows("critic.megatron"),
    *((f"*.optim.{k}", _h(_SPECS)) for k in (
        "lr_decay_steps", "lr_decay_style", "lr_warmup_init", "lr_wsd_decay_steps", "lr_wsd_decay_style", "min_lr",
        "weight_decay_incr_style")),
    ("*.optim.use_checkpoint_opt_param_scheduler", _n("the LR schedule follows the config; a resumed run goes on "
                                                      "from its step count")),
    *((f"*.optim.{k}", _x(PRECISION_AWARE_OPTIMIZER)) for k in (
        "use_precision_aware_optimizer", "main_grads_dtype", "exp_avg_dtype", "exp_avg_sq_dtype")),
    ("*.optim.use_layer_wise_distributed_optimizer", _x(MUON)),
)

# Ordered: first match wins. Subtrees first, then leaves.
TABLE: tuple[tuple[str, Status], ...] = (
    ("*._target_", _n("verl's dataclass to instantiate; ascend-rl reads the keys directly")),
    # Whole sections another engine, role or feature owns.
    *MEGATRON_ROWS,
    ("*.torchtitan.*", _x(TORCHTITAN)),
    ("*.veomni.*", _x(VEOMNI)),
    (f"{A}.actor.profiler.tool_config.npu.contents", _h("trainer/profiler.py")),
    (f"{A}.actor.profiler.tool_config.npu.level", _h("trainer/profiler.py")),
    (f"{A}.actor.profiler.tool_config.npu.analysis", _h("trainer/profiler.py")),
    (f"{A}.actor.profiler.tool_config.npu.discrete", _n("a profiled step gives one trace of the whole step, with a "
                                                        "named range per stage (gen, old_log_prob, update_actor, ...)")),
    ("*.profiler.*", _x(PROFILE_WORKERS)),
    ("distillation.*", _x(DISTILLATION)),
    ("transfer_queue.*", _x(TRANSFER_QUEUE)),
    ("trainer.use_v1", _x(V1_TRAINER)),
    ("trainer.v1.*", _x(V1_TRAINER)),
    ("skip.*", _x(SKIP_ROLLOUT)),
    ("*.qat.*", _x(QAT)),
    ("*.turbo_config.distributed.fsdp_plan.param_dtype", _h("workers/fsdp.py", "model_dtype")),
    ("*.turbo_config.*", _n(TURBO)),
    # The Megatron-only optimizer keys verl's dp tree also carries.
    ("*.optim.muon_*", _x(MUON)),
    # actor_rollout_ref.model
    (f"{A}.model.path", _h("trainer/components.py")),
    (f"{A}.model.external_lib", _h("config/loader.py")),
    ("critic.model.path", _h("trainer/components.py", "critic.model.path")),
    ("critic.model.external_lib", _n(f"the module in {A}.model.external_lib is imported in every process; set "
                                     f"it there")),
    ("critic.model.trust_remote_code", _n("models are loaded without remote code")),
    ("*.model.trust_remote_code", _h("rollout/sglang/server_args.py")),
    ("*.model.enable_gradient_checkpointing", _h("trainer/components.py")),
    ("*use_remove_padding", _h("trainer/components.py")),
    ("*.model.override_config", _x(OVERRIDE_HF_CONFIG)),
    ("*.model.lora_rank", _x(LORA)),
    ("*.model.lora_alpha", _x(LORA)),
    ("*.model.target_modules", _x(LORA)),
    ("*.model.exclude_modules", _x(LORA)),
    ("*.model.lora_adapter_path", _x(LORA)),
    ("*.model.lora.*", _x(LORA)),
    ("*.model.mtp.*", _x(MTP)),
    ("*.model.use_shm", _n("models load from the local directory; there is no shared-memory copy")),
    ("*.model.hf_config_path", _n("the config is read from model.path")),
    ("*.model.tokenizer_path", _n("the tokenizer is data.tokenizer, else model.path")),
    ("*.model.custom_chat_template", _n("the chat template is the tokenizer's")),
    ("*.model.enable_activation_offload", _n("activations stay on the device; use gradient checkpointing", False)),
    ("*.model.use_liger", _n(KERNELS, False)),
    ("*.model.use_fused_kernels", _n(KERNELS, False)),
    ("*.model.fused_kernel_options.*", _n(KERNELS)),
    ("*.model.tiled_mlp.*", _n(KERNELS)),
    (f"{A}.hybrid_engine", _n("the actor and rollout always share devices (verl's hybrid engine)", True)),
    (f"{A}.nccl_timeout", _n("collectives use torch.distributed's default timeout")),
    # actor and ref: batch sizes, losses, optimizer
    (f"{A}.actor.strategy", _h("config/layout.py")),
    (f"{A}.ref.strategy", _n("the reference policy uses the actor's strategy")),
    (f"{A}.*.rollout_n", _n("set from rollout.n")),
    (f"{A}.actor.ppo_mini_batch_size", _h("trainer/components.py")),
    (f"{A}.actor.ppo_micro_batch_size_per_gpu", _h("trainer/components.py")),
    (f"{A}.actor.ppo_micro_batch_size", _n("verl's deprecated global micro-batch; use ppo_micro_batch_size_per_gpu")),
    (f"{A}.actor.use_dynamic_bsz", _h("trainer/components.py")),
    (f"{A}.*.log_prob_use_dynamic_bsz", _h("trainer/actor_specs.py")),
    (f"{A}.*_max_token_len_per_gpu", _h("trainer/actor_specs.py")),
    (f"{A}.*.fsdp_config.ulysses_sequence_parallel_size", _h("config/validate.py", "fsdp_config")),
    ("critic.fsdp.ulysses_sequence_parallel_size", _h("config/validate.py", "fsdp")),
    ("*ulysses_sequence_parallel_size", _h("trainer/components.py")),
    (f"{A}.actor.ppo_epochs", _h("trainer/components.py")),
    (f"{A}.actor.shuffle", _h("trainer/components.py")),
    (f"{A}.actor.data_loader_seed", _h("trainer/components.py")),
    (f"{A}.actor.clip_ratio", _h("algorithms/loss_settings.py")),
    (f"{A}.actor.clip_ratio_low", _h("trainer/actor_specs.py")),
    (f"{A}.actor.clip_ratio_high", _h("trainer/actor_specs.py")),
    (f"{A}.actor.clip_ratio_c", _h("trainer/actor_specs.py")),
    (f"{A}.actor.tau_pos", _h("algorithms/loss_settings.py")),
    (f"{A}.actor.tau_neg", _h("algorithms/loss_settings.py")),
    (f"{A}.actor.policy_loss.loss_mode", _h("trainer/actor_specs.py")),
    (f"{A}.actor.policy_loss.*", _h("algorithms/loss_settings.py")),
    (f"{A}.actor.loss_agg_mode", _h("trainer/components.py")),
    (f"{A}.actor.loss_scale_factor", _h("trainer/components.py")),
    (f"{A}.actor.entropy_coeff", _h("trainer/actor_specs.py")),
    (f"{A}.actor.calculate_entropy", _n("entropy is always computed (it is logged as actor/entropy)", True)),
    (f"{A}.actor.calculate_sum_pi_squared", _n("no loss here needs Σπ²")),
    (f"{A}.actor.use_kl_loss", _h("trainer/components.py")),
    (f"{A}.actor.kl_loss_coef", _h("trainer/actor_specs.py")),
    (f"{A}.actor.kl_loss_type", _h("trainer/actor_specs.py")),
    (f"{A}.actor.grad_clip", _h("trainer/components.py")),
    (f"{A}.actor.use_prefix_grouper", _h("trainer/actor_specs.py")),
    (f"{A}.actor.freeze_vision_tower", _x(MULTIMODAL)),
    ("*.use_torch_compile", _n(KERNELS, False)),
    (f"{A}.actor.use_fused_kernels", _n(KERNELS, False)),
    ("*entropy_from_logits_with_chunking", _n(ENTROPY_CHUNKS, False)),
    ("*entropy_from_logits_chunk_size", _n(ENTROPY_CHUNKS)),
    ("*entropy_checkpointing", _n(ENTROPY_CHUNKS, False)),
    ("*pad_to_length*", _n("batches are padded to their longest sequence")),
    (f"{A}.actor.checkpoint.async_save", _x(ASYNC_CKPT)),
    (f"{A}.actor.checkpoint.*", _n("a checkpoint always holds the model, optimizer and sampler state and the HF "
                                   "weights (global_step_N/actor, huggingface/)")),
    (f"{A}.ref.log_prob_micro_batch_size_per_gpu", _h("trainer/actor_specs.py")),
    (f"{A}.*.log_prob_micro_batch_size", _n(LOGPROB_MICRO)),
    # optimizer
    (f"{A}.ref.optim.*", _n("the reference policy is not trained")),
    ("*.optim.lr", _h("trainer/actor_specs.py")),
    ("*.optim.weight_decay", _h("trainer/actor_specs.py")),
    ("*.optim.betas", _h("trainer/actor_specs.py")),
    ("*.optim.lr_warmup_steps", _h("trainer/actor_specs.py")),
    ("*.optim.lr_warmup_steps_ratio", _h("trainer/actor_specs.py")),
    ("*.optim.lr_scheduler_type", _h("trainer/actor_specs.py")),
    ("*.optim.min_lr_ratio", _h("trainer/actor_specs.py")),
    ("*.optim.num_cycles", _h("trainer/actor_specs.py")),
    ("*.optim.total_training_steps", _n("set from trainer.total_training_steps / total_epochs")),
    ("*.optim.optimizer", _h("trainer/actor_specs.py")),
    ("*.optim.optimizer_impl", _h("trainer/actor_specs.py")),
    ("*.optim.override_optimizer_config", _h("trainer/actor_specs.py")),
    ("*.optim.zero_indexed_step", _x(ONE_INDEXED_LR)),
    ("*.optim.warmup_style", _n("verl's old name of lr_scheduler_type; set lr_scheduler_type")),
    ("*.optim.clip_grad", _h("trainer/actor_specs.py")),  # Megatron's tree (FSDP's clips with grad_clip)
    # FSDP settings (actor and ref)
    (f"{A}.*.fsdp_config.param_offload", _h("workers/fsdp.py")),
    (f"{A}.*.fsdp_config.optimizer_offload", _h("workers/fsdp.py")),
    (f"{A}.*.fsdp_config.model_dtype", _h("workers/fsdp.py")),
    (f"{A}.*.fsdp_config.dtype", _h("workers/fsdp.py")),
    (f"{A}.*.fsdp_config.reshard_after_forward", _h("workers/fsdp.py")),
    (f"{A}.*.fsdp_config.mixed_precision", _h("workers/fsdp.py")),
    (f"{A}.actor.fsdp_config.fsdp_size", _h("config/layout.py")),
    (f"{A}.*.fsdp_config.strategy", _n("actor.strategy decides")),
    (f"{A}.*.fsdp_config.seed", _n("trainer.seed seeds every process")),
    (f"{A}.*.fsdp_config.full_determinism", _n("trainer.deterministic switches deterministic kernels on")),
    (f"{A}.*.fsdp_config.offload_policy", _n("param_offload moves parameters and optimizer state to the host")),
    (f"{A}.*.fsdp_config.*", _n(FSDP1)),
    ("critic.fsdp.param_offload", _h("workers/fsdp.py")),
    ("critic.fsdp.optimizer_offload", _h("workers/fsdp.py")),
    ("critic.fsdp.model_dtype", _h("workers/fsdp.py")),
    ("critic.fsdp.dtype", _h("workers/fsdp.py")),
    ("critic.fsdp.reshard_after_forward", _h("workers/fsdp.py")),
    ("critic.fsdp.mixed_precision", _h("workers/fsdp.py")),
    ("critic.fsdp.strategy", _n("actor.strategy decides")),
    ("critic.fsdp.seed", _n("trainer.seed seeds every process")),
    ("critic.fsdp.full_determinism", _n("trainer.deterministic switches deterministic kernels on")),
    ("critic.fsdp.offload_policy", _n("param_offload moves parameters and optimizer state to the host")),
    ("critic.fsdp.*", _n(FSDP1)),
    # rollout
    (f"{A}.rollout.name", _h("rollout/factory.py")),
    (f"{A}.rollout.mode", _n("rollouts are always served asynchronously (verl 0.9.1's only mode)")),
    (f"{A}.rollout.launch.*", _h("rollout/factory.py")),
    (f"{A}.rollout.n", _h("trainer/loop.py")),
    (f"{A}.rollout.temperature", _h("trainer/loop.py")),
    (f"{A}.rollout.top_k", _h("trainer/loop.py")),
    (f"{A}.rollout.top_p", _h("trainer/loop.py")),
    (f"{A}.rollout.ignore_eos", _h("trainer/loop.py")),
    (f"{A}.rollout.do_sample", _h("config/lint.py")),
    (f"{A}.rollout.val_kwargs.do_sample", _n("validation samples when val_kwargs.temperature > 0")),
    (f"{A}.rollout.val_kwargs.*", _h("trainer/validation.py")),
    (f"{A}.rollout.free_cache_engine", _h("trainer/loop.py")),
    (f"{A}.rollout.gpu_memory_utilization", _h("rollout/factory.py")),
    (f"{A}.rollout.max_num_seqs", _h("rollout/factory.py")),
    (f"{A}.rollout.max_num_batched_tokens", _h("rollout/factory.py")),
    (f"{A}.rollout.max_model_len", _h("rollout/factory.py")),
    (f"{A}.rollout.load_format", _h("rollout/factory.py")),
    (f"{A}.rollout.dtype", _h("rollout/sglang/server_args.py")),
    (f"{A}.rollout.enforce_eager", _h("rollout/sglang/server_args.py")),
    (f"{A}.rollout.skip_tokenizer_init", _h("rollout/sglang/server_args.py")),
    (f"{A}.rollout.engine_kwargs.sglang", _h("rollout/sglang/server_args.py", "engine_kwargs.sglang")),
    (f"{A}.rollout.engine_kwargs.*", _n(NOT_VLLM)),
    (f"{A}.rollout.tensor_model_parallel_size", _h("config/layout.py")),
    (f"{A}.rollout.data_parallel_size", _h("config/layout.py")),
    (f"{A}.rollout.expert_parallel_size", _h("config/layout.py")),
    (f"{A}.rollout.pipeline_model_parallel_size", _h("config/layout.py")),
    (f"{A}.rollout.log_prob_micro_batch_size_per_gpu", _h("trainer/actor_specs.py")),
    (f"{A}.rollout.checkpoint_engine.update_weights_bucket_megabytes", _h("rollout/factory.py")),
    (f"{A}.rollout.checkpoint_engine.*", _x(CKPT_ENGINE)),
    (f"{A}.rollout.enable_chunked_prefill", _n(f"{NOT_VLLM}; SGLang's is {SGLANG_KW}.chunked_prefill_size (-1: off)")),
    (f"{A}.rollout.enable_prefix_caching", _n(NOT_VLLM + "; SGLang caches prefixes (radix cache) by default")),
    (f"{A}.rollout.cudagraph_capture_sizes", _n(f"{NOT_VLLM}; SGLang's is {SGLANG_KW}.cuda_graph_bs")),
    (f"{A}.rollout.disable_log_stats", _n(NOT_VLLM)),
    (f"{A}.rollout.scheduling_policy", _n(f"{NOT_VLLM}; SGLang's is {SGLANG_KW}.schedule_policy")),
    (f"{A}.rollout.logprobs_mode", _n(NOT_VLLM + "; log-probs are of the raw distribution at the rollout temperature")),
    (f"{A}.rollout.multi_stage_wake_up", _n("weight sync always wakes the weights first and the KV cache after them", True)),
    (f"{A}.rollout.layered_summon", _n("FSDP2 weights are gathered one bucket at a time already")),
    (f"{A}.rollout.calculate_log_probs", _n("rollout log-probs are always returned (they feed the "
                                            "engine-vs-trainer metrics)", True)),
    (f"{A}.rollout.prompt_length", _n("set from data.max_prompt_length")),
    (f"{A}.rollout.response_length", _n("set from data.max_response_length")),
    (f"{A}.rollout.seed", _n("each sample's seed derives from trainer.seed, the step and the sample")),
    (f"{A}.rollout.full_determinism", _n("trainer.deterministic switches deterministic inference on")),
    (f"{A}.rollout.nnodes", _n("the rollout shares the actor's nodes (trainer.nnodes)")),
    (f"{A}.rollout.n_gpus_per_node", _n("the rollout shares the actor's devices (trainer.n_gpus_per_node)")),
    (f"{A}.rollout.over_sample_rate", _n("every sample of a step is waited for")),
    (f"{A}.rollout.router_config_path", _n("one engine or server per replica; there is no router")),
    (f"{A}.rollout.moe_load_balance_metrics_interval", _n("no MoE metrics are collected")),
    (f"{A}.rollout.mtp", _x(MTP)),
    (f"{A}.rollout.qat", _x(QAT)),
    (f"{A}.rollout.quantization*", _x(ROLLOUT_QUANT)),
    (f"{A}.rollout.enable_rollout_routing_replay", _x(ROUTING_REPLAY)),
    (f"{A}.rollout.multi_turn.*", _x(MULTI_TURN)),
    (f"{A}.rollout.agent.*", _x(AGENT_LOOP)),
    (f"{A}.rollout.trace.*", _x(ROLLOUT_TRACE)),
    (f"{A}.rollout.prometheus.*", _x(PROMETHEUS)),
    (f"{A}.rollout.disaggregation.*", _x(PD_DISAGGREGATION)),
    # critic (PPO's value function; its optim, fsdp and model keys are with the actor's above)
    ("critic.enable", _h("config/features.py")),
    ("critic.ppo_mini_batch_size", _h("trainer/components.py")),
    ("critic.ppo_micro_batch_size_per_gpu", _h("trainer/components.py")),
    ("critic.forward_micro_batch_size_per_gpu", _h("trainer/components.py")),
    ("critic.ppo_micro_batch_size", _n("verl's deprecated global micro-batch; use ppo_micro_batch_size_per_gpu")),
    ("critic.forward_micro_batch_size", _n("verl's deprecated global micro-batch; use "
                                           "forward_micro_batch_size_per_gpu")),
    ("critic.ppo_epochs", _h("trainer/components.py")),
    ("critic.shuffle", _h("trainer/components.py")),
    ("critic.data_loader_seed", _h("trainer/components.py")),
    ("critic.cliprange_value", _h("trainer/components.py")),
    ("critic.loss_agg_mode", _h("trainer/components.py")),
    ("critic.loss_scale_factor", _h("trainer/components.py")),
    ("critic.grad_clip", _h("trainer/components.py")),
    ("critic.use_dynamic_bsz", _h("trainer/components.py")),
    ("critic.*_max_token_len_per_gpu", _h("trainer/components.py")),
    ("critic.checkpoint.async_save", _x(ASYNC_CKPT)),
    ("critic.checkpoint.*", _n("a checkpoint always holds the critic's model and optimizer state and its HF weights "
                               "(global_step_N/critic)")),
    ("critic.strategy", _n("the critic is FSDP2-sharded like the actor (actor.strategy)")),
    ("critic.rollout_n", _n("set from rollout.n")),
    ("critic.nccl_timeout", _n("collectives use torch.distributed's default timeout")),
    ("trainer.critic_warmup", _h("trainer/loop.py")),
    ("trainer.max_critic_ckpt_to_keep", _n("a checkpoint holds the actor and the critic together; "
                                           "trainer.max_actor_ckpt_to_keep rotates them")),
    # data
    ("data.tokenizer", _h("trainer/components.py")),
    ("data.train_files", _h("trainer/components.py")),
    ("data.val_files", _h("trainer/components.py")),
    ("data.train_max_samples", _h("trainer/components.py")),
    ("data.val_max_samples", _h("trainer/components.py")),
    ("data.prompt_key", _h("trainer/components.py")),
    ("data.reward_fn_key", _h("trainer/components.py")),
    ("data.max_prompt_length", _h("trainer/components.py")),
    ("data.max_response_length", _h("trainer/loop.py")),
    ("data.train_batch_size", _h("trainer/components.py")),
    ("data.shuffle", _h("trainer/components.py")),
    ("data.seed", _h("trainer/components.py")),
    ("data.filter_overlong_prompts", _h("trainer/components.py")),
    ("data.truncation", _h("trainer/components.py")),
    ("data.apply_chat_template_kwargs", _h("trainer/components.py")),
    ("data.image_key", _h("trainer/components.py")),
    ("data.video_key", _h("trainer/components.py")),
    ("data.audio_key", _h("trainer/components.py")),
    ("data.image_patch_size", _x(MULTIMODAL)),
    ("data.mm_processor_kwargs", _x(MULTIMODAL)),
    ("data.return_multi_modal_inputs", _x(MULTIMODAL)),
    ("data.custom_cls.*", _x(CUSTOM_DATASET)),
    ("data.tool_config_path", _x(TOOL_DATA)),
    ("data.function_tool_path", _x(TOOL_DATA)),
    ("data.gen_batch_size", _x(DYNAMIC_SAMPLING)),
    ("data.val_batch_size", _n("validation sends every held-out prompt to the engine at once")),
    ("data.validation_shuffle", _n("validation is scored over all held-out prompts; order does not change it")),
    ("data.dataloader_num_workers", _n("prompts are tokenized once at start-up", 0)),
    ("data.filter_overlong_prompts_workers", _n("prompts are tokenized once at start-up")),
    ("data.use_shm", _n("data files are read from their paths")),
    ("data.trust_remote_code", _n("the tokenizer is loaded with the model's trust_remote_code")),
    ("data.return_raw_input_ids", _n("the rollout and actor share one tokenizer")),
    ("data.return_raw_chat", _n("prompts reach the rollout as token ids")),
    ("data.return_full_prompt", _n("prompts reach the rollout as token ids")),
    # reward
    ("reward.custom_reward_function.*", _h("trainer/components.py")),
    ("reward.num_workers", _h("trainer/components.py")),
    ("reward.reward_kwargs", _h("trainer/components.py")),
    ("reward.timeout_s", _h("trainer/components.py")),
    ("reward.reward_manager.name", _h("reward/managers.py", "REWARD_MANAGERS")),
    ("reward.reward_manager.source", _x(REWARD_LOOP_MODULE)),
    ("reward.reward_manager.module.*", _x(REWARD_LOOP_MODULE)),
    ("reward.reward_model.*", _x(REWARD_MODEL)),
    ("reward.sandbox_fusion.*", _x(SANDBOX)),
    # verl's legacy sections (config/legacy.py moves them into reward.*; these are the keys it drops)
    ("reward_model.*", _n("a legacy key with no place in verl 0.9.1's reward section")),
    ("custom_reward_function.*", _n("a legacy key with no place in verl 0.9.1's reward section")),
    ("sandbox_fusion.*", _x(SANDBOX)),
    # algorithm
    ("algorithm.adv_estimator", _h("trainer/loop.py")),
    ("algorithm.gamma", _h("trainer/loop.py")),
    ("algorithm.lam", _h("trainer/loop.py")),
    ("algorithm.norm_adv_by_std_in_grpo", _h("trainer/loop.py")),
    ("algorithm.use_kl_in_reward", _h("trainer/loop.py")),
    ("algorithm.kl_penalty", _h("trainer/loop.py")),
    ("algorithm.kl_ctrl.*", _h("trainer/components.py")),
    ("algorithm.filter_groups.*", _x(DYNAMIC_SAMPLING)),
    ("algorithm.rollout_correction.rollout_rs", _h("trainer/loop.py")),
    ("algorithm.rollout_correction.rollout_rs_threshold", _h("trainer/loop.py")),
    ("algorithm.rollout_correction.rollout_is", _h("trainer/loop.py")),
    ("algorithm.rollout_correction.rollout_is_threshold", _h("trainer/loop.py")),
    ("algorithm.rollout_correction.rollout_is_batch_normalize", _h("trainer/loop.py")),
    ("algorithm.rollout_correction.bypass_mode", _h("trainer/loop.py")),
    ("algorithm.rollout_correction.loss_type", _h("algorithms/rollout_correction.py")),
    ("algorithm.use_pf_ppo", _x(PF_PPO)),
    ("algorithm.pf_ppo.*", _x(PF_PPO)),
    # trainer
    ("trainer.total_epochs", _h("trainer/components.py")),
    ("trainer.total_training_steps", _h("trainer/components.py")),
    ("trainer.project_name", _h("trainer/reporting.py")),
    ("trainer.experiment_name", _h("trainer/reporting.py")),
    ("trainer.logger", _h("trainer/reporting.py")),
    ("trainer.log_val_generations", _n("validation logs its scores; generations are not logged")),
    ("trainer.rollout_data_dir", _x(ROLLOUT_DUMP)),
    ("trainer.validation_data_dir", _x(ROLLOUT_DUMP)),
    ("trainer.nnodes", _h("config/layout.py")),
    ("trainer.n_gpus_per_node", _h("config/layout.py")),
    ("trainer.save_freq", _h("trainer/loop.py")),
    ("trainer.test_freq", _h("trainer/loop.py")),
    ("trainer.val_before_train", _h("trainer/loop.py")),
    ("trainer.val_only", _x(VAL_ONLY)),
    ("trainer.resume_mode", _h("trainer/loop.py")),
    ("trainer.resume_from_path", _h("trainer/loop.py")),
    ("trainer.max_actor_ckpt_to_keep", _h("trainer/loop.py")),
    ("trainer.default_local_dir", _h("trainer/components.py")),
    ("trainer.default_hdfs_dir", _x(HDFS)),
    ("trainer.del_local_ckpt_after_load", _n("checkpoints are kept; max_actor_ckpt_to_keep prunes old ones")),
    ("trainer.checkpoint_callback_class", _x(CKPT_CALLBACK)),
    ("trainer.esi_redundant_time", _n("saving is by trainer.save_freq; there is no expiry-driven save")),
    ("trainer.balance_batch", _h("trainer/components.py")),
    ("trainer.ray_wait_register_center_timeout", _n("workers register through torch.distributed, not a Ray "
                                                    "register centre")),
    ("trainer.ray_address", _h("distributed/launch.py")),
    ("trainer.device", _h("trainer/components.py")),
    ("trainer.seed", _h("trainer/components.py")),
    ("trainer.deterministic", _h("trainer/components.py")),
    ("ray_kwargs.ray_init*", _h("distributed/launch.py", "ray_init")),
    ("ray_kwargs.timeline_json_file", _n("no Ray timeline is written")),
    ("global_profiler.tool", _h("trainer/profiler.py")),
    ("global_profiler.steps", _h("trainer/profiler.py")),
    ("global_profiler.save_path", _h("trainer/profiler.py")),
    ("global_profiler.global_tool_config", _x(PROFILE_WORKERS)),
    ("global_profiler.*", _n("a profiled step writes one trace of the whole step to global_profiler.save_path")),
    ("model_engine", _h("config/schema.py")),
)


ENGINE_FEATURES = {"megatron": MEGATRON, "torchtitan": TORCHTITAN, "veomni": VEOMNI}


@cache
def status_of(path: str) -> Status | None:
    """The first matching row's status; else, for a key only another engine's tree has, that engine's; else
    None (a key the table does not cover). A legacy key verl moves has the status of its new name."""
    path = new_name(path) or path
    found = next((status for pattern, status in TABLE if fnmatch.fnmatchcase(path, pattern)), None)
    if found is None and path not in schema.engine_keys("dp"):
        found = next((NotBuilt(feature) for engine, feature in ENGINE_FEATURES.items()
                      if path in schema.engine_keys(engine)), None)
    return found


def missing_features(cfg: DictConfig, changed: set[str]) -> tuple[dict[Missing, list[str]], list[str]]:
    """The features this run asks for that are not built (each with the keys that ask), and a warning for each
    not-built key set in a run that leaves its feature off."""
    wanted: dict[Missing, list[str]] = {}
    idle = []
    for path in sorted(changed):
        status = status_of(path)
        if not isinstance(status, NotBuilt):
            continue
        feature = status.feature
        if feature.in_use is None or feature.in_use(cfg):
            wanted.setdefault(feature, []).append(path)
        else:
            idle.append(f"{path}: has no effect: {feature.off_because}")
    return wanted, idle


def no_effect_warnings(cfg: DictConfig, changed: set[str]) -> list[str]:
    return [f"{path}: has no effect here: {status.why}" for path in sorted(changed)
            if isinstance(status := status_of(path), NoEffect) and OmegaConf.select(cfg, path) not in status.matches]
