"""A Megatron-core `GPTModel` for a Hugging Face config (Qwen2/Qwen2.5, Qwen3, Llama, Qwen3-MoE), on the local
layer spec (no Transformer Engine), its process groups, and HF weights loaded into it through `convert`.

Settings keep verl's names (`actor.megatron.*`). Built: tensor parallelism with or without sequence
parallelism, pipeline parallelism (an even split of the layers), expert parallelism (EP) with expert tensor
parallelism (ETP) equal to TP or 1, recompute and any other TransformerConfig field through
`override_transformer_config`. Virtual pipeline and context parallelism are not: they raise NotImplementedError.

Megatron's RoPE takes positions 0..S-1 whatever `position_ids` say, so rows must start at column 0
(right-padded, which causal attention makes harmless to the real tokens): `forward.left_aligned` shifts the
trainer's left-padded rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ascend_rl.workers.megatron.arch import Architecture, architecture
from ascend_rl.workers.megatron.convert import (
    Place,
    check_layout,
    hf_to_mcore_rank,
    padded_vocab_size,
    stage_shard,
    value_model_shard,
)


@dataclass(frozen=True)
class MegatronParallel:
    """The parallel layout (`actor.megatron.*`, verl's names)."""

    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False  # verl's default is true; it turns it off at TP 1, as Megatron requires
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int | None = None
    make_vocab_size_divisible_by: int = 128
    override_transformer_config: dict = field(default_factory=dict, hash=False)

    @property
    def tp(self) -> int:
        return self.tensor_model_parallel_size

    @property
    def ep(self) -> int:
        return self.expert_model_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def etp(self) -> int:
        """Megatron's default ETP is TP."""
        return self.tp if self.expert_tensor_parallel_size is None else self.expert_tensor_parallel_size

    def check(self) -> None:
        unbuilt = [name for name, value, default in (
            ("virtual_pipeline_model_parallel_size", self.virtual_pipeline_model_parallel_size, None),
            ("context_parallel_size", self.context_parallel_size, 1),
        ) if value != default]
        if self.etp not in (1, self.tp):
            unbuilt.append("expert_tensor_parallel_size other than 1 or the TP size")
        if unbuilt:
            raise NotImplementedError(f"Megatron with {', '.join(unbuilt)} is not built yet")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tensor_model_parallel_size > 1")
        if self.etp != self.tp and self.ep == 1:
            # EP 1 makes the experts ordinary parameters to Megatron's DDP, which then sums their gradients
            # over the data-parallel group only, not over the TP ranks that fed them other tokens.
            raise ValueError("expert_tensor_parallel_size other than the TP size needs expert_model_parallel_size > 1")

    def check_world(self, world_size: int) -> None:
        """initialize_model_parallel's conditions, in verl's names before Megatron's terser RuntimeError: TP × PP
        divides the world, and so does EP × ETP × PP (with ETP = TP: EP divides the data-parallel size)."""
        pp_name, pp_size = (" × pipeline_model_parallel_size", f" × {self.pp}") if self.pp > 1 else ("", "")
        if world_size % (self.tp * self.pp):
            raise ValueError(f"world size {world_size} is not a multiple of tensor_model_parallel_size{pp_name} "
                             f"({self.tp}{pp_size})")
        if world_size % (self.ep * self.etp * self.pp):
            hint = (f": EP must divide the data-parallel size {world_size // (self.tp * self.pp)}"
                    if self.etp == self.tp else "")
            raise ValueError(f"world size {world_size} is not a multiple of expert_model_parallel_size × "
                             f"expert_tensor_parallel_size{pp_name} ({self.ep} × {self.etp}{pp_size}){hint}")


def init_model_parallel(parallel: MegatronParallel, seed: int = 42) -> None:
    """Megatron's process groups over the default group (already initialised), and its seeded RNG streams."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel.check()
    parallel.check_world(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=parallel.tp,
                                             pipeline_model_parallel_size=parallel.pp,
                                             expert_model_parallel_size=parallel.ep,
                                             expert_tensor_parallel_size=parallel.etp)
    model_parallel_cuda_manual_seed(seed)


def transformer_config_kwargs(arch: Architecture, parallel: MegatronParallel, dtype: torch.dtype) -> dict:
    """TransformerConfig's fields for `arch`; `override_transformer_config` last."""
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 is [gate; up]
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=arch.attention_dropout,
        tensor_model_parallel_size=parallel.tp,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_model_parallel_size=parallel.pp,
        pipeline_dtype=dtype,
        variable_seq_lengths=parallel.pp > 1,  # micro-batches differ in rows and length: stages send shapes first
        moe_token_dispatcher_type="alltoall",  # (Megatron checks it against variable lengths, MoE or not)
        # Our losses are normalised by the whole mini-batch's counts already: the schedule leaves them as they
        # are, and DDP sums gradients over the data-parallel ranks instead of averaging them.
        calculate_per_token_loss=True,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # The weights are overwritten from the HF model, but Megatron tags its TP-split parameters
        # (tensor_model_parallel, partition_dim: what grad-norm, optimizer and dist checkpoints read) only
        # while initialising them: perform_initialization=False would leave every parameter looking copied.
        perform_initialization=True,
        # On the host even for an accelerator: the HF weights are converted there and the model moved after.
        use_cpu_initialization=True,
        # The fused kernels need apex or Transformer Engine; the local spec runs the unfused PyTorch paths.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # Megatron's default ("full") is a deprecated spelling of this: it warns per model
    )
    if arch.moe:
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            # HF: softmax over all experts, top-k, renormalised if norm_topk_prob. Megatron: top-k of the logits
            # then softmax (the renormalised form), or softmax first (pre_softmax) without renormalising.
            moe_router_pre_softmax=not arch.moe_norm_topk_prob,
            moe_router_load_balancing_type="none",  # the aux loss is a training choice, not the forward's
            moe_grouped_gemm=False,
        )
    kwargs.update(transformer_overrides_for_megatron(parallel.override_transformer_config))
    return kwargs


def transformer_overrides_for_megatron(overrides: dict) -> dict:
    """`override_transformer_config` with the values Megatron takes as objects made from verl's spelling."""
    overrides = dict(overrides)
    if isinstance(overrides.get("attention_backend"), str):  # verl writes the enum's name
        from megatron.core.transformer.enums import AttnBackend

        overrides["attention_backend"] = AttnBackend[overrides["attention_backend"]]
    return overrides


def build_gpt_model(hf_config, parallel: MegatronParallel, dtype: torch.dtype = torch.float32,
                    value_head: bool = False):
    """This rank's GPTModel for `hf_config` (init_model_parallel first), weights uninitialised: load_hf_weights.
    With `value_head`, a critic: one value per position (`ValueHead`) in place of the vocabulary projection."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    arch = architecture(hf_config)
    parallel.check()
    check_layout(arch, parallel.tp, parallel.ep, parallel.etp, parallel.pp)
    if arch.moe and parallel.tp > 1 and not parallel.sequence_parallel:
        raise ValueError("Megatron trains MoE models under tensor parallelism only with sequence_parallel=True")
    config = TransformerConfig(**transformer_config_kwargs(arch, parallel, dtype))
    spec = get_gpt_layer_local_spec(num_experts=arch.num_experts or None, qk_layernorm=arch.qk_norm,
                                    normalization="RMSNorm")
    model = GPTModel(
        config, spec,
        vocab_size=padded_vocab_size(arch.vocab_size, parallel.tp, parallel.make_vocab_size_divisible_by),
        max_sequence_length=arch.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        share_embeddings_and_output_weights=arch.tie_word_embeddings and not value_head,
        parallel_output=True,  # logits stay vocab-parallel: log-probs reduce over the TP group
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )
    if value_head and model.post_process:
        model.output_layer = ValueHead(config)
    return model


class ValueHead(torch.nn.Module):
    """A critic's output layer: one value per position, the same weights on every TP rank (HF's `score`).
    Under sequence parallelism each rank scores its slice of the positions and the slices are gathered; the
    weights' gradients are then partial on each rank, which their `sequence_parallel` tag makes Megatron sum over TP
    (finalize_model_grads), as for the norms. Called as GPTModel calls its output layer."""

    def __init__(self, config):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))  # HF's score layer has one
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        values = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.sequence_parallel:  # every rank then computes the same loss: each keeps its own slice's gradient
            values = gather_from_sequence_parallel_region(values, tensor_parallel_output_grad=False)
        return values, None


def load_hf_weights(model, hf_state: dict[str, torch.Tensor], hf_config, parallel: MegatronParallel,
                    value_head: bool = False) -> None:
    """Every rank converts the whole HF state dict and keeps its pipeline stage's part: its TP slice and its
    experts' ETP slices (`value_head`: a critic's, from HF's token-classification model)."""
    arch, place, divisible_by = architecture(hf_config), rank_place(), parallel.make_vocab_size_divisible_by
    if value_head:
        load_mcore_shard(model, value_model_shard(hf_state, arch, place, divisible_by))
    else:
        load_mcore_shard(model, stage_shard(hf_to_mcore_rank(hf_state, arch, place, divisible_by), arch, place))


def rank_place() -> Place:
    """This rank's coordinates in Megatron's process groups (init_model_parallel first)."""
    from megatron.core import parallel_state as ps

    return Place(tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                 ep=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
                 etp=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
                 pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank())


def load_mcore_shard(model, shard: dict[str, torch.Tensor]) -> None:
    """Load one rank's Megatron state dict; every parameter must be in it (Megatron's `_extra_state`
    entries, which the local spec leaves empty, are kept as the model has them)."""
    state = {k: v for k, v in model.state_dict().items() if k.endswith("._extra_state")}
    state.update(shard)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"Megatron weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def mcore_shard(model) -> dict[str, torch.Tensor]:
    """This rank's parameters by Megatron name (what `convert.mcore_to_hf` takes from every rank)."""
    return {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
