"""Warnings for keys that do nothing (or something else than in verl) in the chosen setup, and the list
of features a config asks for that are not built yet. What each key does is key_status.TABLE's.

A warning fires only for keys the user changed from verl's defaults, so a plain config is silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from omegaconf import DictConfig, OmegaConf

from ascend_rl.algorithms.registry import ADV_ESTIMATORS, POLICY_LOSSES
from ascend_rl.config import features, key_status, schema, verl_names
from ascend_rl.config.validate import LOGGERS, PROFILER_TOOLS
from ascend_rl.reward.managers import REWARD_MANAGERS

A = "actor_rollout_ref"
SGLANG_KW = f"+{A}.rollout.engine_kwargs.sglang"


@dataclass(frozen=True)
class LintRule:
    key: str
    applies: Callable[[DictConfig], bool]
    message: Callable[[DictConfig], str]
    doc: str | None = None  # a behaviour that differs from verl's, for docs/config-keys.md


def _sglang(cfg: DictConfig) -> bool:
    return cfg[A].rollout.name == "sglang"


# Honoured keys that behave differently here than in verl (with `doc`; docs/config-keys.md lists them), or that a
# run sets where they do nothing, as in verl.
LINT_RULES = (
    LintRule("data.truncation", lambda c: not c.data.filter_overlong_prompts,
             lambda c: f"is applied here: prompts over data.max_prompt_length={c.data.max_prompt_length} tokens are "
                       f"{'rejected' if c.data.truncation == 'error' else f'cut ({c.data.truncation})'}; "
                       f"verl stores this key without applying it; to drop long prompts instead use "
                       f"data.filter_overlong_prompts=True",
             "applied to prompts longer than data.max_prompt_length (verl stores it without applying it)"),
    LintRule(f"{A}.rollout.max_model_len", _sglang,
             lambda c: f"only caps max_new_tokens; SGLang's context window is {SGLANG_KW}.context_length=N",
             "with SGLang it only caps max_new_tokens; the context window is engine_kwargs.sglang.context_length"),
    LintRule(f"{A}.actor.use_prefix_grouper",
             lambda c: c[A].actor.strategy == "megatron" or c[A].actor.ulysses_sequence_parallel_size > 1,
             lambda c: "has no effect with the Megatron engine or under Ulysses sequence parallelism: shared prefixes "
                       "are built for the FSDP engine without Ulysses (the update is the same without them, only "
                       "slower)"),
    LintRule(f"{A}.actor.clip_ratio",
             lambda c: c[A].actor.clip_ratio_low is not None and c[A].actor.clip_ratio_high is not None,
             lambda c: f"has no effect while clip_ratio_low/clip_ratio_high are set (they default to 0.2; as in "
                       f"verl, clip_ratio is their fallback when null); set {A}.actor.clip_ratio_low and "
                       f"{A}.actor.clip_ratio_high"),
)
DIFFERENCES = tuple(rule for rule in LINT_RULES if rule.doc)


# The estimator inputs the trainer computes (trainer/loop.py, RLTrainer.ESTIMATOR_INPUTS; a test keeps the two
# equal). An estimator needing another input is not built in the trainer.
TRAINER_INPUTS = ("old_log_probs", "reward_baselines", "values")


def _inputs_missing(cfg: DictConfig) -> list[str]:
    needs = ADV_ESTIMATORS.needs(cfg.algorithm.adv_estimator) if cfg.algorithm.adv_estimator in ADV_ESTIMATORS else ()
    return [need for need in needs if need not in TRAINER_INPUTS]


@dataclass(frozen=True)
class Feature:
    name: str | Callable[[DictConfig], str]
    requested: Callable[[DictConfig, int], bool]
    instead: str

    @classmethod
    def of(cls, missing: features.Missing) -> Feature:
        """A not-built feature the config's values (not its keys) turn on: its own `in_use` says when."""
        return cls(missing.name, lambda c, w: missing.in_use(c), missing.instead)


# Values (not keys) a config can choose that this build does not have; key_status.TABLE has the keys' features.
# `train` stops at start-up on these.
UNSUPPORTED = (
    *map(Feature.of, (features.TORCHTITAN, features.VEOMNI)),
    Feature(lambda c: f"the {c[A].rollout.name} rollout (rollout.name; native and sglang are built)",
            lambda c, w: c[A].rollout.name not in ("native", "sglang"), f"{A}.rollout.name=native"),
    Feature("greedy training rollouts (rollout.do_sample=false: a group's samples would all be the same)",
            lambda c, w: not c[A].rollout.do_sample, f"{A}.rollout.do_sample=true with rollout.temperature > 0"),
    Feature(lambda c: f"the {c.algorithm.adv_estimator} estimator in the trainer (it needs "
                      f"{', '.join(_inputs_missing(c))}, which the trainer does not compute yet)",
            lambda c, w: bool(_inputs_missing(c)), "algorithm.adv_estimator=grpo"),
    Feature(lambda c: f"verl's advantage estimator {c.algorithm.adv_estimator!r}",
            lambda c, w: c.algorithm.adv_estimator in _verl_only(verl_names.ADV_ESTIMATORS, ADV_ESTIMATORS.names()),
            f"one of {', '.join(ADV_ESTIMATORS.names())} (algorithm.adv_estimator)"),
    Feature(lambda c: f"verl's policy loss {c[A].actor.policy_loss.loss_mode!r}",
            lambda c, w: c[A].actor.policy_loss.loss_mode in _verl_only(verl_names.POLICY_LOSSES, POLICY_LOSSES.names()),
            f"one of {', '.join(POLICY_LOSSES.names())} ({A}.actor.policy_loss.loss_mode)"),
    Feature(lambda c: f"verl's reward manager {c.reward.reward_manager.name!r}",
            lambda c, w: c.reward.reward_manager.name in _verl_only(verl_names.REWARD_MANAGERS, REWARD_MANAGERS.names()),
            f"one of {', '.join(REWARD_MANAGERS.names())} (reward.reward_manager.name)"),
    Feature(lambda c: "verl's loggers " + ", ".join(sorted(set(_loggers(c)) - set(LOGGERS))),
            lambda c, w: bool(set(_loggers(c)) - set(LOGGERS)),
            f"trainer.logger from {', '.join(LOGGERS)} (metrics.jsonl in trainer.default_local_dir is always written)"),
    Feature(lambda c: f"verl's profiler tool {c.global_profiler.tool!r}",
            lambda c, w: c.global_profiler.tool in _verl_only(verl_names.PROFILER_TOOLS, PROFILER_TOOLS),
            "global_profiler.tool=torch (or npu on Ascend)"),
)


PROBE = "__verl_default_of_"


@cache
def _resolved_defaults(engine: str) -> DictConfig:
    tree = schema.engine_tree(engine).copy()
    OmegaConf.resolve(tree)
    return tree


def _followed_defaults(cfg: DictConfig, interpolated: dict[str, str]) -> dict[str, object]:
    """What each default that interpolates other keys (`ref.fsdp_config.param_offload: ${oc.select:actor...}`)
    resolves to in this run: each is placed beside its key in a copy of the run's config and resolved there."""
    probe = cfg.copy()
    OmegaConf.set_struct(probe, False)
    placed = {}
    for path, default in interpolated.items():
        parent, _, leaf = path.rpartition(".")
        node = OmegaConf.select(probe, parent) if parent else probe
        if isinstance(node, DictConfig):
            node[f"{PROBE}{leaf}"] = default
            placed[path] = f"{parent}.{PROBE}{leaf}" if parent else f"{PROBE}{leaf}"
    OmegaConf.resolve(probe)
    return {path: OmegaConf.select(probe, where) for path, where in placed.items()}


def changed_keys(cfg: DictConfig) -> set[str]:
    """Keys whose value differs from verl's default for the run's engine; a default that follows another key
    is compared as it resolves in this run. An open map (engine_kwargs.sglang, reward_kwargs, ...) counts as
    one key."""
    engine = schema.engine_of(cfg)
    tree = schema.engine_keys(engine)
    interpolated = {p: default for p, default in tree.items() if schema.interpolates(default)}
    fixed, followed = _resolved_defaults(engine), _followed_defaults(cfg, interpolated)
    changed = set()
    for path in schema.leaf_paths(cfg):
        value = OmegaConf.select(cfg, path)
        if path in followed:
            default = followed[path]
        elif tree.get(path) == "???":  # verl's required value, filled in by verl at run time
            default = None
        else:
            default = OmegaConf.select(fixed, path, default="<absent>")
        if isinstance(value, DictConfig):
            if schema.open_map_of(path + ".x") != path:
                continue  # a section: its keys are compared one by one
            value = OmegaConf.to_container(value)
            default = OmegaConf.to_container(default) if isinstance(default, DictConfig) else default
            if value == {} and default == "<absent>":
                continue
        if value != default:
            changed.add(path)
    return changed


# Estimators whose baseline comes from the other samples of a prompt's group.
GROUP_ESTIMATORS = ("grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "grpo_passk", "gdpo",
                    "reinforce_plus_plus_baseline", "optimal_token_baseline", "tir_optimal_token_baseline")


def _single_sample_groups(cfg: DictConfig) -> list[str]:
    estimator = cfg.algorithm.adv_estimator
    if cfg[A].rollout.n != 1 or estimator not in GROUP_ESTIMATORS:
        return []
    return [f"{A}.rollout.n=1: every group of {estimator} holds one sample, so there is no baseline (the advantage "
            f"is the sample's own score); set {A}.rollout.n to 2 or more (8 is usual)"]


def lint(cfg: DictConfig, changed: set[str] | None = None) -> list[str]:
    """`changed`: changed_keys(cfg), when the caller has it already (it copies and resolves the config)."""
    changed = changed_keys(cfg) if changed is None else changed
    _, idle = key_status.missing_features(cfg, changed)
    return [*key_status.no_effect_warnings(cfg, changed), *idle, *_single_sample_groups(cfg),
            *(f"{r.key}: {r.message(cfg)}" for r in LINT_RULES if r.key in changed and r.applies(cfg))]


def unsupported_features(cfg: DictConfig, world_size: int, changed: set[str] | None = None) -> list[str]:
    """One line per feature the run asks for that is not built: chosen values first, then set keys."""
    lines = {_name(f, cfg): f"{_name(f, cfg)} is not built yet; for now use {f.instead}"
             for f in UNSUPPORTED if f.requested(cfg, world_size)}
    wanted, _ = key_status.missing_features(cfg, changed_keys(cfg) if changed is None else changed)
    for feature, keys in wanted.items():
        if feature.name not in lines:
            lines[feature.name] = f"{feature.name} is not built yet ({', '.join(keys)}); for now use {feature.instead}"
    return list(lines.values())


def _name(feature: Feature, cfg: DictConfig) -> str:
    return feature.name(cfg) if callable(feature.name) else feature.name


def _loggers(cfg: DictConfig) -> list[str]:
    logger = cfg.trainer.logger
    return [logger] if isinstance(logger, str) else list(logger)


def _verl_only(names, ours):
    """Values verl registers and ascend-rl does not build."""
    return set(names) - set(ours)
