"""curves.png: the reward and validation curves of a run, read back from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics_file: Path, out: Path) -> Path | None:
    if not metrics_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, (ax_reward, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = [(r["step"], r["critic/score/mean"]) for r in rows if r.get("critic/score/mean") is not None]
    if train:
        ax_reward.plot(*zip(*train), label="critic/score/mean")
    ax_reward.set(xlabel="step", ylabel="mean score of the step's samples", title="training reward")
    for key in sorted({k for r in rows for k in r if k.startswith("val-core/")}):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax_val.plot(*zip(*points), marker="o", label=key)
    ax_val.set(xlabel="step", ylabel="accuracy", title="validation", ylim=(0, 1))
    for ax in (ax_reward, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
