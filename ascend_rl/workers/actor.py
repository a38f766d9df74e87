"""The actor (policy being trained) and the reference policy: a model, its optimizer and schedule,
log-probs, and the PPO-family update over mini- and micro-batches."""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ascend_rl.algorithms import agg_loss, compute_policy_loss, global_counts, kl_penalty
from ascend_rl.distributed.balance import balanced_partition, contiguous_partition
from ascend_rl.distributed.fsdp import FsdpSettings, full_tensor, place_for_compute, reduce_over_ranks
from ascend_rl.workers.model_io import logprob_metrics, response_log_probs
from ascend_rl.workers.optimizer import OptimSettings, build_optimizer, build_scheduler


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
    loss_scale_factor: float | None = None  # seq-mean-token-sum-norm's divisor (None: the response length)
    policy_loss_kwargs: dict = field(default_factory=dict, hash=False)  # algorithms.policy_loss_kwargs(config)


DCP_DIR = "dcp"  # inside a checkpoint's actor/ directory


def load_policy(path: str, device: str, fsdp: FsdpSettings | None, mesh=None, gradient_checkpointing: bool = False):
    """The model in `fsdp.model_dtype`, sharded over `mesh` when given, and the context its forwards run in."""
    fsdp = fsdp or FsdpSettings()
    model = load_model(path, device, gradient_checkpointing, fsdp.model_dtype)
    return model, place_for_compute(model, mesh, fsdp, torch.device(device).type)


def load_model(path: str, device: str, gradient_checkpointing: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if gradient_checkpointing:  # renamed in transformers 5
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns when it runs without a process group; one process is how the single-device path runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _micro_batches(batch: TensorDict, size: int | None) -> list[TensorDict]:
    return list(batch.split(size)) if size else [batch]


@dataclass(frozen=True)
class ReferenceSettings:
    """What the reference policy needs (`actor_rollout_ref.ref.*`)."""

    temperature: float = 1.0
    micro_batch_size: int | None = None
    fsdp: FsdpSettings | None = None


class ReferencePolicy:
    """A frozen copy of the initial policy, for the KL term; FSDP2-sharded like the actor when given a mesh."""

    def __init__(self, model_path: str, device: str, settings: ReferenceSettings, mesh=None):
        self.model, self._compute = load_policy(model_path, device, settings.fsdp, mesh)
        self.model.eval().requires_grad_(False)
        self.device, self.settings = torch.device(device), settings

    @torch.no_grad()
    def log_probs(self, batch: TensorDict) -> torch.Tensor:
        with self._compute():
            return torch.cat([response_log_probs(self.model, mb.to(self.device), self.settings.temperature)[0]
                              for mb in _micro_batches(batch, self.settings.micro_batch_size)]).cpu()


class Actor:
    """One process's actor. With a device mesh, the model is FSDP2-sharded over it and every rank takes
    its slice of each mini-batch; losses are normalised by the whole mini-batch's counts, so N ranks make the
    update one process would."""

    def __init__(self, model_path: str, device: str, settings: ActorSettings, optim: OptimSettings,
                 gradient_checkpointing: bool = False, mesh=None, fsdp: FsdpSettings | None = None):
        self.settings = settings
        self.device = torch.device(device)
        self.model, self._compute = load_policy(model_path, device, fsdp, mesh, gradient_checkpointing)
        self.rank, self.world_size = (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)
        self.optimizer = build_optimizer(self.model.parameters(), optim)
        self.scheduler = build_scheduler(self.optimizer, optim)

    @torch.no_grad()
    def log_probs(self, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        """Old log-probs and entropy of the sampled responses under the current weights (on the CPU)."""
        self.model.eval()
        with self._compute():
            parts = [response_log_probs(self.model, mb.to(self.device), self.settings.temperature, with_entropy=True)
                     for mb in _micro_batches(batch, self.settings.log_prob_micro_batch_size)]
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def update(self, batch: TensorDict) -> dict[str, float]:
        """`ppo_epochs` passes over mini-batches; one optimizer step per mini-batch; one LR step per call."""
        s = self.settings
        self.model.train()
        batch = batch.to(self.device)
        metrics: dict[str, list[float]] = defaultdict(list)
        for epoch in range(s.ppo_epochs):
            order = torch.arange(batch.batch_size[0])
            if s.shuffle:
                order = torch.randperm(len(order), generator=torch.Generator().manual_seed(s.data_loader_seed + epoch))
            for mini in batch[order].split(s.ppo_mini_batch_size):
                self._update_mini_batch(mini, metrics)
        self.scheduler.step()
        # Keys without a section are the actor's; a "_max" metric is a maximum, the others means.
        local = {(k if "/" in k else f"actor/{k}"): max(v) if k.endswith("_max") else sum(v) / len(v)
                 for k, v in metrics.items()}
        out = reduce_over_ranks(local, maxed=frozenset(k for k in local if k.endswith("_max")))
        for summed in ("actor/pg_loss", "actor/kl_loss"):  # each rank holds its share of the mini-batch loss
            if summed in out:
                out[summed] *= self.world_size
        out["actor/lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def rows_of_rank(self, batch: TensorDict) -> list[int]:
        """This rank's rows of a batch every rank holds (the order of rows does not change the update)."""
        if self.settings.balance_batch and self.world_size > 1:
            tokens = batch["attention_mask"].sum(-1).tolist()
            return balanced_partition(tokens, self.world_size)[self.rank]
        return contiguous_partition(batch.batch_size[0], self.world_size)[self.rank]

    def _update_mini_batch(self, mini: TensorDict, metrics: dict[str, list[float]]) -> None:
        s = self.settings
        mode = s.loss_agg_mode
        # The whole mini-batch's counts make the micro-batch losses of all ranks add up to the mini-batch loss.
        agg_kw = {**global_counts(mini["response_mask"]), "loss_scale_factor": s.loss_scale_factor}
        mini = mini[torch.tensor(self.rows_of_rank(mini))]
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = defaultdict(float)
        # Without old log-probs the step is on-policy (one mini-batch, one epoch): they equal this forward's.
        on_policy = "old_log_probs" not in mini
        for micro in _micro_batches(mini, s.ppo_micro_batch_size_per_gpu):
            mask = micro["response_mask"]
            with self._compute():
                log_prob, entropy = response_log_probs(self.model, micro, s.temperature,
                                                       with_entropy=s.entropy_coeff != 0 or on_policy)
            old_log_prob = log_prob.detach() if on_policy else micro["old_log_probs"]
            if on_policy:  # this forward stands in for the old-log-prob pass, and so do its metrics
                for name, value in logprob_metrics(log_prob.detach(), entropy.detach(), micro["rollout_log_probs"],
                                                   mask).items():
                    metrics[name].append(value)
            pg_loss, pg_metrics = compute_policy_loss(
                s.loss_mode, old_log_prob=old_log_prob, log_prob=log_prob, advantages=micro["advantages"],
                response_mask=mask, loss_agg_mode=mode, clip_ratio_low=s.clip_ratio_low,
                clip_ratio_high=s.clip_ratio_high, clip_ratio_c=s.clip_ratio_c, **s.policy_loss_kwargs, **agg_kw)
            loss = pg_loss
            if s.entropy_coeff != 0:
                loss = loss - s.entropy_coeff * agg_loss(entropy, mask, mode, **agg_kw)
            if s.use_kl_loss:
                kl = agg_loss(kl_penalty(log_prob, micro["ref_log_prob"], s.kl_loss_type), mask, mode, **agg_kw)
                loss = loss + s.kl_loss_coef * kl
                totals["kl_loss"] += kl.item()
            (loss * self.world_size).backward()  # FSDP averages gradients over the ranks; we want their sum
            totals["pg_loss"] += pg_loss.item()
            for name, value in pg_metrics.items():
                metrics[name].append(value.item())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:  # a non-finite gradient would poison the weights: skip this mini-batch's step
            self.optimizer.zero_grad(set_to_none=True)
        metrics["grad_norm"].append(grad_norm.item())
        for name, value in totals.items():
            metrics[name].append(value)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF parameter names and whole tensors, for weight sync (sharded: a collective over the ranks)."""
        for name, param in self.model.named_parameters():
            yield name, full_tensor(param.detach())

    def save(self, path: Path) -> None:
        """`path`: an HF model directory (rank 0 writes the weights gathered from every rank) and `path/dcp`, the
        model and optimizer as torch.distributed.checkpoint shards (every rank writes its own, nothing is
        gathered), which any number of ranks can resume from."""
        import torch.distributed.checkpoint as dcp

        state = None
        if self.world_size > 1:
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            self.model.save_pretrained(path, state_dict=state, safe_serialization=True)
        with _one_process_is_intended():
            dcp.save(self._sharded_state(), checkpoint_id=path / DCP_DIR, no_dist=not dist.is_initialized())

    def state_dict(self) -> dict:
        """What the trainer keeps beside the shards (the same on every rank)."""
        return {"scheduler": self.scheduler.state_dict()}

    def load_state(self, path: Path, state: dict) -> None:
        """Resume from `save`'s shards, whatever the number of ranks that wrote them (DCP reshards on load)."""
        import torch.distributed.checkpoint as dcp

        sharded = self._sharded_state()  # trainer/checkpoint.load_state checked the shards are there
        with _one_process_is_intended():
            dcp.load(sharded, checkpoint_id=path / DCP_DIR, no_dist=not dist.is_initialized())
        set_model_state_dict(self.model, sharded["model"])
        set_optimizer_state_dict(self.model, self.optimizer, sharded["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _sharded_state(self) -> dict:
        """Model and optimizer state keyed by parameter name; under FSDP each rank holds its shards (DTensors)."""
        return {"model": get_model_state_dict(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
