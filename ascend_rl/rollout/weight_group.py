"""A process group for pushing weights to a rollout server by broadcast (`update_weights_from_distributed`).

The group lives beside any default group the trainer has, and is joined the way SGLang's schedulers join
theirs after `/init_weights_update_group`: TCP rendezvous at the trainer (rank 0), a store prefixed with the
group name, ranks 1… for the server's TP ranks. torch has no public call for a second, independently
rendezvoused group, so this uses the same c10d helper SGLang does.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist


def join_weight_group(backend: str, address: str, port: int, rank: int, world_size: int, group_name: str,
                      timeout_s: float = 600):
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], dist.Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def address_towards(url: str) -> str:
    """This host's address on the route to the server at `url` (where the server can reach the rendezvous)."""
    host = urlparse(url).hostname or "127.0.0.1"
    if host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))  # no packet is sent: this only picks the outgoing interface
        return sock.getsockname()[0]
