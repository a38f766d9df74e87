"""Rollout throughput: the native engine against transformers' `generate` (padded batch, KV cache), side
by side in one run, same model, prompts, lengths and thread count.

    .venv/bin/python benchmarks/rollout.py --threads 2

Shapes: the embedded task (arithmetic prompts, 64 prompts × n=8, up to 16 new tokens, eos stops early)
and a long one (64-token prompts, 256 new tokens with eos ignored, 8 prompts × n=8). Each engine runs
every shape `--repeats` times, alternating; the median is reported. Both run as `ascend-rl` runs them: OpenMP's
passive wait unless the environment says otherwise (`OMP_WAIT_POLICY=ACTIVE .venv/bin/python benchmarks/rollout.py`
measures OpenMP's spinning default). Writes benchmarks/results/rollout.{md,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ascend_rl.platform import apply_cpu_thread_defaults  # noqa: E402

apply_cpu_thread_defaults(os.environ)  # before torch starts its OpenMP runtime
import torch  # noqa: E402


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
        engine = NativeEngine.from_pretrained(str(model_dir), max_num_seqs=1024)  # verl's default, as the trainer runs
        hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
        rows, medians = [], {}
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
            medians[name] = (native, ref)
            rows.append(f"| {name} | {native:,.0f} | {ref:,.0f} | {native / ref:.2f}× |")
    table = [f"tiny Qwen3 (0.4 M params), fp32, {args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
             f"median of {args.repeats} (`benchmarks/rollout.py --threads {args.threads}`)", "",
             "| shape | native tokens/s | transformers generate tokens/s | ratio |", "|---|---|---|---|", *rows]
    print("\n".join(table))
    out = ROOT / "benchmarks" / "results" / "rollout"
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    plot(medians, args.threads, out.with_suffix(".png"))


def plot(medians: dict[str, tuple[float, float]], threads: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    names = list(medians)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [medians[n][0] for n in names], 0.4, label="native engine")
    ax.bar([x + 0.2 for x in xs], [medians[n][1] for n in names], 0.4, label="transformers generate")
    for x, n in zip(xs, names):
        ax.annotate(f"{medians[n][0] / medians[n][1]:.2f}×", (x - 0.2, medians[n][0]), ha="center", va="bottom")
    ax.set_xticks(list(xs), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylim(0, 1.15 * max(max(v) for v in medians.values()))
    ax.set(ylabel="generated tokens / s", title=f"rollout throughput, tiny Qwen3, {threads} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
