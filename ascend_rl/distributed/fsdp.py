"""FSDP2 (`fully_shard`) for transformers causal LMs, and the few collectives the actor needs."""

from __future__ import annotations

import torch
import torch.distributed as dist


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks a model is sharded by (one all-gather per layer in forward and backward)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None:
        return list(layers)
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard_model(model: torch.nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # embeddings, final norm and head


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
