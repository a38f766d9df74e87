"""The sharded Megatron model gathered back into whole Hugging Face tensors, for the weight sync to the rollout
engine and for HF export.

One bucket at a time (the parameters outside the decoder layers, then each layer), so a rank holds at most
one layer's whole tensors beyond its own shard, never the whole model. Dense weights are all-gathered over the
TP group; experts over the expert-tensor-parallel group, then the expert-parallel group (EP rank r's local
expert j is global expert r·E/EP + j). Every rank gets every tensor: each data-parallel replica gathers within
its own groups, so any rank can write or send them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ascend_rl.workers.megatron.arch import architecture
from ascend_rl.workers.megatron.convert import (
    expert_index,
    global_layer_names,
    mcore_layer_to_hf,
    mcore_outer_to_hf,
    merge_tensors,
    split_kind,
    stage_layers,
)
from ascend_rl.workers.megatron.model import mcore_shard
from ascend_rl.workers.megatron.pipeline import from_stage


def hf_weights(model, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, whole tensor) for every HF parameter (a tied `lm_head.weight` left out, as `save_pretrained`
    does), bit for bit the converted model's. `model` is this rank's bare GPTModel (unwrap DDP / Float16Module
    first). Collective: every rank of the world iterates it to the end, in lockstep. A tensor may share memory
    with a parameter (copies on every TP rank, everything at TP 1): copy it to keep it past an optimizer step.
    Under pipeline parallelism the stage holding a bucket gathers it and sends it to the other stages."""
    from megatron.core import parallel_state as ps

    arch = architecture(hf_config)
    groups = (ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group(),
              ps.get_expert_model_parallel_group())
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    layers = stage_layers(arch, pp, stage)
    device = next(model.parameters()).device
    local = global_layer_names(mcore_shard(model), layers.start)
    outer = {k: v for k, v in local.items() if not k.startswith("decoder.layers.")}
    if arch.tie_word_embeddings and stage > 0:
        outer.pop("output_layer.weight", None)  # the last stage's copy of the first stage's embedding
    own = gather_bucket(outer, *groups)
    outer = dict(own)
    for owner in sorted({0, pp - 1}) if pp > 1 else ():  # the embedding's stage and the output layer's
        outer.update(from_stage(own if stage == owner else {}, owner, device))
    yield from _converted(mcore_outer_to_hf(outer, arch), outer)
    for i in range(arch.num_layers):
        prefix = f"decoder.layers.{i}."
        mine = i in layers
        layer = gather_bucket({k: v for k, v in local.items() if k.startswith(prefix)}, *groups) if mine else {}
        if pp > 1:
            layer = from_stage(layer, i // len(layers), device)
        yield from _converted(mcore_layer_to_hf(layer, arch, i), layer)


def _converted(hf: dict[str, torch.Tensor], left: dict[str, torch.Tensor]):
    """`hf`'s items, once the conversion took every Megatron tensor of the bucket."""
    if left:
        raise KeyError(f"Megatron weights the converter does not know: {sorted(left)[:8]}")
    return hf.items()


def gather_bucket(local: dict[str, torch.Tensor], tp_group, etp_group, ep_group) -> dict[str, torch.Tensor]:
    """The TP-1 Megatron tensors (global expert indices) of this rank's `local` ones."""
    out = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in local.items():
        expert = expert_index(name)
        if expert is None:  # copies (norms, router) are the same on every TP rank: no need to gather them
            out[name] = t if split_kind(name) == "copied" else merge_tensors(name, all_gather(t, tp_group))
        else:
            prefix, e, suffix = expert
            experts.setdefault((prefix, suffix), {})[e] = t
    for (prefix, suffix), by_index in experts.items():
        out.update(gather_experts(prefix, suffix, [by_index[e] for e in range(len(by_index))], etp_group, ep_group))
    return out


def gather_experts(prefix: str, suffix: str, local: list[torch.Tensor], etp_group, ep_group) -> dict:
    """One parameter of every expert by global name, from this rank's slice of its local experts' (stacked, so
    each group gathers once)."""
    name = prefix + "0" + suffix
    slices = all_gather(torch.stack(local), etp_group)
    whole = torch.stack([merge_tensors(name, [s[j] for s in slices]) for j in range(len(local))])
    every = torch.cat(all_gather(whole, ep_group))
    return {f"{prefix}{e}{suffix}": t for e, t in enumerate(every)}


def all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's `t` in group-rank order (Megatron's shards are equal-sized on every rank of a group)."""
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return [t]
    pieces = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return pieces
