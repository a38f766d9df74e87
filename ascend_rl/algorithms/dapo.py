"""DAPO's batch shaping: dynamic sampling (drop groups with no learning signal) and the overlong
reward penalty."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ascend_rl.algorithms.masked import group_ids, group_stats


def groups_with_signal(scores: torch.Tensor, index: Sequence | torch.Tensor) -> torch.Tensor:
    """Boolean [B]: keep samples whose group's scores differ (std > 0); groups of one are kept."""
    counts, _, std = group_stats(scores.to(torch.float64), group_ids(index, scores.device))
    return (std > 0) | (counts == 1)


def overlong_penalty(response_lengths: torch.Tensor, max_response_length: int, overlong_buffer_len: int,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """Reward shaping for long answers: 0 up to max − buffer, then falling linearly to −penalty_factor
    at max_response_length."""
    if overlong_buffer_len <= 0:
        raise ValueError(f"overlong_buffer_len must be > 0, got {overlong_buffer_len}")
    expected = max_response_length - overlong_buffer_len
    exceed = response_lengths.to(torch.float32) - expected
    return torch.clamp(-exceed / overlong_buffer_len * penalty_factor, max=0.0)
