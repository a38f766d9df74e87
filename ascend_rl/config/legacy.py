"""verl's older spellings, read as verl 0.9.1 reads them.

- `actor_rollout_ref.actor.strategy=megatron` (verl <= 0.7, one tree for every engine) selects verl 0.9.1's
  Megatron tree, `model_engine=megatron`, unless the command line chooses `model_engine` itself.
- The top-level `custom_reward_function`, `reward_model` and `sandbox_fusion` sections (verl's
  legacy_reward_impl.yaml, all null by default) move into `reward.*` as verl's migrate_legacy_reward_impl moves
  them; a legacy key and its new key set to different values is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

LEGACY_SECTIONS = ("custom_reward_function", "reward_model", "sandbox_fusion")
STRATEGY_KEY = "actor_rollout_ref.actor.strategy"
ENGINE_OF_STRATEGY = {"megatron": "megatron"}

# Legacy key -> new key (a map moves whole). `section.*`: each of the section's keys to the same key under the
# new map (verl moves these sections whole; keys the new map does not have are dropped).
MOVES = {
    "reward_model.num_workers": "reward.num_workers",
    "reward_model.reward_manager": "reward.reward_manager.name",
    "reward_model.reward_loop_source": "reward.reward_manager.source",
    "reward_model.reward_loop_module_path": "reward.reward_manager.module.path",
    "reward_model.reward_loop_class_name": "reward.reward_manager.module.name",
    "reward_model.enable": "reward.reward_model.enable",
    "reward_model.enable_resource_pool": "reward.reward_model.enable_resource_pool",
    "reward_model.n_gpus_per_node": "reward.reward_model.n_gpus_per_node",
    "reward_model.nnodes": "reward.reward_model.nnodes",
    "reward_model.model.path": "reward.reward_model.model_path",
    "reward_model.reward_kwargs": "reward.reward_kwargs",
    "reward_model.rollout.*": "reward.reward_model.rollout",
    "custom_reward_function.*": "reward.custom_reward_function",
    "sandbox_fusion.*": "reward.sandbox_fusion",
}


def new_name(path: str) -> str | None:
    """Where verl 0.9.1 reads a legacy key (`reward_model.enable` → `reward.reward_model.enable`), or None."""
    for old, new in MOVES.items():
        if old.endswith(".*") and path.startswith(old[:-1]):
            return f"{new}.{path[len(old) - 1:]}"
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return None


class LegacyConflict(ValueError):
    pass


def is_legacy(path: str) -> bool:
    return path.split(".")[0] in LEGACY_SECTIONS


def engine_override(keys_and_values: Sequence[tuple[str, Any]]) -> str | None:
    """`model_engine=<engine>` when the overrides pick an engine the old way and not the new one."""
    if any(key == "model_engine" for key, _ in keys_and_values):
        return None
    strategy = next((value for key, value in reversed(keys_and_values) if key == STRATEGY_KEY), None)
    engine = ENGINE_OF_STRATEGY.get(strategy) if isinstance(strategy, str) else None
    return f"model_engine={engine}" if engine else None


def engine_mismatch(cfg: DictConfig, engine: str) -> str | None:
    """Megatron's settings live only in Megatron's tree: the old strategy spelling with another engine chosen."""
    strategy = OmegaConf.select(cfg, STRATEGY_KEY, default=None)
    wanted = ENGINE_OF_STRATEGY.get(strategy) if isinstance(strategy, str) else None
    if wanted and wanted != engine:
        return f"{STRATEGY_KEY}={strategy} needs model_engine={wanted} (this config composes model_engine={engine})"
    return None


def migrate(cfg: DictConfig, default_of: Callable[[str], Any], is_known: Callable[[str], bool]) -> None:
    """Move the legacy sections' non-null values to their new keys, then drop the sections (and with them the
    keys that have no new place)."""
    with open_dict(cfg):
        for old, new in _moves(cfg, is_known):
            value = OmegaConf.select(cfg, old)
            if value is None:
                continue
            current = OmegaConf.select(cfg, new, default=None)
            if isinstance(value, DictConfig):
                value = OmegaConf.to_container(value)
                current = OmegaConf.to_container(current) if isinstance(current, DictConfig) else current
            if current not in (default_of(new), value) and not _is_missing(cfg, new):
                raise LegacyConflict(f"'{old}={value}' conflicts with '{new}={current}'; set only '{new}'")
            OmegaConf.update(cfg, new, value, merge=False, force_add=True)
        for section in LEGACY_SECTIONS:
            cfg.pop(section, None)


def _moves(cfg: DictConfig, is_known: Callable[[str], bool]) -> list[tuple[str, str]]:
    out = []
    for old, new in MOVES.items():
        if not old.endswith(".*"):
            out.append((old, new))
            continue
        section = OmegaConf.select(cfg, old[:-2])
        if isinstance(section, DictConfig):
            out += [(f"{old[:-2]}.{key}", f"{new}.{key}") for key in section if is_known(f"{new}.{key}")]
    return out


def _is_missing(cfg: DictConfig, path: str) -> bool:
    """`???` (verl's required value, e.g. reward.reward_model.rollout.name): not set, so no conflict."""
    parent, _, key = path.rpartition(".")
    container = OmegaConf.select(cfg, parent) if parent else cfg
    # `in` is False for a ??? value: ask the node
    return isinstance(container, DictConfig) and container._get_node(key) is not None \
        and OmegaConf.is_missing(container, key)
