"""Environment variables a config needs on its device (the seed's mandatory NPU + SGLang variables).

`check_environment` reports what is missing or inconsistent; setting the variables for the workers is
the launcher's job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from omegaconf import DictConfig

from ascend_rl.platform import get_platform


@dataclass(frozen=True)
class EnvFinding:
    variable: str
    problem: str  # "missing" | "inconsistent"
    message: str


@dataclass(frozen=True)
class EnvRule:
    variable: str
    applies: Callable[[DictConfig, str], bool]
    expected: str | None  # None: any non-empty value
    why: str


def _sglang_on_npu(cfg: DictConfig, device: str) -> bool:
    return device == "npu" and cfg.actor_rollout_ref.rollout.name == "sglang"


def _deepep(cfg: DictConfig, device: str) -> bool:
    return cfg.actor_rollout_ref.rollout.engine_kwargs.sglang.get("moe_a2a_backend") == "deepep"


ENV_RULES = (
    EnvRule("HCCL_HOST_SOCKET_PORT_RANGE", _sglang_on_npu, None,
            "lets the trainer and the SGLang server share one NPU (e.g. 60000-60050)"),
    EnvRule("HCCL_NPU_SOCKET_PORT_RANGE", _sglang_on_npu, None,
            "lets the trainer and the SGLang server share one NPU (e.g. 61000-61050)"),
    EnvRule("RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES", lambda c, d: d == "npu", "1",
            "Ray cannot tell NPU availability itself; every worker must see all devices"),
    EnvRule("ASCEND_RT_VISIBLE_DEVICES", lambda c, d: d == "npu", None,
            "the NPU dies this node uses (A3: two dies per card)"),
    EnvRule("SGLANG_DEEPEP_BF16_DISPATCH", _deepep, "1",
            "SGLang's DeepEP dispatch (moe_a2a_backend=deepep) needs bf16 dispatch"),
)


def check_environment(cfg: DictConfig, device: str, environ: Mapping[str, str]) -> list[EnvFinding]:
    findings = []
    for rule in ENV_RULES:
        if not rule.applies(cfg, device):
            continue
        value = environ.get(rule.variable, "")
        if not value:
            example = f"={rule.expected}" if rule.expected else ""
            findings.append(EnvFinding(rule.variable, "missing",
                                       f"export {rule.variable}{example}: {rule.why}"))
        elif rule.expected is not None and value != rule.expected:
            findings.append(EnvFinding(rule.variable, "inconsistent",
                                       f"{rule.variable}={value}, expected {rule.expected}: {rule.why}"))
    findings.extend(_visible_devices_count(cfg, device, environ))
    return findings


def _visible_devices_count(cfg: DictConfig, device: str, environ: Mapping[str, str]) -> list[EnvFinding]:
    var = get_platform(device).visible_devices_var
    value = environ.get(var, "") if var else ""
    if not value:
        return []
    count = len([d for d in value.split(",") if d.strip()])
    wanted = cfg.trainer.n_gpus_per_node
    if count == wanted:
        return []
    return [EnvFinding(var, "inconsistent",
                       f"{var} lists {count} device(s) but trainer.n_gpus_per_node={wanted}")]
