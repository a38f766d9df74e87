"""Shared prefixes (`actor.use_prefix_grouper`) against packed and padded rows: one update's forward and backward
(log-probs and entropy of every response token) on GRPO-shaped micro-batches, side by side in one run.

    .venv/bin/python benchmarks/shared_prefix.py --threads 2 --repeats 5

Shapes (n = 8 samples per prompt, the tiny Qwen3 of the embedded default, random weights):
- embedded: 64 prompts of 20-28 tokens, responses of 1-6 (what the SFT-warmed model answers);
- long answers: 8 prompts of 100-200 tokens, responses of 50-400.
Each layout runs each shape `--repeats` times, alternating, fp32 and bf16 (autocast); medians. Writes
benchmarks/results/shared_prefix.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # name → (prompts, prompt lengths, response lengths)
    "embedded (64 prompts × 8, 20-28 + 1-6 tokens)": (64, (20, 29), (1, 7)),
    "long answers (8 prompts × 8, 100-200 + 50-400 tokens)": (8, (100, 201), (50, 401)),
}
N = 8


def batch_for(prompts: int, prompt_range, response_range, seed: int = 0):
    from ascend_rl.data.collate import collate

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(prompts):
        prompt = torch.randint(4, 100, (int(torch.randint(*prompt_range, (1,), generator=g)),), generator=g).tolist()
        rows += [prompt] * N
    responses = [torch.randint(4, 100, (int(torch.randint(*response_range, (1,), generator=g)),), generator=g).tolist()
                 for _ in rows]
    return collate(rows, responses, pad_token_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shared_prefix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from ascend_rl.data.tiny_model import TinyModelSpec, build_tiny_model
    from ascend_rl.workers.model_io import ModelForward
    from ascend_rl.workers.packing import SequenceSettings, pack, pack_shared_prefixes

    layouts = {"padded": SequenceSettings(), "packed": SequenceSettings(remove_padding=True),
               "shared prefixes": SequenceSettings(shared_prefix=True)}
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_tiny_model(Path(work) / "model", TinyModelSpec())
        models = {}
        for name, settings in layouts.items():
            forward = ModelForward(settings)
            model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=forward.attn_implementation)
            models[name] = (model, forward)
    results = {}
    for shape, (prompts, prompt_range, response_range) in SHAPES.items():
        batch = batch_for(prompts, prompt_range, response_range)
        args_ = (batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["responses"].shape[1])
        tokens = {"padded": batch["input_ids"].numel(), "packed": pack(*args_).length,
                  "shared prefixes": pack_shared_prefixes(*args_).length}
        mask = batch["response_mask"].bool()
        for dtype in ("fp32", "bf16"):
            times = {name: [] for name in layouts}
            for _ in range(args.repeats + 1):  # the first round warms up
                for name, (model, forward) in models.items():
                    model.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                        log_probs, entropy = forward.log_probs(model, batch, with_entropy=True)
                    (log_probs[mask].sum() + entropy[mask].sum()).backward()
                    times[name].append(time.perf_counter() - start)
            results[f"{shape}|{dtype}"] = {name: {"s": statistics.median(t[1:]), "tokens": tokens[name]}
                                           for name, t in times.items()}
    lines = [f"`benchmarks/shared_prefix.py --threads {args.threads} --repeats {args.repeats}`: one forward and "
             f"backward of a micro-batch (log-probs and entropy of every response token), tiny Qwen3, median of "
             f"{args.repeats}, {args.threads} threads, layouts alternating.", "",
             "| shape | dtype | layout | tokens computed | s | vs padded | vs packed |", "|---|---|---|---|---|---|---|"]
    for key, by_layout in results.items():
        shape, dtype = key.split("|")
        for name, r in by_layout.items():
            lines.append(f"| {shape} | {dtype} | {name} | {r['tokens']:,} | {r['s']:.3f} | "
                         f"{by_layout['padded']['s'] / r['s']:.2f}× | {by_layout['packed']['s'] / r['s']:.2f}× |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
