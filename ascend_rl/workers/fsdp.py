"""FSDP2 (`fully_shard`) for transformers causal LMs, and the few collectives the actor needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from ascend_rl.errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class FsdpSettings:
    """How the actor's weights are kept and computed with (`actor.fsdp_config`)."""

    model_dtype: torch.dtype = torch.float32  # the weights the optimizer updates (model_dtype)
    compute_dtype: torch.dtype = torch.float32  # forward and backward (dtype); gradients are reduced in fp32
    offload: bool = False  # parameters, gradients and optimizer state in host memory (param/optimizer_offload)
    reshard_after_forward: bool = True


def dtype_of(key: str, name) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise UserError(f"{key}={name}: expected one of {', '.join(DTYPES)}") from None


def fsdp_settings(fsdp_config, device: str, key: str = "actor_rollout_ref.actor.fsdp_config") -> FsdpSettings:
    """On CPU: fp32 compute (bf16 matmuls are slow there) and no offload (everything is in host memory)."""
    model_dtype = dtype_of(f"{key}.model_dtype", fsdp_config.model_dtype)
    compute = dtype_of(f"{key}.dtype", fsdp_config.dtype) if device != "cpu" else torch.float32
    offload = device != "cpu" and bool(fsdp_config.param_offload or fsdp_config.get("optimizer_offload", False))
    return FsdpSettings(model_dtype, compute, offload, bool(fsdp_config.reshard_after_forward))


def shard_kwargs(mesh, settings: FsdpSettings) -> dict:
    """fully_shard's arguments: FSDP2 casts parameters to the compute dtype per layer (mixed precision), and
    CPUOffloadPolicy keeps parameters on the host, so the optimizer step also runs there."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs = {"mesh": mesh, "reshard_after_forward": settings.reshard_after_forward}
    if settings.compute_dtype != settings.model_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=settings.compute_dtype, reduce_dtype=torch.float32)
    if settings.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def place_for_compute(model: torch.nn.Module, mesh, settings: FsdpSettings, device_type: str):
    """Shard `model` over `mesh` (FSDP2's mixed precision casts per layer) or, in one process, leave it whole;
    returns the context every forward runs in: nothing under FSDP, autocast to the compute dtype without."""
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
