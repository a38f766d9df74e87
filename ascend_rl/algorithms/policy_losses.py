"""Policy losses (`actor.policy_loss.loss_mode`), with verl's definitions.

Each loss takes keyword arguments `old_log_prob`, `log_prob`, `advantages`, `response_mask` ([B, T]),
`loss_agg_mode`, the clip settings, and the global counts of `agg_loss` (`global_num_tokens`,
`global_batch_size`, `loss_scale_factor`); it returns `(loss, metrics)` with metrics `pg_clipfrac`,
`pg_clipfrac_lower` and `ppo_kl` as 0-dim tensors (masked means over this micro-batch).
"""

from __future__ import annotations

import torch

from ascend_rl.algorithms.aggregation import agg_loss
from ascend_rl.algorithms.masked import masked_mean
from ascend_rl.algorithms.registry import POLICY_LOSSES

register_policy_loss = POLICY_LOSSES.register
LOG_RATIO_CLAMP = 20.0  # keeps exp() finite for any log-ratio


def compute_policy_loss(name: str, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return POLICY_LOSSES.get(name)(**kwargs)


def _agg(loss_mat, mask, mode, agg: dict) -> torch.Tensor:
    keys = ("global_num_tokens", "global_batch_size", "loss_scale_factor")
    return agg_loss(loss_mat, mask, mode, **{k: agg[k] for k in keys if k in agg})


def _log_ratio(log_prob, old_log_prob):
    return torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _metrics(clipfrac, clipfrac_lower, ppo_kl) -> dict[str, torch.Tensor]:
    return {"pg_clipfrac": clipfrac.detach(), "pg_clipfrac_lower": clipfrac_lower.detach(), "ppo_kl": ppo_kl.detach()}


@register_policy_loss("vanilla")
def vanilla(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
            clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, **agg):
    """PPO clip with clip-higher (separate low/high ratios) and dual clip for negative advantages:
    L = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); for A < 0, L = min(L, −A·c)."""
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual clip, got {clip_ratio_c}")
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = -advantages * clip_ratio_c
    negative = advantages < 0
    loss_mat = torch.where(negative, torch.minimum(loss_ppo, loss_dual), loss_ppo)
    return _agg(loss_mat, response_mask, loss_agg_mode, agg), _metrics(
        masked_mean((loss_clipped > loss_unclipped).to(log_prob.dtype), response_mask),
        masked_mean(((loss_ppo > loss_dual) & negative).to(log_prob.dtype), response_mask),
        masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("gspo")
def gspo(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
         clip_ratio_low=0.2, clip_ratio_high=0.2, **agg):
    """Sequence-level ratio exp(mean_t Δ) with per-token gradients (straight-through), PPO-clipped;
    aggregated with seq-mean-token-mean whatever loss_agg_mode says (as GSPO defines it)."""
    log_ratio = log_prob - old_log_prob
    lengths = response_mask.sum(-1).clamp(min=1)
    seq_log_ratio = (log_ratio * response_mask).sum(-1) / lengths
    token_log_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(token_log_ratio, max=10.0))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    return _agg(loss_mat, response_mask, "seq-mean-token-mean", agg), _metrics(
        masked_mean((loss_clipped > loss_unclipped).to(log_prob.dtype), response_mask),
        torch.zeros((), device=log_prob.device),
        masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("gpg")
def gpg(*, log_prob, advantages, response_mask, loss_agg_mode="token-mean", **agg):
    """Plain policy gradient: L = −logπ·A."""
    zero = torch.zeros((), device=log_prob.device)
    return _agg(-log_prob * advantages, response_mask, loss_agg_mode, agg), _metrics(zero, zero, zero)


@register_policy_loss("cispo")
def cispo(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
          clip_ratio_low=0.2, clip_ratio_high=0.2, **agg):
    """Clipped importance-sampling weight, no gradient through it: L = −sg(clip(r))·A·logπ."""
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    loss_mat = -clipped.detach() * advantages * log_prob
    return _agg(loss_mat, response_mask, loss_agg_mode, agg), _metrics(
        masked_mean((ratio > 1 + clip_ratio_high).to(log_prob.dtype), response_mask),
        masked_mean((ratio < 1 - clip_ratio_low).to(log_prob.dtype), response_mask),
        masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("sapo")
def sapo(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
         tau_pos=1.0, tau_neg=1.05, **agg):
    """Soft-gated ratio: gate = σ(τ(r−1))·4/τ with τ = tau_pos for A > 0, tau_neg otherwise; L = −gate·A."""
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    zero = torch.zeros((), device=log_prob.device)
    return _agg(-gate * advantages, response_mask, loss_agg_mode, agg), _metrics(
        zero, zero, masked_mean(-log_ratio, response_mask)
    )
