"""Compose the run's config with Hydra, so users keep Hydra's override grammar and their own YAML files.

`load_config(overrides)` returns a resolved, struct-mode DictConfig whose keys all exist in the schema,
or raises ConfigError with one line per problem.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ascend_rl.config import schema
from ascend_rl.errors import UserError

LEGACY_KEYS = {"custom_reward_function": "reward.custom_reward_function"}


class ConfigError(UserError):
    """A config problem a user can fix; each message is one line."""


def cache_dir() -> Path:
    """Where built-in assets (the tiny model, the arithmetic data) are built and reused."""
    return Path(os.environ.get("ASCEND_RL_CACHE", Path.home() / ".cache" / "ascend-rl")).expanduser()


def default_rollout(device: str | None) -> str:
    """`rollout.name` when the config does not say: sglang where it is installed and a GPU or NPU runs the
    job; native otherwise (CPU, tests, the embedded default)."""
    from ascend_rl.platform import resolve_device
    from ascend_rl.rollout.sglang.fields import installed_version

    if installed_version() is None:
        return "native"
    return "native" if resolve_device(device) == "cpu" else "sglang"


if not OmegaConf.has_resolver("ascend_rl_cache"):
    OmegaConf.register_new_resolver("ascend_rl_cache", lambda: str(cache_dir()))
if not OmegaConf.has_resolver("ascend_rl_rollout"):
    OmegaConf.register_new_resolver("ascend_rl_rollout", default_rollout)


def choose_config_name(overrides: Sequence[str], config_name: str | None) -> str:
    """The embedded default runs when the user names neither a config nor a model."""
    if config_name:
        return config_name
    names_model = any(
        o.lstrip("+~").split("=", 1)[0] == "actor_rollout_ref.model.path" for o in overrides
    )
    return schema.DEFAULT_CONFIG_NAME if names_model else schema.EMBEDDED_CONFIG_NAME


def check_override_keys(overrides: Sequence[str]) -> None:
    """Reject overrides of keys that do not exist, with suggestions, before Hydra sees them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse override: {_one_line(str(err))}") from None
    errors = [
        schema.unknown_key_message(o.key_or_group)
        for o in parsed
        if not o.key_or_group.startswith("hydra.") and not schema.is_known(o.key_or_group)
    ]
    if errors:
        raise ConfigError(errors)


def load_config(
    overrides: Sequence[str] = (),
    config_path: str | os.PathLike | None = None,
    config_name: str | None = None,
) -> DictConfig:
    overrides = list(overrides)
    check_override_keys(overrides)
    cfg = _compose(overrides, config_path, choose_config_name(overrides, config_name))
    unknown = [p for p in schema.leaf_paths(cfg) if not schema.is_known(p) and p not in LEGACY_KEYS]
    if unknown:
        where = f" (in {config_path or schema.CONFIG_DIR}/{config_name})" if config_name else ""
        raise ConfigError([schema.unknown_key_message(p) + where for p in unknown])
    removed = [p for p in schema.missing_paths(cfg) if p not in LEGACY_KEYS]
    if removed:
        raise ConfigError([f"config key '{p}' was removed (~{p}); the run needs it: set a value instead" for p in removed])
    _move_legacy_keys(cfg)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve config: {_one_line(str(err))}") from None
    type_errors = [m for p in schema.leaf_paths(cfg) if (m := schema.type_error(p, OmegaConf.select(cfg, p)))]
    if type_errors:
        raise ConfigError(type_errors)
    OmegaConf.set_struct(cfg, True)
    import_external_lib(cfg.actor_rollout_ref.model.external_lib)
    return cfg


def import_external_lib(module: str | None) -> None:
    """Import `actor_rollout_ref.model.external_lib` before validation, so that the estimators, losses or
    models it registers are known by name."""
    if not module:
        return
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"actor_rollout_ref.model.external_lib={module}: cannot import ({err})") from None


def _compose(overrides: list[str], config_path, config_name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    config_dir = Path(config_path).resolve() if config_path else schema.CONFIG_DIR
    if not config_dir.is_dir():
        raise ConfigError(f"--config-path {config_path}: not a directory")
    if config_dir != schema.CONFIG_DIR:
        # User YAML can build on ours with `defaults: [ppo_trainer, _self_]`.
        overrides = [f"hydra.searchpath=[file://{schema.CONFIG_DIR}]", *overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(str(err))) from None
    finally:
        GlobalHydra.instance().clear()


def _move_legacy_keys(cfg: DictConfig) -> None:
    """verl's older scripts set `custom_reward_function.*` at the top level; it means the same as
    `reward.custom_reward_function.*`. Setting both to different values is an error."""
    with open_dict(cfg):
        for old, new in LEGACY_KEYS.items():
            legacy = cfg.pop(old, None)
            if legacy is None:
                continue
            target = OmegaConf.select(cfg, new)
            for key, value in legacy.items():
                current = target.get(key)
                default = schema.known_keys().get(f"{new}.{key}")
                if value in (default, current):
                    continue
                if current != default:
                    raise ConfigError(
                        f"'{old}.{key}={value}' conflicts with '{new}.{key}={current}'; set only '{new}.{key}'"
                    )
                target[key] = value


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())
