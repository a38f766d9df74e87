"""Megatron's weights, gradients and optimizer state in host memory between the phases that use them (verl's
`megatron.param_offload`, `grad_offload`, `optimizer_offload`), so that the rollout engine colocated on the same
device has its memory while it generates.

By storage, not by tensor: Megatron's parameters are views of its contiguous DDP buffers, and the distributed
optimizer's fp32 shards of an fp32 model are views of those. Emptying a storage (resize to 0) and refilling it in
place keeps every view valid, where rebinding `param.data` would cut the views apart; verl's
offload_megatron_model_to_cpu resizes the buffers' storages for the same reason. On a CPU nothing is gained and
the trainer leaves the switches off (`actor_specs.megatron_engine`); the tests run the mechanism there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ascend_rl.platform import release_cached_memory


@dataclass(frozen=True)
class MegatronOffload:
    """What lives on the device only while a phase runs (verl's `*.megatron.*_offload`)."""

    params: bool = False
    grads: bool = False
    optimizer: bool = False


class HostStorages:
    """Device storages emptied into host memory and refilled in place. A storage to `keep` is copied to a host
    buffer first (pinned for an accelerator's, and kept for the next time: allocating a new one while the old is
    still held would need twice the host memory); the others (gradients, zeroed before each use) are emptied
    without a copy and come back zeroed."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._host: dict[int, torch.Tensor] = {}  # by the storage's identity, which survives resizing
        self._emptied: list[tuple[torch.UntypedStorage, int, bool]] = []  # (storage, its bytes, kept)

    @torch.no_grad()
    def empty(self, storages: Iterable[torch.UntypedStorage], keep: bool) -> None:
        for storage in storages:
            size = storage.nbytes()
            if size == 0:
                continue
            if keep:
                host = self._host.get(storage._cdata)
                if host is None or host.numel() != size:
                    host = self._host[storage._cdata] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
                host.copy_(_bytes(storage))
            storage.resize_(0)
            self._emptied.append((storage, size, keep))

    @torch.no_grad()
    def refill(self) -> None:
        for storage, size, kept in self._emptied:
            storage.resize_(size)
            if kept:
                _bytes(storage).copy_(self._host[storage._cdata], non_blocking=self.pin)
            else:
                _bytes(storage).zero_()
        self._emptied.clear()


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def storages(tensors: Iterable[torch.Tensor], besides: set[int] = frozenset()) -> list[torch.UntypedStorage]:
    """The distinct storages under `tensors`, leaving out those whose identity is in `besides`."""
    seen, out = set(besides), []
    for t in tensors:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            out.append(storage)
    return out


def gradient_buffers(ddp) -> Iterator[torch.Tensor]:
    """Megatron DDP's contiguous gradient buffers (every `main_grad` is a view of one)."""
    for buffer in [*ddp.buffers, *ddp.expert_parallel_buffers]:
        yield buffer.grad_data


def optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """The fp32 main weights and the Adam moments of a Megatron optimizer (a chained one: each of its own)."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))


def optimizer_grads(optimizer) -> Iterator[torch.Tensor]:
    """The main weights' gradients the last step left (a 16-bit model's are fp32 copies of its buffers')."""
    for inner in _torch_optimizers(optimizer):
        yield from (p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None)


def _torch_optimizers(optimizer):
    return [part.optimizer for part in getattr(optimizer, "chained_optimizers", [optimizer])]


class Part(NamedTuple):
    tensors: Callable[[], Iterable[torch.Tensor]]  # what the part's tensors are now
    keep: bool = True  # copy the values out (else: emptied, and zeroed when refilled)
    move: bool = True  # False: stays on the device; listed so that later parts leave its storages alone


class Offloaded:
    """Parts of one model kept in host memory outside `resident()`. A storage belongs to the first part that
    holds it: an fp32 model's distributed-optimizer shards are views of its weights, a main weight's gradient
    may be a view of the DDP gradient buffer."""

    def __init__(self, parts: list[Part], device: str):
        self.parts = parts if any(p.move for p in parts) else []
        self.host = HostStorages(pin=torch.device(device).type != "cpu")
        self.device = device
        self._depth = 0

    def offload(self) -> None:
        taken: set[int] = set()
        for part in self.parts:
            found = storages(part.tensors(), taken)
            taken |= {s._cdata for s in found}
            if part.move:
                self.host.empty(found, part.keep)
        if self.parts:
            release_cached_memory(self.device)

    @contextmanager
    def resident(self):
        """On the device for the block (blocks nest: the outermost one moves them)."""
        if self._depth == 0 and self.parts:
            self.host.refill()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self.parts:
                self.offload()


def model_offload(ddp, optimizer, off: MegatronOffload, device: str) -> tuple[Offloaded, Offloaded]:
    """A DDP model's weights with their gradients, and its optimizer's state; each lists what it must leave
    alone first (the distributed optimizer's fp32 shards of an fp32 model are views of the weights, its main
    gradients of the gradient buffers)."""
    weights = Part(ddp.module.parameters, move=off.params)
    grads = Part(lambda: gradient_buffers(ddp), keep=False, move=off.grads)
    return (Offloaded([weights, grads], device),
            Offloaded([weights._replace(move=False), grads._replace(move=False),
                       Part(lambda: optimizer_tensors(optimizer), move=off.optimizer),
                       Part(lambda: optimizer_grads(optimizer), keep=False, move=off.optimizer)], device))
