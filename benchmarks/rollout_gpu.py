"""Rollout throughput on a GPU: the native engine against transformers' `generate`, side by side in one run, on a
~100 M-parameter Qwen3 built here from a config (random weights, nothing downloaded), and each one's fraction of
the HBM-bandwidth bound.

    python benchmarks/rollout_gpu.py --device cuda --json OUT.json [--markdown OUT.md] [--hbm-gbps 4800]

Shapes: `rl` (64 prompts × n=8 of 128 tokens, 128 new tokens: a GRPO step's rollout) and `decode` (8 prompts ×
n=4 of 128 tokens, 256 new: small-batch decoding). Eos is ignored, so every sample has the full length. For each
dtype and shape both engines run once untimed (kernel selection, the lean decoder's self-check), then `--repeats`
times alternating; the median is reported. The JSON is rewritten after each result, so a run stopped by its time
budget (`--time-budget`) or killed keeps what it measured.

The HBM bound: a decode step must read every weight once and every row's KV cache so far, and write the logits
and the new K/V; at `--hbm-gbps` (H200: 4.8 TB/s) those bytes set the fastest possible rate. The measured time
includes the prefill, the bound does not count its compute: the fraction is a lower estimate of bandwidth use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SIZES = {  # Qwen3 shapes; "100m": 100.1 M parameters (tied embeddings), "tiny": for checking this script on a CPU
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=64),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}
SHAPES = {  # name: (prompts, n, prompt tokens, new tokens) per size
    "100m": {"rl": (64, 8, 128, 128), "decode": (8, 4, 128, 256)},
    "tiny": {"rl": (4, 2, 16, 8), "decode": (2, 2, 16, 16)},
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EOS, PAD = 2, 0


@dataclass
class Result:
    dtype: str
    shape: str
    rows: int
    prompt_tokens: int
    new_tokens: int
    stepper: str  # the native engine's decode path (LeanStepper, or TransformersStepper after a failed self-check)
    native_tokens_per_s: float | None = None
    transformers_tokens_per_s: float | None = None
    bound_tokens_per_s: float | None = None  # the HBM-bandwidth bound
    native_fraction_of_bound: float | None = None
    transformers_fraction_of_bound: float | None = None
    native_peak_gib: float | None = None
    repeats: int = 0
    note: str = ""


def build_model(size: str, dtype: torch.dtype, device: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (on meta: not at all)
        return Qwen3ForCausalLM(config).to(dtype=dtype).eval()


def hbm_bound_tokens_per_s(model, rows: int, prompt: int, new: int, bytes_per_s: float) -> float:
    """Generated tokens per second if each decode step moved only the bytes it must, at `bytes_per_s`."""
    cfg, itemsize = model.config, model.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize
    steps = new  # the prefill reads the weights once too; every later token is one decode step
    kv_reads = rows * kv_per_token * sum(prompt + t for t in range(1, new))
    kv_writes = rows * kv_per_token * (prompt + new)
    logits = rows * cfg.vocab_size * itemsize * steps
    seconds = (steps * weights + kv_reads + kv_writes + logits) / bytes_per_s
    return rows * new / seconds


def prompts_for(vocab: int, count: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, vocab, (count, length), generator=g).tolist()


def run_native(engine, prompts, n, new) -> int:
    from ascend_rl.rollout.protocol import SamplingParams

    params = [SamplingParams(max_new_tokens=new, n=n, sampling_seed=i * n, ignore_eos=True)
              for i in range(len(prompts))]
    return sum(o.completion_tokens for o in engine.generate(prompts, params))


def run_transformers(model, prompts, n, new) -> int:
    ids = torch.tensor([p for p in prompts for _ in range(n)], device=model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                             pad_token_id=PAD)
    if out.shape[1] != ids.shape[1] + new:  # counted as `new` tokens per sample: eos must not end any early
        raise RuntimeError(f"transformers generate stopped after {out.shape[1] - ids.shape[1]} of {new} tokens")
    return out.shape[0] * new


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, run, *args) -> float:
    synchronize(device)
    start = time.perf_counter()
    tokens = run(*args)
    synchronize(device)
    return tokens / (time.perf_counter() - start)


def measure(args, dtype_name: str, shapes: dict, deadline: float, report) -> None:
    from ascend_rl.rollout.native import NativeEngine
    from ascend_rl.rollout.scheduler import Budget

    model = build_model(args.size, DTYPES[dtype_name], args.device)
    engine = NativeEngine(model, eos_token_ids=[EOS], pad_token_id=PAD, budget=Budget(max_num_seqs=1024))
    stepper = type(engine.stepper).__name__
    for shape, (count, n, prompt_len, new) in shapes.items():
        result = Result(dtype_name, shape, count * n, prompt_len, new, stepper)
        report(result)
        if time.monotonic() > deadline:
            result.note = "skipped: time budget spent"
            continue
        prompts = prompts_for(model.config.vocab_size, count, prompt_len)
        run_native(engine, prompts, n, min(new, 8))  # untimed: kernel selection, allocator warm-up
        run_transformers(model, prompts, n, min(new, 8))
        rates: dict[str, list[float]] = {"native": [], "transformers": []}
        peak = 0.0
        for _ in range(args.repeats):  # alternating, so both see the same machine
            if rates["native"] and time.monotonic() > deadline:
                result.note = "fewer repeats: time budget spent"
                break
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            rates["native"].append(timed(args.device, run_native, engine, prompts, n, new))
            if args.device.startswith("cuda"):
                peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
            rates["transformers"].append(timed(args.device, run_transformers, model, prompts, n, new))
        bound = hbm_bound_tokens_per_s(model, count * n, prompt_len, new, args.hbm_gbps * 1e9)
        native, reference = statistics.median(rates["native"]), statistics.median(rates["transformers"])
        result.native_tokens_per_s, result.transformers_tokens_per_s = native, reference
        result.bound_tokens_per_s = bound
        result.native_fraction_of_bound, result.transformers_fraction_of_bound = native / bound, reference / bound
        result.native_peak_gib, result.repeats = (peak or None), len(rates["native"])
        report(result)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def machine(device: str) -> dict:
    info = {"torch": torch.__version__, "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def markdown(summary: dict) -> str:
    m = summary["model"]
    lines = [f"Native engine vs transformers `generate`, Qwen3 {m['parameters'] / 1e6:.1f} M parameters "
             f"({m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']}), random weights, eos ignored; "
             f"{summary['machine'].get('gpu', summary['machine']['device'])}; HBM bound at "
             f"{summary['hbm_gbps']:,.0f} GB/s; median of the repeats.", "",
             "| dtype | shape | rows × (prompt + new) | decode path | native tok/s | transformers tok/s | ratio | "
             "HBM-bound tok/s | native % of bound | transformers % of bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["results"]:
        if r["native_tokens_per_s"] is None:
            lines.append(f"| {r['dtype']} | {r['shape']} | {r['rows']} × ({r['prompt_tokens']} + {r['new_tokens']}) | "
                         f"{r['stepper']} | {r['note'] or 'not measured'} | | | | | |")
            continue
        lines.append(
            f"| {r['dtype']} | {r['shape']} | {r['rows']} × ({r['prompt_tokens']} + {r['new_tokens']}) | "
            f"{r['stepper']} "
            f"| {r['native_tokens_per_s']:,.0f} | {r['transformers_tokens_per_s']:,.0f} | "
            f"{r['native_tokens_per_s'] / r['transformers_tokens_per_s']:.2f}× | {r['bound_tokens_per_s']:,.0f} | "
            f"{100 * r['native_fraction_of_bound']:.2f} % | {100 * r['transformers_fraction_of_bound']:.2f} % |"
            + (f" {r['note']}" if r["note"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hbm-gbps", type=float, default=4800.0, help="HBM bandwidth, GB/s (H200: 4800)")
    parser.add_argument("--time-budget", type=float, default=600.0, help="seconds; later measurements are skipped")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.monotonic() + args.time_budget
    probe = build_model(args.size, torch.float32, "meta")
    cfg = probe.config
    summary = {"model": {"parameters": sum(p.numel() for p in probe.parameters()), "layers": cfg.num_hidden_layers,
                         "hidden": cfg.hidden_size, "vocab": cfg.vocab_size},
               "machine": machine(args.device), "hbm_gbps": args.hbm_gbps, "results": []}

    def report(result: Result) -> None:
        row = asdict(result)
        rows = summary["results"]
        for i, old in enumerate(rows):
            if (old["dtype"], old["shape"]) == (row["dtype"], row["shape"]):
                rows[i] = row
                break
        else:
            rows.append(row)
        args.json.write_text(json.dumps(summary, indent=1))

    for dtype_name in args.dtypes:
        measure(args, dtype_name, SHAPES[args.size], deadline, report)
    text = markdown(summary)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
