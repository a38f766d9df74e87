from __future__ import annotations

import argparse
import sys

from ascend_rl.cli.config_args import add_config_arguments, load_from_args
from ascend_rl.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ascend_rl.config.plan import make_plan

    plan = make_plan(load_from_args(args))
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    problems = plan.errors + plan.unsupported + plan.missing_inputs
    if problems:
        raise UserError(problems)
    return 0
