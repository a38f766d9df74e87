"""Rollout throughput: the native engine against transformers' `generate` (padded batch, KV cache), side
by side in one run, same model, prompts, lengths and thread count.

    .venv/bin/python benchmarks/rollout.py --threads 2

Shapes: the embedded task (arithmetic prompts, 64 prompts × n=8, up to 16 new tokens, eos stops early)
and a long one (64-token prompts, 256 new tokens with eos ignored, 8 prompts × n=8). Each engine runs
every shape `--repeats` times, alternating; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def shapes(tokenizer, records):
    arithmetic = [r.input_ids for r in records[:64]]
    long_prompt = (records[0].input_ids * 8)[:64]
    return {
        "embedded (64 prompts × 8, ≤16 new)": (arithmetic, 8, 16, False),
        "long (8 prompts × 8, 64 in, 256 new)": ([long_prompt] * 8, 8, 256, True),
    }


def run_native(engine, prompts, n, max_new, ignore_eos):
    from ascend_rl.rollout.protocol import SamplingParams

    params = [SamplingParams(max_new_tokens=max_new, sampling_seed=i * n, n=n, ignore_eos=ignore_eos)
              for i in range(len(prompts))]
    outs = engine.generate(prompts, params)
    return sum(o.completion_tokens for o in outs)


def run_hf(model, prompts, n, max_new, ignore_eos, pad_id, eos_ids):
    from ascend_rl.data.collate import pad_rows

    expanded = [p for p in prompts for _ in range(n)]
    ids, mask = pad_rows(expanded, pad_id, "left")
    width = ids.shape[1]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=max_new, min_new_tokens=max_new if ignore_eos else 0,
                             eos_token_id=None if ignore_eos else eos_ids, pad_token_id=pad_id)
    new = out[:, width:]
    if ignore_eos:
        return new.numel()
    finished = torch.isin(new, torch.tensor(eos_ids))
    lengths = torch.where(finished.any(-1), finished.int().argmax(-1) + 1, torch.full((len(new),), new.shape[1]))
    return int(lengths.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ascend_rl.data.dataset import load_prompts
    from ascend_rl.data.tasks import write_arithmetic
    from ascend_rl.data.tiny_model import build_tiny_model
    from ascend_rl.rollout.native import NativeEngine

    with tempfile.TemporaryDirectory() as work:
        model_dir = build_tiny_model(Path(work) / "model")
        data = write_arithmetic(Path(work) / "data", n_train=64, n_test=8, max_operand=49)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        records = load_prompts([data["train"]], tokenizer, 64)
        engine = NativeEngine.from_pretrained(str(model_dir))
        hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
        rows = []
        for name, (prompts, n, max_new, ignore_eos) in shapes(tokenizer, records).items():
            rates = {"native": [], "transformers": []}
            for _ in range(args.repeats):  # alternate so both see the same machine load
                start = time.perf_counter()
                tokens = run_native(engine, prompts, n, max_new, ignore_eos)
                rates["native"].append(tokens / (time.perf_counter() - start))
                start = time.perf_counter()
                tokens = run_hf(hf, prompts, n, max_new, ignore_eos, tokenizer.pad_token_id, eos)
                rates["transformers"].append(tokens / (time.perf_counter() - start))
            native, ref = statistics.median(rates["native"]), statistics.median(rates["transformers"])
            rows.append(f"| {name} | {native:,.0f} | {ref:,.0f} | {native / ref:.2f}× |")
    table = ["| shape | native tokens/s | transformers generate tokens/s | ratio |", "|---|---|---|---|", *rows]
    print(f"tiny Qwen3 (0.4 M params), fp32, {args.threads} threads, median of {args.repeats}")
    print("\n".join(table))


if __name__ == "__main__":
    main()
