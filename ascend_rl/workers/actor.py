"""The actor (policy being trained) and the reference policy: a model, its optimizer and schedule,
log-probs, and the PPO-family update over mini- and micro-batches."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict

from ascend_rl.algorithms import agg_loss, compute_policy_loss, global_counts, kl_penalty
from ascend_rl.workers.fsdp import FsdpSettings, full_tensor
from ascend_rl.workers.model_io import ModelForward, logprob_metrics
from ascend_rl.workers.optimizer import OptimSettings
from ascend_rl.workers.packing import SequenceSettings
from ascend_rl.workers.trained import (
    DCP_DIR,
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

__all__ = ["DCP_DIR", "Actor", "ActorSettings", "ActorSpec", "ReferencePolicy", "ReferenceSettings", "load_model",
           "load_policy"]


def load_policy(path: str, device: str, fsdp: FsdpSettings | None, forward: ModelForward, mesh=None,
                gradient_checkpointing: bool = False):
    """The model in `fsdp.model_dtype` with the attention `forward` needs, sharded over `mesh` when given, and
    the context its forwards run in."""
    model = load_model(path, device, gradient_checkpointing, (fsdp or FsdpSettings()).model_dtype,
                       attn_implementation=forward.attn_implementation)
    return model, place(model, device, fsdp, mesh)


@dataclass(frozen=True)
class ActorSettings:
    """What the update needs from `actor_rollout_ref.actor.*` (names as in the config)."""

    ppo_mini_batch_size: int  # samples (prompts × n)
    ppo_micro_batch_size_per_gpu: int | None
    ppo_epochs: int = 1
    shuffle: bool = False
    data_loader_seed: int = 42
    loss_mode: str = "vanilla"
    loss_agg_mode: str = "token-mean"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float = 3.0
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    grad_clip: float = 1.0
    temperature: float = 1.0
    log_prob_micro_batch_size: int | None = None
    balance_batch: bool = True  # several ranks: even token counts per rank (trainer.balance_batch)
    ppo_max_token_len_per_gpu: int | None = None  # use_dynamic_bsz (None: micro-batches of rows)
    log_prob_max_token_len: int | None = None  # rollout.log_prob_use_dynamic_bsz
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm's divisor (None: the response length)
    policy_loss_kwargs: dict = field(default_factory=dict, hash=False)  # algorithms.policy_loss_kwargs(config)
    sequences: SequenceSettings = SequenceSettings()  # packed (use_remove_padding), Ulysses

    @property
    def batching(self) -> Batching:
        return Batching(self.ppo_mini_batch_size, self.ppo_micro_batch_size_per_gpu, self.ppo_epochs, self.shuffle,
                        self.data_loader_seed, self.balance_batch, self.ppo_max_token_len_per_gpu,
                        self.sequences.shared_prefix)


@dataclass(frozen=True)
class ReferenceSettings:
    """What the reference policy needs (`actor_rollout_ref.ref.*`)."""

    temperature: float = 1.0
    micro_batch_size: int | None = None
    fsdp: FsdpSettings | None = None
    max_token_len: int | None = None  # ref.log_prob_use_dynamic_bsz
    sequences: SequenceSettings = SequenceSettings()


class ReferencePolicy:
    """A frozen copy of the initial policy, for the KL term; FSDP2-sharded like the actor when given a mesh."""

    def __init__(self, model_path: str, device: str, settings: ReferenceSettings, mesh=None):
        self.forward = model_forward(settings.sequences, mesh)
        self.model, self._compute = load_policy(model_path, device, settings.fsdp, self.forward, mesh)
        self.model.eval().requires_grad_(False)
        self.device, self.settings = torch.device(device), settings

    @torch.no_grad()
    def log_probs(self, batch: TensorDict) -> torch.Tensor:
        s = self.settings
        rows = micro_batch_rows(batch, s.micro_batch_size, s.max_token_len, self.device, s.sequences.shared_prefix)
        with self._compute():
            return in_row_order([self.forward.log_probs(self.model, mb.to(self.device), self.settings.temperature)[0]
                                 for mb in split(batch, rows)], rows).cpu()


def needs_entropy(s: ActorSettings, micro: TensorDict) -> bool:
    """The entropy bonus needs it, and so does an on-policy step (its forward's metrics stand in for the
    old-log-prob pass's)."""
    return s.entropy_coeff != 0 or "old_log_probs" not in micro


def policy_loss(s: ActorSettings, micro: TensorDict, log_prob: torch.Tensor, entropy: torch.Tensor | None,
                agg_kw: dict, metrics: dict[str, list[float]], totals: dict[str, float]) -> torch.Tensor:
    """One micro-batch's share of the mini-batch loss (policy loss, entropy bonus, KL loss) from the log-probs
    the training engine computed; its metrics go to `metrics`, its summed losses to `totals`."""
    mode, mask = s.loss_agg_mode, micro["response_mask"]
    # Without old log-probs the step is on-policy (one mini-batch, one epoch): they equal this forward's.
    on_policy = "old_log_probs" not in micro
    old_log_prob = log_prob.detach() if on_policy else micro["old_log_probs"]
    if on_policy:  # this forward stands in for the old-log-prob pass, and so do its metrics
        for name, value in logprob_metrics(log_prob.detach(), entropy.detach(), micro["rollout_log_probs"],
                                           mask).items():
            metrics[name].append(value)
    pg_loss, pg_metrics = compute_policy_loss(
        s.loss_mode, old_log_prob=old_log_prob, log_prob=log_prob, advantages=micro["advantages"],
        response_mask=mask, loss_agg_mode=mode, clip_ratio_low=s.clip_ratio_low,
        clip_ratio_high=s.clip_ratio_high, clip_ratio_c=s.clip_ratio_c,
        rollout_is_weights=micro.get("rollout_is_weights", None), **s.policy_loss_kwargs, **agg_kw)
    loss = pg_loss
    if s.entropy_coeff != 0:
        loss = loss - s.entropy_coeff * agg_loss(entropy, mask, mode, **agg_kw)
    if s.use_kl_loss:
        kl = agg_loss(kl_penalty(log_prob, micro["ref_log_prob"], s.kl_loss_type), mask, mode, **agg_kw)
        loss = loss + s.kl_loss_coef * kl
        totals["kl_loss"] += kl.item()
    totals["pg_loss"] += pg_loss.item()
    for name, value in pg_metrics.items():
        metrics[name].append(value.item())
    return loss


class PolicyUpdate(ModelUpdate):
    """The PPO-family update, whichever engine computes it: `policy_loss` per micro-batch. An engine supplies
    the steps that differ: `_zero_grads`, `_forward_backward` (each micro-batch's log-probs, the loss of them,
    its backward), `_step` (→ the grad norm), `_lr_step`, and `_replica_metrics`."""

    SECTION, SUMMED = "actor", ("pg_loss", "kl_loss")
    settings: ActorSettings
    optimizer: torch.optim.Optimizer

    def _update_mini_batch(self, mini: TensorDict, metrics: dict[str, list[float]]) -> None:
        s = self.settings
        # The whole mini-batch's counts make the micro-batch losses of all ranks add up to the mini-batch loss.
        agg_kw = {**global_counts(mini["response_mask"]), "loss_scale_factor": s.loss_scale_factor}
        mini = mini[torch.tensor(self.rows_of_rank(mini))]
        self._zero_grads()
        totals: dict[str, float] = defaultdict(float)

        def loss_of(micro: TensorDict, log_prob: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
            return policy_loss(s, micro, log_prob, entropy, agg_kw, metrics, totals)

        self._forward_backward(self.micro_batches(mini), loss_of)
        metrics["grad_norm"].append(self._step())
        for name, value in totals.items():
            metrics[name].append(value)


class Actor(TrainedModel, PolicyUpdate):
    """One process's actor (a shard of it, with a device mesh): old log-probs and the PPO-family update."""

    def __init__(self, model_path: str, device: str, settings: ActorSettings, optim: OptimSettings,
                 gradient_checkpointing: bool = False, mesh=None, fsdp: FsdpSettings | None = None):
        forward = model_forward(settings.sequences, mesh)
        model, compute = load_policy(model_path, device, fsdp, forward, mesh, gradient_checkpointing)
        super().__init__(model, compute, forward, device, optim, settings.batching, mesh)
        self.settings = settings

    @torch.no_grad()
    def log_probs(self, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        """Old log-probs and entropy of the sampled responses under the current weights (on the CPU)."""
        self.model.eval()
        s = self.settings
        rows = micro_batch_rows(batch, s.log_prob_micro_batch_size, s.log_prob_max_token_len, self.device,
                                s.sequences.shared_prefix)
        with self._compute():
            parts = [self.forward.log_probs(self.model, mb.to(self.device), self.settings.temperature, with_entropy=True)
                     for mb in split(batch, rows)]
        return in_row_order([p[0] for p in parts], rows).cpu(), in_row_order([p[1] for p in parts], rows).cpu()

    # --- PolicyUpdate's steps (TrainedModel has the others) ----------------------------------------------

    def _forward_backward(self, micros: list[TensorDict], loss_of) -> None:
        for micro in micros:
            with self._compute():
                log_prob, entropy = self.forward.log_probs(self.model, micro, self.settings.temperature,
                                                           with_entropy=needs_entropy(self.settings, micro))
            # FSDP averages gradients over every rank (a Ulysses group's too): the losses must add up
            (loss_of(micro, log_prob, entropy) * self.world_size).backward()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF parameter names and whole tensors, for weight sync (sharded: a collective over the ranks)."""
        for name, param in self.model.named_parameters():
            yield name, full_tensor(param.detach())


@dataclass(frozen=True)
class ActorSpec:
    """Everything to build the FSDP actor and, with `ref`, the reference policy in each worker (it pickles)."""

    model_path: str
    settings: ActorSettings
    optim: OptimSettings
    gradient_checkpointing: bool = False
    fsdp: FsdpSettings | None = None
    ref: ReferenceSettings | None = None

    def data_shard(self, rank: int, world_size: int) -> int:
        """The rows `rank` takes: consecutive ranks of a Ulysses group share them."""
        return rank // self.settings.sequences.ulysses_sp

    def in_workers(self, world_size: int) -> bool:
        """One device trains in the driver's process; several in worker processes."""
        return world_size > 1

    def build_in_process(self, device: str, mesh=None):
        """The actor and reference in this process: unsharded, or this rank's shards over `mesh`."""
        actor = Actor(self.model_path, device, self.settings, self.optim, self.gradient_checkpointing, mesh=mesh,
                      fsdp=self.fsdp)
        return actor, ReferencePolicy(self.model_path, device, self.ref, mesh=mesh) if self.ref is not None else None

    def build(self, device: str, world_size: int):
        """This rank's actor and reference shards over a mesh of every rank, and the mesh (a critic's too)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.split(":")[0], (world_size,))
        return *self.build_in_process(device, mesh), mesh
