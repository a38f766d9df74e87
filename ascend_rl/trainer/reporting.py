"""What a run shows and keeps: metric sinks (console, metrics.jsonl, TensorBoard, wandb), the progress bar with
its postfix, one-line messages that do not break the bar, ascend-rl's log lines in `train.log` of the run
directory (appended to when the run resumes), and the curves PNG at the end."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ascend_rl.trainer.plots import plot_curves
from ascend_rl.trainer.tracking import make_sinks

logger = logging.getLogger(__name__)


@dataclass
class Reporter:
    cfg: DictConfig
    out_dir: Path
    total_steps: int
    show_progress: bool = True
    sinks: list = field(default_factory=list)
    log_file: logging.Handler | None = None

    def open(self, step: int) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = logging.FileHandler(self.out_dir / "train.log", encoding="utf-8")
        self.log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("ascend_rl").addHandler(self.log_file)
        t = self.cfg.trainer
        loggers = [t.logger] if isinstance(t.logger, str) else list(t.logger)
        self.sinks = make_sinks(loggers, self.out_dir, t.project_name, t.experiment_name,
                                OmegaConf.to_container(self.cfg), self.write, step)

    def explain_scores(self) -> None:
        """Why the bar's score and the held-out accuracy differ, said once at the start of a run."""
        ro = self.cfg.actor_rollout_ref.rollout
        if ro.temperature > 0 and ro.val_kwargs.temperature == 0:
            logger.info("score (critic/score/mean) is of the training samples, drawn at temperature %s; held-out "
                        "accuracy (val-core/...) is of greedy answers: the score is usually the lower of the two",
                        ro.temperature)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def progress(self, initial: int):
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=initial, desc=self.cfg.algorithm.adv_estimator, unit="step",
                    disable=not self.show_progress, dynamic_ncols=True)

    @staticmethod
    def postfix(metrics: dict[str, float], val_metrics: dict[str, float]) -> dict[str, str]:
        shown = {"score": f"{metrics['critic/score/mean']:.3f}"}
        shown.update({k.split("/")[1] + "_acc": f"{v:.3f}" for k, v in val_metrics.items() if k.startswith("val-core/")})
        if metrics.get("reward/failures"):
            shown["fail"] = f"{metrics['reward/failures']:.0f}"  # failed rewards scored 0; the log says why
        return shown

    def write(self, message: str) -> None:
        from tqdm import tqdm

        if self.show_progress:
            tqdm.write(message)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self.log_file is not None:
            logging.getLogger("ascend_rl").removeHandler(self.log_file)
            self.log_file.close()
            self.log_file = None

    def plot(self) -> Path | None:
        return plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
