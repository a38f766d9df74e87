"""Rewards: rule scorers routed by data_source, user functions by path, isolated scoring."""

from ascend_rl.reward.runner import (
    RewardFunction,
    RewardRunner,
    ScoredSample,
    failure_summary,
    load_custom_reward_fn,
    log_failures,
)
from ascend_rl.reward.scorers import SCORERS, default_compute_score, register_scorer, scorer_for

__all__ = ["SCORERS", "RewardFunction", "RewardRunner", "ScoredSample", "default_compute_score", "failure_summary",
           "load_custom_reward_fn", "log_failures", "register_scorer", "scorer_for"]
