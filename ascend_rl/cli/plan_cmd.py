from __future__ import annotations

import argparse
import json

from ascend_rl.cli.config_args import add_config_arguments, load_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ascend_rl.config.plan import format_plan, make_plan

    plan = make_plan(load_from_args(args))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 1 if plan.errors else 0
