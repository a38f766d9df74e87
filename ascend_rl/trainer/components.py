"""Everything the loop uses, built from the config: data, sampler, actor, reference, critic, engine, rewards,
KL controller and the reporter (sinks, progress bar). The loop itself never reads devices or engine details."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ascend_rl.algorithms import make_kl_controller
from ascend_rl.config.features import critic_in_use
from ascend_rl.config.validate import data_files, plain_map
from ascend_rl.data.dataset import PromptRecord, load_prompts
from ascend_rl.data.model_dir import check_model_dir, load_tokenizer
from ascend_rl.data.sampler import ResumableBatchSampler
from ascend_rl.distributed.actor_group import ActorGroup
from ascend_rl.distributed.colocated import colocated, colocated_rollout, worker_rollout_spec
from ascend_rl.distributed.launch import worker_group_factory
from ascend_rl.errors import UserError
from ascend_rl.platform import make_deterministic, usable_device
from ascend_rl.preflight import context_problems, megatron_problems, missing_scorers, sequence_parallel_problems
from ascend_rl.reward import RewardFunction, RewardRunner
from ascend_rl.reward.managers import RewardManager, make_reward_manager
from ascend_rl.rollout.factory import Rollout, build_rollout
from ascend_rl.trainer.actor_specs import actor_spec, megatron_engine, megatron_optim, optim_settings, token_budget
from ascend_rl.trainer.checkpoint import check_run_dir
from ascend_rl.trainer.profiler import StepProfiler
from ascend_rl.trainer.reporting import Reporter
from ascend_rl.trainer.validation import Validator
from ascend_rl.trainer.vocabulary import Vocabulary
from ascend_rl.workers.actor import Actor, ReferencePolicy
from ascend_rl.workers.critic import Critic, CriticSettings, CriticSpec
from ascend_rl.workers.fsdp import fsdp_settings
from ascend_rl.workers.megatron.critic import MegatronCriticSpec
from ascend_rl.workers.packing import SequenceSettings
from ascend_rl.workers.trained import Batching


@dataclass
class Components:
    cfg: DictConfig
    vocab: Vocabulary  # the tokenizer's pad id, decoding, and its copy in checkpoints
    actor: Actor | ActorGroup
    ref: ReferencePolicy | None  # or the shards in the actor's workers (same interface)
    critic: Critic | None  # PPO's value function, likewise
    rollout: Rollout
    rewards: RewardRunner
    reward_manager: RewardManager  # scores → rewards (reward.reward_manager.name)
    kl_controller: object | None
    train_records: list[PromptRecord]
    validator: Validator  # held-out prompts, scored with val_kwargs (empty: no validation)
    sampler: ResumableBatchSampler
    total_steps: int
    seed: int
    out_dir: Path
    profiler: StepProfiler
    report: Reporter  # sinks, progress bar, messages, curves
    n_devices: int = 1

    @property
    def engine(self):
        return self.rollout.engine

    def next_prompts(self) -> list[PromptRecord]:
        return [self.train_records[i] for i in self.sampler.next_batch()]

    def save_models(self, step_dir: Path) -> None:
        """`actor/` (HF weights and tokenizer + sharded model and optimizer state) and, with a critic, `critic/`."""
        self.actor.save(step_dir / "actor")
        self.vocab.save(step_dir / "actor")
        if self.critic is not None:
            self.critic.save(step_dir / "critic")

    def close(self) -> None:
        self.report.close()
        self.rewards.close()
        self.rollout.close()
        if isinstance(self.actor, ActorGroup):
            self.actor.close()



def total_training_steps(cfg: DictConfig, batches_per_epoch: int) -> int:
    if cfg.trainer.total_training_steps:
        return cfg.trainer.total_training_steps
    return cfg.trainer.total_epochs * batches_per_epoch


def build_components(cfg: DictConfig, show_progress: bool = True) -> Components:
    arr, data, t = cfg.actor_rollout_ref, cfg.data, cfg.trainer
    seed, out_dir = t.seed, Path(t.default_local_dir)
    check_run_dir(out_dir)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = usable_device(t.device)
    if t.deterministic:  # before any worker starts: they inherit the switches
        defaulted = make_deterministic(device, os.environ)
        print(f"ascend-rl: deterministic mode{': ' + ' '.join(defaulted) if defaulted else ''}", file=sys.stderr)
    check_model_dir(arr.model.path, "actor_rollout_ref.model.path")
    tokenizer = load_tokenizer(*((data.tokenizer, "data.tokenizer") if data.tokenizer
                                 else (arr.model.path, "actor_rollout_ref.model.path")))
    if problems := context_problems(cfg) + sequence_parallel_problems(cfg) + megatron_problems(cfg):
        raise UserError(problems)
    load = dict(tokenizer=tokenizer, max_prompt_length=data.max_prompt_length, prompt_key=data.prompt_key,
                reward_fn_key=data.reward_fn_key, filter_overlong_prompts=data.filter_overlong_prompts,
                truncation=data.truncation, chat_template_kwargs=OmegaConf.to_container(data.apply_chat_template_kwargs),
                media_keys=[data.get(key) for key in ("image_key", "video_key", "audio_key")])
    train_records = load_prompts(data_files(data.train_files), max_samples=data.train_max_samples, **load)
    val_records = load_prompts(data_files(data.val_files), max_samples=data.val_max_samples, **load) \
        if data.val_files else []
    reward_fn = RewardFunction(cfg.reward.custom_reward_function.path, cfg.reward.custom_reward_function.name,
                               OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs))
    sources = {r.data_source for r in train_records + val_records}  # the files were read once, above
    if reward_fn.custom_path is None and (problems := missing_scorers(sources)):
        raise UserError(problems)
    sampler = ResumableBatchSampler(len(train_records), data.train_batch_size, shuffle=data.shuffle,
                                    seed=data.seed if data.seed is not None else seed)
    total = total_training_steps(cfg, sampler.batches_per_epoch)
    spec = actor_spec(cfg, device, total, with_ref=arr.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward)
    rollout_spec = worker_rollout_spec(cfg, device) if colocated(cfg) else None
    critic_spec = _critic_spec(cfg, device, total) if critic_in_use(cfg) else None
    if spec.in_workers(t.nnodes * t.n_gpus_per_node):
        # one worker process per device, holding the actor and, beside it, the reference, critic and engines
        actor = ActorGroup(worker_group_factory(cfg, device), device, spec, rollout_spec, critic_spec)
        ref, critic = actor.reference, actor.critic
    else:
        actor, ref = spec.build_in_process(device)
        critic = critic_spec.build(device) if critic_spec else None
    kl = cfg.algorithm.kl_ctrl
    kl_controller = make_kl_controller(kl.type, kl.kl_coef, kl.target_kl, kl.horizon) \
        if cfg.algorithm.use_kl_in_reward else None
    # last: a launched server must not outlive a failed build
    rollout = colocated_rollout(actor, rollout_spec) if rollout_spec else build_rollout(cfg, device, out_dir)
    # scoring is light: more processes than a few only add start-up time
    rewards = RewardRunner(reward_fn, num_workers=min(cfg.reward.num_workers, 4), timeout_s=cfg.reward.timeout_s)
    vocab = Vocabulary(tokenizer)
    validator = Validator(val_records, rewards, vocab.decode,
                          arr.rollout.val_kwargs, data.max_response_length, seed=seed + 7_777_777)
    return Components(
        cfg=cfg, vocab=vocab, actor=actor, ref=ref, critic=critic, rollout=rollout, rewards=rewards,
        validator=validator, reward_manager=make_reward_manager(cfg.reward.reward_manager.name, plain_map(cfg.reward.get("reward_kwargs"))),
        kl_controller=kl_controller, train_records=train_records, sampler=sampler,
        total_steps=total, seed=seed, out_dir=out_dir, profiler=StepProfiler(cfg, device),
        report=Reporter(cfg, out_dir, total, show_progress),
        n_devices=t.nnodes * t.n_gpus_per_node,
    )


def _critic_spec(cfg: DictConfig, device: str, total_steps: int) -> CriticSpec | MegatronCriticSpec:
    """`critic.*`: its own model (critic.model.path), batches counted in prompts as the actor's, optimizer."""
    critic, n = cfg.critic, cfg.actor_rollout_ref.rollout.n
    path = str(Path(critic.model.path).expanduser())
    check_model_dir(path, "critic.model.path")
    batching = Batching(critic.ppo_mini_batch_size * n, critic.ppo_micro_batch_size_per_gpu, critic.ppo_epochs,
                        critic.shuffle, critic.data_loader_seed, cfg.trainer.balance_batch,
                        token_budget(critic, "use_dynamic_bsz", "ppo_max_token_len_per_gpu"))
    # Megatron's tree has no forward micro-batch size: its value passes take the update's
    forward = (critic.get("forward_micro_batch_size_per_gpu", critic.ppo_micro_batch_size_per_gpu),
               token_budget(critic, "use_dynamic_bsz", "forward_max_token_len_per_gpu"),
               critic.cliprange_value, critic.loss_agg_mode, critic.get("loss_scale_factor"))
    if critic.strategy == "megatron":  # Megatron's optimizer clips (optim.clip_grad); rows stay padded
        return MegatronCriticSpec(path, CriticSettings(batching, *forward, critic.optim.clip_grad),
                                  megatron_optim(critic.optim, total_steps),
                                  megatron_engine(critic.megatron, device, "critic.megatron"))
    settings = CriticSettings(batching, *forward, critic.grad_clip,
                              SequenceSettings(critic.model.use_remove_padding, critic.ulysses_sequence_parallel_size))
    return CriticSpec(path, settings, optim_settings(critic.optim, total_steps),
                      fsdp_settings(critic.fsdp, device, "critic.fsdp"), critic.model.enable_gradient_checkpointing)
