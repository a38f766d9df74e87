"""`ascend-rl <command>`: argument parsing and error reporting only; the work lives in the packages."""

from __future__ import annotations

import argparse
import sys

from ascend_rl.cli import data_cmd, plan_cmd, train_cmd
from ascend_rl.errors import UserError

COMMANDS = {
    "train": (train_cmd, "run RL training (no arguments: the embedded tiny model and task on this machine)"),
    "plan": (plan_cmd, "resolve and check a config, print the device layout; needs no devices, models or data"),
    "data": (data_cmd, "build the tiny model and datasets, convert GSM8K"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ascend-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as err:
        for message in err.messages:
            print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
