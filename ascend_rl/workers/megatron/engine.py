"""What the Megatron engine is built from (`*.megatron.*` and the Megatron tree's `*.optim.*`, verl's names), and
the pieces it is built of: the model on Megatron's process groups with the HF weights, Megatron's
DistributedDataParallel, its optimizer (DistributedOptimizer when asked) and its LR schedule, as verl builds them
(verl/utils/megatron/optimizer.py)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch

from ascend_rl.workers.critic import value_model
from ascend_rl.workers.megatron.checkpoint import load_dist_weights
from ascend_rl.workers.megatron.model import MegatronParallel, build_gpt_model, init_model_parallel, load_hf_weights
from ascend_rl.workers.megatron.offload import MegatronOffload

log = logging.getLogger(__name__)

# TransformerConfig fields MindSpeed adds on Ascend; without MindSpeed, Megatron-core has no such field.
MINDSPEED_FIELDS = {"use_flash_attn": "MindSpeed's fused attention on Ascend"}


def transformer_overrides(overrides: dict, key: str) -> dict:
    """`override_transformer_config` for this machine: MindSpeed's own fields are kept where MindSpeed is
    installed and left out, with one log line each, where it is not (a verl recipe for Ascend sets them). Any
    other unknown field fails when the model is built, naming it."""
    if importlib.util.find_spec("mindspeed") is not None:
        return dict(overrides)
    kept = {}
    for name, value in overrides.items():
        if name in MINDSPEED_FIELDS:
            log.warning("%s.%s=%s: %s, which is not installed here; left out", key, name, value,
                        MINDSPEED_FIELDS[name])
        else:
            kept[name] = value
    return kept


def unknown_overrides(transformer: dict, ddp: dict, optimizer: dict) -> dict[str, list[str]]:
    """The override maps' fields Megatron's config dataclasses do not have, by the map's key (MindSpeed's own
    fields are known: they are left out where MindSpeed is not installed)."""
    import dataclasses

    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    maps = {"actor.megatron.override_transformer_config": (transformer, TransformerConfig, set(MINDSPEED_FIELDS)),
            "actor.megatron.override_ddp_config": (ddp, DistributedDataParallelConfig, set()),
            "actor.optim.override_optimizer_config": (optimizer, OptimizerConfig, set())}
    unknown = {}
    for key, (given, cls, extra) in maps.items():
        fields = {f.name for f in dataclasses.fields(cls)} | extra
        if missing := sorted(set(given) - fields):
            unknown[key] = missing
    return unknown


@dataclass(frozen=True)
class MegatronOptim:
    """The Megatron tree's `actor.optim.*` (verl passes lr, min_lr, clip_grad and weight_decay to Megatron's
    OptimizerConfig and the schedule keys to its OptimizerParamScheduler; betas go to Adam as well here)."""

    lr: float = 1e-6
    min_lr: float = 0.0
    clip_grad: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adam"
    lr_warmup_init: float = 0.0
    lr_warmup_steps: int = 0  # already resolved from lr_warmup_steps / lr_warmup_steps_ratio
    lr_decay_steps: int = 1
    lr_decay_style: str = "constant"
    weight_decay_incr_style: str = "constant"
    lr_wsd_decay_style: str = "exponential"
    lr_wsd_decay_steps: int | None = None
    total_steps: int = 1
    overrides: dict = field(default_factory=dict, hash=False)  # override_optimizer_config


@dataclass(frozen=True)
class MegatronEngine:
    """`*.megatron.*`: the layout, the dtype weights are kept and computed in (an fp32 master copy lives in the
    optimizer for 16-bit ones), the distributed optimizer, the seed, where the weights come from, and what lives
    in host memory between phases."""

    parallel: MegatronParallel = MegatronParallel()
    dtype: torch.dtype = torch.float32
    use_distributed_optimizer: bool = True
    seed: int = 42
    dist_checkpointing_path: str | None = None  # use_dist_checkpointing: a converted checkpoint, not the HF weights
    ddp_overrides: dict = field(default_factory=dict, hash=False)  # override_ddp_config
    optim_fully_reshardable: bool = False  # dist_ckpt_optim_fully_reshardable: its state resumes at any layout
    offload: MegatronOffload = MegatronOffload()

    @property
    def sequence_multiple(self) -> int:
        """Sequence parallelism splits positions evenly over the TP ranks."""
        return self.parallel.tp if self.parallel.sequence_parallel else 1


def build_module(model_path: str, engine: MegatronEngine, device: str = "cpu", value_head: bool = False):
    """This rank's GPTModel with its weights on `device`, and the HF config it was built from (built and loaded
    on the host, then moved); with `value_head`, a critic's. Megatron's process groups are made once per process
    (the actor, the reference and the critic share them)."""
    import transformers
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(engine.parallel, engine.seed)
    hf_config = transformers.AutoConfig.from_pretrained(model_path)
    try:
        module = build_gpt_model(hf_config, engine.parallel, engine.dtype, value_head)
    except TypeError as err:  # an override_transformer_config field TransformerConfig does not have
        raise ValueError(f"megatron.override_transformer_config: {err}") from None
    if engine.dist_checkpointing_path:
        load_dist_weights(engine.dist_checkpointing_path, module)
    else:  # every rank reads the whole HF model and keeps its shard
        hf = (value_model(model_path, "cpu", engine.dtype) if value_head
              else transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=engine.dtype))
        load_hf_weights(module, hf.state_dict(), hf_config, engine.parallel, value_head)
        del hf
    return module.to(device), hf_config


def wrap_ddp(module, engine: MegatronEngine):
    """Megatron's DDP: gradients accumulate in fp32 buffers over micro-batches and are reduced once per
    mini-batch (no overlap: the update is not communication-bound at these sizes, and it keeps the step exact)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = _config(DistributedDataParallelConfig, "megatron.override_ddp_config", engine.ddp_overrides,
                     use_distributed_optimizer=engine.use_distributed_optimizer, overlap_grad_reduce=False,
                     grad_reduce_in_fp32=True)
    return DistributedDataParallel(module.config, config, module)


def _config(cls, key: str, overrides: dict, **settings):
    """Megatron's config dataclass `cls` from our settings with the user's `key` map on top; a field it does not
    have is named."""
    try:
        return cls(**{**settings, **overrides})
    except TypeError as err:
        raise ValueError(f"{key}: {err}") from None


def build_optimizer(ddp, engine: MegatronEngine, optim: MegatronOptim):
    """Megatron's optimizer over the DDP model (a chained one when there are experts) and its schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    sixteen = {torch.bfloat16: {"bf16": True}, torch.float16: {"fp16": True}}.get(engine.dtype, {})
    config = _config(OptimizerConfig, "optim.override_optimizer_config", optim.overrides, optimizer=optim.optimizer,
                     lr=optim.lr, min_lr=optim.min_lr, clip_grad=optim.clip_grad, weight_decay=optim.weight_decay,
                     adam_beta1=optim.betas[0], adam_beta2=optim.betas[1],
                     use_distributed_optimizer=engine.use_distributed_optimizer, params_dtype=engine.dtype, **sixteen)
    optimizer = get_megatron_optimizer(config, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=optim.lr_warmup_init, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps, lr_decay_steps=optim.lr_decay_steps,
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=optim.total_steps, wd_incr_style=optim.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        wsd_decay_steps=optim.lr_wsd_decay_steps, lr_wsd_decay_style=optim.lr_wsd_decay_style)
    return optimizer, scheduler


def megatron_step(model, optimizer) -> float:
    """The DP all-reduce and the sums over TP of weights each rank saw a part of (sequence-parallel norms, q/k
    norms, a critic's head), then Megatron's clipped step → the grad norm; a non-finite gradient anywhere would
    poison the weights: the step is skipped (nan)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([model])
    if not _finite_everywhere(p.main_grad for p in model.parameters() if p.requires_grad):
        optimizer.zero_grad()
        return float("nan")
    _, grad_norm, _ = optimizer.step()
    return float(grad_norm)


def _finite_everywhere(grads) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([all(bool(torch.isfinite(g).all()) for g in grads)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
