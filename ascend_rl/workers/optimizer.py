"""The actor's optimizer and learning-rate schedule (`actor_rollout_ref.actor.optim.*`), as verl builds them:
`optimizer_impl` is a module, `optimizer` a class in it (torch.optim.AdamW by default; e.g. torchao.optim
_AdamW or bitsandbytes.optim AdamW8bit), called with lr, weight_decay, betas (for Adam-like names) and
`override_optimizer_config` on top."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

KEY = "actor_rollout_ref.actor.optim"


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.0
    num_cycles: float = 0.5
    optimizer_impl: str = "torch.optim"
    optimizer: str = "AdamW"
    overrides: dict = field(default_factory=dict, hash=False)  # override_optimizer_config


def optimizer_class(optimizer_impl: str, optimizer: str):
    """The class, or a ValueError naming the keys."""
    try:
        module = importlib.import_module(optimizer_impl)
    except ImportError as err:
        raise ValueError(f"{KEY}.optimizer_impl={optimizer_impl}: cannot import it ({err})") from None
    cls = getattr(module, optimizer, None)
    if not callable(cls):
        raise ValueError(f"{KEY}.optimizer={optimizer}: {optimizer_impl} has no such optimizer")
    return cls


def build_optimizer(params, optim: OptimSettings):
    kwargs = {"lr": optim.lr, "weight_decay": optim.weight_decay}
    if "adam" in optim.optimizer.lower() or "ademamix" in optim.optimizer.lower():  # verl's rule for betas
        kwargs["betas"] = tuple(optim.betas)
    kwargs.update(optim.overrides)
    cls = optimizer_class(optim.optimizer_impl, optim.optimizer)
    try:
        return cls(params, **kwargs)
    except TypeError as err:  # an override the class does not take
        raise ValueError(f"{KEY}: {optim.optimizer_impl}.{optim.optimizer} rejects its arguments ({err}); "
                         f"check {KEY}.override_optimizer_config") from None


def build_scheduler(optimizer, optim: OptimSettings):
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if optim.lr_scheduler_type == "constant":
        return get_constant_schedule_with_warmup(optimizer, optim.warmup_steps)
    if optim.lr_scheduler_type == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, optim.warmup_steps, optim.total_steps, num_cycles=optim.num_cycles,
            min_lr_rate=optim.min_lr_ratio)
    raise ValueError(f"{KEY}.lr_scheduler_type={optim.lr_scheduler_type!r}: expected constant or cosine")
