"""What the Megatron actor and critic share: one rank's GPTModel under Megatron's DDP with its optimizer and LR
schedule, its place in the data-parallel group, what of it lives in host memory between calls (the engine's
offload switches), its checkpoint as a Megatron dist checkpoint in verl's layout, and the clipped step."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from ascend_rl.workers.megatron.checkpoint import load_dist_checkpoint, save_dist_checkpoint
from ascend_rl.workers.megatron.engine import MegatronEngine, MegatronOptim, build_optimizer, megatron_step, wrap_ddp
from ascend_rl.workers.megatron.offload import model_offload
from ascend_rl.workers.megatron.pipeline import last_stage_metrics
from ascend_rl.workers.trained import DCP_DIR, Batching, MiniBatchWalk


class MegatronTrained(MiniBatchWalk):
    """`module` (this rank's GPTModel on `device`) trained by Megatron's DDP, optimizer and schedule."""

    def __init__(self, module, engine: MegatronEngine, optim: MegatronOptim, batching: Batching, device: str):
        from megatron.core import parallel_state

        self.model = wrap_ddp(module, engine)
        self.optimizer, self.scheduler = build_optimizer(self.model, engine, optim)
        self.engine, self.batching, self.device = engine, batching, torch.device(device)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.weights, self.optimizer_state = model_offload(self.model, self.optimizer, engine.offload, device)
        self.weights.offload()
        self.optimizer_state.offload()

    @contextmanager
    def training_state(self):
        """The weights, gradients and optimizer state on the device for the block."""
        with self.weights.resident(), self.optimizer_state.resident():
            yield

    def _zero_grads(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _step(self) -> float:
        return megatron_step(self.model, self.optimizer)

    def _lr_step(self) -> None:
        self.scheduler.step(1)

    def _replica_metrics(self, metrics: dict[str, list[float]]) -> dict[str, list[float]]:
        return last_stage_metrics(metrics)  # the last pipeline stage computed the losses

    def save_shards(self, path: Path) -> None:
        """`path/dcp`: the model and optimizer as a Megatron dist checkpoint (every rank writes its shards), which
        another layout resumes from (the distributed optimizer's state: with dist_ckpt_optim_fully_reshardable)."""
        with self.training_state():
            save_dist_checkpoint(path / DCP_DIR, self.model, self.optimizer,
                                 fully_reshardable=self.engine.optim_fully_reshardable)

    def state_dict(self) -> dict:
        """What the trainer keeps beside the shards (the same on every rank)."""
        return {"scheduler": self.scheduler.state_dict()}

    def load_state(self, path: Path, state: dict) -> None:
        with self.training_state():
            load_dist_checkpoint(path / DCP_DIR, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
