"""PPO's critic on Megatron-core (`critic.strategy=megatron`), in the Megatron actor's workers and on its layout
(Megatron's process groups are one per process): the HF critic's body with a one-value head (`model.ValueHead`,
HF's `score.weight`, fresh from the same seed as the FSDP critic's), the values of the sampled responses, and the
clipped value-loss update through Megatron's schedule, with the FSDP critic's losses and metrics."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tensordict import TensorDict

from ascend_rl.algorithms import global_counts, masked_mean, value_loss
from ascend_rl.workers.critic import CriticSettings
from ascend_rl.workers.megatron.checkpoint import load_dist_checkpoint, save_dist_checkpoint
from ascend_rl.workers.megatron.engine import (
    MegatronEngine,
    MegatronOptim,
    build_module,
    build_optimizer,
    megatron_step,
    wrap_ddp,
)
from ascend_rl.workers.megatron.forward import response_values
from ascend_rl.workers.megatron.offload import model_offload
from ascend_rl.workers.megatron.pipeline import from_last_stage, is_last_stage, object_from_last_stage, through_stages
from ascend_rl.workers.trained import DCP_DIR, MiniBatchWalk, in_row_order, micro_batch_rows, reduced_metrics, split


class MegatronCritic(MiniBatchWalk):
    """One rank's critic: its Megatron shard under DDP, Megatron's optimizer and LR schedule (in host memory
    between calls with the engine's offload switches)."""

    def __init__(self, model_path: str, settings: CriticSettings, optim: MegatronOptim, engine: MegatronEngine,
                 device: str = "cpu"):
        from megatron.core import parallel_state

        self.module, self.hf_config = build_module(model_path, engine, device, value_head=True)
        self.model = wrap_ddp(self.module, engine)
        self.optimizer, self.scheduler = build_optimizer(self.model, engine, optim)
        self.settings, self.batching, self.engine = settings, settings.batching, engine
        self.device = torch.device(device)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.weights, self.optimizer_state = model_offload(self.model, self.optimizer, engine.offload, device)
        self.weights.offload()
        self.optimizer_state.offload()

    @torch.no_grad()
    def values(self, batch: TensorDict) -> torch.Tensor:
        """The values of the sampled responses under the current weights, masked, on the host (every stage)."""
        self.model.eval()
        s = self.settings
        rows = micro_batch_rows(batch, s.forward_micro_batch_size_per_gpu, s.forward_max_token_len)
        micros = [mb.to(self.device) for mb in split(batch, rows)]
        with self.weights.resident():
            parts = through_stages(self.model, micros, lambda micro, out, lead: (None, response_values(out, lead, micro)),
                                   self.engine.sequence_multiple, forward_only=True)
        values = from_last_stage(in_row_order(parts, rows) if parts else None, batch["responses"].shape,
                                 torch.float32, self.device).cpu()
        return (values * batch["response_mask"]).to(batch["response_mask"].dtype)

    def update(self, batch: TensorDict) -> dict[str, float]:
        """`ppo_epochs` passes over mini-batches, fitting the values to the returns; one LR step per call."""
        with self.weights.resident(), self.optimizer_state.resident():
            self.model.train()
            metrics: dict[str, list[float]] = defaultdict(list)
            for mini in self.mini_batches(batch.to(self.device)):
                self._update_mini_batch(mini, metrics)
            self.scheduler.step(1)
        replica = object_from_last_stage(dict(metrics) if is_last_stage() else None)  # its stage has the losses
        return reduced_metrics(replica, "critic", ("vf_loss",), self.dp_size, self.optimizer.param_groups[0]["lr"])

    def _update_mini_batch(self, mini: TensorDict, metrics: dict[str, list[float]]) -> None:
        s = self.settings
        counts = {**global_counts(mini["response_mask"]), "loss_scale_factor": s.loss_scale_factor}
        mini = mini[torch.tensor(self.rows_of_rank(mini))]
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses: list[float] = []

        def on_output(micro, out, lead):
            mask = micro["response_mask"]
            vpreds = response_values(out, lead, micro)
            loss, clipfrac = value_loss(vpreds, micro["values"], micro["returns"], mask, s.cliprange_value,
                                        s.loss_agg_mode, **counts)
            losses.append(loss.item())
            metrics["vf_clipfrac"].append(clipfrac.item())
            metrics["vpred_mean"].append(masked_mean(vpreds.detach(), mask).item())
            return loss, None  # DDP sums gradients over the data-parallel ranks: the losses add up

        through_stages(self.model, self.micro_batches(mini), on_output, self.engine.sequence_multiple,
                       forward_only=False)
        metrics["grad_norm"].append(megatron_step(self.model, self.optimizer))
        metrics["vf_loss"].append(sum(losses))

    def save(self, path: Path) -> None:
        """`path/dcp`: the model and optimizer as a Megatron dist checkpoint (every rank writes its shards), and
        the HF config beside it (no HF weights: a critic is not served)."""
        with self.weights.resident(), self.optimizer_state.resident():
            path.mkdir(parents=True, exist_ok=True)  # inside the trainer's new, partial step directory
            if torch.distributed.get_rank() == 0:
                self.hf_config.save_pretrained(path)
            save_dist_checkpoint(path / DCP_DIR, self.model, self.optimizer,
                                 fully_reshardable=self.engine.optim_fully_reshardable)

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state(self, path: Path, state: dict) -> None:
        with self.weights.resident(), self.optimizer_state.resident():
            load_dist_checkpoint(path / DCP_DIR, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])


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
