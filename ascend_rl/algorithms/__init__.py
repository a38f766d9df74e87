"""RL math as pure tensor functions, in registries keyed by the names users write in the config.

Extend from user code with the decorators:

    from ascend_rl.algorithms import register_adv_estimator

    @register_adv_estimator("my_estimator")
    def my_estimator(*, token_level_rewards, response_mask, index, **_):
        ...
        return advantages, returns

then set `algorithm.adv_estimator=my_estimator`.
"""

from ascend_rl.algorithms import advantages_otb, policy_losses_cov, rollout_correction  # noqa: F401  (register)
from ascend_rl.algorithms.advantages import compute_advantages, register_adv_estimator
from ascend_rl.algorithms.aggregation import agg_denominator, agg_loss, global_counts
from ascend_rl.algorithms.dapo import groups_with_signal, overlong_penalty
from ascend_rl.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_in_reward,
    kl_penalty,
    make_kl_controller,
)
from ascend_rl.algorithms.logits import entropy_from_logits, log_probs_from_logits
from ascend_rl.algorithms.loss_settings import bypass_mode, policy_loss_kwargs, policy_loss_mode
from ascend_rl.algorithms.masked import masked_mean, masked_var, masked_whiten
from ascend_rl.algorithms.policy_losses import compute_policy_loss, register_policy_loss
from ascend_rl.algorithms.registry import ADV_ESTIMATORS, KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES
from ascend_rl.algorithms.value_loss import value_loss

__all__ = [
    "ADV_ESTIMATORS", "KL_ESTIMATORS", "LOSS_AGG_MODES", "POLICY_LOSSES",
    "AdaptiveKLController", "FixedKLController", "agg_denominator", "agg_loss", "apply_kl_in_reward",
    "compute_advantages", "compute_policy_loss", "entropy_from_logits", "global_counts", "groups_with_signal",
    "kl_penalty", "log_probs_from_logits", "make_kl_controller", "masked_mean", "masked_var", "masked_whiten",
    "overlong_penalty", "policy_loss_kwargs", "policy_loss_mode", "bypass_mode", "register_adv_estimator",
    "register_policy_loss", "value_loss",
]
