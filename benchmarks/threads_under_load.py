"""What a busy neighbour costs the main job's step, by intra-op thread count and OpenMP wait policy.

    .venv/bin/python benchmarks/threads_under_load.py --repeats 3

Each run is `ascend-rl train` on the embedded default's shapes (64 prompts × 8 samples, ≤ 16 new tokens,
4 mini-batches) with a fresh tiny model (no SFT: the step's cost does not depend on what the model knows),
and the step time is the median of `timing_s/step` over steps 2-6. The neighbour is one other process
spinning on one core (a pure-Python loop), started before the run and stopped after it. Settings alternate
run by run, so drift on the shared machine spreads over all of them.

Goal (reliability issue): with the defaults `ascend-rl train` picks, a busy neighbour costs at most its fair
share: on 2 cores with one of them taken, the step at most ~2× its time on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
SETTINGS = {  # name → environment; "defaults" is what `ascend-rl train` chooses when the user sets nothing
    "defaults": {},
    "2 threads, spinning wait (OpenMP's default)": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "2 threads, passive wait": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "2 threads, brief spin (GOMP_SPINCOUNT=10000)": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
NEIGHBOUR = "while True: pass"


def prepare(work: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from ascend_rl.data.tasks import write_arithmetic
    from ascend_rl.data.tiny_model import build_tiny_model

    return build_tiny_model(work / "model"), write_arithmetic(work / "data", seed=0)["train"].parent


def step_time(env_extra: dict, model: Path, data: Path, out: Path, busy: bool) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "ascend_rl", "train", "--no-progress", "--config-name", "embedded",
           f"actor_rollout_ref.model.path={model}", f"data.train_files={data}/train.parquet",
           f"data.val_files={data}/test.parquet", f"trainer.total_training_steps={STEPS}", "trainer.test_freq=0",
           "trainer.val_before_train=False", "trainer.save_freq=-1", "trainer.logger=[console]",
           f"trainer.default_local_dir={out}"]
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if busy else None
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({env_extra}, busy={busy}):\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["timing_s/step"] for r in rows if r["step"] >= 2 and "timing_s/step" in r)


def write_report(times: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"Main job's step (embedded shapes, fresh tiny model), median of steps 2-{STEPS} per run, median over "
             f"runs; neighbour: one process spinning on one of the {os.cpu_count()} cores.", "",
             "| setting | idle machine (s) | busy neighbour (s) | slowdown |", "|---|---|---|---|"]
    for name, (idle, busy) in times.items():
        lines.append(f"| {name} | {statistics.median(idle):.3f} | {statistics.median(busy):.3f} | "
                     f"{statistics.median(busy) / statistics.median(idle):.1f}× |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(times)
    for k, (label, col) in enumerate((("idle machine", 0), ("busy neighbour", 1))):
        ax.bar([i + 0.4 * k for i in range(len(names))], [statistics.median(times[n][col]) for n in names],
               width=0.4, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("seconds per step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "threads_under_load")
    args = parser.parse_args()
    from tqdm import tqdm

    times = {name: ([], []) for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = prepare(work)
        runs = [(r, name, busy) for r in range(args.repeats) for busy in (False, True) for name in SETTINGS]
        for i, (_, name, busy) in enumerate(tqdm(runs, desc="runs", unit="run")):
            seconds = step_time(SETTINGS[name], model, data, work / f"run{i}", busy)
            times[name][int(busy)].append(seconds)
    write_report(times, args.out)


if __name__ == "__main__":
    main()
