from __future__ import annotations

import argparse
import sys

from ascend_rl.cli.config_args import add_config_arguments, load_from_args
from ascend_rl.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or console lines")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ascend_rl.cli.quiet import quiet_transformers
    from ascend_rl.config.loader import choose_config_name
    from ascend_rl.config.schema import EMBEDDED_CONFIG_NAME
    from ascend_rl.plan import make_plan

    cfg = load_from_args(args)
    quiet_transformers()
    if choose_config_name(args.overrides, args.config_name) == EMBEDDED_CONFIG_NAME:
        from ascend_rl.trainer.embedded import ensure_embedded_assets

        ensure_embedded_assets(cfg.trainer.seed)
    plan = make_plan(cfg)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    problems = plan.errors + plan.unsupported + plan.missing_inputs
    if problems:
        raise UserError(problems)

    from ascend_rl.trainer.components import build_components
    from ascend_rl.trainer.loop import RLTrainer

    result = RLTrainer(build_components(cfg, show_progress=not args.no_progress)).fit()
    print(summary_line(result))
    return 0


def written(out_dir) -> str:
    """What the run left in its directory, as found there (no checkpoint when trainer.save_freq is off)."""
    found = [name for name, present in (("metrics.jsonl", (out_dir / "metrics.jsonl").is_file()),
                                        ("curves.png", (out_dir / "curves.png").is_file()),
                                        ("TensorBoard events", (out_dir / "tensorboard").is_dir()),
                                        ("checkpoints", any(out_dir.glob("global_step_*")))) if present]
    return ", ".join(found) or "nothing"


def summary_line(result) -> str:
    if result.resumed_step >= result.steps:
        return (f"the run in {result.out_dir} had already trained its {result.steps} steps: nothing to do (raise "
                f"trainer.total_training_steps to continue it, or set trainer.default_local_dir for a new run)")
    keys = sorted(set(result.val_before) | set(result.val_after))
    accs = [k for k in keys if k.startswith("val-core/")]
    parts = [f"{k.removeprefix('val-core/')}: {result.val_before.get(k, float('nan')):.3f} → "
             f"{result.val_after.get(k, float('nan')):.3f}" for k in accs]
    where = f"{written(result.out_dir)} in {result.out_dir}"
    return f"validation accuracy before → after {result.steps} steps: {'; '.join(parts) or 'no validation data'} ({where})"
