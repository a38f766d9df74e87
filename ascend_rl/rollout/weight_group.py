"""A process group for pushing weights to a rollout server by broadcast (`update_weights_from_distributed`).

The group lives beside any default group the trainer has, and is joined the way SGLang's schedulers join
theirs after `/init_weights_update_group`: TCP rendezvous at the trainer (rank 0), a store prefixed with the
group name, ranks 1… for the server's TP ranks. torch has no public call for a second, independently
rendezvoused group, so this uses the same c10d helper SGLang does.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import Future, wait
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def join_weight_group(backend: str, address: str, port: int, rank: int, world_size: int, group_name: str,
                      timeout_s: float = 600, connect_timeout_s: float | None = None):
    """`timeout_s` bounds each collective; `connect_timeout_s` (default: the same) the rendezvous, as far as
    torch keeps to it (see `join_weight_group_within`)."""
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    connect_timeout = timedelta(seconds=connect_timeout_s or timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", rank, world_size, timeout=connect_timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], dist.Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def join_weight_group_within(timeout_s: float, stop: threading.Event, backend: str, address: str, port: int,
                             rank: int, world_size: int, group_name: str):
    """`join_weight_group`, waited for at most `timeout_s` and no longer than until `stop` is set: else
    TimeoutError. The join runs on a daemon thread of its own because torch's rendezvous timeout does not bound
    it: a peer that accepts the connection and never answers holds it forever. A join that succeeds after the
    wait was given up has its group destroyed."""
    joined: Future = Future()

    def join() -> None:
        try:
            joined.set_result(join_weight_group(backend, address, port, rank, world_size, group_name,
                                                connect_timeout_s=timeout_s))
        except Exception as err:  # noqa: BLE001 - handed to the waiter
            joined.set_exception(err)

    threading.Thread(target=join, name=f"join {group_name}", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not joined.done() and not stop.is_set() and (left := deadline - time.monotonic()) > 0:
        wait([joined], timeout=min(left, 0.1))  # short steps: `stop` is checked between them
    if joined.done():
        return joined.result()
    joined.add_done_callback(_destroy_late_group)
    logger.warning("weight update group %s: gave up on the rendezvous at %s:%s; its thread lives on until torch "
                   "lets go", group_name, address, port)
    raise TimeoutError("the server is shutting down" if stop.is_set() else
                       f"no rendezvous with {address}:{port} within {timeout_s:g} s")


def _destroy_late_group(joined: Future) -> None:
    if joined.exception() is None:
        dist.destroy_process_group(joined.result())


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
