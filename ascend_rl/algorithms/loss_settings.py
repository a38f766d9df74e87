"""The policy-loss settings verl reads from the actor config, as keyword arguments for `compute_policy_loss`.

The actor passes the clip ratios and the global counts itself; these are the rest, under verl's names:
`clip_ratio` (the fallback of unset low/high ratios), `tau_pos`/`tau_neg` (sapo), `policy_loss.*`
(clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef, dro_beta) and the rollout correction
(bypass_mode): `policy_loss.rollout_correction` where the config has it, else `algorithm.rollout_correction`
(verl's trainer copies the latter into the former in bypass mode). Values are plain Python, so the
settings pickle to worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

ACTOR_KEYS = ("clip_ratio", "tau_pos", "tau_neg")
POLICY_LOSS_KEYS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta")


def _plain(node: Mapping | None) -> dict[str, Any] | None:
    return None if node is None else {key: node[key] for key in node}


def bypass_mode(algorithm_cfg: Mapping | None) -> bool:
    """verl's bypass mode (`algorithm.rollout_correction.bypass_mode`): the engine's log-probs stand in for the
    old policy's, and the `bypass_mode` loss replaces the actor's."""
    correction = (algorithm_cfg or {}).get("rollout_correction")
    return bool(correction is not None and correction.get("bypass_mode"))


def policy_loss_mode(actor_cfg: Mapping, algorithm_cfg: Mapping | None = None) -> str:
    """The actor's `policy_loss.loss_mode`, or `bypass_mode` in bypass mode, whatever it says: verl's trainer
    overwrites it so (rollout_corr_helper.apply_bypass_mode); said once here where that drops a choice."""
    chosen = actor_cfg["policy_loss"]["loss_mode"]
    if not bypass_mode(algorithm_cfg):
        return chosen
    if chosen not in ("vanilla", "bypass_mode"):
        logger.warning("algorithm.rollout_correction.bypass_mode=True: the bypass_mode policy loss (its loss_type "
                       "%s) replaces actor.policy_loss.loss_mode=%s, as in verl",
                       algorithm_cfg["rollout_correction"].get("loss_type", "ppo_clip"), chosen)
    return "bypass_mode"


def policy_loss_kwargs(actor_cfg: Mapping, algorithm_cfg: Mapping | None = None) -> dict[str, Any]:
    """`actor_rollout_ref.actor` (and `algorithm`) → the keyword arguments above; absent keys are left out,
    so each loss falls back to verl's default."""
    kwargs = {key: actor_cfg[key] for key in ACTOR_KEYS if actor_cfg.get(key) is not None}
    policy_loss = actor_cfg.get("policy_loss") or {}
    kwargs.update({key: policy_loss[key] for key in POLICY_LOSS_KEYS if policy_loss.get(key) is not None})
    correction = policy_loss.get("rollout_correction")
    if correction is None and algorithm_cfg is not None:
        correction = algorithm_cfg.get("rollout_correction")
    if correction is not None:
        kwargs["rollout_correction"] = _plain(correction)
    return kwargs
