"""Advantage estimators (`algorithm.adv_estimator`), with verl's definitions.

Every estimator takes keyword arguments and returns `(advantages, returns)`, both [B, T]:
`token_level_rewards` [B, T], `response_mask` [B, T], `index` (group label per sample), plus what it
needs of `values`, `reward_baselines`, `gamma`, `lam`, `norm_adv_by_std_in_grpo`, `epsilon`.
Unused keywords are accepted so the trainer can call any estimator the same way.
"""

from __future__ import annotations

import torch

from ascend_rl.algorithms.masked import group_ids, group_stats, masked_sum, masked_whiten
from ascend_rl.algorithms.registry import ADV_ESTIMATORS

register_adv_estimator = ADV_ESTIMATORS.register


def compute_advantages(name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return ADV_ESTIMATORS.get(name)(**kwargs)


def sequence_scores(token_level_rewards, response_mask):
    """s_i: the sum of a sample's rewards over its response tokens (padding never counts)."""
    return masked_sum(token_level_rewards, response_mask, dim=-1)


def _group_baseline_stats(token_level_rewards, response_mask, index):
    scores = sequence_scores(token_level_rewards, response_mask)
    counts, mean, std = group_stats(scores, group_ids(index, scores.device))
    single = counts == 1
    # A group of one has no baseline: mean 0 and std 1, so its advantage is its own score.
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return scores, counts, mean, std


def _broadcast(per_sample: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adv = per_sample.unsqueeze(-1) * response_mask
    return adv, adv


@register_adv_estimator("grpo")
def grpo(*, token_level_rewards, response_mask, index, norm_adv_by_std_in_grpo=True, epsilon=1e-6, **_):
    """A_i = (s_i − μ_g)/(σ_g + ε), σ unbiased; Dr.GRPO (no std) when norm_adv_by_std_in_grpo=False."""
    scores, _, mean, std = _group_baseline_stats(token_level_rewards, response_mask, index)
    adv = (scores - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else scores - mean
    return _broadcast(adv, response_mask)


@register_adv_estimator("rloo")
def rloo(*, token_level_rewards, response_mask, index, **_):
    """A_i = n/(n−1)·(s_i − μ_g): the score minus the mean of the other samples of the group."""
    scores, counts, mean, _ = _group_baseline_stats(token_level_rewards, response_mask, index)
    factor = torch.where(counts > 1, counts / (counts - 1).clamp(min=1), torch.ones_like(counts))
    return _broadcast(factor * (scores - mean), response_mask)


@register_adv_estimator("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(*, token_level_rewards, response_mask, index, **_):
    """s_i − μ_g tiled over the response, then whitened over all masked tokens of the batch."""
    scores, _, mean, _ = _group_baseline_stats(token_level_rewards, response_mask, index)
    tiled = (scores - mean).unsqueeze(-1) * response_mask
    adv = masked_whiten(tiled, response_mask) * response_mask
    return adv, adv


@register_adv_estimator("reinforce_plus_plus")
def reinforce_plus_plus(*, token_level_rewards, response_mask, gamma=1.0, **_):
    """Discounted return G_t = r_t + γ·G_{t+1} (reset after the response ends), whitened."""
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros_like(token_level_rewards[:, 0])
    for t in reversed(range(token_level_rewards.shape[1])):
        running = token_level_rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * response_mask[:, t]
    adv = masked_whiten(returns, response_mask) * response_mask
    return adv, returns


@register_adv_estimator("remax")
def remax(*, token_level_rewards, response_mask, reward_baselines, **_):
    """Reverse cumulative sum of the masked rewards minus the greedy sample's score."""
    returns = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
    adv = returns - reward_baselines.unsqueeze(-1) * response_mask
    return adv, returns


@register_adv_estimator("opo")
def opo(*, token_level_rewards, response_mask, index, **_):
    """Baseline = the group's length-weighted mean score Σ(len·s)/Σlen."""
    scores = sequence_scores(token_level_rewards, response_mask)
    lengths = response_mask.sum(-1).to(scores.dtype)
    groups = group_ids(index, scores.device)
    n = int(groups.max()) + 1 if groups.numel() else 0
    weighted = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, groups, lengths * scores)
    total_len = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, groups, lengths)
    counts = torch.zeros(n, dtype=scores.dtype, device=scores.device).index_add_(0, groups, torch.ones_like(scores))
    baseline = torch.where(counts > 1, weighted / total_len.clamp(min=1), torch.zeros_like(weighted))[groups]
    return _broadcast(scores - baseline, response_mask)


@register_adv_estimator("gae")
def gae(*, token_level_rewards, response_mask, values, gamma=1.0, lam=1.0, **_):
    """δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}; masked positions carry V and A through;
    returns = A + V; A is then whitened over the mask."""
    mask = response_mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    last_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * last_adv
        next_value = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_value
        last_adv = adv_t * mask[:, t] + (1 - mask[:, t]) * last_adv
        advantages[:, t] = last_adv
    returns = advantages + values
    return masked_whiten(advantages, response_mask), returns
