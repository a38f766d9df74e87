"""A batch sampler whose position can be saved mid-epoch and restored exactly.

Each epoch's order is a permutation drawn from `seed + epoch`, so the state is just (epoch, position):
restoring it replays exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ResumableBatchSampler:
    num_samples: int
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = True
    epoch: int = 0
    position: int = 0  # samples of this epoch already handed out

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.drop_last and self.num_samples < self.batch_size:
            raise ValueError(f"{self.num_samples} samples cannot fill one batch of {self.batch_size} "
                             f"(data.train_batch_size); use more data or a smaller batch")

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        """The next batch of indices, moving to the next epoch when this one is used up."""
        if self.position >= self.batches_per_epoch * self.batch_size:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['num_samples']} samples with seed {state['seed']}, "
                             f"this dataset has {self.num_samples} with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
