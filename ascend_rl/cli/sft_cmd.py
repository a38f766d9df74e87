from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory to start from")
    parser.add_argument("--data", required=True, action="append",
                        help="parquet with `prompt` (messages or text) and `response` columns (repeatable)")
    parser.add_argument("--out", required=True, help="output HF model directory")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=int, default=0, help="pairs kept out of training for exact-match checks")
    parser.add_argument("--stop-at-exact-match", type=float,
                        help="stop when greedy answers on the holdout reach this accuracy (needs --holdout)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ascend_rl.cli.quiet import quiet_transformers
    from ascend_rl.errors import UserError
    from ascend_rl.sft import SFTSettings, run_sft

    if args.stop_at_exact_match is not None and args.holdout <= 0:
        raise UserError("--stop-at-exact-match needs --holdout N (the pairs to measure it on)")
    quiet_transformers()
    out = run_sft(SFTSettings(args.model, tuple(args.data), args.out, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed, holdout=args.holdout,
                              stop_at_exact_match=args.stop_at_exact_match))
    print(f"wrote {out}")
    return 0
