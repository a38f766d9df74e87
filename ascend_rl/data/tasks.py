"""Datasets in verl's parquet schema: the built-in arithmetic task and GSM8K conversion.

One row per prompt: `data_source` (routes the scorer), `prompt` (chat messages), `ability`,
`reward_model` {style, ground_truth}, `extra_info` {split, index, question, answer}.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ascend_rl.errors import UserError
from ascend_rl.files import new_file, refuse_existing

ARITHMETIC_SOURCE = "arithmetic"
GSM8K_SOURCE = "openai/gsm8k"
GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
_GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def make_row(data_source: str, question: str, answer: str, ground_truth: str, split: str, index: int,
             content: str | None = None, ability: str = "math") -> dict:
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": content if content is not None else question}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, "question": question, "answer": answer},
    }


def write_rows(rows: list[dict], path: Path) -> Path:
    """A new parquet file, whole or not at all; an existing file is never replaced."""
    with new_file(path, "ascend-rl data") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    return path


def arithmetic_rows(n_train: int, n_test: int, max_operand: int, seed: int) -> dict[str, list[dict]]:
    """Two-number additions `a+b=` with the sum as ground truth; train and test share no question."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if n_train + n_test > len(pairs):
        raise UserError(f"arithmetic: {n_train}+{n_test} rows asked, but operands up to {max_operand} give only "
                        f"{len(pairs)} distinct problems; raise --max-operand")
    random.Random(seed).shuffle(pairs)
    splits = {"train": pairs[:n_train], "test": pairs[n_train:n_train + n_test]}
    return {
        split: [make_row(ARITHMETIC_SOURCE, f"{a}+{b}=", str(a + b), str(a + b), split, i)
                for i, (a, b) in enumerate(chosen)]
        for split, chosen in splits.items()
    }


def write_arithmetic(out_dir: str | Path, n_train: int = 2300, n_test: int = 200, max_operand: int = 49,
                     seed: int = 0) -> dict[str, Path]:
    """train.parquet and test.parquet (RL schema) and sft.parquet (the train prompts with their answers, for
    `ascend-rl sft`)."""
    out = Path(out_dir)
    for name in ("train", "test", "sft"):  # before writing any: all three or none
        refuse_existing(out / f"{name}.parquet", "ascend-rl data arithmetic")
    splits = arithmetic_rows(n_train, n_test, max_operand, seed)
    written = {split: write_rows(rows, out / f"{split}.parquet") for split, rows in splits.items()}
    sft = [{"prompt": r["prompt"], "response": r["reward_model"]["ground_truth"]} for r in splits["train"]]
    written["sft"] = write_rows(sft, out / "sft.parquet")
    return written


def gsm8k_ground_truth(answer: str) -> str:
    """The number after the last `####`, commas removed (as verl extracts it)."""
    match = _GSM8K_ANSWER.search(answer)
    if match is None:
        raise ValueError("no '#### <number>' in the answer")
    return match.group(0).split("#### ")[1].replace(",", "")


def gsm8k_rows(records: list[dict], split: str, source: str) -> list[dict]:
    rows = []
    for i, record in enumerate(records):
        missing = [k for k in ("question", "answer") if not isinstance(record.get(k), str)]
        if missing:
            raise UserError(f"{source}: row {i}: column {missing[0]!r} missing or not a string")
        try:
            truth = gsm8k_ground_truth(record["answer"])
        except ValueError as err:
            raise UserError(f"{source}: row {i}: column 'answer': {err}") from None
        rows.append(make_row(GSM8K_SOURCE, record["question"], record["answer"], truth, split, i,
                             content=f"{record['question']} {GSM8K_INSTRUCTION}"))
    return rows


def read_records(path: str | Path) -> list[dict]:
    """Rows from a .jsonl / .json / .parquet file, or a directory of them (a hub snapshot) or of .arrow
    files (a `datasets.save_to_disk` directory)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix in (".jsonl", ".json", ".parquet", ".arrow")
                       and f.name not in ("dataset_info.json", "state.json"))
        if not files:
            raise UserError(f"{path}: no .jsonl, .parquet or .arrow files in this directory")
        return [r for f in files for r in read_records(f)]
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        if path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_stream(source).read_all().to_pylist()
        if path.suffix == ".json" and path.read_text().lstrip().startswith("["):
            return json.loads(path.read_text())
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (pa.ArrowInvalid, json.JSONDecodeError, OSError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None


def convert_gsm8k(inputs: list[str | Path], out_dir: str | Path, split: str | None = None) -> dict[str, Path]:
    """Convert GSM8K rows to verl's schema; the split comes from `split` or the file name (test/train)."""
    out, written = Path(out_dir), {}
    for source in inputs:
        name = split or ("test" if "test" in Path(source).name else "train")
        rows = gsm8k_rows(read_records(source), name, str(source))
        if not rows:
            raise UserError(f"{source}: no rows")
        written[name] = write_rows(rows, out / f"{name}.parquet")
    return written
