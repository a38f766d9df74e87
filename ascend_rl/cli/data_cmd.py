from __future__ import annotations

import argparse

from ascend_rl.cli.argtypes import DefaultsHelpFormatter, int_at_least

TINY_MODEL = """\
a tiny, randomly initialised Qwen3-architecture model and its tokenizer, as a Hugging Face directory
(AutoModelForCausalLM / AutoTokenizer load it offline); about 0.4 M parameters with the default sizes,
512 positions (prompt + response, in characters). Random weights: warm it up with `ascend-rl sft`.

Tokenizer: one token per character, for printable ASCII (space to ~) and newline; any other character
(accents, CJK, emoji, tab) becomes <unk>. Specials: <|endoftext|> (padding), <|im_start|>, <|im_end|>
(end of a turn, the EOS). Chat template: Qwen's (<|im_start|>role\\ncontent<|im_end|>), no system prompt
added."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="WHAT")

    def command(name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=description or help_text,
                              formatter_class=DefaultsHelpFormatter)

    tiny = command("tiny-model", "a tiny random Qwen3-architecture model + char tokenizer (HF dir)", TINY_MODEL)
    tiny.add_argument("out", help="output directory (must not exist)")
    tiny.add_argument("--hidden-size", type=int_at_least(1), default=128, help="width (a multiple of --heads)")
    tiny.add_argument("--layers", type=int_at_least(1), default=2, help="decoder layers")
    tiny.add_argument("--heads", type=int_at_least(1), default=4,
                      help="attention (query) heads (a multiple of --kv-heads)")
    tiny.add_argument("--kv-heads", type=int_at_least(1), default=2, help="key/value heads (grouped-query attention)")
    tiny.add_argument("--intermediate-size", type=int_at_least(1), default=384, help="MLP width")
    tiny.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    tiny.set_defaults(run=_tiny_model)

    arith = command("arithmetic", "the two-number addition task in verl's parquet schema",
                    "the two-number addition task (`12+7=` -> `19`) in verl's parquet schema: train.parquet and\n"
                    "test.parquet (no problem in both), and sft.parquet (the train prompts with their answers,\n"
                    "for `ascend-rl sft`)")
    arith.add_argument("out", help="output directory (train.parquet, test.parquet, sft.parquet)")
    arith.add_argument("--train-size", type=int_at_least(1), default=2300, help="training prompts")
    arith.add_argument("--test-size", type=int_at_least(0), default=200, help="held-out prompts")
    arith.add_argument("--max-operand", type=int_at_least(1), default=49,
                       help="largest operand (0..N each: (N+1)^2 distinct problems)")
    arith.add_argument("--seed", type=int, default=0, help="seeds which problems land in which split")
    arith.set_defaults(run=_arithmetic)

    gsm = command("gsm8k", "convert GSM8K rows (jsonl/parquet/HF dataset dir) to verl's schema")
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
