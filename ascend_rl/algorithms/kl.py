"""KL estimators, KL controllers, and the KL-in-reward penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ascend_rl.algorithms.masked import masked_mean
from ascend_rl.algorithms.registry import KL_CONTROLLERS, KL_ESTIMATORS


@KL_ESTIMATORS.register("kl", "k1")
def kl_k1(log_prob, ref_log_prob):
    return log_prob - ref_log_prob


@KL_ESTIMATORS.register("abs")
def kl_abs(log_prob, ref_log_prob):
    return (log_prob - ref_log_prob).abs()


@KL_ESTIMATORS.register("mse", "k2")
def kl_k2(log_prob, ref_log_prob):
    return 0.5 * (log_prob - ref_log_prob).square()


@KL_ESTIMATORS.register("low_var_kl", "k3")
def kl_k3(log_prob, ref_log_prob):
    """exp(x) − x − 1 with x = ref − logp clamped to ±20, result clamped to [−10, 10]."""
    x = torch.clamp(ref_log_prob - log_prob, -20, 20)
    return torch.clamp(torch.exp(x) - x - 1, -10, 10)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate. A `+` suffix (e.g. `k3+`) gives the base estimator's value with k2's
    gradient (straight-through), which is unbiased for the KL gradient."""
    if kind.endswith("+"):
        value = KL_ESTIMATORS.get(kind[:-1])(log_prob, ref_log_prob)
        grad = kl_k2(log_prob, ref_log_prob)
        return grad + (value - grad).detach()
    return KL_ESTIMATORS.get(kind)(log_prob, ref_log_prob)


@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


@dataclass
class AdaptiveKLController:
    """β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon)."""

    value: float
    target_kl: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target_kl - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


KL_CONTROLLERS.register("fixed")(lambda kl_coef, **_: FixedKLController(kl_coef))
KL_CONTROLLERS.register("adaptive")(
    lambda kl_coef, target_kl, horizon, **_: AdaptiveKLController(kl_coef, target_kl, horizon)
)


def make_kl_controller(type: str, kl_coef: float, target_kl: float = 0.1, horizon: int = 10000):
    return KL_CONTROLLERS.get(type)(kl_coef=kl_coef, target_kl=target_kl, horizon=horizon)


def apply_kl_in_reward(token_level_scores, old_log_prob, ref_log_prob, response_mask, controller, kind="kl"):
    """token rewards = scores − β·KL·mask; updates the controller with the batch's mean sequence KL.
    Returns (token_level_rewards, metrics)."""
    kld = kl_penalty(old_log_prob, ref_log_prob, kind) * response_mask
    beta = controller.value
    rewards = token_level_scores - beta * kld
    current_kl = masked_mean(kld, response_mask, dim=-1).mean().item()
    controller.update(current_kl, n_steps=token_level_scores.shape[0])
    return rewards, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}
