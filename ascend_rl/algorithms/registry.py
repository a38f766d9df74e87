"""Name → function registries: the names are the values users write in the config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, what: str, config_key: str):
        self.what = what
        self.config_key = config_key
        self._entries: dict[str, F] = {}
        self._needs: dict[str, tuple[str, ...]] = {}

    def register(self, *names: str, needs: tuple[str, ...] = ()) -> Callable[[F], F]:
        """Decorator: `@ADV_ESTIMATORS.register("my_estimator")`. Re-registering a name replaces it. `needs`: the
        inputs beyond the common ones the caller must pass (an estimator's `values`, `reward_baselines`, ...)."""

        def add(fn: F) -> F:
            for name in names:
                self._entries[name] = fn
                self._needs[name] = tuple(needs)
            return fn

        return add

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.what} {name!r} ({self.config_key}); valid: {', '.join(self.names())}"
            ) from None

    def needs(self, name: str) -> tuple[str, ...]:
        return self._needs.get(name, ())

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


ADV_ESTIMATORS: Registry = Registry("advantage estimator", "algorithm.adv_estimator")
POLICY_LOSSES: Registry = Registry("policy loss", "actor_rollout_ref.actor.policy_loss.loss_mode")
KL_ESTIMATORS: Registry = Registry("KL estimator", "actor_rollout_ref.actor.kl_loss_type / algorithm.kl_penalty")
KL_CONTROLLERS: Registry = Registry("KL controller", "algorithm.kl_ctrl.type")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")
