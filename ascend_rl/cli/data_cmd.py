from __future__ import annotations

import argparse

from ascend_rl.cli.argtypes import int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="WHAT")

    tiny = sub.add_parser("tiny-model", help="a tiny random Qwen3-architecture model + char tokenizer (HF dir)")
    tiny.add_argument("out", help="output directory (must not exist)")
    tiny.add_argument("--hidden-size", type=int_at_least(1), default=128)
    tiny.add_argument("--layers", type=int_at_least(1), default=2)
    tiny.add_argument("--heads", type=int_at_least(1), default=4)
    tiny.add_argument("--kv-heads", type=int_at_least(1), default=2)
    tiny.add_argument("--intermediate-size", type=int_at_least(1), default=384)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny_model)

    arith = sub.add_parser("arithmetic", help="the two-number addition task in verl's parquet schema")
    arith.add_argument("out", help="output directory (train.parquet, test.parquet, sft.parquet)")
    arith.add_argument("--train-size", type=int_at_least(1), default=2300)
    arith.add_argument("--test-size", type=int_at_least(0), default=200)
    arith.add_argument("--max-operand", type=int_at_least(1), default=49)
    arith.add_argument("--seed", type=int, default=0)
    arith.set_defaults(run=_arithmetic)

    gsm = sub.add_parser("gsm8k", help="convert GSM8K rows (jsonl/parquet/HF dataset dir) to verl's schema")
    gsm.add_argument("--input", action="append", required=True, help="a GSM8K file or directory (repeatable)")
    gsm.add_argument("--split", choices=("train", "test"), help="default: from the file name")
    gsm.add_argument("out", help="output directory ({split}.parquet)")
    gsm.set_defaults(run=_gsm8k)


def _tiny_model(args) -> int:
    from ascend_rl.data.tiny_model import TinyModelSpec, build_tiny_model
    from ascend_rl.errors import UserError

    if args.heads % args.kv_heads:
        raise UserError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads} (grouped-query "
                        f"attention shares each key/value head among a whole number of query heads)")
    if args.hidden_size % args.heads:
        raise UserError(f"--hidden-size {args.hidden_size} is not a multiple of --heads {args.heads}")

    spec = TinyModelSpec(args.hidden_size, args.layers, args.heads, args.kv_heads, args.intermediate_size,
                         seed=args.seed)
    print(f"wrote {build_tiny_model(args.out, spec)}")
    return 0


def _arithmetic(args) -> int:
    from ascend_rl.data.tasks import write_arithmetic

    for path in write_arithmetic(args.out, args.train_size, args.test_size, args.max_operand, args.seed).values():
        print(f"wrote {path}")
    return 0


def _gsm8k(args) -> int:
    from ascend_rl.data.tasks import convert_gsm8k

    for path in convert_gsm8k(args.input, args.out, args.split).values():
        print(f"wrote {path}")
    return 0
