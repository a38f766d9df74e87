"""`ascend-rl plan`: everything a config implies, computed without devices, models or data."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from ascend_rl.config.environment import EnvFinding, check_environment
from ascend_rl.config.features import critic_in_use
from ascend_rl.config.layout import Layout, compute_layout
from ascend_rl.config.lint import changed_keys, lint, unsupported_features
from ascend_rl.config.memory import MemoryEstimate, estimate_memory
from ascend_rl.config.validate import data_files, missing_inputs, validate
from ascend_rl.distributed.colocated import colocated
from ascend_rl.distributed.launch import uses_ray
from ascend_rl.platform import get_platform, resolve_device
from ascend_rl.preflight import preflight
from ascend_rl.rollout.sglang.server_args import ServerArgsPlan


@dataclass
class Plan:
    layout: Layout
    memory: MemoryEstimate
    total_steps: int | None
    steps_note: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    environment: list[EnvFinding] = field(default_factory=list)
    missing_inputs: list[str] = field(default_factory=list)
    sglang: list[ServerArgsPlan] = field(default_factory=list)  # one per rollout replica
    sglang_fields: str | None = None  # which SGLang's fields the kwargs were checked against
    workers: str = ""  # where the training processes go

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.to_dict(),
            "memory": self.memory.to_dict(),
            "total_steps": self.total_steps,
            "steps_note": self.steps_note,
            "errors": self.errors,
            "warnings": self.warnings,
            "unsupported": self.unsupported,
            "environment": [asdict(f) for f in self.environment],
            "missing_inputs": self.missing_inputs,
            "sglang_server_args": [asdict(p) for p in self.sglang],
            "sglang_fields": self.sglang_fields,
            "workers": self.workers,
        }


def make_plan(cfg: DictConfig, environ: Mapping[str, str] | None = None) -> Plan:
    environ = os.environ if environ is None else environ
    layout = compute_layout(cfg, resolve_device(cfg.trainer.device))
    total, note = total_steps(cfg)
    changed = changed_keys(cfg)
    plan = Plan(
        layout=layout,
        memory=estimate_memory(cfg, layout),
        total_steps=total,
        steps_note=note,
        errors=validate(cfg, layout),
        warnings=lint(cfg, changed),
        unsupported=unsupported_features(cfg, layout.world_size, changed),
        environment=check_environment(cfg, layout.device, environ),
        missing_inputs=missing_inputs(cfg) + preflight(cfg),  # train stops on these; plan lists them
        workers=describe_workers(cfg, layout.device),
    )
    plan.warnings += machine_warnings(layout)
    if cfg.actor_rollout_ref.rollout.name == "sglang" and not cfg.actor_rollout_ref.rollout.launch.url:
        _add_sglang_server_args(plan, cfg, environ)
    return plan


def machine_warnings(layout: Layout, cores: int | None = None) -> list[str]:
    """More CPU worker processes than this machine's cores make every step slower than one process."""
    cores = cores or os.cpu_count() or 1
    if layout.device != "cpu" or layout.devices_per_node <= cores:
        return []
    return [f"trainer.n_gpus_per_node={layout.devices_per_node}: {layout.devices_per_node} CPU worker processes on "
            f"{cores} core(s) share them, slower than fewer; set trainer.n_gpus_per_node to at most {cores}"]


def _add_sglang_server_args(plan: Plan, cfg: DictConfig, environ: Mapping[str, str]) -> None:
    """ServerArgs per replica (for node 0 of a replica that spans nodes); a key the SGLang version lacks is
    an error, a deprecated one a warning."""
    from ascend_rl.rollout.sglang.fields import current_fields
    from ascend_rl.rollout.sglang.server_args import plan_server_args

    fields, lay = current_fields(), plan.layout
    plan.sglang = [plan_server_args(cfg, lay.rollout, lay.device, fields, environ, replica=r)
                   for r in range(lay.rollout.replicas)]
    plan.sglang_fields = fields.describe()
    plan.errors += plan.sglang[0].errors  # the same for every replica
    plan.warnings += plan.sglang[0].warnings


def describe_workers(cfg: DictConfig, device: str) -> str:
    """Where the training processes go, in one line (for `plan`)."""
    t = cfg.trainer
    world = t.nnodes * t.n_gpus_per_node
    actor = cfg.actor_rollout_ref.actor
    megatron = actor.strategy == "megatron"
    if world == 1 and not megatron:
        return "one process: actor, reference and rollout engine"
    others = "the reference, when the KL needs one" + (", and the critic" if critic_in_use(cfg) else "")
    if megatron:  # Megatron needs its process groups, even for one rank
        m = actor.megatron
        held = (f"each a Megatron rank of the actor (and of {others}): TP groups of "
                f"{m.tensor_model_parallel_size} consecutive ranks share their rows")
        if m.pipeline_model_parallel_size > 1:
            held += (f", as do the {m.pipeline_model_parallel_size} pipeline stages of a replica (each an even "
                     f"share of the layers)")
        if m.expert_model_parallel_size > 1:
            held += f", experts split over EP groups of {m.expert_model_parallel_size}"
    else:
        held = f"each an FSDP2 shard of the actor (and of {others})"
    if (sp := actor.get("ulysses_sequence_parallel_size", 1)) > 1:
        held += f", in Ulysses groups of {sp} that split each packed micro-batch's positions"
    if not colocated(cfg):
        held += "; the driver holds the rollout engine"
    elif cfg.actor_rollout_ref.rollout.name == "native":
        held += " and a native engine generating its share of the prompts"
    else:
        held += "; the first worker of each rollout replica holds its sglang.Engine"
    if device != "cpu":  # say it where people look before a run
        held += f" (worker groups are tested with gloo on CPU; on {device} they have not run on hardware yet)"
    if uses_ray(cfg):
        resource = get_platform(device).ray_resource or "CPU"
        return (f"Ray: {t.nnodes} STRICT_PACK placement group(s) of {t.n_gpus_per_node} worker(s) ({resource} each), "
                f"{held}")
    return f"{world} worker processes on this machine ({get_platform(device).process_group_backend}), {held}"


def total_steps(cfg: DictConfig) -> tuple[int | None, str]:
    """Training steps: trainer.total_training_steps, else epochs × full batches per epoch."""
    epochs, batch = cfg.trainer.total_epochs, cfg.data.train_batch_size
    if cfg.trainer.total_training_steps:
        return cfg.trainer.total_training_steps, "trainer.total_training_steps"
    rows = count_rows(data_files(cfg.data.train_files))
    if rows is None:
        return None, f"{epochs} epoch(s) × ⌊rows / {batch}⌋; the training data is not on this machine"
    if cfg.data.train_max_samples and cfg.data.train_max_samples > 0:
        rows = min(rows, cfg.data.train_max_samples)
    return epochs * (rows // batch), f"{epochs} epoch(s) × ⌊{rows} rows / {batch}⌋"


def count_rows(files: list[str]) -> int | None:
    """Rows in parquet files, from their metadata (nothing is read); None if any is absent."""
    if not files or not all(Path(f).is_file() for f in files):
        return None
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def format_plan(plan: Plan) -> str:
    lay, b, mem = plan.layout, plan.layout.batch, plan.memory
    micro = lay.batch.micro_batch_size_per_device
    lines = [
        f"devices        {lay.device}: {lay.nnodes} node(s) × {lay.devices_per_node} = {lay.world_size}",
        f"training       {lay.train.describe()}",
        f"workers        {plan.workers}",
        f"rollout        {lay.rollout.describe()} ({lay.rollout.devices_per_replica} device(s) each)",
        f"per step       {b.prompts_per_step} prompts × n = {b.samples_per_step} samples",
        f"updates        {b.mini_batches_per_step} mini-batch(es) of {b.samples_per_mini_batch} samples × "
        f"{b.ppo_epochs} epoch(s) = {b.optimizer_steps_per_step} optimizer step(s) per step",
        f"micro-batches  {b.micro_batches_per_mini_batch} per mini-batch per rank ({b.samples_per_rank_per_mini_batch}"
        f" samples / micro-batch {micro if micro else 'unset: all at once'})",
        f"total steps    {plan.total_steps if plan.total_steps is not None else '?'} ({plan.steps_note})",
        _format_memory(mem),
    ]
    lines += _format_sglang(plan)
    sections = (("error", plan.errors), ("warning", plan.warnings), ("not built", plan.unsupported),
                ("environment", [f.message for f in plan.environment]), ("input", plan.missing_inputs))
    for label, items in sections:
        lines += [f"{label}: {item}" for item in items]
    return "\n".join(lines)


def _format_sglang(plan: Plan) -> list[str]:
    if not plan.sglang:
        return []
    first = plan.sglang[0]
    lines = [f"sglang         ServerArgs for replica 0, checked against {plan.sglang_fields}:",
             *(f"                 {k}={v!r}" for k, v in first.kwargs.items())]
    if first.env:
        lines.append(f"               server environment: {' '.join(f'{k}={v}' for k, v in first.env.items())}")
    for other in plan.sglang[1:]:
        differing = {k: v for k, v in other.kwargs.items() if first.kwargs.get(k) != v}
        lines.append(f"               replica {other.replica}: same but {', '.join(f'{k}={v!r}' for k, v in differing.items()) or 'nothing'}")
    lines += [f"               note: {note}" for note in first.notes]
    return lines


def _format_memory(mem: MemoryEstimate) -> str:
    if mem.parameters is None:
        return f"memory         unknown: parameter count {mem.parameters_source}"
    off = f"; offloaded to host: {', '.join(mem.offloaded)}" if mem.offloaded else ""
    return (f"memory         {_count(mem.parameters)} parameters ({mem.parameters_source}); per device while "
            f"training ≈ {mem.train_phase_gib:.1f} GiB (actor params {mem.actor_params_gib}, grads "
            f"{mem.actor_grads_gib}, optimizer {mem.actor_optimizer_gib}, ref {mem.ref_params_gib}"
            f"{f', critic {mem.critic_gib}' if mem.critic_gib else ''}); rollout "
            f"weights {mem.rollout_weights_gib} GiB per device + KV cache{off}")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
