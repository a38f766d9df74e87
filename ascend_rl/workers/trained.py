"""What the actor and the critic share: a model being trained with its optimizer and LR schedule, FSDP2-sharded
over a device mesh when given; the PPO mini-batch loop (epochs, seeded shuffle, each rank's rows of a
mini-batch); clipped optimizer steps; and sharded checkpoints any number of ranks can resume from."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
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

from ascend_rl.workers.balance import (
    balanced_partition,
    balanced_unit_partition,
    contiguous_partition,
    prompt_units,
    token_budget_groups,
)
from ascend_rl.workers.fsdp import FsdpSettings, place_for_compute, reduce_over_ranks
from ascend_rl.workers.model_io import ModelForward
from ascend_rl.workers.optimizer import OptimSettings, build_optimizer, build_scheduler
from ascend_rl.workers.packing import SequenceSettings, prompt_groups

DCP_DIR = "dcp"  # inside a checkpoint's actor/ (or critic/) directory


@dataclass(frozen=True)
class Batching:
    """How an update walks a batch (`ppo_mini_batch_size` in samples, as the trainer passes it)."""

    ppo_mini_batch_size: int
    ppo_micro_batch_size_per_gpu: int | None
    ppo_epochs: int = 1
    shuffle: bool = False
    data_loader_seed: int = 42
    balance_batch: bool = True  # several ranks: even token counts per rank (trainer.balance_batch)
    ppo_max_token_len_per_gpu: int | None = None  # use_dynamic_bsz: micro-batches by tokens instead of rows
    shared_prefix: bool = False  # rows with the same prompt stay together (in a rank's share, a token budget's)


def load_model(path: str, device: str, gradient_checkpointing: bool = False, dtype: torch.dtype = torch.float32,
               auto_class: str = "AutoModelForCausalLM", attn_implementation: str | None = None, **config_overrides):
    import transformers

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if config_overrides:  # set on the config: not every model class takes them as keyword arguments
        config = transformers.AutoConfig.from_pretrained(path)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        extra["config"] = config
    model = getattr(transformers, auto_class).from_pretrained(path, dtype=dtype, **extra).to(device)
    if gradient_checkpointing:  # renamed in transformers 5
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def place(model, device: str, fsdp: FsdpSettings | None, mesh=None):
    """The model sharded over `mesh` when given, and the context its forwards run in."""
    return place_for_compute(model, mesh, fsdp or FsdpSettings(), torch.device(device).type)


@functools.cache
def ulysses_group(size: int):
    """This rank's group of `size` consecutive ranks for Ulysses attention (None for 1). Creating groups is a
    collective: every rank creates all of them, once, when the first model asks (the actor, the reference and
    the critic share them)."""
    if size == 1:
        return None
    group, _ = dist.new_subgroups(group_size=size)
    return group


def model_forward(sequences: SequenceSettings, mesh=None) -> ModelForward:
    """How a model on `mesh` runs micro-batches: padded or packed, split over its Ulysses group."""
    return ModelForward(sequences, ulysses_group(sequences.ulysses_sp) if mesh is not None else None)


def micro_batch_rows(batch: TensorDict, size: int | None, budget: int | None, device=None,
                     shared_prefix: bool = False) -> list[list[int]]:
    """The rows of each micro-batch: `size` rows at a time (None: all at once), or with `budget`, at most that
    many tokens each (verl's use_dynamic_bsz; with `shared_prefix`, rows of a prompt together, counted as packed).
    Under a process group every rank calls this at once and they agree on the count (FSDP needs the same number
    of passes on every rank; `device`: where the group's collectives run). Losses normalise by the mini-batch's
    counts, so any split gives the same update."""
    n = batch.batch_size[0]
    if budget is None:
        step = size or max(n, 1)
        return [list(range(start, min(start + step, n))) for start in range(0, n, step)]
    units, weights = _units(batch, shared_prefix, budget)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        groups = token_budget_groups(weights, budget)
    else:
        count = min(_agreed(len(token_budget_groups(weights, budget)), dist.ReduceOp.MAX, device),
                    _agreed(len(units), dist.ReduceOp.MIN, device))  # no rank may run out of rows
        groups = token_budget_groups(weights, budget, groups=count)
    return [sorted(row for unit in group for row in units[unit]) for group in groups]


def _units(batch: TensorDict, shared_prefix: bool, budget: int | None = None) -> tuple[list[list[int]], list[int]]:
    """What micro-batches and ranks are made of: rows, or with `shared_prefix` the rows of each prompt (see
    balance.prompt_units), and their token counts."""
    mask = batch["attention_mask"]
    tokens = mask.sum(-1).tolist()
    if not shared_prefix:
        return [[i] for i in range(len(tokens))], tokens
    response_length = batch["responses"].shape[1]
    group = prompt_groups(batch["input_ids"], mask, response_length).tolist()
    return prompt_units(group, mask[:, :-response_length].sum(-1).tolist(), tokens, budget)


def split(batch: TensorDict, rows: list[list[int]]) -> list[TensorDict]:
    return [batch[torch.tensor(r)] for r in rows]


def in_row_order(outputs: list[torch.Tensor], rows: list[list[int]]) -> torch.Tensor:
    """Per-row outputs of the micro-batches, back in the batch's row order."""
    return torch.cat(outputs)[torch.tensor([i for r in rows for i in r]).argsort()]


def _agreed(value: int, op, device) -> int:
    t = torch.tensor([value], dtype=torch.long, device=device if dist.get_backend() != "gloo" else "cpu")
    dist.all_reduce(t, op=op)
    return int(t.item())


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns when it runs without a process group; one process is how the single-device path runs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def reduced_metrics(metrics: dict[str, list[float]], section: str, summed: tuple[str, ...], dp_size: int,
                    lr: float) -> dict[str, float]:
    """Per-mini-batch metrics as one number each over every rank: a "_max" metric is a maximum, the others
    means; the `summed` losses are each data-parallel rank's share of the mini-batch loss, so they add up (the
    ranks of a Ulysses or tensor-parallel group each hold their group's)."""
    local = {(k if "/" in k else f"{section}/{k}"): max(v) if k.endswith("_max") else sum(v) / len(v)
             for k, v in metrics.items()}
    out = reduce_over_ranks(local, maxed=frozenset(k for k in local if k.endswith("_max")))
    for name in summed:
        if f"{section}/{name}" in out:
            out[f"{section}/{name}"] *= dp_size
    out[f"{section}/lr"] = lr
    return out


class MiniBatchWalk:
    """How an update walks a batch: epochs of mini-batches, each rank's rows of one, its micro-batches. Needs
    `batching`, `dp_rank`, `dp_size` and `device` (any training engine: FSDP here, Megatron's)."""

    batching: Batching
    dp_rank: int
    dp_size: int
    device: torch.device

    def mini_batches(self, batch: TensorDict) -> Iterator[TensorDict]:
        """`ppo_epochs` passes over the batch in mini-batches (a seeded shuffle per epoch when asked)."""
        b = self.batching
        for epoch in range(b.ppo_epochs):
            order = torch.arange(batch.batch_size[0])
            if b.shuffle:
                order = torch.randperm(len(order), generator=torch.Generator().manual_seed(b.data_loader_seed + epoch))
            yield from batch[order].split(b.ppo_mini_batch_size)

    def rows_of_rank(self, batch: TensorDict) -> list[int]:
        """This rank's rows of a batch every rank holds (the order of rows does not change the update). Shared
        prefixes keep a prompt's rows on one rank when the prompts' rows divide evenly (verl asks the same)."""
        b = self.batching
        if b.balance_batch and self.dp_size > 1:
            parts = balanced_unit_partition(*_units(batch, True), self.dp_size) if b.shared_prefix else None
            return (parts or balanced_partition(batch["attention_mask"].sum(-1).tolist(), self.dp_size))[self.dp_rank]
        return contiguous_partition(batch.batch_size[0], self.dp_size)[self.dp_rank]

    def micro_batches(self, rows: TensorDict) -> list[TensorDict]:
        """This rank's rows of a mini-batch in micro-batches (by rows, or by tokens with use_dynamic_bsz)."""
        b = self.batching
        if b.ppo_max_token_len_per_gpu is None:  # fixed sizes: views of the rows, no copies
            size = b.ppo_micro_batch_size_per_gpu
            return list(rows.split(size)) if size else [rows]
        return split(rows, micro_batch_rows(rows, None, b.ppo_max_token_len_per_gpu, self.device, b.shared_prefix))


class ModelUpdate(MiniBatchWalk):
    """An update call, whichever model and engine: `ppo_epochs` passes over mini-batches (`_update_mini_batch`
    each, one optimizer step), one LR step, the metrics reduced over the ranks in `SECTION` (`SUMMED`: each
    rank's share of a mini-batch loss, which add up). The engine supplies `_lr_step` and, where not every rank
    computes the losses, `_replica_metrics`."""

    SECTION: str
    SUMMED: tuple[str, ...]

    def update(self, batch: TensorDict) -> dict[str, float]:
        self.model.train()
        metrics: dict[str, list[float]] = defaultdict(list)
        for mini in self.mini_batches(batch.to(self.device)):
            self._update_mini_batch(mini, metrics)
        self._lr_step()
        return reduced_metrics(self._replica_metrics(metrics), self.SECTION, self.SUMMED, self.dp_size,
                               self.optimizer.param_groups[0]["lr"])

    def _replica_metrics(self, metrics: dict[str, list[float]]) -> dict[str, list[float]]:
        """The metrics as the ranks that computed the losses hold them (every rank, unless pipelined)."""
        return metrics


class TrainedModel(MiniBatchWalk):
    """A model, its optimizer and schedule. With a device mesh every rank takes its slice of each mini-batch;
    losses are normalised by the whole mini-batch's counts, so N ranks make the update one process would."""

    def __init__(self, model, compute, forward: ModelForward, device: str, optim: OptimSettings, batching: Batching,
                 mesh=None):
        self.model, self._compute, self.forward = model, compute, forward
        self.device = torch.device(device)
        self.batching = batching
        self.rank, self.world_size = (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)
        self.sharded = mesh is not None  # FSDP2's DTensors, even on one rank
        # The ranks of a Ulysses group share their rows; data parallelism is over the groups.
        sp = dist.get_world_size(forward.sp_group) if forward.sp_group is not None else 1
        self.dp_rank, self.dp_size = self.rank // sp, self.world_size // sp
        self.optimizer = build_optimizer(self.model.parameters(), optim)
        self.scheduler = build_scheduler(self.optimizer, optim)

    # --- the update steps the actor's and the critic's update loops ask of their engine (settings.grad_clip)

    def _zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self) -> float:
        """Clip and step; a non-finite gradient would poison the weights: that mini-batch's step is skipped."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.item()

    def _lr_step(self) -> None:
        self.scheduler.step()

    def save(self, path: Path) -> None:
        """`path`: an HF model directory (rank 0 writes the weights gathered from every rank) and `path/dcp`, the
        model and optimizer as torch.distributed.checkpoint shards (every rank writes its own, nothing is
        gathered), which any number of ranks can resume from."""
        import torch.distributed.checkpoint as dcp

        state = None
        if self.sharded:  # DTensors: gather them (safetensors cannot write a DTensor's local storage)
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
