"""What keys exist: the defaults YAML is the schema.

Every key path in `ppo_trainer.yaml` is valid; a few maps are open (any sub-key), because their
contents are passed through to another system (SGLang's ServerArgs, Megatron's TransformerConfig, the
chat template, ray.init, ...). Anything else is a typo, reported with the closest valid keys.
"""

from __future__ import annotations

import difflib
import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent
DEFAULT_CONFIG_NAME = "ppo_trainer"
EMBEDDED_CONFIG_NAME = "embedded"

# Maps whose keys belong to another system; any sub-key is accepted.
OPEN_MAPS = (
    "data.apply_chat_template_kwargs",
    "actor_rollout_ref.model.override_config",
    "actor_rollout_ref.*.megatron.override_transformer_config",
    "actor_rollout_ref.rollout.engine_kwargs.sglang",
    "actor_rollout_ref.rollout.engine_kwargs.vllm",
    "reward.custom_reward_function.reward_kwargs",
    "global_profiler.global_tool_config",
    "ray_kwargs.ray_init",
)


@lru_cache(maxsize=1)
def defaults_tree() -> DictConfig:
    """The defaults as written (interpolations unresolved), read once."""
    return OmegaConf.load(CONFIG_DIR / f"{DEFAULT_CONFIG_NAME}.yaml")


@lru_cache(maxsize=1)
def known_keys() -> dict[str, Any]:
    """Every key path of the defaults mapped to its default (None for maps)."""
    out: dict[str, Any] = {}

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            path = f"{prefix}{key}"
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                out[path] = None
                walk(child, path + ".")
            else:
                out[path] = child._value()

    walk(defaults_tree(), "")
    return out


def open_map_of(path: str) -> str | None:
    """The open map that contains `path` (strictly below it), if any."""
    parts = path.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if any(fnmatch.fnmatchcase(prefix, pattern) for pattern in OPEN_MAPS):
            return prefix
    return None


def is_known(path: str) -> bool:
    return path in known_keys() or open_map_of(path) is not None


def suggest(path: str, limit: int = 3) -> list[str]:
    """Closest valid keys: siblings with a similar last name first, then similar full paths."""
    keys = [k for k in known_keys() if not path.startswith(k + ".")]
    parent, _, leaf = path.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    by_leaf = {k.rpartition(".")[2]: k for k in siblings}
    picks = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=limit, cutoff=0.6)]
    # Same leaf name elsewhere in the tree (e.g. `actor.n` when `rollout.n` was meant).
    picks += [k for k in keys if k.rpartition(".")[2] == leaf and k not in picks]
    picks += [k for k in difflib.get_close_matches(path, keys, n=limit, cutoff=0.75) if k not in picks]
    return picks[:limit]


def unknown_key_message(path: str) -> str:
    hint = suggest(path)
    tail = f" (did you mean {', '.join(repr(h) for h in hint)}?)" if hint else ""
    return f"unknown config key '{path}'{tail}"


def missing_paths(cfg: DictConfig) -> list[str]:
    """Schema keys absent from a composed config (removed with `~`)."""
    present = set(leaf_paths(cfg))
    return [k for k in known_keys() if k not in present and open_map_of(k) is None
            and k.rpartition(".")[0] in present | {""}]


def leaf_paths(cfg: DictConfig, prefix: str = "") -> list[str]:
    """All key paths of a composed config (maps included, list items not)."""
    out = []
    for key in cfg:
        path = f"{prefix}{key}"
        out.append(path)
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and open_map_of(path + ".x") is None:
            out.extend(leaf_paths(child, path + "."))
    return out


def type_error(path: str, value: Any) -> str | None:
    """A message when `value` cannot be what the key's default says it is; None when it fits."""
    default = known_keys().get(path)
    if default is None or value is None or isinstance(default, str) and default.startswith("${"):
        return None
    expected: tuple[type, ...]
    if isinstance(default, bool):
        expected, name = (bool,), "true or false"
    elif isinstance(default, int):
        expected, name = (int,), "an integer"
    elif isinstance(default, float):
        expected, name = (int, float), "a number"
    elif isinstance(default, (list, ListConfig)):
        expected, name = (list, ListConfig, str), "a list"
    else:
        return None
    # bool is an int to Python, but `ppo_epochs=True` is a mistake, not 1
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        return f"config key '{path}' expects {name}, got {value!r}"
    return None
