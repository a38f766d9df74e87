from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda", "npu"), default=None,
                        help="check for this device (default: npu when anything Ascend is installed, else cuda, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides: also check what this config needs")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ascend_rl.doctor import diagnose, format_rows, rows_json

    config = None
    if args.overrides:
        from ascend_rl.config import load_config

        config = load_config(args.overrides)
    device, rows = diagnose(args.device, config)
    report = rows_json(device, rows)
    print(json.dumps(report, indent=2) if args.json else format_rows(device, rows))
    return 0 if report["ok"] else 1
