"""The worker group on Ray: `trainer.nnodes × trainer.n_gpus_per_node` workers, one STRICT_PACK placement
group per node, one torch.distributed group over all of them. Same interface as `ProcessWorkerGroup`.

Used when the run spans nodes or attaches to a cluster (`trainer.ray_address`, `RAY_ADDRESS`); `ray.init`
gets `ray_kwargs.ray_init.*`. Workers get the platform's variables (e.g. HCCL port ranges on NPU) in their
runtime environment when the driver's environment does not set them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from ascend_rl.distributed.worker_group import WorkerDied, WorkerGroup, build_worker_object
from ascend_rl.errors import UserError


class _RayWorker:
    """One worker process: joins the group, builds its object, answers calls."""

    def __init__(self, rank: int, world_size: int, local_rank: int, threads: int):
        import torch

        from ascend_rl.platform import follow_deterministic_mode

        torch.set_num_threads(threads)
        follow_deterministic_mode(os.environ)  # trainer.deterministic, through the runtime environment
        self.rank, self.world_size, self.local_rank, self.obj = rank, world_size, local_rank, None

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        from ascend_rl.rollout.server_process import free_port

        return ray.util.get_node_ip_address(), free_port("0.0.0.0")

    def setup(self, address: str, port: int, backend: str, factory: str, kwargs: dict, imports: tuple) -> str:
        import ray
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank))
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world_size)
        self.obj = build_worker_object(factory, self.rank, self.world_size, kwargs, imports)
        return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"

    def call(self, method: str, *args):
        return getattr(self.obj, method)(*args)


def _device_request(resource: str | None) -> dict:
    """Ray takes GPUs as num_gpus and other accelerators (NPU) as custom resources."""
    if resource is None:
        return {}
    return {"num_gpus": 1} if resource == "GPU" else {"resources": {resource: 1}}


class RayWorkerGroup(WorkerGroup):
    def __init__(self, nnodes: int, per_node: int, factory: str, kwargs: dict, backend: str,
                 resource: str | None, address: str | None = None, ray_init: dict | None = None,
                 env: dict[str, str] | None = None, timeout_s: float = 300, imports: Sequence[str] = ()):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                     **{k: v for k, v in (ray_init or {}).items() if v is not None})
        bundle = {"CPU": 1, **({resource: 1} if resource else {})}
        self.groups = [placement_group([bundle] * per_node, strategy="STRICT_PACK") for _ in range(nnodes)]
        _, not_ready = ray.wait([g.ready() for g in self.groups], num_returns=nnodes, timeout=timeout_s)
        if not_ready:
            have = ray.cluster_resources()
            self.close()
            raise UserError(f"Ray could not place {nnodes} node(s) × {per_node} worker(s) of {bundle} within "
                            f"{timeout_s:.0f} s; the cluster has {dict(sorted(have.items()))} (are all nodes "
                            f"joined? `ray status`)")
        worker = ray.remote(_RayWorker)
        world = nnodes * per_node
        threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // world)
        self.workers = [
            worker.options(num_cpus=1, **_device_request(resource),
                           runtime_env={"env_vars": env or {}},
                           scheduling_strategy=PlacementGroupSchedulingStrategy(self.groups[r // per_node],
                                                                                placement_group_bundle_index=r % per_node))
            .remote(r, world, r % per_node, threads)
            for r in range(world)]
        self.nodes = ["?"] * world
        addr, port = self._get([self.workers[0].rendezvous_address.remote()], "start-up")[0]
        self.nodes = self._get([w.setup.remote(addr, port, backend, factory, kwargs, tuple(imports)) for w in self.workers], "start-up")

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def call(self, method: str, args_per_rank: Sequence[tuple]) -> list:
        return self._get([w.call.remote(method, *args) for w, args in zip(self.workers, args_per_rank)], method)

    def _get(self, refs: list, what: str, grace_s: float = 3.0) -> list:
        """Results in rank order. A dead worker is reported as such, also when its peers fail first (they see
        its death as a collective error): after the first error, the others get `grace_s` to show theirs."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending, errors, deadline = list(refs), {}, None
        while pending and (deadline is None or time.monotonic() < deadline):
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                rank = refs.index(ref)
                try:
                    ray.get(ref)
                except RayActorError:
                    self.close()
                    raise WorkerDied(f"worker {rank} (node {self.nodes[rank]}) died during {what}") from None
                except RayTaskError as err:
                    errors[rank] = err
                    deadline = deadline or time.monotonic() + grace_s
        if errors:
            rank, err = min(errors.items())
            self.close()
            raise RuntimeError(f"worker {rank} (node {self.nodes[rank]}) failed during {what}:\n{err}")
        return ray.get(refs)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for worker in getattr(self, "workers", []):
            ray.kill(worker)
        for group in self.groups:
            remove_placement_group(group)
        self.workers, self.groups = [], []
