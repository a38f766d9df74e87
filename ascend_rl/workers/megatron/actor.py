"""The actor and the reference policy on Megatron-core (`actor.strategy=megatron`), with the FSDP actor's
interface and losses: old log-probs, the PPO-family update over mini- and micro-batches, weights out in HF names.

Every data-parallel rank takes its slice of each mini-batch (`MiniBatchWalk`); the ranks of a tensor-parallel
group and the stages of a pipeline share theirs. Losses are normalised by the whole mini-batch's counts and
Megatron's DDP sums gradients over the data-parallel ranks (`calculate_per_token_loss`): N ranks make the update
one process would. Micro-batches go through Megatron's schedule (`pipeline`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tensordict import TensorDict

from ascend_rl.workers.actor import ActorSettings, PolicyUpdate, ReferenceSettings, needs_entropy
from ascend_rl.workers.megatron import adaptors
from ascend_rl.workers.megatron.arch import architecture
from ascend_rl.workers.megatron.engine import MegatronEngine, MegatronOptim, build_module
from ascend_rl.workers.megatron.forward import logits_log_probs
from ascend_rl.workers.megatron.gather import hf_weights
from ascend_rl.workers.megatron.offload import MegatronOffload, Offloaded, Part
from ascend_rl.workers.megatron.pipeline import row_columns, through_stages
from ascend_rl.workers.megatron.trained import MegatronTrained
from ascend_rl.workers.trained import micro_batch_rows, split


class MegatronPolicy:
    """A Megatron GPTModel of an HF causal LM on this rank's device and how it computes response log-probs in
    micro-batches."""

    def __init__(self, model_path: str, engine: MegatronEngine, device: str):
        self.module, self.hf_config = build_module(model_path, engine, device)
        self.vocab_size = architecture(self.hf_config).vocab_size
        self.engine, self.device = engine, torch.device(device)

    def log_probs(self, model, batch: TensorDict, micro_size: int | None, max_tokens: int | None,
                  temperature: float, with_entropy: bool):
        """On the host, in the batch's row order, on every pipeline stage."""
        rows = micro_batch_rows(batch, micro_size, max_tokens)
        micros = [mb.to(self.device) for mb in split(batch, rows)]

        def per_micro(micro, logits, lead):
            return logits_log_probs(logits, lead, micro, self.vocab_size, temperature, with_entropy)

        columns = row_columns(model, micros, rows, per_micro, 1 + with_entropy, self.engine.sequence_multiple,
                              batch["responses"].shape, self.device)
        return columns[0], columns[1] if with_entropy else None


class MegatronReference:
    """The frozen initial policy for the KL term, on the actor's Megatron layout (in host memory between calls
    with `megatron.param_offload`)."""

    def __init__(self, model_path: str, engine: MegatronEngine, settings: ReferenceSettings, device: str):
        self.policy = MegatronPolicy(model_path, engine, device)
        self.policy.module.eval().requires_grad_(False)
        self.settings = settings
        self.weights = Offloaded([Part(self.policy.module.parameters, move=engine.offload.params)], device)
        self.weights.offload()

    def log_probs(self, batch: TensorDict) -> torch.Tensor:
        s = self.settings
        with self.weights.resident():
            return self.policy.log_probs(self.policy.module, batch, s.micro_batch_size, s.max_token_len,
                                         s.temperature, with_entropy=False)[0]


class MegatronActor(MegatronTrained, PolicyUpdate):
    """One rank's actor: its Megatron shard under DDP, Megatron's optimizer and LR schedule. With the engine's
    offload switches, the weights, gradients and optimizer state are in host memory outside the calls that use
    them (each call brings back what it needs)."""

    def __init__(self, model_path: str, settings: ActorSettings, optim: MegatronOptim, engine: MegatronEngine,
                 device: str = "cpu"):
        self.policy = MegatronPolicy(model_path, engine, device)
        super().__init__(self.policy.module, engine, optim, settings.batching, device)
        self.settings = settings

    @torch.no_grad()
    def log_probs(self, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        """Old log-probs and entropy of the sampled responses under the current weights."""
        self.model.eval()
        s = self.settings
        with self.weights.resident():
            return self.policy.log_probs(self.model, batch, s.log_prob_micro_batch_size, s.log_prob_max_token_len,
                                         s.temperature, with_entropy=True)

    def update(self, batch: TensorDict) -> dict[str, float]:
        with self.training_state():
            return super().update(batch)

    # --- PolicyUpdate's steps (MegatronTrained has the others) -------------------------------------------

    def _forward_backward(self, micros: list[TensorDict], loss_of) -> None:
        """Through Megatron's schedule; DDP sums gradients over the data-parallel ranks (the TransformerConfig's
        calculate_per_token_loss), so the losses, normalised by the whole mini-batch's counts, add up."""
        s, vocab = self.settings, self.policy.vocab_size

        def on_logits(micro, logits, lead):
            log_prob, entropy = logits_log_probs(logits, lead, micro, vocab, s.temperature, needs_entropy(s, micro))
            return loss_of(micro, log_prob, entropy), None

        through_stages(self.model, micros, on_logits, self.engine.sequence_multiple, forward_only=False)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF names and whole tensors gathered from every rank's shard, a layer at a time (a collective: every
        rank iterates to the end). Some share memory with the parameters."""
        with self.weights.resident():
            yield from hf_weights(self.policy.module, self.policy.hf_config)

    def save(self, path: Path) -> None:
        """`path`: an HF model directory (rank 0 writes the weights gathered from every rank, a layer at a time)
        and `path/dcp`, the model and optimizer as a Megatron dist checkpoint in verl's layout."""
        from huggingface_hub import save_torch_state_dict

        writer = dist.get_rank() == 0
        with self.training_state():  # moved once for both halves
            state = {name: t.to("cpu", copy=True) for name, t in self.named_weights() if writer}  # all take part
            path.mkdir(parents=True, exist_ok=True)  # inside the trainer's new, partial step directory
            if writer:
                save_torch_state_dict(state, path)
                self.policy.hf_config.save_pretrained(path)
            del state
            self.save_shards(path)


@dataclass(frozen=True)
class MegatronActorSpec:
    """Everything to build the Megatron actor and, with `ref`, the reference policy on its layout, in each
    worker (it pickles)."""

    model_path: str
    settings: ActorSettings
    optim: MegatronOptim
    engine: MegatronEngine
    ref: ReferenceSettings | None = None
    ref_dist_checkpointing_path: str | None = None  # ref.megatron's converted weights (else the HF model's)
    ref_param_offload: bool = False  # ref.megatron.param_offload

    def data_shard(self, rank: int, world_size: int) -> int:
        """`rank`'s data-parallel index in Megatron's order (tp-cp-dp-pp: TP innermost, pipeline stages
        outermost): the ranks of a tensor-parallel group and the stages of a pipeline take the same rows."""
        p = self.engine.parallel
        return (rank // p.tp) % (world_size // (p.tp * p.pp))

    def in_workers(self, world_size: int) -> bool:
        """Always: Megatron needs its process groups, even for one rank."""
        return True

    def build(self, device: str, world_size: int):
        """This rank's actor and reference on `device` (no device mesh: Megatron makes its own process groups),
        once Megatron is adapted to the device kind."""
        adaptors.adapt(torch.device(device).type, self.engine.parallel)
        actor = MegatronActor(self.model_path, self.settings, self.optim, self.engine, device)
        ref = None
        if self.ref is not None:
            engine = replace(self.engine, dist_checkpointing_path=self.ref_dist_checkpointing_path,
                             offload=MegatronOffload(params=self.ref_param_offload))
            ref = MegatronReference(self.model_path, engine, self.ref, device)
        return actor, ref, None
