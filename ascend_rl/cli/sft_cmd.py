from __future__ import annotations

import argparse

from ascend_rl.cli.argtypes import float_in, int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory to start from")
    parser.add_argument("--data", required=True, action="append",
                        help="parquet with `prompt` (messages or text) and `response` columns (repeatable)")
    parser.add_argument("--out", required=True, help="output HF model directory (must not exist)")
    parser.add_argument("--epochs", type=float_in(0, 1e6, low_open=True), default=1.0)
    parser.add_argument("--batch-size", type=int_at_least(1), default=64)
    parser.add_argument("--lr", type=float_in(0, 1e3, low_open=True), default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=int_at_least(0), default=0,
                        help="pairs kept out of training for exact-match checks")
    parser.add_argument("--stop-at-exact-match", type=float_in(0, 1, low_open=True),
                        help="stop when greedy answers on the holdout reach this accuracy (needs --holdout)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ascend_rl.cli.quiet import quiet_transformers
    from ascend_rl.errors import UserError
    from ascend_rl.files import refuse_existing
    from ascend_rl.sft import SFTSettings, run_sft

    if args.stop_at_exact_match is not None and args.holdout <= 0:
        raise UserError("--stop-at-exact-match needs --holdout N (the pairs to measure it on)")
    refuse_existing(args.out, "ascend-rl sft")  # before training, not after it
    quiet_transformers()
    out = run_sft(SFTSettings(args.model, tuple(args.data), args.out, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed, holdout=args.holdout,
                              stop_at_exact_match=args.stop_at_exact_match))
    print(f"wrote {out}")
    return 0
