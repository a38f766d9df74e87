"""Loss aggregation (`actor.loss_agg_mode`) that stays exact under micro-batching and data parallelism.

Each micro-batch on each rank divides its own sum by the *global* count of its mini-batch (tokens or
sequences, summed over micro-batches and data-parallel ranks), so adding up the micro-batch losses gives
exactly the loss of the whole mini-batch. Without global counts, the local ones are used.
"""

from __future__ import annotations

import torch

from ascend_rl.algorithms.masked import masked_sum
from ascend_rl.algorithms.registry import LOSS_AGG_MODES


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    global_num_tokens: int | float | torch.Tensor | None = None,
    global_batch_size: int | float | torch.Tensor | None = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Aggregate a [B, T] per-token loss.

    - token-mean: Σ mask·L / N_tokens
    - seq-mean-token-sum: Σ_i Σ_t mask·L / N_seqs
    - seq-mean-token-sum-norm: Σ_i Σ_t mask·L / N_seqs / loss_scale_factor (default T)
    - seq-mean-token-mean: Σ_i (Σ_t mask·L / Σ_t mask) / N_seqs, sequences with no token excluded
    """
    if loss_agg_mode == "token-mean":
        denom = global_num_tokens if global_num_tokens is not None else loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / _at_least_one(denom)
    seq_sums = masked_sum(loss_mat, loss_mask, dim=-1)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        denom = global_batch_size if global_batch_size is not None else loss_mat.shape[0]
        loss = seq_sums.sum() / _at_least_one(denom)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1])
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        tokens = loss_mask.sum(-1)
        has_tokens = tokens > 0
        seq_means = torch.where(has_tokens, seq_sums / tokens.clamp(min=1), torch.zeros_like(seq_sums))
        denom = global_batch_size if global_batch_size is not None else has_tokens.sum()
        return seq_means.sum() / _at_least_one(denom)
    raise ValueError(
        f"unknown loss aggregation {loss_agg_mode!r} (actor_rollout_ref.actor.loss_agg_mode); "
        f"valid: {', '.join(LOSS_AGG_MODES)}"
    )


def agg_denominator(loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """This micro-batch's contribution to the global count that `agg_loss` divides by."""
    if loss_agg_mode == "token-mean":
        return loss_mask.sum()
    if loss_agg_mode == "seq-mean-token-mean":
        return (loss_mask.sum(-1) > 0).sum()
    return torch.tensor(loss_mask.shape[0], device=loss_mask.device)


def _at_least_one(x):
    return x.clamp(min=1) if isinstance(x, torch.Tensor) else max(x, 1)
