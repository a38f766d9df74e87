"""Where Hydra looks for configs: the user's `--config-path`, then ascend-rl's config root and verl's files.

verl's entry point (`verl/trainer/main_ppo.py`) resolves a relative `--config-path` against its own folder, so
verl scripts pass `--config-path config` for verl's `verl/trainer/config`, and user YAML reaches verl's files
through `hydra.searchpath` (`pkg://verl.trainer.config`, or `file://verl/trainer/config` from a verl
checkout). Each of these names our copy here: our config root first (its ppo_trainer.yaml is verl's plus
ascend-rl's keys), then verl's files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from ascend_rl.config.schema import CONFIG_DIR, VERL_CONFIG_DIR

# The folder verl's entry point resolves a relative --config-path against holds verl's config as `config/`.
ENTRY_POINT_CONFIG = "config"
VERL_CONFIG_PATTERN = re.compile(r"(^|[/.])verl[/.]trainer[/.]config/?$")


def ours() -> list[str]:
    return [f"file://{CONFIG_DIR}", f"file://{VERL_CONFIG_DIR}"]


def is_verl_config_dir(entry: str) -> bool:
    """`pkg://verl.trainer.config`, `file://verl/trainer/config`, `/any/where/verl/trainer/config`."""
    return bool(VERL_CONFIG_PATTERN.search(re.sub(r"^(pkg|file)://", "", entry)))


def is_config_group(key: str) -> bool:
    """`actor@actor_rollout_ref.actor` (a group override, `key=option`): one of verl's config groups, which
    Hydra checks."""
    group = key.partition("@")[0]
    return bool(group) and ".." not in group and (VERL_CONFIG_DIR / group).is_dir()


def config_dir(config_path: str | os.PathLike | None) -> Path:
    """The directory `--config-path` names: as given when it exists (relative to the current directory), else as
    verl's entry point would read it (`config` is verl's config: our root); verl's own config dir is ours."""
    if config_path is None:
        return CONFIG_DIR
    path = Path(config_path).expanduser()
    if is_verl_config_dir(str(path)):
        return CONFIG_DIR
    if path.is_dir():
        return path.resolve()
    if not path.is_absolute() and path.parts and path.parts[0] == ENTRY_POINT_CONFIG:
        candidate = CONFIG_DIR.joinpath(*path.parts[1:])
        if candidate.is_dir():
            return candidate
    raise NotADirectoryError(f"--config-path {config_path}: not a directory (here, or under verl's trainer folder, "
                             f"where `{ENTRY_POINT_CONFIG}` is verl's config)")


def search_path(main_dir: Path, config_name: str, user_entries: Sequence[str] | None) -> list[str]:
    """Hydra's search path after the main directory: the user's entries (from the command line, else from
    their primary YAML's `hydra.searchpath`), verl's config dir replaced by ours; ours last where they did not
    name it."""
    if user_entries is None:
        user_entries = _yaml_searchpath(main_dir, config_name)
    out: list[str] = []
    for entry in user_entries:
        out += [e for e in (ours() if is_verl_config_dir(str(entry)) else [str(entry)]) if e not in out]
    return out + [e for e in ours() if e not in out]


def _yaml_searchpath(main_dir: Path, config_name: str) -> list[str]:
    """`hydra.searchpath` of the user's primary YAML: the search path we give Hydra replaces it, so it keeps
    the user's entries."""
    file = main_dir / (config_name if config_name.endswith(".yaml") else f"{config_name}.yaml")
    if main_dir == CONFIG_DIR or not file.is_file():
        return []
    entries = OmegaConf.select(OmegaConf.load(file), "hydra.searchpath", default=None)
    return [str(e) for e in entries] if entries else []
