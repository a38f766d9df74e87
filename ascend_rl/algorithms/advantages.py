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
    return _group_stats_of(sequence_scores(token_level_rewards, response_mask), index)


def _group_stats_of(scores, index):
    counts, mean, std = group_stats(scores, group_ids(index, scores.device))
    single = counts == 1
    # A group of one has no baseline: mean 0 and std 1, so its advantage is its own score.
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return scores, counts, mean, std


def _grpo_scalars(scores, index, norm_by_std, epsilon):
    _, _, mean, std = _group_stats_of(scores, index)
    return (scores - mean) / (std + epsilon) if norm_by_std else scores - mean


def _broadcast(per_sample: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    adv = per_sample.unsqueeze(-1) * response_mask
    return adv, adv


@register_adv_estimator("grpo")
def grpo(*, token_level_rewards, response_mask, index, norm_adv_by_std_in_grpo=True, epsilon=1e-6, **_):
    """A_i = (s_i − μ_g)/(σ_g + ε), σ unbiased; Dr.GRPO (no std) when norm_adv_by_std_in_grpo=False."""
    scores = sequence_scores(token_level_rewards, response_mask)
    return _broadcast(_grpo_scalars(scores, index, norm_adv_by_std_in_grpo, epsilon), response_mask)


@register_adv_estimator("grpo_vectorized")
def grpo_vectorized(*, token_level_rewards, response_mask, index, epsilon=1e-6, **_):
    """grpo's math. verl's trainer hands algorithm.norm_adv_by_std_in_grpo to `grpo` only, so this name
    always divides by σ (as in verl)."""
    return grpo(token_level_rewards=token_level_rewards, response_mask=response_mask, index=index, epsilon=epsilon)


@register_adv_estimator("rloo")
def rloo(*, token_level_rewards, response_mask, index, **_):
    """A_i = n/(n−1)·(s_i − μ_g): the score minus the mean of the other samples of the group."""
    scores, counts, mean, _ = _group_baseline_stats(token_level_rewards, response_mask, index)
    factor = torch.where(counts > 1, counts / (counts - 1).clamp(min=1), torch.ones_like(counts))
    return _broadcast(factor * (scores - mean), response_mask)


@register_adv_estimator("rloo_vectorized")
def rloo_vectorized(*, token_level_rewards, response_mask, index, **_):
    """rloo, except that a group of one gets advantage 0 (rloo keeps its score), as verl's vectorized form."""
    scores, counts, mean, _ = _group_baseline_stats(token_level_rewards, response_mask, index)
    factor = torch.where(counts > 1, counts / (counts - 1).clamp(min=1), torch.zeros_like(counts))
    return _broadcast(factor * (scores - mean), response_mask)


@register_adv_estimator("gpg")
def gpg(*, token_level_rewards, response_mask, index, f_norm=1.0, **_):
    """GPG: A_i = α·(s_i − μ_g)/f_norm with α = B / #(samples with s ≠ 0), which rescales a batch whose
    rewards are mostly zero (no std normalisation)."""
    scores, _, mean, _ = _group_baseline_stats(token_level_rewards, response_mask, index)
    alpha = scores.numel() / torch.count_nonzero(scores).clamp(min=1)
    return _broadcast(alpha * (scores - mean) / f_norm, response_mask)


@register_adv_estimator("grpo_passk")
def grpo_passk(*, token_level_rewards, response_mask, index, norm_adv_by_std_in_grpo=True, epsilon=1e-6, **_):
    """Pass@k: only each group's best sample gets an advantage, s_max − s_second (over σ_g + ε when
    norm_adv_by_std_in_grpo); ties at the top give 0. Every group needs two samples or more."""
    scores = sequence_scores(token_level_rewards, response_mask)
    groups = group_ids(index, scores.device)
    counts, _, std = group_stats(scores, groups)
    if (counts < 2).any():
        raise ValueError("grpo_passk needs at least 2 samples per prompt (actor_rollout_ref.rollout.n >= 2)")
    per_sample = torch.zeros_like(scores)
    for g in range(int(groups.max()) + 1):
        members = (groups == g).nonzero().squeeze(-1)
        top = torch.topk(scores[members], 2)
        gap = top.values[0] - top.values[1]
        best = members[top.indices[0]]
        per_sample[best] = gap / (std[best] + epsilon) if norm_adv_by_std_in_grpo else gap
    return _broadcast(per_sample, response_mask)


@register_adv_estimator("gdpo", needs=("reward_components",))
def gdpo(*, token_level_rewards, response_mask, index, reward_components=None, reward_weights=None,
         epsilon=1e-6, **_):
    """GDPO: each reward component is GRPO-normalised within its group on its own, A = whiten(Σ_k w_k·A_k)
    over the batch's masked tokens. `reward_components` maps name → per-sample score [B] (verl reads
    them from compute_score's dict under algorithm.gdpo_reward_keys, weights algorithm.gdpo_reward_weights);
    without them the one component is s_i. verl's trainer does not pass norm_adv_by_std_in_grpo here, so
    the per-component normalisation always divides by σ."""
    if reward_components is None:
        components = [sequence_scores(token_level_rewards, response_mask)]
    else:
        components = list(reward_components.values() if hasattr(reward_components, "values") else reward_components)
    weights = [1.0] * len(components) if reward_weights is None else list(reward_weights)
    if len(weights) != len(components):
        raise ValueError(f"gdpo: {len(weights)} reward weights for {len(components)} reward components")
    mask = response_mask.to(token_level_rewards.dtype)
    total = torch.zeros_like(token_level_rewards)
    for weight, scores in zip(weights, components):
        scores = torch.as_tensor(scores, dtype=token_level_rewards.dtype, device=token_level_rewards.device)
        total = total + weight * _grpo_scalars(scores, index, True, epsilon).unsqueeze(-1) * mask
    adv = masked_whiten(total, response_mask) * response_mask
    return adv, adv


@register_adv_estimator("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline(*, token_level_rewards, response_mask, index, **_):
    """s_i − μ_g tiled over the response, then whitened over all masked tokens of the batch."""
    scores, _, mean, _ = _group_baseline_stats(token_level_rewards, response_mask, index)
    tiled = (scores - mean).unsqueeze(-1) * response_mask
    adv = masked_whiten(tiled, response_mask) * response_mask
    return adv, adv


@register_adv_estimator("reinforce_plus_plus")
def reinforce_plus_plus(*, token_level_rewards, response_mask, gamma=1.0, **_):
    """G_t = r_t + γ·G_{t+1} over response tokens; a masked position inside the response (e.g. a tool
    observation) passes the running return through unchanged and gets return 0. A = whiten(G) over the mask."""
    mask = response_mask.bool()
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros_like(token_level_rewards[:, 0])
    for t in reversed(range(token_level_rewards.shape[1])):
        candidate = token_level_rewards[:, t] + gamma * running
        returns[:, t] = torch.where(mask[:, t], candidate, torch.zeros_like(candidate))
        running = torch.where(mask[:, t], candidate, running)
    adv = masked_whiten(returns, response_mask) * response_mask
    return adv, returns


@register_adv_estimator("remax", needs=("reward_baselines",))
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


@register_adv_estimator("gae", needs=("values",))
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
