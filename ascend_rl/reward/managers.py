"""Reward managers (`reward.reward_manager.name`, legacy `reward_model.reward_manager`): how a sample's score
becomes its reward, as verl's registered managers of the same name do.

- `naive`: the score.
- `dapo`: the score plus DAPO's overlong penalty when `reward.reward_kwargs.overlong_buffer_cfg.enable`
  (`len`, `penalty_factor`, `log`; the limit is `reward.reward_kwargs.max_resp_len`).

verl's `batch`, `prime`, `remote` and `gdpo` are not built (config/verl_names.py lists them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ascend_rl.algorithms.dapo import overlong_penalty
from ascend_rl.algorithms.registry import Registry

KWARGS = "reward.reward_kwargs"


@dataclass(frozen=True)
class Shaped:
    rewards: torch.Tensor  # [B]
    metrics: dict[str, float]


RewardManager = Callable[[torch.Tensor, torch.Tensor], Shaped]  # (scores [B], response lengths [B]) -> Shaped
REWARD_MANAGERS: Registry = Registry("reward manager", "reward.reward_manager.name")


@REWARD_MANAGERS.register("naive")
def naive(reward_kwargs: Mapping) -> RewardManager:
    return lambda scores, lengths: Shaped(scores, {})


@REWARD_MANAGERS.register("dapo")
def dapo(reward_kwargs: Mapping) -> RewardManager:
    buffer = reward_kwargs.get("overlong_buffer_cfg") or {}
    if not buffer.get("enable"):
        return naive(reward_kwargs)
    length, factor = buffer.get("len"), buffer.get("penalty_factor", 1.0)
    max_len, log = reward_kwargs.get("max_resp_len"), bool(buffer.get("log", False))

    def shape(scores: torch.Tensor, lengths: torch.Tensor) -> Shaped:
        penalty = overlong_penalty(lengths, max_len, length, factor).to(scores.dtype)
        metrics = {"reward/overlong_reward/mean": float(penalty.mean()),
                   "reward/overlong_fraction": float((penalty < 0).float().mean())} if log else {}
        return Shaped(scores + penalty, metrics)

    return shape


def check_reward_kwargs(name: str, reward_kwargs: Mapping) -> list[str]:
    """verl's start-up checks of the manager's settings, as one-line messages naming the keys."""
    buffer = reward_kwargs.get("overlong_buffer_cfg") or {}
    if name != "dapo" or not buffer.get("enable"):
        return []
    key, length, max_len = f"{KWARGS}.overlong_buffer_cfg", buffer.get("len"), reward_kwargs.get("max_resp_len")
    if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
        return [f"{key}.len={length!r} must be a positive integer when the overlong penalty is enabled "
                f"(to turn it off: {key}.enable=False)"]
    if not isinstance(max_len, int) or isinstance(max_len, bool):
        return [f"{KWARGS}.max_resp_len must be set (an integer, usually data.max_response_length) when "
                f"{key}.enable=True"]
    if max_len < length:
        return [f"{KWARGS}.max_resp_len={max_len} must be at least {key}.len={length}"]
    factor = buffer.get("penalty_factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        return [f"{key}.penalty_factor={factor!r} must be a number"]
    return []


def make_reward_manager(name: str, reward_kwargs: Mapping) -> RewardManager:
    return REWARD_MANAGERS.get(name)(reward_kwargs)
