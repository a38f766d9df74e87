"""The update phase with padded micro-batches against packed ones (`use_remove_padding`), side by side in one
run: same model, batch, seeds, settings and thread count; the two alternate and the median is reported.

    .venv/bin/python benchmarks/packing.py --threads 2

Tasks: the embedded one's shapes (64 × 8 samples, prompts of 8-14 tokens, responses of 1-4) on the embedded
tiny model, and a long, uneven one (32 samples, 64-token prompts, responses of 8-256 tokens) on the same
model. Writes benchmarks/results/packing.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # name: (samples, prompt lengths (low, high), response lengths (low, high), micro-batch size)
    "embedded (512 samples, prompts 8-14, responses 1-4)": (512, (8, 14), (1, 4), 128),
    "uneven (32 samples, prompts 64, responses 8-256)": (32, (64, 64), (8, 256), 8),
}


def make_batch(samples: int, prompt_range, response_range, seed: int = 0):
    from ascend_rl.data.collate import collate

    g = torch.Generator().manual_seed(seed)

    def lengths(low, high):
        return torch.randint(low, high + 1, (samples,), generator=g).tolist()

    prompts = [torch.randint(4, 90, (n,), generator=g).tolist() for n in lengths(*prompt_range)]
    responses = [torch.randint(4, 90, (n,), generator=g).tolist() for n in lengths(*response_range)]
    batch = collate(prompts, responses, pad_token_id=0)
    batch["advantages"] = torch.randn(batch["response_mask"].shape, generator=g) * batch["response_mask"]
    return batch


def main() -> None:
    from ascend_rl.data.tiny_model import build_tiny_model
    from ascend_rl.workers.actor import Actor, ActorSettings
    from ascend_rl.workers.optimizer import OptimSettings
    from ascend_rl.workers.packing import SequenceSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "packing.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_model(Path(tmp) / "model"))
        for task, (samples, prompt_range, response_range, micro) in TASKS.items():
            batch = make_batch(samples, prompt_range, response_range)
            settings = dict(ppo_mini_batch_size=samples // 4, ppo_micro_batch_size_per_gpu=micro, entropy_coeff=0.0)
            actors = {name: Actor(model, "cpu", ActorSettings(**settings, sequences=SequenceSettings(packed)),
                                  OptimSettings(lr=1e-6, total_steps=100))
                      for name, packed in (("padded", False), ("packed", True))}
            batch["old_log_probs"] = actors["padded"].log_probs(batch)[0]
            times = {name: [] for name in actors}
            for _ in range(args.repeats):
                for name, actor in actors.items():
                    start = time.perf_counter()
                    actor.update(batch)
                    times[name].append(time.perf_counter() - start)
            padded, packed = (statistics.median(times[name]) for name in ("padded", "packed"))
            real = int(batch["attention_mask"].sum())
            rows.append((task, real / batch["attention_mask"].numel(), padded, packed))
            print(f"{task}: padded {padded:.3f} s, packed {packed:.3f} s, {padded / packed:.2f}x", flush=True)

    lines = ["# Update phase: padded against packed micro-batches", "",
             f"`.venv/bin/python benchmarks/packing.py --threads {args.threads} --repeats {args.repeats}` "
             f"(torch {torch.__version__}, {args.threads} threads; median of {args.repeats} alternating updates; "
             f"one update = 4 mini-batches, PPO-clip, the tiny embedded model, fp32).", "",
             "| task | real tokens / padded | padded update (s) | packed update (s) | packed speed-up |",
             "|---|---|---|---|---|"]
    lines += [f"| {task} | {share:.0%} | {padded:.3f} | {packed:.3f} | {padded / packed:.2f}× |"
              for task, share, padded, packed in rows]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
