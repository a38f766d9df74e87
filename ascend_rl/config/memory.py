"""A rough per-device memory estimate for the model states of a layout (no activations, no KV cache).

Good enough to see whether a recipe fits before renting the cluster: it counts parameters, gradients and
Adam states with the dtype and sharding the config asks for, and says what is offloaded to host memory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from ascend_rl.config.features import critic_in_use
from ascend_rl.config.layout import Layout

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
_SIZE_IN_NAME = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)[Bb](?![A-Za-z])")


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int | None
    parameters_source: str
    actor_params_gib: float = 0.0
    actor_grads_gib: float = 0.0
    actor_optimizer_gib: float = 0.0
    ref_params_gib: float = 0.0
    critic_gib: float = 0.0  # the critic's weights, gradients and optimizer state, in the same workers
    rollout_weights_gib: float = 0.0
    offloaded: tuple[str, ...] = ()

    @property
    def train_phase_gib(self) -> float:
        """Device memory for model states while training (the rollout engine has released its memory)."""
        return (self.actor_params_gib + self.actor_grads_gib + self.actor_optimizer_gib + self.ref_params_gib
                + self.critic_gib)

    def to_dict(self) -> dict:
        return {**asdict(self), "train_phase_gib": round(self.train_phase_gib, 2)}


def count_parameters(model_path: str | None) -> tuple[int | None, str]:
    """Exact count from a local config.json (built on the meta device), else a guess from the name."""
    if not model_path:
        return None, "no model path"
    if (Path(model_path) / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(model_path, local_files_only=True)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except Exception as err:  # a broken config.json: `train` names it at start-up; the plan only can't count
            return None, f"unknown (config.json unreadable: {type(err).__name__})"
        return sum(p.numel() for p in model.parameters()), "config.json"
    match = _SIZE_IN_NAME.search(Path(model_path).name)
    if match:
        return int(float(match.group(1)) * 1e9), f"guessed from the name ({match.group(0)})"
    return None, "unknown (no local config.json, no size in the name)"


def estimate_memory(cfg: DictConfig, layout: Layout) -> MemoryEstimate:
    params, source = count_parameters(cfg.actor_rollout_ref.model.path)
    if params is None:
        return MemoryEstimate(None, source)
    arr = cfg.actor_rollout_ref
    train = layout.train
    if train.strategy == "megatron":
        m = arr.actor.megatron
        shard = train.tp * train.pp
        optim_shard = shard * train.data_parallel  # distributed optimizer
        param_bytes = 2  # Megatron keeps bf16 weights and an fp32 master copy in the optimizer
        grad_bytes = 4  # its DDP accumulates gradients in fp32 buffers (grad_reduce_in_fp32)
        optim_bytes = 12
        param_off, grad_off, optim_off = m.param_offload, m.grad_offload, m.optimizer_offload
        ref_off = arr.ref.megatron.param_offload
    else:
        fsdp = arr.actor.fsdp_config
        shard = optim_shard = train.fsdp_shard or layout.world_size
        param_bytes = grad_bytes = DTYPE_BYTES.get(str(fsdp.model_dtype), 4)
        optim_bytes = 8  # Adam exp_avg + exp_avg_sq in fp32
        param_off = grad_off = fsdp.param_offload
        optim_off = fsdp.optimizer_offload
        ref_off = arr.ref.fsdp_config.param_offload
    use_ref = arr.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward

    def gib(n_bytes: float, offloaded: bool) -> float:
        return 0.0 if offloaded else round(n_bytes / GIB, 2)

    critic_gib, critic_off = 0.0, False
    if critic_in_use(cfg):  # sharded as the actor is (it lives in its workers, in the same engine)
        # a critic whose size cannot be read counts as the actor's: it is usually the same base model (then it
        # is not built on the meta device a second time)
        critic_path = cfg.critic.model.get("path")
        same = critic_path == arr.model.path
        critic_params = params if same else count_parameters(critic_path)[0] or params
        section = cfg.critic.megatron if train.strategy == "megatron" else cfg.critic.fsdp
        critic_off = bool(section.param_offload)  # its gradients go with its parameters, as in verl 0.9.1
        critic_gib = round(gib(critic_params * (param_bytes + grad_bytes) / shard, critic_off)
                           + gib(critic_params * optim_bytes / optim_shard, bool(section.optimizer_offload)), 2)
    offloaded = [name for name, off in (("actor params", param_off), ("actor grads", grad_off),
                                        ("optimizer states", optim_off), ("ref params", ref_off and use_ref),
                                        ("critic params", critic_off)) if off]
    return MemoryEstimate(
        parameters=params,
        parameters_source=source,
        actor_params_gib=gib(params * param_bytes / shard, param_off),
        actor_grads_gib=gib(params * grad_bytes / shard, grad_off),
        actor_optimizer_gib=gib(params * optim_bytes / optim_shard, optim_off),
        ref_params_gib=gib(params * 2 / shard, ref_off) if use_ref else 0.0,
        critic_gib=critic_gib,
        rollout_weights_gib=round(params * DTYPE_BYTES.get(str(arr.rollout.dtype), 2) / layout.rollout.tp / GIB, 2),
        offloaded=tuple(offloaded),
    )
