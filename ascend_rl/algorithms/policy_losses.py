"""Policy losses (`actor.policy_loss.loss_mode`), with verl 0.9.1's definitions.

Every loss takes keyword arguments: `old_log_prob`, `log_prob`, `advantages`, `response_mask` ([B, T]),
`loss_agg_mode`, the global counts of `agg_loss` (`global_num_tokens`, `global_batch_size`,
`loss_scale_factor`), optional `rollout_is_weights` [B, T] (verl's rollout-correction weights, multiplied
into the per-token loss), and the settings it reads under verl's config names: `clip_ratio`,
`clip_ratio_low`/`_high` (None: clip_ratio), `clip_ratio_c`, `tau_pos`, `tau_neg`, and `policy_loss.*`:
`clip_cov_ratio`, `clip_cov_lb`, `clip_cov_ub`, `kl_cov_ratio`, `ppo_kl_coef` (policy_losses_cov), `dro_beta`,
`rollout_correction` (rollout_correction.bypass_mode); `loss_settings.policy_loss_kwargs` reads them from the
config. Keywords a loss does not use are ignored, so the actor passes the same set to every loss.
It returns `(loss, metrics)`: the metrics verl reports for that loss, as 0-dim tensors over this micro-batch.
"""

from __future__ import annotations

import torch

from ascend_rl.algorithms.aggregation import agg_loss
from ascend_rl.algorithms.masked import masked_mean, masked_sum
from ascend_rl.algorithms.registry import POLICY_LOSSES

register_policy_loss = POLICY_LOSSES.register
LOG_RATIO_CLAMP = 20.0  # keeps exp() finite for any log-ratio
_AGG_KEYS = ("global_num_tokens", "global_batch_size", "loss_scale_factor")


def compute_policy_loss(name: str, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return POLICY_LOSSES.get(name)(**kwargs)


def _agg(loss_mat, mask, mode, rest: dict, rollout_is_weights=None) -> torch.Tensor:
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    return agg_loss(loss_mat, mask, mode, **{k: rest[k] for k in _AGG_KEYS if k in rest})


def _log_ratio(log_prob, old_log_prob):
    return torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clip_range(clip_ratio_low, clip_ratio_high, clip_ratio=0.2) -> tuple[float, float]:
    """(ε_low, ε_high); an unset bound falls back to clip_ratio, as verl reads them."""
    return (clip_ratio if clip_ratio_low is None else clip_ratio_low,
            clip_ratio if clip_ratio_high is None else clip_ratio_high)


def _fraction(condition, mask) -> torch.Tensor:
    return masked_mean(condition.to(torch.float32), mask)


def _metrics(**values) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in values.items()}


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), device=like.device)


@register_policy_loss("vanilla")
def vanilla(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", clip_ratio=0.2,
            clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, rollout_is_weights=None, **rest):
    """PPO clip with clip-higher (separate low/high ratios) and dual clip for negative advantages:
    L = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); for A < 0, L = min(L, −A·c)."""
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual clip, got {clip_ratio_c}")
    low, high = clip_range(clip_ratio_low, clip_ratio_high, clip_ratio)
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = -advantages * clip_ratio_c
    negative = advantages < 0
    loss_mat = torch.where(negative, torch.minimum(loss_ppo, loss_dual), loss_ppo)
    return _agg(loss_mat, response_mask, loss_agg_mode, rest, rollout_is_weights), _metrics(
        pg_clipfrac=_fraction(loss_clipped > loss_unclipped, response_mask),
        pg_clipfrac_lower=_fraction((loss_ppo > loss_dual) & negative, response_mask),
        ppo_kl=masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("gspo")
def gspo(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
         clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, rollout_is_weights=None, **rest):
    """Sequence-level ratio exp(mean_t Δ) with per-token gradients (straight-through), PPO-clipped, aggregated
    with the configured loss_agg_mode as verl does (the GSPO paper uses seq-mean-token-mean)."""
    low, high = clip_range(clip_ratio_low, clip_ratio_high, clip_ratio)
    log_ratio = log_prob - old_log_prob
    lengths = response_mask.sum(-1).clamp(min=1)
    seq_log_ratio = masked_sum(log_ratio, response_mask, dim=-1) / lengths
    token_log_ratio = log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(token_log_ratio, max=10.0))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    return _agg(loss_mat, response_mask, loss_agg_mode, rest, rollout_is_weights), _metrics(
        pg_clipfrac=_fraction(loss_clipped > loss_unclipped, response_mask),
        pg_clipfrac_lower=_zero(log_prob),
        ppo_kl=masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("gpg")
def gpg(*, log_prob, advantages, response_mask, loss_agg_mode="token-mean", rollout_is_weights=None, **rest):
    """Plain policy gradient: L = −logπ·A (no metrics, as verl)."""
    return _agg(-log_prob * advantages, response_mask, loss_agg_mode, rest, rollout_is_weights), {}


@register_policy_loss("cispo")
def cispo(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", clip_ratio=0.2,
          clip_ratio_low=0.2, clip_ratio_high=0.2, rollout_is_weights=None, **rest):
    """Clipped importance-sampling weight, no gradient through it: L = −sg(clip(r))·A·logπ.
    pg_clipfrac counts the tokens clipped on either side."""
    low, high = clip_range(clip_ratio_low, clip_ratio_high, clip_ratio)
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - low, 1 + high)
    loss_mat = -clipped.detach() * advantages * log_prob
    return _agg(loss_mat, response_mask, loss_agg_mode, rest, rollout_is_weights), _metrics(
        pg_clipfrac=_fraction(ratio != clipped, response_mask),
        pg_clipfrac_lower=_zero(log_prob),
        ppo_kl=masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("sapo")
def sapo(*, old_log_prob, log_prob, advantages, response_mask, tau_pos=1.0, tau_neg=1.05,
         rollout_is_weights=None, **rest):
    """Soft-gated ratio: gate = σ(τ(r−1))·4/τ with τ = tau_pos for A > 0, tau_neg otherwise; L = −gate·A.
    Always aggregated with seq-mean-token-mean, whatever loss_agg_mode says (as verl)."""
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    zero = _zero(log_prob)
    return _agg(-gate * advantages, response_mask, "seq-mean-token-mean", rest, rollout_is_weights), _metrics(
        pg_clipfrac=zero, pg_clipfrac_lower=zero, ppo_kl=masked_mean(-log_ratio, response_mask)
    )


def _dppo(valid_mask, *, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip_ratio_c,
          rollout_is_weights, rest):
    """DPPO's shared form: L = −A·sg(min(r, c))·logπ on tokens inside the divergence trust region."""
    log_ratio = _log_ratio(log_prob, old_log_prob)
    ratio = torch.exp(log_ratio)
    truncated = torch.clamp(ratio, max=clip_ratio_c).detach()
    valid = valid_mask.detach().to(log_prob.dtype)
    loss_mat = -advantages * truncated * log_prob * valid
    return _agg(loss_mat, response_mask, loss_agg_mode, rest, rollout_is_weights), _metrics(
        pg_clipfrac=masked_mean(1.0 - valid, response_mask),
        pg_clipfrac_lower=masked_mean((ratio > clip_ratio_c).to(valid.dtype) * valid, response_mask),
        ppo_kl=masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("dppo_tv")
def dppo_tv(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", clip_ratio=0.2,
            clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=20.0, rollout_is_weights=None, **rest):
    """DPPO-Binary-TV: a token counts while its probability moved by at most ε_high up (A > 0) or ε_low
    down (A ≤ 0): π − π_old ≤ ε_high, resp. ≥ −ε_low. The clip ratios are these TV thresholds; the ratio
    weight is truncated at clip_ratio_c (the actor passes actor.clip_ratio_c; 20 when absent, as verl)."""
    low, high = clip_range(clip_ratio_low, clip_ratio_high, clip_ratio)
    moved = torch.exp(log_prob) - torch.exp(old_log_prob)
    valid = torch.where(advantages > 0, moved <= high, moved >= -low)
    return _dppo(valid, old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                 response_mask=response_mask, loss_agg_mode=loss_agg_mode, clip_ratio_c=clip_ratio_c,
                 rollout_is_weights=rollout_is_weights, rest=rest)


@register_policy_loss("dppo_kl")
def dppo_kl(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", clip_ratio=0.2,
            clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=20.0, rollout_is_weights=None, **rest):
    """DPPO-Binary-KL: the trust region is the KL between the Bernoulli(π_old) and Bernoulli(π) of the sampled
    token, ≤ ε_high when A > 0 (or π fell), ≤ ε_low otherwise (or π rose)."""
    low, high = clip_range(clip_ratio_low, clip_ratio_high, clip_ratio)
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
    binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
        (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
    valid = torch.where(advantages > 0, (binary_kl <= high) | (prob <= old_prob),
                        (binary_kl <= low) | (prob >= old_prob))
    return _dppo(valid, old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                 response_mask=response_mask, loss_agg_mode=loss_agg_mode, clip_ratio_c=clip_ratio_c,
                 rollout_is_weights=rollout_is_weights, rest=rest)


@register_policy_loss("geo_mean")
def geo_mean(*, old_log_prob, log_prob, advantages, response_mask, clip_ratio=0.2, clip_ratio_low=0.2,
             clip_ratio_high=0.2, rollout_is_weights=None, global_batch_size=None, **_):
    """GMPO: per sequence, r_seq = exp(mean_t Δ'_t) with Δ' = min(Δ, ε_high) for A > 0 and max(Δ, −ε_low)
    for A < 0 (no ±20 clamp, as verl); L_i = −Ā_i·r_seq with Ā_i the mean advantage of the sequence.
    The mean over sequences ignores loss_agg_mode (as verl). It divides by the rows with at least one token
    (verl's torch.mean also counts fully masked rows, whose loss is 0), or by global_batch_size."""
    low, high = clip_range(clip_ratio_low, clip_ratio_high, clip_ratio)
    mask = response_mask.to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob
    sign = torch.sign(advantages)
    clamped = torch.clamp(log_ratio, -low, high)
    log_ratio_clipped = sign * torch.minimum(sign * log_ratio, sign * clamped)
    lengths = mask.sum(-1) + 1e-8
    ratio = torch.exp((log_ratio_clipped * mask).sum(-1) / lengths)
    seq_advantage = (advantages * mask).sum(-1) / lengths
    seq_loss = -seq_advantage * ratio
    if rollout_is_weights is not None:  # the sequence's geometric-mean weight
        seq_loss = seq_loss * torch.exp((torch.log(rollout_is_weights + 1e-10) * mask).sum(-1) / lengths)
    rows = global_batch_size if global_batch_size is not None else (mask.sum(-1) > 0).sum()
    loss = seq_loss.sum() / (rows.clamp(min=1) if isinstance(rows, torch.Tensor) else max(rows, 1))
    clipped = log_ratio != clamped
    return loss, _metrics(
        pg_clipfrac=_fraction(clipped & (advantages > 0), response_mask),
        pg_clipfrac_lower=_fraction(clipped & (advantages < 0), response_mask),
        ppo_kl=masked_mean(-log_ratio, response_mask),
    )


@register_policy_loss("dro")
def dro(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", dro_beta=None,
        rollout_is_weights=None, **rest):
    """Direct reward optimisation: L = −(logπ·A − ½β(logπ − logπ_old)²), β = policy_loss.dro_beta > 0."""
    if dro_beta is None or dro_beta <= 0:
        raise ValueError("actor_rollout_ref.actor.policy_loss.dro_beta must be > 0 for loss_mode=dro")
    log_ratio = log_prob - old_log_prob
    loss_mat = -(log_prob * advantages - 0.5 * dro_beta * log_ratio.square())
    return _agg(loss_mat, response_mask, loss_agg_mode, rest, rollout_is_weights), _metrics(
        ppo_kl=masked_mean(-log_ratio, response_mask)
    )
