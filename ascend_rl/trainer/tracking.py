"""Metric sinks selected by `trainer.logger` (console, tensorboard, wandb), plus a JSONL file always."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ascend_rl.config.validate import LOGGERS

CONSOLE_KEYS = ("critic/score/mean", "actor/pg_loss", "actor/entropy", "response_length/mean", "timing_s/step")


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one object per step. A fresh run starts it empty; on resume, lines after the resumed
    step are dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in self._lines() if json.loads(line)["step"] <= resume_step] if resume_step else []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self.file = path.open("a")

    def _lines(self) -> list[str]:
        return [l for l in self.path.read_text().splitlines() if l.strip()] if self.path.exists() else []

    def log(self, metrics, step):
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class ConsoleSink:
    def __init__(self, write: Callable[[str], None]):
        self.write = write

    def log(self, metrics, step):
        shown = [f"{k}={metrics[k]:.4g}" for k in CONSOLE_KEYS if k in metrics]
        shown += [f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("val-core/")]
        self.write(f"step {step}: " + " ".join(shown))

    def close(self):
        pass


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            from ascend_rl.errors import UserError

            raise UserError("trainer.logger includes wandb but wandb is not installed: pip install 'ascend-rl[wandb]'"
                            " or drop it from trainer.logger") from None
        self.run = wandb.init(project=project, name=name, config=config)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


def make_sinks(loggers: list[str], out_dir: Path, project: str, experiment: str, config: dict,
               write: Callable[[str], None], resume_step: int) -> list[Sink]:
    factories: dict[str, Callable[[], Sink]] = {
        "console": lambda: ConsoleSink(write),
        "tensorboard": lambda: TensorBoardSink(out_dir / "tensorboard"),
        "wandb": lambda: WandbSink(project, experiment, config),
    }
    assert set(factories) == set(LOGGERS), "config.validate.LOGGERS and the sinks here must agree"
    return [JsonlSink(out_dir / "metrics.jsonl", resume_step), *(factories[name]() for name in loggers)]
