"""The critic (PPO's value function): its own model from `critic.model.path` with a one-output head on every
position (transformers' token-classification model, as verl builds it), the values of the sampled responses,
and the clipped value-loss update over mini- and micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict

from ascend_rl.algorithms import global_counts, masked_mean, value_loss
from ascend_rl.workers.fsdp import FsdpSettings
from ascend_rl.workers.model_io import ModelForward
from ascend_rl.workers.optimizer import OptimSettings
from ascend_rl.workers.packing import SequenceSettings
from ascend_rl.workers.trained import (
    Batching,
    ModelUpdate,
    TrainedModel,
    in_row_order,
    load_model,
    micro_batch_rows,
    model_forward,
    place,
    split,
)

VALUE_HEAD_SEED = 0


@dataclass(frozen=True)
class CriticSettings:
    """What the critic needs from `critic.*` (names as in the config)."""

    batching: Batching
    forward_micro_batch_size_per_gpu: int | None = None
    forward_max_token_len: int | None = None  # critic.use_dynamic_bsz: forward micro-batches by tokens
    cliprange_value: float = 0.5
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: float | None = None
    grad_clip: float = 1.0
    sequences: SequenceSettings = SequenceSettings()  # critic.model.use_remove_padding, ulysses


@dataclass(frozen=True)
class CriticSpec:
    """Everything to build a critic, in one process or in each worker (it pickles)."""

    model_path: str
    settings: CriticSettings
    optim: OptimSettings
    fsdp: FsdpSettings | None = None
    gradient_checkpointing: bool = False

    def build(self, device: str, mesh=None) -> Critic:
        return Critic(self.model_path, device, self.settings, self.optim, self.gradient_checkpointing, mesh, self.fsdp)


def value_model(path: str, device: str, dtype: torch.dtype, gradient_checkpointing: bool = False,
                attn_implementation: str | None = None):
    """A causal LM's body with a fresh scalar head (a critic's own checkpoint keeps its trained head); no dropout
    on the head, as verl sets it, so a value is a function of the tokens. The fresh head is drawn from a fixed
    seed: every rank of a sharded critic, every engine and every run start from the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VALUE_HEAD_SEED)
        return load_model(path, device, gradient_checkpointing, dtype, auto_class="AutoModelForTokenClassification",
                          attn_implementation=attn_implementation, num_labels=1, classifier_dropout=0.0)


def load_value_model(path: str, device: str, fsdp: FsdpSettings | None, forward: ModelForward, mesh=None,
                     gradient_checkpointing: bool = False):
    """`value_model`, placed for FSDP's compute."""
    model = value_model(path, device, (fsdp or FsdpSettings()).model_dtype, gradient_checkpointing,
                        forward.attn_implementation)
    return model, place(model, device, fsdp, mesh)


class ValueUpdate(ModelUpdate):
    """The clipped value-loss update, whichever engine computes it: the values fitted to the returns. An engine
    supplies, as for `actor.PolicyUpdate`: `_zero_grads`, `_forward_backward` (each micro-batch's values, the
    loss of them, its backward), `_step` (→ the grad norm), `_lr_step`, and `_replica_metrics`."""

    SECTION, SUMMED = "critic", ("vf_loss",)
    settings: CriticSettings
    optimizer: torch.optim.Optimizer

    def _update_mini_batch(self, mini: TensorDict, metrics: dict[str, list[float]]) -> None:
        s = self.settings
        # The whole mini-batch's counts make the micro-batch losses of all ranks add up to the mini-batch loss.
        counts = {**global_counts(mini["response_mask"]), "loss_scale_factor": s.loss_scale_factor}
        mini = mini[torch.tensor(self.rows_of_rank(mini))]
        self._zero_grads()
        losses: list[float] = []

        def loss_of(micro: TensorDict, vpreds: torch.Tensor) -> torch.Tensor:
            mask = micro["response_mask"]
            loss, clipfrac = value_loss(vpreds, micro["values"], micro["returns"], mask, s.cliprange_value,
                                        s.loss_agg_mode, **counts)
            losses.append(loss.item())
            metrics["vf_clipfrac"].append(clipfrac.item())
            metrics["vpred_mean"].append(masked_mean(vpreds.detach(), mask).item())
            return loss

        self._forward_backward(self.micro_batches(mini), loss_of)
        metrics["grad_norm"].append(self._step())
        metrics["vf_loss"].append(sum(losses))


class Critic(TrainedModel, ValueUpdate):
    """One process's critic (a shard of it, with a device mesh): values and the value-loss update."""

    def __init__(self, model_path: str, device: str, settings: CriticSettings, optim: OptimSettings,
                 gradient_checkpointing: bool = False, mesh=None, fsdp: FsdpSettings | None = None):
        forward = model_forward(settings.sequences, mesh)
        model, compute = load_value_model(model_path, device, fsdp, forward, mesh, gradient_checkpointing)
        super().__init__(model, compute, forward, device, optim, settings.batching, mesh)
        self.settings = settings

    @torch.no_grad()
    def values(self, batch: TensorDict) -> torch.Tensor:
        """The values of the sampled responses under the current weights, masked (on the CPU)."""
        self.model.eval()
        rows = micro_batch_rows(batch, self.settings.forward_micro_batch_size_per_gpu,
                                self.settings.forward_max_token_len, self.device)
        with self._compute():
            parts = [self.forward.values(self.model, mb.to(self.device)) for mb in split(batch, rows)]
        return (in_row_order(parts, rows).cpu() * batch["response_mask"]).to(batch["response_mask"].dtype)

    # --- ValueUpdate's steps (TrainedModel has the others) -----------------------------------------------

    def _forward_backward(self, micros: list[TensorDict], loss_of) -> None:
        for micro in micros:
            with self._compute():
                vpreds = self.forward.values(self.model, micro)
            # FSDP averages gradients over every rank: the losses must add up
            (loss_of(micro, vpreds) * self.world_size).backward()
