"""Config: verl's key tree composed with Hydra, validated, linted."""

from ascend_rl.config.loader import ConfigError, cache_dir, load_config

__all__ = ["ConfigError", "cache_dir", "load_config"]
