"""The actor over N processes (FSDP2 over a gloo/hccl/nccl group), with the single actor's interface, so the
driver's step loop does not change.

Log-probs: each rank computes a contiguous slice of the rows. Update: every rank receives the whole batch
and takes its slice of each mini-batch (`Actor._update_mini_batch`), so mini-batch membership, shuffling and
loss normalisation are those of one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tensordict import TensorDict

from ascend_rl.distributed.balance import balanced_partition
from ascend_rl.distributed.fsdp import FsdpSettings


class _ActorWorker:
    """Runs in each worker process: one FSDP2 shard of the actor."""

    def __init__(self, rank: int, world_size: int, model_path: str, device: str, settings, optim,
                 gradient_checkpointing: bool, fsdp):
        from torch.distributed.device_mesh import init_device_mesh

        from ascend_rl.platform import select_worker_device
        from ascend_rl.workers.actor import Actor

        own_device = select_worker_device(device)  # e.g. npu:3, made current before the mesh is built
        mesh = init_device_mesh(device, (world_size,))
        self.actor = Actor(model_path, own_device, settings, optim, gradient_checkpointing, mesh=mesh, fsdp=fsdp)
        self.rank = rank

    def log_probs(self, rows: TensorDict):
        return self.actor.log_probs(rows)

    def update(self, batch: TensorDict) -> dict[str, float]:
        return self.actor.update(batch)

    def named_weights(self):
        named = [(n, t.cpu()) for n, t in self.actor.named_weights()]  # every rank takes part in the gather
        return named if self.rank == 0 else None

    def save(self, path: Path) -> None:
        self.actor.save(path)

    def state_dict(self):
        return self.actor.state_dict()

    def load_state(self, path: Path, state: dict) -> None:
        self.actor.load_state(path, state)


class ActorGroup:
    def __init__(self, make_group, model_path: str, device: str, settings, optim, gradient_checkpointing: bool = False,
                 fsdp: FsdpSettings | None = None):
        """make_group(factory, kwargs) starts the workers (`launch.worker_group_factory`)."""
        self.group = make_group("ascend_rl.distributed.actor_group:_ActorWorker",
                                dict(model_path=model_path, device=device, settings=settings, optim=optim,
                                     gradient_checkpointing=gradient_checkpointing, fsdp=fsdp))

    def log_probs(self, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["attention_mask"].sum(-1).tolist()
        rows = balanced_partition(tokens, self.group.world_size)  # the slowest rank sets the pace
        parts = self.group.call("log_probs", [(batch[torch.tensor(r)],) for r in rows])
        order = torch.tensor([i for r in rows for i in r]).argsort()  # back to the batch's row order
        return torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order]

    def update(self, batch: TensorDict) -> dict[str, float]:
        return self.group.call_all("update", batch)[0]  # metrics are already reduced over the ranks

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.group.call_all("named_weights")[0]

    def save(self, path: Path) -> None:
        self.group.call_all("save", path)

    def state_dict(self) -> dict:
        return self.group.call_all("state_dict")[0]

    def load_state(self, path: Path, state: dict) -> None:
        self.group.call_all("load_state", path, state)

    def close(self) -> None:
        self.group.close()
