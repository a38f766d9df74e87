"""Rollout correction and verl 0.9.1's `bypass_mode` policy loss.

In bypass mode the rollout engine's log-probs stand in for the old policy's (no old-log-prob pass), so
`old_log_prob` *is* the rollout log-prob. The mismatch ρ = π_θ/π_rollout is then corrected with
importance-sampling (IS) weights and/or rejection sampling (RS), configured as verl's
`algorithm.rollout_correction` (the actor passes it as the `rollout_correction` mapping):

- `rollout_is`: None, "token" (ρ_t) or "sequence" (Π_t ρ_t on every token); `rollout_is_threshold`: a number
  or "u" truncates the weights at u (TIS), "l_u" zeroes weights outside [l, u] (IcePop);
  `rollout_is_batch_normalize` rescales them to mean 1 (over this micro-batch's tokens, resp. sequences).
- `rollout_rs`: comma-separated filters, every one must pass: token_k{1,2,3}, seq_sum_k{1,2,3},
  seq_mean_k{1,2,3}, seq_max_k{2,3} on k1 = −log ρ, k2 = ½(log ρ)², k3 = ρ − 1 − log ρ; `rollout_rs_threshold`:
  one value or one per filter; k1 filters take ratio bounds "l_u" (a single u means [1/u, u]) and keep
  log l ≤ k1 ≤ log u, the others an upper bound. A sequence filter drops the whole sequence.
- `loss_type`: "ppo_clip" (vanilla PPO on the rejection-masked tokens; the ratio already corrects, so no IS
  weight) or "reinforce" (L = −w·A·logπ).

verl's off-policy diagnostics are reduced here to a few: IS weight mean, rejected fraction, KL, k3 KL, χ².
"""

from __future__ import annotations

import math

import torch

from ascend_rl.algorithms.masked import masked_mean, masked_sum
from ascend_rl.algorithms.policy_losses import _agg, register_policy_loss, vanilla

SAFETY_BOUND = 20.0  # |log ρ| bound before exp()
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
              "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def parse_is_threshold(spec) -> tuple[float, float | None]:
    """(upper, lower or None) from 2.0, "2.0" or "0.5_2.0"."""
    if isinstance(spec, bool) or not isinstance(spec, int | float | str):
        raise TypeError(f"rollout_is_threshold must be a number or a 'lower_upper' string, got {spec!r}")
    lower, upper = (None, float(spec)) if not isinstance(spec, str) or "_" not in spec else map(float, spec.split("_", 1))
    if upper <= 0 or (lower is not None and not 0 < lower <= upper):
        raise ValueError(f"rollout_is_threshold {spec!r}: bounds must be positive and lower <= upper")
    return upper, lower


def parse_rs_thresholds(options: list[str], spec) -> dict[str, tuple[float | None, float]]:
    """Per filter (lower, upper): ratio bounds for k1 filters (lower defaults to 1/upper), else (None, upper)."""
    if spec is None:
        raise ValueError("rollout_rs needs rollout_rs_threshold")
    specs = [str(spec)] if isinstance(spec, int | float) else [p.strip() for p in str(spec).split(",") if p.strip()]
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold: give one threshold or {len(options)} (one per rollout_rs filter)")
    specs = specs * len(options) if len(specs) == 1 else specs
    bounds = {}
    for option, text in zip(options, specs):
        if option.endswith("k1"):
            lower, upper = map(float, text.split("_", 1)) if "_" in text else (1.0 / float(text), float(text))
            if not 0 < lower <= upper:
                raise ValueError(f"rollout_rs_threshold for {option}: need 0 < lower <= upper, got {text!r}")
        else:
            if "_" in text or float(text) <= 0:
                raise ValueError(f"rollout_rs_threshold for {option}: one positive upper bound, got {text!r}")
            lower, upper = None, float(text)
        bounds[option] = (lower, upper)
    return bounds


def is_weights(log_ratio, response_mask, level: str, threshold, batch_normalize: bool = False) -> torch.Tensor:
    """Detached IS weights [B, T], zero on padding."""
    if level not in ("token", "sequence"):
        raise ValueError(f"rollout_is must be token or sequence, got {level!r}")
    upper, lower = parse_is_threshold(threshold)
    mask = response_mask.to(log_ratio.dtype)
    if level == "sequence":
        log_ratio = masked_sum(log_ratio, response_mask, dim=-1).unsqueeze(-1).expand_as(mask)
    raw = torch.exp(torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND)) * mask
    if lower is None:
        weights = raw.clamp(max=upper)
    else:
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    weights = weights.detach()
    if batch_normalize:
        if level == "token":
            mean = masked_mean(weights, response_mask)
        else:
            rows = (mask.sum(-1) > 0).to(weights.dtype)
            mean = (masked_mean(weights, response_mask, dim=-1) * rows).sum() / rows.sum().clamp(min=1e-8)
        if mean > 1e-8:
            weights = weights / mean
    return weights


def _seq_max(values, response_mask):
    filled = values.masked_fill(~response_mask.bool(), float("-inf")).max(-1).values
    return torch.where(torch.isinf(filled), torch.zeros_like(filled), filled)


_SEQ_STAT = {"seq_sum": lambda v, m: masked_sum(v, m, dim=-1), "seq_mean": lambda v, m: masked_mean(v, m, dim=-1),
             "seq_max": _seq_max}


def rejection_mask(log_ratio, response_mask, rollout_rs: str, threshold) -> torch.Tensor:
    """The response mask with the tokens (or sequences) that fail any rollout_rs filter set to 0."""
    options = list(dict.fromkeys(o.strip() for o in rollout_rs.split(",") if o.strip()))
    unknown = [o for o in options if o not in RS_OPTIONS]
    if not options or unknown:
        raise ValueError(f"rollout_rs {rollout_rs!r}: valid filters are {', '.join(RS_OPTIONS)}")
    bounds = parse_rs_thresholds(options, threshold)
    x = torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND)
    stats = {"k1": -x, "k2": 0.5 * x.square(), "k3": torch.exp(x) - 1.0 - x}
    keep = torch.ones_like(response_mask, dtype=torch.bool)
    for option in options:
        level, kind = option.rsplit("_", 1)
        stat = stats[kind] if level == "token" else _SEQ_STAT[level](stats[kind], response_mask).unsqueeze(-1)
        lower, upper = bounds[option]
        passed = (stat >= math.log(lower)) & (stat <= math.log(upper)) if kind == "k1" else stat <= upper
        keep = keep & passed.expand_as(keep)
    return response_mask * keep.to(response_mask.dtype)


def diagnostics(log_ratio, response_mask, effective_mask, weights) -> dict[str, torch.Tensor]:
    """verl's rollout_corr/* metrics (a few of them) of log ρ = log π_old − log π_rollout."""
    x = torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND)
    metrics = {
        "rollout_corr/kl": masked_mean(-log_ratio, response_mask),
        "rollout_corr/k3_kl": masked_mean(torch.exp(log_ratio) - log_ratio - 1, response_mask),
        "rollout_corr/chi2_token": masked_mean(torch.exp(x).square(), response_mask) - 1.0,
        "rollout_corr/rollout_rs_masked_fraction": masked_mean(1.0 - effective_mask.to(x.dtype), response_mask),
    }
    if weights is not None:
        metrics["rollout_corr/rollout_is_mean"] = masked_mean(weights, response_mask)
    return {name: value.detach() for name, value in metrics.items()}


@register_policy_loss("bypass_mode")
def bypass_mode(*, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                rollout_correction=None, **rest):
    """`old_log_prob` is the rollout's; see the module docstring for `rollout_correction`'s keys."""
    if rollout_correction is None:
        raise ValueError("loss_mode=bypass_mode needs algorithm.rollout_correction (passed as rollout_correction)")
    cfg = dict(rollout_correction)
    loss_type = cfg.get("loss_type", "ppo_clip")
    if loss_type not in ("ppo_clip", "reinforce"):
        raise ValueError(f"rollout_correction.loss_type must be ppo_clip or reinforce, got {loss_type!r}")
    with torch.no_grad():
        log_ratio = log_prob - old_log_prob
        weights = None
        if cfg.get("rollout_is") is not None and cfg.get("rollout_is_threshold", 2.0) is not None:
            weights = is_weights(log_ratio, response_mask, cfg["rollout_is"], cfg.get("rollout_is_threshold", 2.0),
                                 cfg.get("rollout_is_batch_normalize", False))
        mask = response_mask
        if cfg.get("rollout_rs") is not None:
            mask = rejection_mask(log_ratio, response_mask, cfg["rollout_rs"], cfg.get("rollout_rs_threshold"))
        diagnostics_ = diagnostics(log_ratio, response_mask, mask, weights)
    if loss_type == "reinforce":
        loss = _agg(-advantages * log_prob, mask, loss_agg_mode, rest, weights)
        metrics = {"ppo_kl": masked_mean(-(log_prob - old_log_prob), mask).detach()}
    else:  # the PPO ratio against the rollout policy is the correction: no IS weight on top
        rest.pop("rollout_is_weights", None)
        loss, metrics = vanilla(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                                response_mask=mask, loss_agg_mode=loss_agg_mode, **rest)
    return loss, {**metrics, **diagnostics_}
