"""Loss aggregation (`actor.loss_agg_mode`) that stays exact under micro-batching and data parallelism.

Each micro-batch on each rank divides its own sum by the *global* count of its mini-batch (tokens or
sequences, summed over micro-batches and data-parallel ranks), so adding up the micro-batch losses gives
exactly the loss of the whole mini-batch. Without global counts, the local ones are used.

The local definitions are verl 0.9.1's: the sequence modes divide by the number of rows that have at least
one valid token, so a fully masked row neither adds to the loss nor to the count. (verl's own trainer
passes the mini-batch's row count as its global count, which differs from its local rule only when a row
has no token at all; our global count is the sum of the local ones, so both agree.) verl also multiplies
by the data-parallel size because FSDP averages gradients; our actor does that scaling itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ascend_rl.algorithms.masked import masked_sum
from ascend_rl.algorithms.registry import LOSS_AGG_MODES

Count = int | float | torch.Tensor | None


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    global_num_tokens: Count = None,
    global_batch_size: Count = None,
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Aggregate a [B, T] per-token loss.

    - token-mean: Σ mask·L / N_tokens
    - token-sum: Σ mask·L
    - seq-mean-token-sum: Σ_i Σ_t mask·L / N_seqs
    - seq-mean-token-sum-norm: Σ_i Σ_t mask·L / N_seqs / loss_scale_factor (default T)
    - seq-mean-token-mean: Σ_i (Σ_t mask·L / Σ_t mask) / N_seqs

    N_seqs counts the rows with at least one valid token.
    """
    rule = _RULES.get(loss_agg_mode)
    if rule is None:
        raise ValueError(
            f"unknown loss aggregation {loss_agg_mode!r} (actor_rollout_ref.actor.loss_agg_mode); "
            f"valid: {', '.join(LOSS_AGG_MODES)}"
        )
    return rule(loss_mat, loss_mask, global_num_tokens, global_batch_size, loss_scale_factor)


def agg_denominator(loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """This micro-batch's contribution to the global count that `agg_loss` divides by (token-sum divides by
    nothing: 0, unused)."""
    if loss_agg_mode == "token-mean":
        return loss_mask.sum()
    if loss_agg_mode == "token-sum":
        return torch.zeros((), dtype=torch.long, device=loss_mask.device)
    return _rows_with_tokens(loss_mask).sum()


def global_counts(loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both global counts of a mini-batch mask, as `agg_loss` and the policy losses take them: every mode
    (and geo_mean, which averages over sequences whatever the mode) finds the one it divides by."""
    return {"global_num_tokens": agg_denominator(loss_mask, "token-mean"),
            "global_batch_size": agg_denominator(loss_mask, "seq-mean-token-mean")}


def _rows_with_tokens(loss_mask: torch.Tensor) -> torch.Tensor:
    return loss_mask.sum(-1) > 0


def _at_least_one(x):
    return x.clamp(min=1) if isinstance(x, torch.Tensor) else max(x, 1)


def _seq_count(loss_mask, global_batch_size):
    return global_batch_size if global_batch_size is not None else _rows_with_tokens(loss_mask).sum()


def _token_mean(loss_mat, loss_mask, global_num_tokens, _global_batch_size, _scale):
    denom = global_num_tokens if global_num_tokens is not None else loss_mask.sum()
    return masked_sum(loss_mat, loss_mask) / _at_least_one(denom)


def _token_sum(loss_mat, loss_mask, _global_num_tokens, _global_batch_size, _scale):
    return masked_sum(loss_mat, loss_mask)


def _seq_mean_token_sum(loss_mat, loss_mask, _global_num_tokens, global_batch_size, _scale):
    return masked_sum(loss_mat, loss_mask) / _at_least_one(_seq_count(loss_mask, global_batch_size))


def _seq_mean_token_sum_norm(loss_mat, loss_mask, global_num_tokens, global_batch_size, loss_scale_factor):
    # The default horizon is this batch's padded length; a fixed loss_scale_factor keeps the scale constant.
    scale = loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1]
    return _seq_mean_token_sum(loss_mat, loss_mask, global_num_tokens, global_batch_size, None) / scale


def _seq_mean_token_mean(loss_mat, loss_mask, _global_num_tokens, global_batch_size, _scale):
    tokens = loss_mask.sum(-1)
    seq_means = masked_sum(loss_mat, loss_mask, dim=-1) / tokens.clamp(min=1)  # a row without tokens sums to 0
    return seq_means.sum() / _at_least_one(_seq_count(loss_mask, global_batch_size))


_RULES: dict[str, Callable[..., torch.Tensor]] = {
    "token-mean": _token_mean,
    "token-sum": _token_sum,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
    "seq-mean-token-mean": _seq_mean_token_mean,
}
assert tuple(_RULES) == LOSS_AGG_MODES
