"""Masked reductions and per-group statistics: the building blocks every estimator shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    # where() rather than a product: a masked inf/nan must not leak into the result.
    masked = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions; unbiased (n−1) when more than one position is unmasked."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean)·rsqrt(var + 1e-8) with mean and unbiased variance over masked positions only."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def group_ids(index: Sequence | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Dense group ids 0..G−1 for per-sample group labels (uid strings or ints), in first-seen order."""
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    ids: dict = {}
    dense = [ids.setdefault(label, len(ids)) for label in index]
    return torch.tensor(dense, dtype=torch.long, device=device)


def group_stats(scores: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group size, group mean, unbiased group std); std is NaN-free (0) for groups of one."""
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    counts = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, groups, torch.ones_like(scores))
    sums = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, groups, scores)
    mean = (sums / counts)[groups]
    sq = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device).index_add_(0, groups, (scores - mean) ** 2)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()[groups]
    return counts[groups], mean, std
