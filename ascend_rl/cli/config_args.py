"""The config arguments every config-taking command shares (Hydra's spelling)."""

from __future__ import annotations

import argparse

from omegaconf import DictConfig


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-path", help="directory of your YAML config (may build on ours: "
                        "`defaults: [ppo_trainer, _self_]`)")
    parser.add_argument("--config-name", help="config file name in --config-path, without .yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Hydra overrides: key=value, +key=value, ++key=value, ~key")


def load_from_args(args: argparse.Namespace) -> DictConfig:
    from ascend_rl.config import load_config

    return load_config(args.overrides, config_path=args.config_path, config_name=args.config_name)
