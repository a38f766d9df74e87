"""Micro-batches through Megatron's schedule (`get_forward_backward_func`), so that pipeline parallelism works:
each stage runs its layers and passes activations to the next (their shapes first: micro-batches differ in rows
and length), and backward flows back the same way. What is computed from the logits (log-probs, the loss)
exists on the last stage only, which shares the results with the other stages of its pipeline. Without pipeline
parallelism the same schedule runs forward and backward one micro-batch at a time. Also here: what one stage
holds sent to the others (`from_last_stage`, `object_from_last_stage`, `from_stage`: the weight gather's)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ascend_rl.workers.megatron.forward import stage_forward
from ascend_rl.workers.trained import in_row_order

# on_logits(micro-batch, logits, each row's shift) -> (loss to back-propagate or None, a result to keep)
OnLogits = Callable[[object, torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, object]]


def through_stages(model, micros: list, on_logits: OnLogits, multiple_of: int, forward_only: bool) -> list:
    """Run `micros` (on the model's device) through the stages; `on_logits` runs on the last stage for each,
    and its results come back in micro-batch order there ([] on the other stages). Losses are taken as they are
    (the TransformerConfig's `calculate_per_token_loss`): they are normalised by the whole mini-batch already."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    results = []

    def step(data, stage):
        micro = next(data)
        output, lead = stage_forward(stage, micro, multiple_of)

        def loss_func(logits):
            loss, result = on_logits(micro, logits, lead)
            results.append(result)
            return (loss if loss is not None else logits.new_zeros(()), torch.ones((), dtype=torch.int), {})

        return output, loss_func

    longest = max(m["input_ids"].shape[1] for m in micros)
    get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micros), model=[model], num_microbatches=len(micros),
        seq_length=-(-longest // multiple_of) * multiple_of, micro_batch_size=max(len(m) for m in micros),
        forward_only=forward_only)
    return results


def row_columns(model, micros: list, rows: list[list[int]], per_micro, columns: int, multiple_of: int,
                shape, device) -> list[torch.Tensor]:
    """Forward only: `per_micro(micro, output, lead)` gives `columns` [rows, R] tensors of each micro-batch on the
    last stage; each column comes back whole (`shape`), in the batch's row order, on the host, on every stage."""
    with torch.no_grad():
        parts = through_stages(model, micros, lambda micro, out, lead: (None, per_micro(micro, out, lead)),
                               multiple_of, forward_only=True)
    return [from_last_stage(in_row_order([p[i] for p in parts], rows) if parts else None, shape, torch.float32,
                            device).cpu() for i in range(columns)]


def last_stage_metrics(metrics: dict[str, list[float]]) -> dict[str, list[float]]:
    """The step's metrics as the last pipeline stage, which computed the losses, has them (on every stage)."""
    from megatron.core import parallel_state as ps

    return object_from_last_stage(dict(metrics) if ps.is_pipeline_last_stage() else None)


def from_last_stage(tensor: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """The last pipeline stage's `tensor` on every stage of its pipeline (`shape`, `dtype`: what it is)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    tensor = torch.empty(shape, dtype=dtype, device=device) if tensor is None else tensor.contiguous()
    dist.broadcast(tensor, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return tensor


def object_from_last_stage(value):
    """The last pipeline stage's picklable `value` on every stage of its pipeline."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def from_stage(tensors: dict[str, torch.Tensor], owner: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pipeline stage `owner`'s `tensors` on every stage of this rank's pipeline, on `device` (their names,
    shapes and dtypes first, then each tensor)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    source = dist.get_global_rank(group, owner)
    mine = ps.get_pipeline_model_parallel_rank() == owner
    box = [[(name, t.shape, t.dtype) for name, t in tensors.items()] if mine else None]
    dist.broadcast_object_list(box, source, group=group)
    out = {}
    for name, shape, dtype in box[0]:
        t = tensors[name].contiguous() if mine else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, source, group=group)
        out[name] = t
    return out
