"""Compose the run's config with Hydra, so users keep Hydra's override grammar and their own YAML files.

`load_config(overrides)` composes verl's config tree (our ppo_trainer.yaml: verl's, plus ascend-rl's keys),
the embedded default, verl's ppo_megatron_trainer or a user's YAML, and returns a resolved, struct-mode
DictConfig whose keys all exist in the schema, or raises ConfigError with one line per problem.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ascend_rl.config import legacy, schema, sources
from ascend_rl.errors import UserError
from ascend_rl.stack import installed_version, versions

ENTRY_CONFIG = "_ascend_rl_entry"  # see compose_tree
VERL_VERSION = versions()["verl"]["version"]
log = logging.getLogger(__name__)
_ABSENT = object()


class ConfigError(UserError):
    """A config problem a user can fix; each message is one line."""


def cache_dir() -> Path:
    """Where built-in assets (the tiny model, the arithmetic data) are built and reused."""
    return Path(os.environ.get("ASCEND_RL_CACHE", Path.home() / ".cache" / "ascend-rl")).expanduser()


def default_rollout(device: str | None) -> str:
    """`rollout.name` when the config does not say: sglang where it is installed and a GPU or NPU runs the
    job; native otherwise (CPU, tests, the embedded default)."""
    from ascend_rl.platform import resolve_device
    if installed_version("sglang") is None:
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


def parse_overrides(overrides: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse override: {_one_line(str(err))}") from None


def check_override_keys(overrides: Sequence[str]) -> None:
    """Reject overrides of keys that do not exist, with suggestions, before Hydra sees them. Hydra (so verl) adds
    a `+key` anywhere: one verl's tree lacks is taken (load_config warns and drops it) unless it is close to a
    key that exists (`+...engine_kwargs.sglnag.x`): that is a typo, which would silently do nothing."""
    errors = [
        schema.unknown_key_message(o.key_or_group)
        for o in parse_overrides(overrides)
        if not o.key_or_group.startswith("hydra.") and not schema.is_known(o.key_or_group)
        and not sources.is_config_group(o.key_or_group)
        and not ((o.is_add() or o.is_force_add()) and (legacy.is_legacy(o.key_or_group)
                                                        or not schema.suggest(o.key_or_group)))
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
    cfg = compose_tree(overrides, config_path, choose_config_name(overrides, config_name))
    _add_ours(cfg, {o.key_or_group for o in parse_overrides(overrides) if o.is_delete()})
    engine = schema.engine_of(cfg)
    if mismatch := legacy.engine_mismatch(cfg, engine):
        raise ConfigError(mismatch)
    unknown = [p for p in schema.leaf_paths(cfg) if not schema.is_known(p)]
    for path in [p for p in unknown if legacy.is_legacy(p)]:
        # verl adds `+key` anywhere and drops its legacy sections after moving what it knows: so do we
        log.warning("%s: verl %s has no such key; dropped with the legacy %s section", path, VERL_VERSION,
                    path.split(".")[0])
    unknown = [p for p in unknown if not legacy.is_legacy(p)]
    added = {o.key_or_group for o in parse_overrides(overrides) if o.is_add() or o.is_force_add()}
    for path in [p for p in unknown if p in added]:
        # Hydra (so verl) adds a `+key` anywhere; nothing here reads one verl's tree lacks: say so, drop it
        log.warning("%s: verl %s has no such key; added with '+', it has no effect here", path, VERL_VERSION)
        _drop(cfg, path)
    unknown = [p for p in unknown if p not in added and not any(p.startswith(a + ".") for a in added)]
    if unknown:
        where = f" (in {config_path or schema.CONFIG_DIR}/{config_name})" if config_name else ""
        raise ConfigError([schema.unknown_key_message(p) + where for p in unknown])
    removed = [p for p in schema.missing_paths(cfg) if p.split(".")[0] not in legacy.LEGACY_SECTIONS]
    if removed:
        raise ConfigError([f"config key '{p}' was removed (~{p}); the run needs it: set a value instead" for p in removed])
    try:
        legacy.migrate(cfg, lambda key: schema.engine_keys(engine).get(key, schema.known_keys().get(key)),
                       schema.is_known)
    except legacy.LegacyConflict as err:
        raise ConfigError(str(err)) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve config: {_one_line(str(err))}") from None
    type_errors = [m for p in schema.leaf_paths(cfg) if (m := schema.type_error(p, OmegaConf.select(cfg, p), engine))]
    if type_errors:
        raise ConfigError(type_errors)
    OmegaConf.set_struct(cfg, True)
    import_external_lib(cfg.actor_rollout_ref.model.external_lib)
    return cfg


def _drop(cfg: DictConfig, path: str) -> None:
    parent, _, key = path.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig):
        with open_dict(node):
            node.pop(key, None)


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


def compose_tree(overrides: list[str], config_path, config_name: str) -> DictConfig:
    """The config as Hydra composes it, before any check (interpolations unresolved).

    The main directory (the user's, else our root) comes first in the search path, then the user's
    `hydra.searchpath`, our root and verl's files. Hydra finds a primary config only in the main directory:
    one that is elsewhere on the search path (`ppo_megatron_trainer` is in verl's files) is named by a one-line
    entry config in Hydra's ConfigStore instead."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        main_dir = sources.config_dir(config_path)
    except NotADirectoryError as err:
        raise ConfigError(str(err)) from None
    parsed = parse_overrides(overrides)
    user_path = next((o.value() for o in parsed if o.key_or_group == "hydra.searchpath"), None)
    overrides = [o for o, p in zip(overrides, parsed) if p.key_or_group != "hydra.searchpath"]
    try:
        searchpath = sources.search_path(main_dir, config_name, user_path)
    except (OSError, OmegaConfBaseException) as err:
        raise ConfigError(f"{config_name}: {_one_line(str(err))}") from None
    name = config_name.removesuffix(".yaml")
    primary = name if (main_dir / f"{name}.yaml").is_file() else ENTRY_CONFIG
    if primary == ENTRY_CONFIG:
        ConfigStore.instance().store(name=ENTRY_CONFIG, node={"defaults": [f"{name}@_global_" if "/" in name else name]})
    quoted = ",".join("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in searchpath)
    base = [f"hydra.searchpath=[{quoted}]"]
    engine = legacy.engine_override([(p.key_or_group, p.value()) for p in parsed if not p.is_delete()])
    attempts = [[*base, engine, *overrides], [*base, *overrides]] if engine else [[*base, *overrides]]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(main_dir), version_base=None):
            for i, attempt in enumerate(attempts):
                try:
                    return compose(config_name=primary, overrides=attempt)
                except (HydraException, OmegaConfBaseException) as err:
                    # the config has no model_engine group to choose from: compose it as it is
                    if i + 1 < len(attempts) and "model_engine" in str(err):
                        continue
                    raise ConfigError(_engine_hint(_one_line(str(err)))) from None
    finally:
        GlobalHydra.instance().clear()
    raise AssertionError("unreachable")


def _add_ours(cfg: DictConfig, deleted: set[str]) -> None:
    """ascend-rl's keys with their defaults where the composed config lacks them: a config that does not build
    on our ppo_trainer.yaml (a standalone YAML, verl's own ppo_trainer) has only verl's. A key the command line
    removed (`~key`) stays removed: missing_paths reports it."""
    layers = [OmegaConf.load(schema.OVERLAY)]
    if (engine := schema.ENGINE_OVERLAY_DIR / f"{schema.engine_of(cfg)}.yaml").is_file():
        layers.append(OmegaConf.load(engine))

    def fill(target: DictConfig, source: DictConfig, prefix: str) -> None:
        for key in source:
            path, node = f"{prefix}{key}", source._get_node(key)
            if any(path == d or path.startswith(d + ".") for d in deleted):
                continue
            if isinstance(node, DictConfig) and len(node):
                if key not in target:
                    target[key] = {}
                if isinstance(target._get_node(key), DictConfig):
                    fill(target._get_node(key), node, path + ".")
            elif key not in target or OmegaConf.is_missing(target, key):
                target[key] = node._value() if not isinstance(node, DictConfig) else {}

    with open_dict(cfg):
        fill(cfg, OmegaConf.merge(*layers), "")


def _engine_hint(message: str) -> str:
    """Hydra cannot override a key the composed tree lacks; when another engine's tree has it, say which."""
    match = re.search(r"Could not override '([^']+)'", message)
    engines = [e for e in schema.ENGINES if match and match[1] in schema.engine_keys(e)]
    if not engines:
        return message
    return (f"config key '{match[1]}' is in verl's tree for model_engine={' or '.join(engines)}, not in the one this "
            f"config composes: choose one with model_engine={engines[0]}")


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())
