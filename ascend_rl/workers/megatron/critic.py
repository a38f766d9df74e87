"""PPO's critic on Megatron-core (`critic.strategy=megatron`), in the Megatron actor's workers and on its layout
(Megatron's process groups are one per process): the HF critic's body with a one-value head (`model.ValueHead`,
HF's `score.weight`, fresh from the same seed as the FSDP critic's), the values of the sampled responses, and the
clipped value-loss update through Megatron's schedule, with the FSDP critic's losses and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict

from ascend_rl.workers.critic import CriticSettings, ValueUpdate
from ascend_rl.workers.megatron.engine import MegatronEngine, MegatronOptim, build_module
from ascend_rl.workers.megatron.forward import response_values
from ascend_rl.workers.megatron.pipeline import row_columns, through_stages
from ascend_rl.workers.megatron.trained import MegatronTrained
from ascend_rl.workers.trained import micro_batch_rows, split


class MegatronCritic(MegatronTrained, ValueUpdate):
    """One rank's critic: its Megatron shard under DDP, Megatron's optimizer and LR schedule (in host memory
    between calls with the engine's offload switches)."""

    def __init__(self, model_path: str, settings: CriticSettings, optim: MegatronOptim, engine: MegatronEngine,
                 device: str = "cpu"):
        module, self.hf_config = build_module(model_path, engine, device, value_head=True)
        super().__init__(module, engine, optim, settings.batching, device)
        self.settings = settings

    @torch.no_grad()
    def values(self, batch: TensorDict) -> torch.Tensor:
        """The values of the sampled responses under the current weights, masked, on the host (every stage)."""
        self.model.eval()
        s = self.settings
        rows = micro_batch_rows(batch, s.forward_micro_batch_size_per_gpu, s.forward_max_token_len)
        micros = [mb.to(self.device) for mb in split(batch, rows)]

        def per_micro(micro, output, lead):
            return (response_values(output, lead, micro),)

        with self.weights.resident():
            (values,) = row_columns(self.model, micros, rows, per_micro, 1, self.engine.sequence_multiple,
                                    batch["responses"].shape, self.device)
        return (values * batch["response_mask"]).to(batch["response_mask"].dtype)

    def update(self, batch: TensorDict) -> dict[str, float]:
        with self.training_state():
            return super().update(batch)

    # --- ValueUpdate's steps (MegatronTrained has the others) --------------------------------------------

    def _forward_backward(self, micros: list[TensorDict], loss_of) -> None:
        """Through Megatron's schedule; DDP sums gradients over the data-parallel ranks: the losses add up."""

        def on_output(micro, output, lead):
            return loss_of(micro, response_values(output, lead, micro)), None

        through_stages(self.model, micros, on_output, self.engine.sequence_multiple, forward_only=False)

    def save(self, path: Path) -> None:
        """`path/dcp` (`save_shards`) and the HF config beside it (no HF weights: a critic is not served)."""
        path.mkdir(parents=True, exist_ok=True)  # inside the trainer's new, partial step directory
        if torch.distributed.get_rank() == 0:
            self.hf_config.save_pretrained(path)
        self.save_shards(path)


@dataclass(frozen=True)
class MegatronCriticSpec:
    """Everything to build the Megatron critic in each worker, after the actor made Megatron's process groups
    (it pickles)."""

    model_path: str
    settings: CriticSettings
    optim: MegatronOptim
    engine: MegatronEngine

    def build(self, device: str, mesh=None) -> MegatronCritic:
        return MegatronCritic(self.model_path, self.settings, self.optim, self.engine, device)
