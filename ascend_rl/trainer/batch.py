"""One step's record: tensors in a TensorDict plus per-sample Python fields. Every stage adds keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from tensordict import TensorDict


@dataclass
class RolloutBatch:
    tensors: TensorDict
    uid: list[str]
    data_source: list[str]
    ground_truth: list
    extra_info: list[dict] = field(default_factory=list)
    response_text: list[str] = field(default_factory=list)
    baseline_outputs: list | None = None  # ReMax: one greedy GenerateOutput per prompt

    def __len__(self) -> int:
        return self.tensors.batch_size[0]

    def __getitem__(self, key: str):
        return self.tensors[key]

    def __setitem__(self, key: str, value) -> None:
        self.tensors[key] = value
