"""Which worker group a config gets: worker processes on this machine, or Ray workers placed on the cluster
(several nodes, or `trainer.ray_address` / `RAY_ADDRESS` given)."""

from __future__ import annotations

import os
import sys
from functools import partial

from omegaconf import DictConfig, OmegaConf

from ascend_rl.distributed.worker_group import ProcessWorkerGroup
from ascend_rl.platform import get_platform, worker_env


def uses_ray(cfg: DictConfig) -> bool:
    return cfg.trainer.nnodes > 1 or bool(cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS"))


def worker_group_factory(cfg: DictConfig, device: str):
    """A callable (factory, kwargs) → worker group for `trainer.nnodes × trainer.n_gpus_per_node` workers."""
    t, platform = cfg.trainer, get_platform(device)
    external = cfg.actor_rollout_ref.model.external_lib
    imports = (external,) if external else ()
    if not uses_ray(cfg):
        return partial(ProcessWorkerGroup, t.n_gpus_per_node, backend=platform.process_group_backend,
                       imports=imports)
    from ascend_rl.distributed.ray_group import RayWorkerGroup

    env, defaulted = worker_env(device, os.environ, deterministic=bool(t.deterministic))
    if defaulted:
        print(f"ascend-rl: workers get {' '.join(defaulted)} (not set in this environment)", file=sys.stderr)
    return partial(RayWorkerGroup, t.nnodes, t.n_gpus_per_node, backend=platform.process_group_backend,
                   resource=platform.ray_resource, address=t.ray_address,
                   ray_init=OmegaConf.to_container(cfg.ray_kwargs.ray_init), env=env, imports=imports)
