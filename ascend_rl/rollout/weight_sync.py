"""Pushing the trainer's weights to a rollout engine in buckets (`checkpoint_engine.update_weights_bucket_megabytes`).

Buckets bound the extra memory a push needs (one bucket of copies at a time) while keeping the number of
engine calls small: one call per tensor is what made early RL weight syncs slow.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ascend_rl.rollout.weight_group import dtype_name, join_weight_group

NamedTensor = tuple[str, torch.Tensor]


@dataclass(frozen=True)
class PushStats:
    tensors: int
    buckets: int
    bytes: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {"rollout/weight_sync_buckets": self.buckets, "rollout/weight_sync_gib": self.bytes / 2**30,
                "perf/weight_sync_gib_per_s": self.bytes / 2**30 / max(self.seconds, 1e-9)}


def tensor_buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Consecutive groups of at most `bucket_bytes` (a larger tensor travels alone), in the given order."""
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = _nbytes([(name, tensor)])
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class _BucketPush:
    """One push: `begin`, `send` each bucket, `finish`; the bucketing and the counting are shared."""

    def __init__(self, engine, bucket_megabytes: int):
        self.engine, self.bucket_bytes = engine, bucket_megabytes << 20

    def __call__(self, named_tensors: Iterable[NamedTensor]) -> PushStats:
        start = time.perf_counter()
        self.begin()
        tensors = buckets = nbytes = 0
        for bucket in tensor_buckets(named_tensors, self.bucket_bytes):
            buckets += 1
            self.send(bucket, buckets)
            tensors += len(bucket)
            nbytes += _nbytes(bucket)
        self.finish()
        return PushStats(tensors, buckets, nbytes, time.perf_counter() - start)

    def begin(self) -> None:
        pass

    def send(self, bucket: list[NamedTensor], index: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class TensorPush(_BucketPush):
    """Each bucket through `engine.update_weights_from_tensor` (in-process engines; SGLang over HTTP on this node)."""

    def send(self, bucket: list[NamedTensor], index: int) -> None:
        self.engine.update_weights_from_tensor(bucket)


class DiskPush(_BucketPush):
    """Buckets written as safetensors shards of a model directory, then one `update_weights_from_disk`: for
    servers that cannot take device handles (another host, or `ascend-rl serve`). Needs a directory both
    sides can read; a fresh one per push, so a server never reads a half-written set."""

    def __init__(self, engine, staging_dir: Path, model_path: str, bucket_megabytes: int):
        super().__init__(engine, bucket_megabytes)
        self.staging_dir, self.model_path = Path(staging_dir), Path(model_path)
        self.pushes = 0

    def _target(self, push: int) -> Path:
        return self.staging_dir / f"push-{push:06d}"

    def begin(self) -> None:
        self.pushes += 1
        self._target(self.pushes).mkdir(parents=True)

    def send(self, bucket: list[NamedTensor], index: int) -> None:
        from safetensors.torch import save_file

        save_file({name: t.detach().contiguous().cpu() for name, t in bucket},
                  self._target(self.pushes) / f"weights-{index:05d}.safetensors")

    def finish(self) -> None:
        target = self._target(self.pushes)
        for name in ("config.json", "generation_config.json"):
            if (self.model_path / name).is_file():
                shutil.copy(self.model_path / name, target / name)
        self.engine.update_weights_from_disk(str(target))
        shutil.rmtree(self._target(self.pushes - 1), ignore_errors=True)  # the previous one


class DistributedPush(_BucketPush):
    """Buckets broadcast over a process group the trainer and the server join once (`hccl` on NPU, `nccl` on
    CUDA, `gloo` on CPU): the server allocates each bucket from its names, dtypes and shapes and receives it
    from rank 0. For servers on other nodes, where device handles do not reach."""

    GROUP = "ascend_rl_weight_sync"

    def __init__(self, engine, backend: str, address: str, bucket_megabytes: int, server_ranks: int = 1):
        super().__init__(engine, bucket_megabytes)
        self.backend, self.address, self.server_ranks = backend, address, server_ranks
        self.group = None

    def begin(self) -> None:
        if self.group is None:
            self.group = self._join()

    def send(self, bucket: list[NamedTensor], index: int) -> None:
        import torch.distributed as dist

        meta = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket]}
        with _in_background(self.engine.update_weights_from_distributed, meta, self.GROUP):
            for _, tensor in bucket:
                dist.broadcast(tensor.detach().contiguous(), src=0, group=self.group)

    def _join(self):
        from ascend_rl.rollout.server_process import free_port

        port, world = free_port(), 1 + self.server_ranks
        # Both sides block until all ranks have joined: the server's request waits in the background.
        with _in_background(self.engine.init_weights_update_group, self.address, port, 1, world, self.GROUP,
                            self.backend):
            return join_weight_group(self.backend, self.address, port, 0, world, self.GROUP)

    def close(self) -> None:
        if self.group is not None:
            self.engine.destroy_weights_update_group(self.GROUP)
            self.group = None


@contextlib.contextmanager
def _in_background(fn, *args):
    """Run fn(*args) in a thread while the block runs; re-raise its error after the block."""
    result: dict = {}

    def target():
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    yield
    thread.join()
    if "error" in result:
        raise result["error"]


def _nbytes(bucket: list[NamedTensor]) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)
