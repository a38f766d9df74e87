"""Clip-Cov and KL-Cov (verl 0.9.1's `clip_cov`, `kl_cov`): PPO variants that act on the few tokens whose
advantage and log-prob covary most, the tokens that drive entropy collapse.

cov_t = (A_t − mean A)·(logπ_t − mean logπ), means over the micro-batch's valid tokens. No ±20 clamp on the
log-ratio here (as verl).
"""

from __future__ import annotations

import torch

from ascend_rl.algorithms.masked import masked_mean
from ascend_rl.algorithms.policy_losses import _agg, _fraction, _metrics, clip_range, register_policy_loss


@register_policy_loss("clip_cov")
def clip_cov(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", clip_ratio=0.2,
             clip_ratio_low=0.2, clip_ratio_high=0.2, clip_cov_ratio=None, clip_cov_lb=None, clip_cov_ub=None,
             rollout_is_weights=None, generator: torch.Generator | None = None, **rest):
    """PPO clip, plus: among the valid tokens PPO did not clip whose cov lies in (lb, ub), a random
    max(⌊clip_cov_ratio·N_tokens⌋, 1) get no gradient (their loss is 0). Defaults (config null):
    ratio 0.0002, lb 1.0, ub 5.0. `generator` seeds the random pick (global RNG by default, as verl)."""
    clip_cov_ratio = 0.0002 if clip_cov_ratio is None else clip_cov_ratio
    lb = 1.0 if clip_cov_lb is None else clip_cov_lb
    ub = 5.0 if clip_cov_ub is None else clip_cov_ub
    if clip_cov_ratio <= 0:
        raise ValueError(f"actor_rollout_ref.actor.policy_loss.clip_cov_ratio must be > 0, got {clip_cov_ratio}")
    low, high = clip_range(clip_ratio_low, clip_ratio_high, clip_ratio)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    valid = response_mask > 0
    with torch.no_grad():
        cov = (advantages - masked_mean(advantages, response_mask)) * (log_prob - masked_mean(log_prob, response_mask))
        candidates = valid & ~(loss_clipped > loss_unclipped) & (cov > lb) & (cov < ub)
        picked = candidates.nonzero()
        n_pick = min(max(int(clip_cov_ratio * response_mask.sum().item()), 1), len(picked))
        picked = picked[torch.randperm(len(picked), generator=generator)[:n_pick].to(picked.device)]
        keep = torch.ones_like(advantages)
        keep[picked[:, 0], picked[:, 1]] = 0
    loss_mat = torch.maximum(loss_unclipped, loss_clipped) * keep
    return _agg(loss_mat, response_mask, loss_agg_mode, rest, rollout_is_weights), _metrics(
        pg_clipfrac=_fraction(keep == 0, response_mask),
        ppo_kl=masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("kl_cov")
def kl_cov(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", kl_cov_ratio=None,
           ppo_kl_coef=None, rollout_is_weights=None, **rest):
    """Unclipped −A·r, plus ppo_kl_coef·|Δ| on the max(⌊kl_cov_ratio·N_tokens⌋, 1) valid tokens with the
    largest cov. Defaults (config null): ratio 0.0002, coef 1.0 (verl's config default for the coef is 0.1).
    ppo_kl reports mean |Δ|, as verl."""
    kl_cov_ratio = 0.0002 if kl_cov_ratio is None else kl_cov_ratio
    ppo_kl_coef = 1.0 if ppo_kl_coef is None else ppo_kl_coef
    if kl_cov_ratio <= 0:
        raise ValueError(f"actor_rollout_ref.actor.policy_loss.kl_cov_ratio must be > 0, got {kl_cov_ratio}")
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    loss_plain = -advantages * ratio
    loss_kl = loss_plain + ppo_kl_coef * log_ratio.abs()
    valid = response_mask > 0
    penalised = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
    with torch.no_grad():
        adv_valid, logp_valid = advantages[valid], log_prob[valid]
        if adv_valid.numel():
            cov = (adv_valid - adv_valid.mean()) * (logp_valid - logp_valid.mean())
            top = torch.topk(cov, max(1, int(cov.numel() * kl_cov_ratio))).indices
            flat = valid.reshape(-1).nonzero().squeeze(-1)[top]
            penalised.view(-1)[flat] = True
    loss_mat = torch.where(penalised, loss_kl, loss_plain)
    return _agg(loss_mat, response_mask, loss_agg_mode, rest, rollout_is_weights), _metrics(
        ppo_kl=masked_mean(log_ratio.abs(), response_mask)
    )
