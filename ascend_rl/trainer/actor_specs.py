"""The actor (and the reference policy beside it) each training engine builds, from the config: verl's names in,
the workers' settings dataclasses out. One function per `actor.strategy`."""

from __future__ import annotations

from omegaconf import DictConfig

from ascend_rl.algorithms import policy_loss_kwargs, policy_loss_mode
from ascend_rl.config.validate import plain_map
from ascend_rl.platform import compute_dtype, dtype_named
from ascend_rl.workers.actor import ActorSettings, ActorSpec, ReferenceSettings
from ascend_rl.workers.fsdp import fsdp_settings
from ascend_rl.workers.megatron.actor import MegatronActorSpec
from ascend_rl.workers.megatron.engine import MegatronEngine, MegatronOptim, transformer_overrides
from ascend_rl.workers.megatron.model import MegatronParallel
from ascend_rl.workers.megatron.offload import MegatronOffload
from ascend_rl.workers.optimizer import OptimSettings
from ascend_rl.workers.packing import SequenceSettings

A = "actor_rollout_ref"


def optim_settings(optim: DictConfig, total_steps: int) -> OptimSettings:
    """`*.optim` of the FSDP trees (the actor's or the critic's) as the workers take it."""
    warmup = optim.lr_warmup_steps if optim.lr_warmup_steps > 0 else int(optim.lr_warmup_steps_ratio * total_steps)
    return OptimSettings(lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas),
                         lr_scheduler_type=optim.lr_scheduler_type, warmup_steps=warmup, total_steps=total_steps,
                         min_lr_ratio=optim.min_lr_ratio, num_cycles=optim.num_cycles,
                         optimizer_impl=optim.get("optimizer_impl", "torch.optim"),
                         optimizer=optim.get("optimizer", "AdamW"),
                         overrides=plain_map(optim.get("override_optimizer_config")))


def token_budget(section: DictConfig, switch: str, budget: str) -> int | None:
    """verl's dynamic batch size: micro-batches of at most `budget` tokens per device when `switch` is on."""
    return section.get(budget) if section.get(switch) else None


def actor_settings(cfg: DictConfig, grad_clip: float, sequences: SequenceSettings) -> ActorSettings:
    """What the update needs from `actor_rollout_ref.actor.*`, whichever engine runs it."""
    arr = cfg[A]
    actor = arr.actor
    return ActorSettings(
        ppo_mini_batch_size=actor.ppo_mini_batch_size * arr.rollout.n,  # verl counts prompts; we count samples
        ppo_micro_batch_size_per_gpu=actor.ppo_micro_batch_size_per_gpu,
        ppo_epochs=actor.ppo_epochs, shuffle=actor.shuffle, data_loader_seed=actor.data_loader_seed,
        loss_mode=policy_loss_mode(actor, cfg.algorithm), loss_agg_mode=actor.loss_agg_mode,
        clip_ratio_low=actor.clip_ratio_low, clip_ratio_high=actor.clip_ratio_high, clip_ratio_c=actor.clip_ratio_c,
        entropy_coeff=actor.entropy_coeff, use_kl_loss=actor.use_kl_loss, kl_loss_coef=actor.kl_loss_coef,
        kl_loss_type=actor.kl_loss_type, grad_clip=grad_clip, temperature=arr.rollout.temperature,
        log_prob_micro_batch_size=arr.rollout.log_prob_micro_batch_size_per_gpu,
        ppo_max_token_len_per_gpu=token_budget(actor, "use_dynamic_bsz", "ppo_max_token_len_per_gpu"),
        log_prob_max_token_len=token_budget(arr.rollout, "log_prob_use_dynamic_bsz", "log_prob_max_token_len_per_gpu"),
        balance_batch=cfg.trainer.balance_batch, loss_scale_factor=actor.get("loss_scale_factor"),
        policy_loss_kwargs=policy_loss_kwargs(actor, cfg.algorithm), sequences=sequences)


def reference_settings(cfg: DictConfig, fsdp=None, sequences: SequenceSettings | None = None) -> ReferenceSettings:
    ref = cfg[A].ref
    return ReferenceSettings(cfg[A].rollout.temperature, ref.log_prob_micro_batch_size_per_gpu, fsdp,
                             token_budget(ref, "log_prob_use_dynamic_bsz", "log_prob_max_token_len_per_gpu"),
                             sequences or SequenceSettings())


def fsdp_spec(cfg: DictConfig, device: str, total_steps: int, with_ref: bool) -> ActorSpec:
    arr = cfg[A]
    actor = arr.actor
    # The reference is the same policy: it shares prompts too. Not under Ulysses (lint says so).
    shared_prefix = bool(actor.get("use_prefix_grouper", False)) and actor.ulysses_sequence_parallel_size == 1
    ref = reference_settings(
        cfg, fsdp_settings(arr.ref.fsdp_config, device, f"{A}.ref.fsdp_config"),
        SequenceSettings(arr.model.use_remove_padding, arr.ref.ulysses_sequence_parallel_size,
                         shared_prefix)) if with_ref else None
    sequences = SequenceSettings(actor.get("use_remove_padding", arr.model.use_remove_padding),
                                 actor.ulysses_sequence_parallel_size, shared_prefix)
    return ActorSpec(arr.model.path, actor_settings(cfg, actor.grad_clip, sequences),
                     optim_settings(actor.optim, total_steps), arr.model.enable_gradient_checkpointing,
                     fsdp_settings(actor.fsdp_config, device), ref)


def megatron_spec(cfg: DictConfig, device: str, total_steps: int, with_ref: bool) -> MegatronActorSpec:
    """verl's Megatron tree: the layout and engine from `actor.megatron.*`, the optimizer and its schedule from
    `actor.optim.*` (Megatron's names), clipping from `optim.clip_grad`."""
    arr = cfg[A]
    actor = arr.actor
    return MegatronActorSpec(arr.model.path, actor_settings(cfg, actor.optim.clip_grad, SequenceSettings(False)),
                             megatron_optim(actor.optim, total_steps), megatron_engine(actor.megatron, device),
                             reference_settings(cfg) if with_ref else None, converted_weights(arr.ref.megatron),
                             device != "cpu" and bool(arr.ref.megatron.param_offload))


def converted_weights(m: DictConfig) -> str | None:
    """A `*.megatron` section's dist checkpoint to load the weights from (None: the HF model directory)."""
    return m.dist_checkpointing_path if m.use_dist_checkpointing else None


def megatron_engine(m: DictConfig, device: str, key: str = f"{A}.actor.megatron") -> MegatronEngine:
    tp = m.tensor_model_parallel_size
    parallel = MegatronParallel(
        tensor_model_parallel_size=tp, sequence_parallel=bool(m.sequence_parallel) and tp > 1,  # verl: off at TP 1
        pipeline_model_parallel_size=m.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=m.virtual_pipeline_model_parallel_size,
        context_parallel_size=m.context_parallel_size, expert_model_parallel_size=m.expert_model_parallel_size,
        expert_tensor_parallel_size=m.expert_tensor_parallel_size,
        override_transformer_config=transformer_overrides(plain_map(m.override_transformer_config),
                                                          f"{key}.override_transformer_config"))
    dtype = compute_dtype(device, dtype_named(f"{key}.dtype", m.dtype), f"{key}.dtype")
    return MegatronEngine(parallel, dtype, bool(m.use_distributed_optimizer), m.seed, converted_weights(m),
                          plain_map(m.override_ddp_config), bool(m.dist_ckpt_optim_fully_reshardable),
                          megatron_offload(m, device))


def megatron_offload(m: DictConfig, device: str) -> MegatronOffload:
    """What stays in host memory between phases: nothing on a CPU, where it already is. verl 0.9.1 releases the
    gradient buffers with param_offload; grad_offload is older verl's own switch (it defaults to param_offload)."""
    if device == "cpu":
        return MegatronOffload()
    return MegatronOffload(params=bool(m.param_offload), grads=bool(m.param_offload or m.get("grad_offload")),
                           optimizer=bool(m.optimizer_offload))


def megatron_optim(optim: DictConfig, total_steps: int) -> MegatronOptim:
    """verl's get_megatron_optimizer_param_scheduler: decay over the run unless lr_decay_steps says otherwise;
    warm-up steps as given, else lr_warmup_steps_ratio of the decay steps."""
    decay = optim.lr_decay_steps or total_steps
    warmup = optim.lr_warmup_steps
    if optim.get("lr_warmup_steps_ratio") is not None and (warmup is None or warmup <= 0):
        warmup = int(optim.lr_warmup_steps_ratio * decay)
    return MegatronOptim(
        lr=optim.lr, min_lr=optim.min_lr, clip_grad=optim.clip_grad, weight_decay=optim.weight_decay,
        betas=tuple(optim.betas), optimizer=optim.optimizer, lr_warmup_init=optim.lr_warmup_init,
        lr_warmup_steps=max(warmup or 0, 0), lr_decay_steps=decay, lr_decay_style=optim.lr_decay_style,
        weight_decay_incr_style=optim.weight_decay_incr_style, lr_wsd_decay_style=optim.lr_wsd_decay_style,
        lr_wsd_decay_steps=optim.lr_wsd_decay_steps, total_steps=total_steps,
        overrides=plain_map(optim.get("override_optimizer_config")))


SPECS = {"fsdp": fsdp_spec, "fsdp2": fsdp_spec, "megatron": megatron_spec}


def actor_spec(cfg: DictConfig, device: str, total_steps: int, with_ref: bool) -> ActorSpec | MegatronActorSpec:
    """The spec of `actor.strategy`'s engine (validated against SPECS' names at start-up)."""
    return SPECS[cfg[A].actor.strategy](cfg, device, total_steps, with_ref)
