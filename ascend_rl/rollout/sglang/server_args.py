"""SGLang `ServerArgs` from our (verl's) config, one set per rollout replica, checked against the fields
of the installed SGLang version.

The mapping is verl's, so a verl user's server comes up the same way; `engine_kwargs.sglang.*` is passed
through last and wins, except where SGLang itself overrides the value (attention on NPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from ascend_rl.config.layout import RolloutLayout
from ascend_rl.platform import get_platform
from ascend_rl.rollout.sglang.fields import ServerArgsFields

ROLLOUT = "actor_rollout_ref.rollout"
USER_PREFIX = f"{ROLLOUT}.engine_kwargs.sglang"

# Where each mapped field comes from, for error messages.
MAPPED_FROM = {
    "model_path": "actor_rollout_ref.model.path", "dtype": f"{ROLLOUT}.dtype",
    "mem_fraction_static": f"{ROLLOUT}.gpu_memory_utilization", "disable_cuda_graph": f"{ROLLOUT}.enforce_eager",
    "max_running_requests": f"{ROLLOUT}.max_num_seqs",
    "tp_size": f"{ROLLOUT}.tensor_model_parallel_size × data_parallel_size",
    "dp_size": f"{ROLLOUT}.data_parallel_size", "ep_size": f"{ROLLOUT}.expert_parallel_size",
    "pp_size": f"{ROLLOUT}.pipeline_model_parallel_size", "load_format": f"{ROLLOUT}.load_format",
    "trust_remote_code": "actor_rollout_ref.model.trust_remote_code",
    "skip_tokenizer_init": f"{ROLLOUT}.skip_tokenizer_init", "random_seed": "trainer.seed",
}

# Our own defaults that older SGLang versions may lack: dropped (with a note) rather than failing.
OPTIONAL_FIELDS = frozenset({"enable_weights_cpu_backup", "deepep_dispatcher_output_dtype"})


@dataclass(frozen=True)
class DeviceDefaults:
    kwargs: dict
    env: dict
    forced: dict = field(default_factory=dict)  # fields SGLang overrides on this device whatever is passed


DEVICE_DEFAULTS = {
    "npu": DeviceDefaults({"device": "npu", "attention_backend": "ascend"}, {}, forced={"attention_backend": "ascend"}),
    "cuda": DeviceDefaults({"device": "cuda"}, {}),
    # SGLang's CPU engine is only selected with this variable (and wants the overlap scheduler off).
    "cpu": DeviceDefaults({"device": "cpu", "disable_overlap_schedule": True}, {"SGLANG_USE_CPU_ENGINE": "1"}),
}


@dataclass
class ServerArgsPlan:
    replica: int
    kwargs: dict
    env: dict
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def user_server_kwargs(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.actor_rollout_ref.rollout.engine_kwargs.sglang, resolve=True) or {}


def mapped_server_kwargs(cfg: DictConfig, rollout: RolloutLayout) -> dict:
    """The fields verl derives from its rollout keys, plus the settings RL needs from SGLang."""
    arr = cfg.actor_rollout_ref
    ro = arr.rollout
    return {
        "model_path": arr.model.path, "dtype": ro.dtype, "mem_fraction_static": ro.gpu_memory_utilization,
        "disable_cuda_graph": ro.enforce_eager, "max_running_requests": ro.max_num_seqs,
        "tp_size": rollout.tp * rollout.dp,  # SGLang's data parallelism lives inside its TP group
        "dp_size": rollout.dp, "ep_size": rollout.ep, "pp_size": rollout.pp, "load_format": ro.load_format,
        "trust_remote_code": arr.model.trust_remote_code, "skip_tokenizer_init": ro.skip_tokenizer_init,
        "random_seed": cfg.trainer.seed,
        "enable_memory_saver": True,  # release/resume_memory_occupation do nothing without it
        # Released weights are discarded unless backed up; a backup keeps anything the push leaves out.
        "enable_weights_cpu_backup": bool(ro.free_cache_engine),
        "skip_server_warmup": True, "log_level": "error", "gpu_id_step": 1,
        **({"enable_deterministic_inference": True} if cfg.trainer.deterministic else {}),
    }


def placement_kwargs(rollout: RolloutLayout, devices_per_node: int, replica: int, all_devices_visible: bool,
                     node_rank: int = 0, dist_init_addr: str | None = None) -> dict:
    """Which devices and nodes a replica uses. When every process sees all devices (Ray told not to set the
    visible-devices variable, as on NPU), the replica picks its slice with base_gpu_id."""
    per_replica = rollout.devices_per_replica
    nnodes = max(1, -(-per_replica // devices_per_node))
    out = {"base_gpu_id": (replica * per_replica) % devices_per_node if all_devices_visible else 0,
           "nnodes": nnodes, "node_rank": node_rank}
    if nnodes > 1 and dist_init_addr:
        out["dist_init_addr"] = dist_init_addr
    return out


def plan_server_args(cfg: DictConfig, rollout: RolloutLayout, device: str, fields: ServerArgsFields,
                     environ: dict, replica: int = 0, node_rank: int = 0,
                     dist_init_addr: str | None = None) -> ServerArgsPlan:
    """ServerArgs kwargs and server environment for one replica, with what is wrong for this SGLang version."""
    defaults = DEVICE_DEFAULTS[device]
    user = user_server_kwargs(cfg)
    noset = get_platform(device).noset_visible_devices_var
    kwargs = {**mapped_server_kwargs(cfg, rollout), **defaults.kwargs,
              **placement_kwargs(rollout, cfg.trainer.n_gpus_per_node, replica,
                                 bool(noset and environ.get(noset) == "1"), node_rank, dist_init_addr)}
    plan = ServerArgsPlan(replica, kwargs, dict(defaults.env))
    if user.get("moe_a2a_backend") == "deepep" and "deepep_dispatcher_output_dtype" not in user:
        if "deepep_dispatcher_output_dtype" in fields:
            kwargs["deepep_dispatcher_output_dtype"] = "bf16"
        else:
            plan.env["SGLANG_DEEPEP_BF16_DISPATCH"] = "1"
    for name, value in user.items():
        forced = defaults.forced.get(name)
        if forced is not None and value != forced:
            plan.warnings.append(f"{USER_PREFIX}.{name}={value}: SGLang uses {name}={forced} on {device} "
                                 f"whatever is passed; passing {forced}")
            continue
        kwargs[name] = value
    _check_fields(plan, set(user), fields)
    return plan


def _check_fields(plan: ServerArgsPlan, user_keys: set[str], fields: ServerArgsFields) -> None:
    for name in list(plan.kwargs):
        if name in fields:
            note = fields.deprecation(name)
            if note and name in user_keys:
                plan.warnings.append(f"{USER_PREFIX}.{name}: {note}")
            continue
        if name in OPTIONAL_FIELDS and name not in user_keys:
            plan.notes.append(f"{name} left out: {fields.describe()} has no such field")
            del plan.kwargs[name]
            continue
        source = f"{USER_PREFIX}.{name}" if name in user_keys else MAPPED_FROM.get(name, name)
        hint = fields.deprecation(name) or f"closest: {', '.join(fields.closest(name)) or 'none'}"
        plan.errors.append(f"{source}: {fields.describe()} has no ServerArgs field {name!r} ({hint})")
