"""How a config places work on devices: a pure function of the config, shared by `plan`, validation
and (later) the distributed launcher, so all three agree on the numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from omegaconf import DictConfig


@dataclass(frozen=True)
class TrainParallelism:
    strategy: str  # fsdp | fsdp2 | megatron
    data_parallel: int  # ranks that each see different samples
    fsdp_shard: int | None = None  # FSDP: ranks a parameter is sharded over
    ulysses_sp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    def describe(self) -> str:
        if self.strategy == "megatron":
            return (f"Megatron DP {self.data_parallel} × TP {self.tp} × PP {self.pp} × CP {self.cp}"
                    f" (EP {self.ep})")
        sp = f" × Ulysses SP {self.ulysses_sp}" if self.ulysses_sp > 1 else ""
        return f"FSDP DP {self.fsdp_shard}{sp} ({self.data_parallel} data-parallel group(s) of samples)"


@dataclass(frozen=True)
class RolloutLayout:
    backend: str
    replicas: int
    tp: int
    dp: int
    pp: int
    ep: int

    @property
    def devices_per_replica(self) -> int:
        return self.tp * self.dp * self.pp

    def describe(self) -> str:
        extra = "".join(f" × {k} {v}" for k, v in (("DP", self.dp), ("PP", self.pp)) if v > 1)
        ep = f", EP {self.ep}" if self.ep > 1 else ""
        return f"{self.backend}: {self.replicas} replica(s) × TP {self.tp}{extra}{ep}"


@dataclass(frozen=True)
class BatchLayout:
    prompts_per_step: int
    samples_per_step: int
    samples_per_mini_batch: int
    mini_batches_per_step: int
    ppo_epochs: int
    samples_per_rank_per_mini_batch: int
    micro_batch_size_per_device: int | None

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.mini_batches_per_step * self.ppo_epochs

    @property
    def micro_batches_per_mini_batch(self) -> int:
        if not self.micro_batch_size_per_device:  # unset: the rank's whole mini-batch at once
            return 1
        return max(1, self.samples_per_rank_per_mini_batch // self.micro_batch_size_per_device)


@dataclass(frozen=True)
class Layout:
    device: str
    nnodes: int
    devices_per_node: int
    train: TrainParallelism
    rollout: RolloutLayout
    batch: BatchLayout

    @property
    def world_size(self) -> int:
        return self.nnodes * self.devices_per_node

    def to_dict(self) -> dict:
        out = asdict(self)
        out["world_size"] = self.world_size
        out["batch"]["optimizer_steps_per_step"] = self.batch.optimizer_steps_per_step
        out["batch"]["micro_batches_per_mini_batch"] = self.batch.micro_batches_per_mini_batch
        out["rollout"]["devices_per_replica"] = self.rollout.devices_per_replica
        return out


def compute_layout(cfg: DictConfig, device: str) -> Layout:
    trainer, arr = cfg.trainer, cfg.actor_rollout_ref
    world = trainer.nnodes * trainer.n_gpus_per_node
    train = _train_parallelism(arr.actor, world)
    ro = arr.rollout
    tp, dp, pp = ro.tensor_model_parallel_size, ro.data_parallel_size, ro.pipeline_model_parallel_size
    rollout = RolloutLayout(ro.name, max(1, world // max(1, tp * dp * pp)), tp, dp, pp, ro.expert_parallel_size)
    n = ro.n
    mini = arr.actor.ppo_mini_batch_size * n
    prompts = cfg.data.train_batch_size
    batch = BatchLayout(
        prompts_per_step=prompts,
        samples_per_step=prompts * n,
        samples_per_mini_batch=mini,
        mini_batches_per_step=max(1, -(-prompts * n // max(1, mini))),
        ppo_epochs=arr.actor.ppo_epochs,
        samples_per_rank_per_mini_batch=mini // max(1, train.data_parallel),
        micro_batch_size_per_device=arr.actor.ppo_micro_batch_size_per_gpu,
    )
    return Layout(device, trainer.nnodes, trainer.n_gpus_per_node, train, rollout, batch)


def _train_parallelism(actor: DictConfig, world: int) -> TrainParallelism:
    if actor.strategy == "megatron":
        m = actor.megatron
        model_parallel = m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
        return TrainParallelism(
            "megatron", max(1, world // model_parallel), tp=m.tensor_model_parallel_size,
            pp=m.pipeline_model_parallel_size, cp=m.context_parallel_size, ep=m.expert_model_parallel_size,
        )
    sp = actor.ulysses_sequence_parallel_size
    shard = world if actor.fsdp_config.fsdp_size in (-1, None) else actor.fsdp_config.fsdp_size
    return TrainParallelism(actor.strategy, max(1, world // sp), fsdp_shard=shard, ulysses_sp=sp)
