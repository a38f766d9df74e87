"""FSDP2 (`fully_shard`) for transformers causal LMs, and the few collectives the actor needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from ascend_rl.platform import compute_dtype, dtype_named


@dataclass(frozen=True)
class FsdpSettings:
    """How the actor's weights are kept and computed with (`actor.fsdp_config`)."""

    model_dtype: torch.dtype = torch.float32  # the weights the optimizer updates (model_dtype)
    compute_dtype: torch.dtype = torch.float32  # forward and backward (mixed_precision.param_dtype, else dtype)
    offload: bool = False  # parameters, gradients and optimizer state in host memory (param/optimizer_offload)
    reshard_after_forward: bool = True
    reduce_dtype: torch.dtype = torch.float32  # gradients' all-reduce (mixed_precision.reduce_dtype)


def fsdp_settings(fsdp_config, device: str, key: str = "actor_rollout_ref.actor.fsdp_config") -> FsdpSettings:
    """verl's keys: the compute dtype is `mixed_precision.param_dtype` where the config has that map (verl's
    FSDP engine reads it), else `dtype` (both default to bf16 in verl). A CPU without 16-bit matmul units
    computes in fp32 (platform.compute_dtype says so once). No offload on CPU: everything is in host memory."""
    model_dtype = dtype_named(f"{key}.model_dtype", fsdp_config.model_dtype)
    mixed = fsdp_config.get("mixed_precision") or {}
    if mixed.get("param_dtype") is not None:
        name, asked = f"{key}.mixed_precision.param_dtype", mixed["param_dtype"]
    else:
        name, asked = f"{key}.dtype", fsdp_config.dtype
    compute = compute_dtype(device, dtype_named(name, asked), name)
    reduce = dtype_named(f"{key}.mixed_precision.reduce_dtype", mixed.get("reduce_dtype") or "fp32")
    offload = device != "cpu" and bool(fsdp_config.param_offload or fsdp_config.get("optimizer_offload", False))
    return FsdpSettings(model_dtype, compute, offload, bool(fsdp_config.reshard_after_forward), reduce)


def shard_kwargs(mesh, settings: FsdpSettings) -> dict:
    """fully_shard's arguments: FSDP2 casts parameters to the compute dtype per layer (mixed precision), and
    CPUOffloadPolicy keeps parameters on the host, so the optimizer step also runs there."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs = {"mesh": mesh, "reshard_after_forward": settings.reshard_after_forward}
    if settings.compute_dtype != settings.model_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=settings.compute_dtype,
                                                   reduce_dtype=settings.reduce_dtype)
    if settings.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def place_for_compute(model: torch.nn.Module, mesh, settings: FsdpSettings, device_type: str):
    """Shard `model` over `mesh` (FSDP2's mixed precision casts per layer) or, in one process, leave it whole;
    returns the context every forward runs in: nothing under FSDP, autocast to the compute dtype without."""
    if device_type == "cpu" and settings.compute_dtype in (torch.bfloat16, torch.float16):
        from ascend_rl.workers.cpu_attention import use_cpu_attention

        use_cpu_attention(model)
    if mesh is not None:
        shard_model(model, mesh, settings)
        return contextlib.nullcontext
    if settings.compute_dtype == settings.model_dtype:
        return contextlib.nullcontext
    return partial(torch.autocast, device_type=device_type, dtype=settings.compute_dtype)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks a model is sharded by (one all-gather per layer in forward and backward)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None:
        return list(layers)
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard_model(model: torch.nn.Module, mesh, settings: FsdpSettings) -> None:
    from torch.distributed.fsdp import fully_shard

    kwargs = shard_kwargs(mesh, settings)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)  # embeddings, final norm and head


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank must call it); a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def reduce_over_ranks(values: dict[str, float], maxed: frozenset[str] = frozenset()) -> dict[str, float]:
    """The mean of each value over the ranks, the maximum for the keys in `maxed` (same keys on every rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    means, maxes = sorted(k for k in values if k not in maxed), sorted(k for k in values if k in maxed)
    packed = torch.tensor([values[k] for k in means], dtype=torch.float64)
    dist.all_reduce(packed)
    out = {k: v / dist.get_world_size() for k, v in zip(means, packed.tolist())}
    if maxes:
        top = torch.tensor([values[k] for k in maxes], dtype=torch.float64)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        out.update(zip(maxes, top.tolist()))
    return out
