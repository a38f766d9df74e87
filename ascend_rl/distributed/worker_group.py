"""N worker processes in one torch.distributed group, called by the driver like one object.

Each worker builds its object (e.g. an actor shard) from a factory, then answers method calls; the driver
sends every rank its arguments and gets the results back in rank order. A worker that raises stops the call
with its traceback; a worker that dies stops it within a second, naming the rank and exit code.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence

import torch.multiprocessing as mp

from ascend_rl.errors import UserError
from ascend_rl.platform import follow_deterministic_mode


class WorkerDied(UserError):
    pass


def build_worker_object(factory: str, rank: int, world_size: int, kwargs: dict, imports: Sequence[str] = ()):
    """What a worker serves: `module:Name` called with its rank, the world size and the group's kwargs, after
    importing `imports` (the user's `external_lib`: estimators, losses or models it registers must be known in
    the worker too, not only in the driver that validated the config)."""
    for extra in imports:
        importlib.import_module(extra)
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)(rank=rank, world_size=world_size, **kwargs)


class WorkerGroup:
    """What the driver sees of a group of workers (processes here, Ray actors in `ray_group`)."""

    world_size: int

    def call(self, method: str, args_per_rank: Sequence[tuple]) -> list:
        """`method` on every worker with its own arguments; the results in rank order."""
        raise NotImplementedError

    def call_all(self, method: str, *args) -> list:
        return self.call(method, [args] * self.world_size)

    def close(self) -> None:
        raise NotImplementedError


# What a CPU worker imports before it builds anything: the fork server imports it once for every group.
FORK_SERVER_PRELOAD = ["ascend_rl.distributed.actor_group"]


def start_context(backend: str):
    """How workers start. On a CPU (gloo) they fork from a server that imported the worker code once: a group
    starts in ~0.05 s instead of ~2.5 s of imports per worker. Accelerators' workers are spawned, so that no
    process they come from has touched a device. Either way a worker takes the driver's environment as it is
    when the group starts (`_worker_main`), not the fork server's."""
    if backend != "gloo":
        return mp.get_context("spawn")
    multiprocessing.set_forkserver_preload(FORK_SERVER_PRELOAD)  # no effect once the server runs
    return mp.get_context("forkserver")


def _worker_main(rank: int, world_size: int, port: int, backend: str, threads: int, conn, factory: str,
                 kwargs: dict, imports: Sequence[str], environ: dict[str, str]) -> None:
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))  # one node: the rank is the device index
    torch.set_num_threads(threads)
    follow_deterministic_mode(os.environ)  # the driver set trainer.deterministic's variable before starting us
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        obj = build_worker_object(factory, rank, world_size, kwargs, imports)
        conn.send(("ok", None))
        while (message := conn.recv()) is not None:
            method, args = message
            try:
                conn.send(("ok", getattr(obj, method)(*args)))
            except Exception:  # noqa: BLE001 - the driver re-raises it with this worker's traceback
                conn.send(("error", traceback.format_exc()))
    except Exception:  # noqa: BLE001 - failed to build: report instead of hanging the driver
        conn.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class ProcessWorkerGroup(WorkerGroup):
    def __init__(self, world_size: int, factory: str, kwargs: dict, backend: str = "gloo",
                 threads_per_worker: int | None = None, imports: Sequence[str] = ()):
        from ascend_rl.rollout.server_process import free_port

        ctx = start_context(backend)  # never a fork of the driver: it would copy its threads and torch state
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // world_size)
        port = free_port()
        self.conns, self.processes = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            # Not daemonic: a worker may start processes of its own (SGLang's schedulers), which Python forbids
            # daemonic processes. A worker whose driver is gone sees its pipe close and exits.
            process = ctx.Process(target=_worker_main, daemon=False, name=f"ascend-rl-worker-{rank}",
                                  args=(rank, world_size, port, backend, threads, child, factory, kwargs,
                                        tuple(imports), dict(os.environ)))
            process.start()
            self.conns.append(parent)
            self.processes.append(process)
        # Registered after multiprocessing's own exit handler, so it runs first: at exit the workers are told to
        # stop before Python joins them (else a group nobody closed would keep the interpreter waiting).
        atexit.register(self.close)
        self._collect("start-up")

    @property
    def world_size(self) -> int:
        return len(self.processes)

    def call(self, method: str, args_per_rank: Sequence[tuple]) -> list:
        for conn, args in zip(self.conns, args_per_rank):
            conn.send((method, args))
        return self._collect(method)

    def _collect(self, what: str) -> list:
        results = []
        for rank, (conn, process) in enumerate(zip(self.conns, self.processes)):
            while not conn.poll(1.0):
                if not process.is_alive():
                    self._died(rank, what)
            try:
                status, value = conn.recv()
            except (EOFError, ConnectionResetError):  # the pipe closed: the process is exiting
                process.join(timeout=5)
                self._died(rank, what)
            if status == "error":
                dead = self._first_dead(wait_s=2.0)  # a peer's death shows up as a collective error here
                if dead is not None:
                    self._died(dead, what)
                self.close()
                raise RuntimeError(f"worker {rank} failed during {what}:\n{value}")
            results.append(value)
        return results

    def _first_dead(self, wait_s: float) -> int | None:
        """A worker that crashed (a worker that failed to build reports it, then exits cleanly: not this)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [rank for rank, p in enumerate(self.processes) if not p.is_alive() and p.exitcode != 0]
            if dead or time.monotonic() > deadline:
                return dead[0] if dead else None
            time.sleep(0.1)

    def _died(self, rank: int, what: str) -> None:
        process = self.processes[rank]
        self.close()
        raise WorkerDied(f"worker {rank} (pid {process.pid}, this node) died with exit code {process.exitcode} "
                         f"during {what}")

    def close(self) -> None:
        atexit.unregister(self.close)
        for conn, process in zip(self.conns, self.processes):
            if process.is_alive():
                with contextlib.suppress(BrokenPipeError, OSError):
                    conn.send(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        self.conns, self.processes = [], []
