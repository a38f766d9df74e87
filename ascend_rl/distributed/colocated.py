"""Engines inside the actor's workers (verl's hybrid engine), for several devices and an in-process engine:
each rollout replica's engine lives in its first worker (a native engine on every worker; an sglang.Engine on
every TP-th one, its scheduler processes on the replica's devices), and a weight sync loads it from the
workers' own shards, without the driver."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from omegaconf import DictConfig

from ascend_rl.config.layout import compute_layout
from ascend_rl.distributed.launch import uses_ray
from ascend_rl.errors import UserError
from ascend_rl.platform import get_platform, worker_env
from ascend_rl.rollout.factory import Rollout, bucket_megabytes, native_engine_kwargs
from ascend_rl.rollout.protocol import GenerateOutput, per_prompt
from ascend_rl.rollout.sglang.fields import current_fields
from ascend_rl.rollout.sglang.server_args import plan_server_args
from ascend_rl.rollout.weight_sync import PushStats
from ascend_rl.workers.balance import contiguous_partition


class WorkerEngines:
    """The engines in the actor's workers (one per replica) as one engine of the rollout protocol: each
    replica generates a contiguous share of the prompts (a prompt's n samples stay together, sharing a
    prefill); outputs come back in the protocol's order. Sampling noise depends only on each sample's seed, so
    native engines give the outputs one engine with the same weights gives."""

    def __init__(self, group, spec):
        self.group = group
        self.leaders = [rank for rank in range(group.world_size) if spec.leads(rank)]

    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params, return_logprob: bool = False,
                 ) -> list[GenerateOutput]:
        params = per_prompt(sampling_params, len(input_ids))
        shares = dict(zip(self.leaders, contiguous_partition(len(input_ids), len(self.leaders))))
        parts = self.group.call("generate", [([list(input_ids[i]) for i in shares.get(rank, [])],
                                              [params[i] for i in shares.get(rank, [])], return_logprob)
                                             for rank in range(self.group.world_size)])
        return [out for part in parts for out in part]

    def release_memory_occupation(self, tags=None) -> None:
        self.group.call_all("engine_call", "release_memory_occupation", tags)

    def resume_memory_occupation(self, tags=None) -> None:
        self.group.call_all("engine_call", "resume_memory_occupation", tags)

    def flush_cache(self) -> None:
        self.group.call_all("engine_call", "flush_cache")

    def close(self) -> None:
        """SGLang engines stop their scheduler processes; native ones have nothing to stop."""
        self.group.call_all("engine_call", "close")


def colocated(cfg: DictConfig) -> bool:
    """Several devices and an in-process engine: the engines live in the actor's workers (verl's hybrid
    engine), each replica's on its first worker, and syncs load them from the workers' own shards."""
    ro, t = cfg.actor_rollout_ref.rollout, cfg.trainer
    return t.nnodes * t.n_gpus_per_node > 1 and ro.launch.mode == "engine" and not ro.launch.url


@dataclass(frozen=True)
class WorkerRolloutSpec:
    """What the actor's workers build for a colocated rollout (it travels to them, so plain data)."""

    name: str  # native | sglang
    devices_per_replica: int  # the first worker of each replica holds its engine
    bucket_megabytes: int  # weight sync from the shards into the engine
    native: dict = field(default_factory=dict)  # NativeEngine.from_pretrained settings
    sglang: tuple[dict, ...] = ()  # ServerArgs kwargs per replica
    env: dict = field(default_factory=dict)  # the SGLang plan's environment

    def leads(self, rank: int) -> bool:
        return rank % self.devices_per_replica == 0

    def engine_for(self, rank: int, model_path: str, device: str):
        """In worker `rank`: its replica's engine, or None where another worker of the replica holds it."""
        if not self.leads(rank):
            return None
        if self.name == "native":
            from ascend_rl.rollout.native import NativeEngine

            return NativeEngine.from_pretrained(model_path, device, **self.native)
        from ascend_rl.rollout.sglang.engine import SGLangEngine

        os.environ.update(self.env)  # SGLang's scheduler processes inherit this worker's environment
        return SGLangEngine(self.sglang[rank // self.devices_per_replica])


def worker_rollout_spec(cfg: DictConfig, device: str) -> WorkerRolloutSpec:
    ro = cfg.actor_rollout_ref.rollout
    if ro.name == "native":  # one engine per device: it has no tensor parallelism
        return WorkerRolloutSpec("native", 1, 0, native=native_engine_kwargs(cfg, device))
    layout = compute_layout(cfg, device).rollout
    if layout.devices_per_replica > cfg.trainer.n_gpus_per_node:
        raise UserError(f"a rollout replica of {layout.devices_per_replica} devices spans nodes: engines inside the "
                        f"workers need replicas within a node for now; use "
                        f"actor_rollout_ref.rollout.launch.mode=server")
    environ = {**os.environ, **worker_env(device, os.environ)[0]}  # what the workers will see
    noset = get_platform(device).noset_visible_devices_var
    if noset and not uses_ray(cfg):  # worker processes on one node all see every device
        environ[noset] = "1"
    if noset and layout.devices_per_replica > 1 and environ.get(noset) != "1":
        raise UserError(f"SGLang replicas of {layout.devices_per_replica} devices inside Ray workers need every worker "
                        f"to see its node's devices: set {noset}=1")
    plans = [plan_server_args(cfg, layout, device, current_fields(), environ, replica=r)
             for r in range(layout.replicas)]
    errors = [e for plan in plans for e in plan.errors]
    if errors:
        raise UserError(errors)
    return WorkerRolloutSpec("sglang", layout.devices_per_replica, bucket_megabytes(cfg),
                             sglang=tuple(plan.kwargs for plan in plans), env=plans[0].env)


@dataclass
class ColocatedRollout(Rollout):
    """The engines live in the actor's workers; a sync loads each from its workers' own shards."""

    def sync_from(self, actor) -> PushStats:
        return actor.sync_rollout_weights()


def colocated_rollout(actors, spec: WorkerRolloutSpec) -> Rollout:
    engines = WorkerEngines(actors.group, spec)
    where = f"the first of every {spec.devices_per_replica} " if spec.devices_per_replica > 1 else ""
    return ColocatedRollout(engines, None, f"{len(engines.leaders)} {spec.name} engine(s) in {where}actor workers "
                                           f"(colocated)")
