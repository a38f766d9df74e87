from __future__ import annotations

import argparse

from ascend_rl.cli.argtypes import DefaultsHelpFormatter, float_in, int_at_least

DESCRIPTION = """\
supervised fine-tuning on prompt/response parquet (loss on the response only), e.g. the warm-up before RL:
RL needs a model that is sometimes right. With --holdout and --stop-at-exact-match, training stops as soon
as greedy answers on the held-out pairs reach that accuracy (checked every --eval-every steps).

Data: parquet with a `prompt` column (a list of {role, content} chat messages, or a string taken as one
user message) and a `response` string column (the assistant's answer; the model's EOS token is appended)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description, parser.formatter_class = DESCRIPTION, DefaultsHelpFormatter
    parser.add_argument("--model", required=True, help="HF model directory to start from")
    parser.add_argument("--data", required=True, action="append",
                        help="parquet with `prompt` (messages or text) and `response` columns (repeatable)")
    parser.add_argument("--out", required=True, help="output HF model directory (must not exist)")
    parser.add_argument("--epochs", type=float_in(0, 1e6, low_open=True), default=1.0,
                        help="passes over the training pairs, the most it trains (fractions allowed)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=64, help="pairs per optimizer step")
    parser.add_argument("--lr", type=float_in(0, 1e3, low_open=True), default=1e-3,
                        help="peak learning rate (AdamW, 5%% warm-up, cosine decay)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the holdout split and the data order")
    parser.add_argument("--holdout", type=int_at_least(0), default=0,
                        help="pairs kept out of training for exact-match checks")
    parser.add_argument("--stop-at-exact-match", type=float_in(0, 1, low_open=True),
                        help="stop when greedy answers on the holdout reach this accuracy (needs --holdout; "
                             "default: train all --epochs)")
    parser.add_argument("--eval-every", type=int_at_least(1), default=10, metavar="N",
                        help="check the holdout's exact match every N steps (with --stop-at-exact-match)")
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
                              stop_at_exact_match=args.stop_at_exact_match, eval_every=args.eval_every))
    print(f"wrote {out}")
    return 0
