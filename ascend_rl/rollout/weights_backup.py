"""The native engine's weights across `release_memory_occupation` / `resume_memory_occupation` and pushes.

SGLang's semantics (torch_memory_saver under `enable_memory_saver`): releasing "weights" frees their device
memory; resuming allocates it again, holding the old values only when the engine was started with
`enable_weights_cpu_backup` (a host copy taken at release and copied back at resume), and otherwise
whatever the new memory holds until a weight push overwrites it.

Here the parameters move to the meta device on release, so their memory is freed also on a CPU, where the
"device" is the host and a backup costs as much host memory as it frees; resume allocates them empty. Which
parameters hold real values is tracked by name: generating while any does not (a dummy load, a resume
without a backup, a push that left some out) is an error naming them, never sampling from garbage.
Buffers (rotary frequencies) are computed by the model, not pushed by a trainer, so they are always kept.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

DUMMY = "load_format=dummy"
RESUMED = "resumed after a release without enable_weights_cpu_backup"


class EngineWeights:
    def __init__(self, model, device: torch.device, cpu_backup: bool = False, loaded: bool = True):
        """`loaded`: the model holds its real weights (False: load_format=dummy, pushed later)."""
        self.model, self.device, self.cpu_backup = model, device, cpu_backup
        self.released = False
        self.missing: set[str] = set() if loaded else set(self._parameters())
        self.why = "" if loaded else DUMMY  # how the missing ones came to be missing
        self._buffers: dict[str, torch.Tensor] = {}
        self._backup: dict[str, torch.Tensor] | None = None

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        """By name, tied parameters once (what a trainer's named_parameters() pushes)."""
        return dict(self.model.named_parameters())

    @torch.no_grad()
    def release(self) -> None:
        if self.released:
            return
        self._buffers = {name: b.detach().to("cpu", copy=True) for name, b in self.model.named_buffers()}
        if self.cpu_backup:
            self._backup = {name: p.detach().to("cpu", copy=True) for name, p in self._parameters().items()}
        self.model.to("meta")
        self.released = True

    @torch.no_grad()
    def resume(self) -> None:
        if not self.released:
            return
        self.model.to_empty(device=self.device)
        self.model.tie_weights()  # to_empty may give tied parameters separate tensors: one again before naming them
        for name, buffer in self.model.named_buffers():
            buffer.copy_(self._buffers[name])
        parameters = self._parameters()
        if self._backup is not None:  # what was missing before the release stays missing
            for name, param in parameters.items():
                param.copy_(self._backup[name])
        else:
            self.missing, self.why = set(parameters), RESUMED
        self._backup, self._buffers = None, {}
        self.released = False

    @torch.no_grad()
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each tensor into the parameter of that name (on its device, in its dtype). The caller holds
        the scheduler's step lock, so a decode step never sees half a bucket."""
        if self.released:
            raise RuntimeError("weights are released: call resume_memory_occupation(['weights']) first")
        parameters = self._parameters()
        for name, tensor in named_tensors:
            param = parameters.get(name)
            if param is None:
                raise KeyError(f"update_weights_from_tensor: the engine's model has no parameter {name!r}")
            if tuple(tensor.shape) != tuple(param.shape):  # copy_ would broadcast a wrong shape silently
                raise ValueError(f"update_weights_from_tensor: {name} has shape {tuple(tensor.shape)}, the "
                                 f"engine's parameter {tuple(param.shape)}")
            param.data.copy_(tensor.to(param.device, param.dtype))
            self.missing.discard(name)

    def check_loaded(self) -> None:
        if self.missing:
            example = sorted(self.missing)[0]
            raise RuntimeError(f"the weights are not loaded ({self.why}): {len(self.missing)} of "
                               f"{len(self._parameters())} parameters have no values (e.g. {example}); call "
                               f"update_weights_from_tensor first")
