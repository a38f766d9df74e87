"""The actor over N processes (FSDP2 or Megatron over a gloo/hccl/nccl group), with the single actor's interface,
so the driver's step loop does not change; beside it in the same processes, the reference policy's shards
(`reference`) and the rollout engines (`colocated.WorkerEngines`), as in verl's hybrid engine.

Log-probs: each rank computes a share of the rows, balanced by tokens. Update: every rank receives the whole
batch and takes its slice of each mini-batch (`PolicyUpdate._update_mini_batch`), so mini-batch membership,
shuffling and loss normalisation are those of one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tensordict import TensorDict

from ascend_rl.rollout.weight_sync import PushStats
from ascend_rl.workers.balance import balanced_partition
from ascend_rl.workers.critic import CriticSpec


class _ActorWorker:
    """Runs in each worker process: one shard of the actor (FSDP2 or Megatron), and of the reference policy and
    the critic when there are (colocated on the same device, as in verl's hybrid engine)."""

    def __init__(self, rank: int, world_size: int, device: str, spec, rollout, critic=None):
        from ascend_rl.platform import select_worker_device

        own_device = select_worker_device(device)  # e.g. npu:3, made current before the mesh is built
        self.actor, self.ref, mesh = spec.build(own_device, world_size)
        self.critic = critic.build(own_device, mesh) if critic is not None else None
        # A whole model for generation on the first worker of each replica, loaded from the shards at each sync.
        self.engine = rollout.engine_for(rank, spec.model_path, own_device) if rollout is not None else None
        self.rollout, self.device, self.rank = rollout, own_device, rank

    def log_probs(self, rows: TensorDict):
        return self.actor.log_probs(rows)

    def ref_log_probs(self, rows: TensorDict):
        return self.ref.log_probs(rows)

    def critic_call(self, method: str, *args):
        return getattr(self.critic, method)(*args)

    def critic_values(self, rows: TensorDict):
        return self.critic.values(rows)

    def generate(self, prompts, params, return_logprob: bool):
        if self.engine is None or not prompts:
            return []
        return self.engine.generate(prompts, params, return_logprob=return_logprob)

    def engine_call(self, method: str, *args):
        """An engine method where this worker holds one (close: where the engine has it)."""
        call = getattr(self.engine, method, None)
        return call(*args) if call is not None else None

    def sync_rollout_weights(self):
        """Every rank gathers each tensor from the shards (a collective, in lockstep); the replica's engine
        takes them on its worker's device. Nothing leaves the workers."""
        from ascend_rl.rollout.weight_sync import TensorPush

        whole = ((name, tensor.to(self.device)) for name, tensor in self.actor.named_weights())
        if self.engine is None:
            for _ in whole:  # take part in every gather
                pass
            return None
        return TensorPush(self.engine, self.rollout.bucket_megabytes)(whole)

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
    def __init__(self, make_group, device: str, spec, rollout=None, critic: CriticSpec | None = None):
        """make_group(factory, kwargs) starts the workers (`launch.worker_group_factory`); each builds its shard
        of the actor from `spec` (FSDP's `workers.actor.ActorSpec` or Megatron's `MegatronActorSpec`), and of the
        reference policy when the spec has one (`reference`); with `critic`, of the critic (`critic`); with
        `rollout` (a `rollout.colocated.WorkerRolloutSpec`), the first worker of each replica its engine
        (`colocated.WorkerEngines`)."""
        self.group = make_group("ascend_rl.distributed.actor_group:_ActorWorker",
                                dict(device=device, spec=spec, rollout=rollout, critic=critic))
        self.reference = _WorkerReference(self) if spec.ref is not None else None
        self.critic = _WorkerCritic(self) if critic is not None else None
        # each rank's data-parallel shard: the reference's and the critic's are the actor's (validated)
        self.data_shard = [spec.data_shard(rank, self.group.world_size) for rank in range(self.group.world_size)]

    def log_probs(self, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, entropy = self._by_rows("log_probs", batch)
        return log_probs, entropy

    def _by_rows(self, method: str, batch: TensorDict) -> list:
        """`method` on each data-parallel shard's share of the rows (balanced by tokens: the slowest rank sets the
        pace; the ranks of a Ulysses, tensor- or pipeline-parallel group share one); the results (each a tensor
        or a tuple of them) come back as whole columns in the batch's row order."""
        tokens = batch["attention_mask"].sum(-1).tolist()
        rows = balanced_partition(tokens, max(self.data_shard) + 1)
        shares = [(batch[torch.tensor(rows[shard])],) for shard in self.data_shard]
        answers = self.group.call(method, shares)
        parts = [answers[self.data_shard.index(shard)] for shard in range(len(rows))]  # one answer per shard
        order = torch.tensor([i for r in rows for i in r]).argsort()
        columns = zip(*parts) if isinstance(parts[0], tuple) else [parts]
        return [torch.cat(list(column))[order] for column in columns]

    def update(self, batch: TensorDict) -> dict[str, float]:
        return self.group.call_all("update", batch)[0]  # metrics are already reduced over the ranks

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.group.call_all("named_weights")[0]

    def sync_rollout_weights(self) -> PushStats:
        return self.group.call_all("sync_rollout_weights")[0]

    def save(self, path: Path) -> None:
        self.group.call_all("save", path)

    def state_dict(self) -> dict:
        return self.group.call_all("state_dict")[0]

    def load_state(self, path: Path, state: dict) -> None:
        self.group.call_all("load_state", path, state)

    def close(self) -> None:
        self.group.close()


class _WorkerReference:
    """The reference policy's interface over the shards the actor's workers hold."""

    def __init__(self, actors: ActorGroup):
        self.actors = actors

    def log_probs(self, batch: TensorDict) -> torch.Tensor:
        (log_probs,) = self.actors._by_rows("ref_log_probs", batch)
        return log_probs


class _WorkerCritic:
    """The critic's interface over the shards the actor's workers hold."""

    def __init__(self, actors: ActorGroup):
        self.group = actors.group
        self.actors = actors

    def values(self, batch: TensorDict) -> torch.Tensor:
        (values,) = self.actors._by_rows("critic_values", batch)
        return values

    def update(self, batch: TensorDict) -> dict[str, float]:
        return self.group.call_all("critic_call", "update", batch)[0]  # reduced over the ranks already

    def save(self, path: Path) -> None:
        self.group.call_all("critic_call", "save", path)

    def state_dict(self) -> dict:
        return self.group.call_all("critic_call", "state_dict")[0]

    def load_state(self, path: Path, state: dict) -> None:
        self.group.call_all("critic_call", "load_state", path, state)
