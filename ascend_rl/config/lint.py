"""Warnings for keys that do nothing (or something else than in verl) in the chosen setup, and the list
of features a config asks for that are not built yet.

A lint rule fires only for keys the user changed from verl's defaults, so a plain config is silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from omegaconf import DictConfig, OmegaConf

from ascend_rl.algorithms.registry import ADV_ESTIMATORS, POLICY_LOSSES
from ascend_rl.config import schema, verl_names
from ascend_rl.config.validate import LOGGERS, PROFILER_TOOLS

A = "actor_rollout_ref"
SGLANG_KW = f"+{A}.rollout.engine_kwargs.sglang"


@dataclass(frozen=True)
class LintRule:
    key: str
    applies: Callable[[DictConfig], bool]
    message: Callable[[DictConfig], str]


def _sglang(cfg: DictConfig) -> bool:
    return cfg[A].rollout.name == "sglang"


LINT_RULES = (
    LintRule(f"{A}.rollout.enable_chunked_prefill", _sglang,
             lambda c: f"has no effect with rollout.name=sglang (only vLLM reads it); to turn chunked prefill off "
                       f"use {SGLANG_KW}.chunked_prefill_size=-1"),
    LintRule(f"{A}.rollout.multi_stage_wake_up", lambda c: True,
             lambda c: "has no effect: weight sync always wakes the weights first and the KV cache after them"),
    LintRule("data.truncation", lambda c: not c.data.filter_overlong_prompts,
             lambda c: f"is applied here: prompts over data.max_prompt_length={c.data.max_prompt_length} tokens are "
                       f"{'rejected' if c.data.truncation == 'error' else f'cut ({c.data.truncation})'}; "
                       f"verl stores this key without applying it; to drop long prompts instead use "
                       f"data.filter_overlong_prompts=True"),
    LintRule(f"{A}.rollout.val_kwargs.do_sample", lambda c: True,
             lambda c: f"has no effect: validation samples when val_kwargs.temperature > 0 (here "
                       f"{c[A].rollout.val_kwargs.temperature}) and is greedy at 0; set val_kwargs.temperature"),
    LintRule(f"{A}.rollout.max_model_len", _sglang,
             lambda c: f"only caps max_new_tokens; SGLang's context window is {SGLANG_KW}.context_length=N"),
    LintRule(f"{A}.actor.clip_ratio", lambda c: True,
             lambda c: f"has no effect while clip_ratio_low/clip_ratio_high are set (they default to 0.2); "
                       f"set {A}.actor.clip_ratio_low and {A}.actor.clip_ratio_high"),
    LintRule(f"{A}.actor.profiler.tool_config.npu.discrete", lambda c: c.global_profiler.tool is not None,
             lambda c: "has no effect: a profiled step gives one trace of the whole step, with a named range per "
                       "stage (gen, old_log_prob, update_actor, ...)"),
    LintRule(f"{A}.actor.ppo_micro_batch_size", lambda c: True,
             lambda c: f"is verl's deprecated global micro-batch; use {A}.actor.ppo_micro_batch_size_per_gpu"),
)


@dataclass(frozen=True)
class Feature:
    name: str | Callable[[DictConfig], str]
    requested: Callable[[DictConfig, int], bool]
    instead: str


# What a config can ask for that this build does not have yet. `train` stops at start-up on these.
UNSUPPORTED = (
    Feature("Megatron training (actor.strategy=megatron)", lambda c, w: c[A].actor.strategy == "megatron",
            f"{A}.actor.strategy=fsdp"),
    Feature("rollout backends other than native/sglang", lambda c, w: c[A].rollout.name not in ("native", "sglang"),
            f"{A}.rollout.name=native"),
    Feature("Ulysses sequence parallelism", lambda c, w: c[A].actor.ulysses_sequence_parallel_size > 1,
            f"{A}.actor.ulysses_sequence_parallel_size=1"),
    Feature("dynamic batch size (use_dynamic_bsz)", lambda c, w: c[A].actor.use_dynamic_bsz,
            f"{A}.actor.use_dynamic_bsz=False"),
    Feature("LoRA (model.lora_rank > 0)", lambda c, w: c[A].model.lora_rank > 0, f"{A}.model.lora_rank=0"),
    Feature("PPO with a critic (adv_estimator=gae / critic.enable)",
            lambda c, w: c.critic.enable or (c.critic.enable is None and c.algorithm.adv_estimator == "gae"),
            "algorithm.adv_estimator=grpo"),
    Feature("ReMax in the trainer (it needs a greedy baseline rollout)",
            lambda c, w: c.algorithm.adv_estimator == "remax", "algorithm.adv_estimator=grpo"),
    Feature("greedy training rollouts (rollout.do_sample=false: a group's samples would all be the same)",
            lambda c, w: not c[A].rollout.do_sample, f"{A}.rollout.do_sample=true with rollout.temperature > 0"),
    Feature(lambda c: f"verl's advantage estimator {c.algorithm.adv_estimator!r}",
            lambda c, w: c.algorithm.adv_estimator in _verl_only(verl_names.ADV_ESTIMATORS, ADV_ESTIMATORS.names()),
            f"one of {', '.join(ADV_ESTIMATORS.names())} (algorithm.adv_estimator)"),
    Feature(lambda c: f"verl's policy loss {c[A].actor.policy_loss.loss_mode!r}",
            lambda c, w: c[A].actor.policy_loss.loss_mode in _verl_only(verl_names.POLICY_LOSSES, POLICY_LOSSES.names()),
            f"one of {', '.join(POLICY_LOSSES.names())} ({A}.actor.policy_loss.loss_mode)"),
    Feature(lambda c: "verl's loggers " + ", ".join(sorted(set(_loggers(c)) - set(LOGGERS))),
            lambda c, w: bool(set(_loggers(c)) - set(LOGGERS)),
            f"trainer.logger from {', '.join(LOGGERS)} (metrics.jsonl in trainer.default_local_dir is always written)"),
    Feature(lambda c: f"verl's profiler tool {c.global_profiler.tool!r}",
            lambda c, w: c.global_profiler.tool in _verl_only(verl_names.PROFILER_TOOLS, PROFILER_TOOLS),
            "global_profiler.tool=torch (or npu on Ascend)"),
    Feature("reward models (reward.reward_model.enable)", lambda c, w: c.reward.reward_model.enable,
            "rule rewards or reward.custom_reward_function.path"),
)


@lru_cache(maxsize=1)
def _resolved_defaults() -> DictConfig:
    cfg = schema.defaults_tree().copy()
    OmegaConf.resolve(cfg)
    return cfg


def changed_keys(cfg: DictConfig) -> set[str]:
    """Keys whose value differs from verl's default."""
    defaults = _resolved_defaults()
    return {
        path for path in schema.leaf_paths(cfg)
        if not isinstance(OmegaConf.select(cfg, path), DictConfig)
        and OmegaConf.select(cfg, path) != OmegaConf.select(defaults, path, default="<absent>")
    }


def lint(cfg: DictConfig) -> list[str]:
    changed = changed_keys(cfg)
    return [f"{r.key}: {r.message(cfg)}" for r in LINT_RULES if r.key in changed and r.applies(cfg)]


def unsupported_features(cfg: DictConfig, world_size: int) -> list[str]:
    return [f"{f.name(cfg) if callable(f.name) else f.name} is not built yet; for now use {f.instead}"
            for f in UNSUPPORTED if f.requested(cfg, world_size)]


def _loggers(cfg: DictConfig) -> list[str]:
    logger = cfg.trainer.logger
    return [logger] if isinstance(logger, str) else list(logger)


def _verl_only(names, ours):
    """Values verl registers and ascend-rl does not build."""
    return set(names) - set(ours)
