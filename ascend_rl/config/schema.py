"""What keys exist: verl's config tree is the schema.

verl composes one tree per training engine (`model_engine`: dp, megatron, torchtitan, veomni); verl writes each
out as `_generated_ppo_<engine>_trainer.yaml`, which we keep with the rest of verl's files in `verl/`. A key is
valid when it is in any of those trees or in ascend-rl's own overlay (`ascend_rl.yaml`, `ascend_rl_engine/`);
its default comes from the tree of the run's engine. Some maps are open (any sub-key), because their contents
are passed through to another system (SGLang's ServerArgs, Megatron's TransformerConfig, the chat template,
ray.init, ...) or verl lets users extend them with `+key`. Anything else is a typo, reported with the closest
valid keys.
"""

from __future__ import annotations

import difflib
import fnmatch
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent
VERL_CONFIG_DIR = CONFIG_DIR / "verl"  # verl's trainer config, as scripts/sync_verl_config.py copied it
OVERLAY = CONFIG_DIR / "ascend_rl.yaml"
ENGINE_OVERLAY_DIR = CONFIG_DIR / "ascend_rl_engine"
DEFAULT_CONFIG_NAME = "ppo_trainer"
EMBEDDED_CONFIG_NAME = "embedded"
ENGINES = ("dp", "megatron", "torchtitan", "veomni")  # verl's model_engine choices; dp is verl's default

# Open maps besides those whose default is {} in verl's tree (found by open_maps()): maps verl fills with
# `+key=value` although their default is null, absent or has entries. Patterns: `*` matches across dots.
OPEN_MAPS = (
    "data.apply_chat_template_kwargs",
    "*.model.override_config",
    "*.optim.override_optimizer_config",
    "*.megatron.override_transformer_config",
    "*.megatron.override_ddp_config",
    "*.megatron.override_mcore_model_config",
    "*.fsdp_config.mixed_precision",  # verl's FSDP engine reads a dict here (FSDPEngineConfig.mixed_precision)
    "critic.fsdp.mixed_precision",
    "reward_model.rollout.engine_kwargs",
    "reward_model.reward_kwargs",  # verl's legacy spelling of reward.reward_kwargs (+reward_model.reward_kwargs.x)
    "reward.reward_kwargs",
    "reward.custom_reward_function.reward_kwargs",
    "custom_reward_function.reward_kwargs",  # legacy spelling; verl moves the whole section into reward.*
    "global_profiler.global_tool_config",
    "ray_kwargs.ray_init",
)

# Floats that verl's YAML writes as integers (`top_p: 1`, `temperature: 0`; verl's config dataclasses declare
# them float, and verl documents fractional num_warmup_batches): a float value fits.
FLOAT_KEYS = ("*.top_p", "*.temperature", "*.entropy_coeff", "*.over_sample_rate", "trainer.v1.*.num_warmup_batches")


def _generated(engine: str) -> Path:
    return VERL_CONFIG_DIR / ("_generated_ppo_trainer.yaml" if engine == "dp" else f"_generated_ppo_{engine}_trainer.yaml")


@cache
def engine_tree(engine: str = "dp") -> DictConfig:
    """What `ppo_trainer model_engine=<engine>` composes, interpolations unresolved: verl's generated tree (which
    leaves out the top-level `model_engine` choice), then our overlay, as ppo_trainer.yaml orders them.
    tests/test_verl_config.py checks that Hydra's composition holds the same leaves."""
    if engine not in ENGINES:
        engine = "dp"
    parts = [OmegaConf.create({"model_engine": engine}), OmegaConf.load(_generated(engine)), OmegaConf.load(OVERLAY)]
    if (extra := ENGINE_OVERLAY_DIR / f"{engine}.yaml").is_file():
        parts.append(OmegaConf.load(extra))
    return OmegaConf.merge(*parts)


def defaults_tree() -> DictConfig:
    """The defaults of a plain run (verl's default engine, dp)."""
    return engine_tree("dp")


def _walk(node: DictConfig, prefix: str, out: dict[str, Any]) -> None:
    for key in node:
        path = f"{prefix}{key}"
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            out.setdefault(path, None)
            _walk(child, path + ".", out)
        else:
            out.setdefault(path, child._value())


@cache
def engine_keys(engine: str = "dp") -> dict[str, Any]:
    """Every key path of one engine's tree mapped to its default (None for maps)."""
    out: dict[str, Any] = {}
    _walk(engine_tree(engine), "", out)
    return out


@lru_cache(maxsize=1)
def known_keys() -> dict[str, Any]:
    """Every key path of any engine's tree, with the default of the first engine that has it (dp first)."""
    out: dict[str, Any] = {}
    for engine in ENGINES:
        for path, default in engine_keys(engine).items():
            out.setdefault(path, default)
    return out


@lru_cache(maxsize=1)
def open_maps() -> tuple[frozenset[str], tuple[str, ...]]:
    """(exact paths, patterns) of the open maps: verl's empty maps, and OPEN_MAPS."""
    empty: set[str] = set()

    def walk(node: DictConfig, prefix: str) -> None:
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                if len(child) == 0:
                    empty.add(f"{prefix}{key}")
                walk(child, f"{prefix}{key}.")

    for engine in ENGINES:
        walk(engine_tree(engine), "")
    return frozenset(empty), OPEN_MAPS


def open_map_of(path: str) -> str | None:
    """The open map that contains `path` (strictly below it), if any. A pattern matches only below a known key
    (`actor_rollout_ref.modle.override_config` is a typo, not an open map)."""
    exact, patterns = open_maps()
    parts = path.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if prefix in exact:
            return prefix
        if (depth == 1 or ".".join(parts[:depth - 1]) in known_keys()) and any(
                fnmatch.fnmatchcase(prefix, pattern) for pattern in patterns):
            return prefix
    return None


def is_known(path: str) -> bool:
    """In a tree, or an open map (`reward.reward_kwargs` is in none of verl's trees), or below one."""
    return path in known_keys() or open_map_of(path + ".x") is not None


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


def interpolates(default: Any) -> bool:
    """A default written as an interpolation of other keys (`${...}`): it follows them."""
    return isinstance(default, str) and "${" in default


def engine_of(cfg: DictConfig) -> str:
    """The engine a composed config was built for (verl's default when it does not say)."""
    engine = cfg.get("model_engine") if "model_engine" in cfg else None
    return engine if engine in ENGINES else "dp"


def missing_paths(cfg: DictConfig) -> list[str]:
    """Keys of the run's tree absent from the composed config (removed with `~`). Another engine's keys are
    not the run's: a dp run has no `actor.megatron.*` even when `+actor.megatron.override_transformer_config.x`
    made the `megatron` map."""
    present = set(leaf_paths(cfg))
    return [k for k in engine_keys(engine_of(cfg)) if k not in present and open_map_of(k) is None
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


def type_error(path: str, value: Any, engine: str = "dp") -> str | None:
    """A message when `value` cannot be what the key's default says it is; None when it fits."""
    default = engine_keys(engine).get(path, known_keys().get(path))
    if default is None or value is None or isinstance(default, str) and default.startswith("${"):
        return None
    expected: tuple[type, ...]
    if isinstance(default, bool):
        expected, name = (bool,), "true or false"
    elif isinstance(default, int) and not any(fnmatch.fnmatchcase(path, p) for p in FLOAT_KEYS):
        expected, name = (int,), "an integer"
    elif isinstance(default, (int, float)):
        expected, name = (int, float), "a number"
    elif isinstance(default, (list, ListConfig)):
        expected, name = (list, ListConfig, str), "a list"
    else:
        return None
    # bool is an int to Python, but `ppo_epochs=True` is a mistake, not 1
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        return f"config key '{path}' expects {name}, got {value!r}"
    return None
