"""Optimal token baseline (OTB) advantage estimators, with verl 0.9.1's definitions.

A per-token baseline instead of one per sequence: within a prompt group, at step t,
    B_t = Σ_i G_{i,t}·W_{i,t} / (Σ_i W_{i,t} + ε),
where G is the reward-to-go and W_{i,t} = Σ_{j≤t} w_{i,j} the path-variance proxy accumulated so far, with
w_j = (1 − 2π_j + Σ_v π_v²)·ρ_j² (π_j = exp(old log-prob) of the sampled token, Σπ² over the vocabulary at
that step, ρ the optional rollout importance weights). A = (G − B)·mask.

Inputs the trainer must provide beyond the usual ones: `old_log_probs` [B, T] and `sum_pi_squared` [B, T]
(verl: actor.calculate_sum_pi_squared=True computes Σπ² in the old-log-prob pass), optionally
`rollout_is_weights` [B, T].
"""

from __future__ import annotations

import torch

from ascend_rl.algorithms.advantages import register_adv_estimator
from ascend_rl.algorithms.masked import group_ids


def _require(name, **inputs):
    missing = [key for key, value in inputs.items() if value is None]
    if missing:
        raise ValueError(f"adv_estimator={name} needs {' and '.join(missing)} [B, T] from the trainer (verl computes "
                         f"sum_pi_squared when actor_rollout_ref.actor.calculate_sum_pi_squared=true)")


def _returns_and_path_weights(token_level_rewards, response_mask, old_log_probs, sum_pi_squared, rollout_is_weights):
    mask = response_mask.to(token_level_rewards.dtype)
    returns = (token_level_rewards * mask).flip(-1).cumsum(-1).flip(-1)
    w = 1 - 2 * torch.exp(old_log_probs) + sum_pi_squared
    if rollout_is_weights is not None:
        w = w * rollout_is_weights**2
    return returns, (w * mask).cumsum(-1)


def _zero_tail_row(lengths: torch.Tensor) -> tuple[int, int] | None:
    """(row, from) when one row of the group is strictly longest: past the second-longest length the others
    give no baseline, so verl sets that row's baseline to 0 there."""
    ordered = torch.sort(lengths).values
    longest, second = int(ordered[-1]), int(ordered[-2])
    at_longest = (lengths == longest).nonzero().squeeze(-1)
    if at_longest.numel() == 1 and longest > second:
        return int(at_longest[0]), second
    return None


@register_adv_estimator("optimal_token_baseline", needs=("old_log_probs", "sum_pi_squared"))
def optimal_token_baseline(*, token_level_rewards, response_mask, index, old_log_probs=None, sum_pi_squared=None,
                           rollout_is_weights=None, handle_zero_tail=True, epsilon=1e-8, **_):
    """OTB aligned by position t in the padded response (a group of one gets no baseline)."""
    _require("optimal_token_baseline", old_log_probs=old_log_probs, sum_pi_squared=sum_pi_squared)
    with torch.no_grad():
        returns, w_cum = _returns_and_path_weights(token_level_rewards, response_mask, old_log_probs,
                                                   sum_pi_squared, rollout_is_weights)
        mask = response_mask.to(returns.dtype)
        groups = group_ids(index, returns.device)
        baselines = torch.zeros_like(returns)
        for g in range(int(groups.max()) + 1 if groups.numel() else 0):
            rows = (groups == g).nonzero().squeeze(-1)
            if rows.numel() == 1:
                continue
            num = (returns[rows] * w_cum[rows] * mask[rows]).sum(0)
            den = (w_cum[rows] * mask[rows]).sum(0) + epsilon
            baselines[rows] = num / den
            tail = _zero_tail_row(mask[rows].sum(-1)) if handle_zero_tail else None
            if tail is not None:
                baselines[rows[tail[0]], tail[1]:] = 0.0
        return (returns - baselines) * mask, returns


@register_adv_estimator("tir_optimal_token_baseline", needs=("old_log_probs", "sum_pi_squared"))
def tir_optimal_token_baseline(*, token_level_rewards, response_mask, index, old_log_probs=None,
                               sum_pi_squared=None, rollout_is_weights=None, handle_zero_tail=True, epsilon=1e-8,
                               **_):
    """OTB for multi-turn (tool-integrated) responses: each row's valid tokens are first packed to the left, so
    the k-th generated token of every sample shares a baseline whatever observation spans lie between.
    Rows without tokens are left out of their group."""
    _require("tir_optimal_token_baseline", old_log_probs=old_log_probs, sum_pi_squared=sum_pi_squared)
    with torch.no_grad():
        returns, w_cum = _returns_and_path_weights(token_level_rewards, response_mask, old_log_probs,
                                                   sum_pi_squared, rollout_is_weights)
        mask = response_mask.bool()
        lengths = mask.sum(-1)
        width = int(lengths.max()) if lengths.numel() else 0
        # packed[i, k] = value at row i's k-th valid token; zeros past its length
        packed_slot = torch.arange(width, device=mask.device) < lengths.unsqueeze(-1)
        packed_w = w_cum.new_zeros(len(lengths), width)
        packed_g = torch.zeros_like(packed_w)
        packed_w[packed_slot] = w_cum[mask]
        packed_g[packed_slot] = returns[mask]
        groups = group_ids(index, returns.device)
        baselines = torch.zeros_like(packed_g)
        for g in range(int(groups.max()) + 1 if groups.numel() else 0):
            rows = ((groups == g) & (lengths > 0)).nonzero().squeeze(-1)
            if rows.numel() <= 1:
                continue
            b_star = (packed_g[rows] * packed_w[rows]).sum(0) / (packed_w[rows].sum(0) + epsilon)
            baselines[rows] = b_star.to(baselines.dtype)
            tail = _zero_tail_row(lengths[rows]) if handle_zero_tail else None
            if tail is not None:
                baselines[rows[tail[0]], tail[1]:] = 0.0
        advantages = torch.zeros_like(returns)
        advantages[mask] = (packed_g - baselines)[packed_slot]
        return advantages, returns
