from __future__ import annotations

import argparse
import json

from ascend_rl.cli.config_args import add_config_arguments, load_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ascend_rl.config.loader import cache_dir, choose_config_name
    from ascend_rl.config.schema import EMBEDDED_CONFIG_NAME
    from ascend_rl.plan import format_plan, make_plan

    plan = make_plan(load_from_args(args))
    if choose_config_name(args.overrides, args.config_name) == EMBEDDED_CONFIG_NAME and plan.missing_inputs:
        # Not an error: `train` builds the embedded default's model and data on first use.
        plan.missing_inputs = [f"embedded default: the tiny model, its SFT warm-up and the arithmetic data are "
                               f"built into {cache_dir()} by the first `ascend-rl train`"]
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 1 if plan.errors else 0
