"""What the Megatron engine needs to know about a Hugging Face model: its shapes and the variant of the decoder
(biases, q/k norms, MoE), read from the HF config of the architectures the converter knows. Pure: no megatron
import, so `plan` and the converter's tests can use it anywhere."""

from __future__ import annotations

from dataclasses import dataclass

# HF `model_type` → the features that differ between the decoders we convert (everything else is shared:
# RMSNorm, SwiGLU MLP, RoPE in rotate-half form, grouped-query attention, no linear biases but q/k/v's).
KNOWN = {
    "qwen2": {"qkv_bias": True, "qk_norm": False, "moe": False},
    "qwen3": {"qkv_bias": False, "qk_norm": True, "moe": False},
    "llama": {"qkv_bias": False, "qk_norm": False, "moe": False},
    "qwen3_moe": {"qkv_bias": False, "qk_norm": True, "moe": True},
}


@dataclass(frozen=True)
class Architecture:
    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int  # dense MLP width (MoE: unused by the experts)
    num_attention_heads: int
    num_query_groups: int  # key/value heads
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool
    qk_norm: bool
    attention_dropout: float = 0.0
    num_experts: int = 0  # 0: dense
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = False

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def architecture(hf_config) -> Architecture:
    """The Architecture of an HF config (a `transformers.PretrainedConfig` or anything with its attributes).
    Configs that would need a different Megatron layer raise NotImplementedError naming the setting."""
    model_type = hf_config.model_type
    if model_type not in KNOWN:
        raise NotImplementedError(f"Megatron conversion of model_type={model_type!r}: known are {sorted(KNOWN)}")
    kind = KNOWN[model_type]
    _refuse_unbuilt(hf_config, kind["moe"])
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    moe = {}
    if kind["moe"]:
        moe = {"num_experts": hf_config.num_experts, "moe_topk": hf_config.num_experts_per_tok,
               "moe_ffn_hidden_size": hf_config.moe_intermediate_size,
               "moe_norm_topk_prob": bool(hf_config.norm_topk_prob)}
    return Architecture(
        model_type=model_type,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=hf_config.vocab_size,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=_rope_theta(hf_config),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=hf_config.max_position_embeddings,
        qkv_bias=kind["qkv_bias"],
        qk_norm=kind["qk_norm"],
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        **moe,
    )


def _rope_theta(hf_config) -> float:
    """transformers 5 keeps RoPE's settings in `rope_parameters`; 4.x in `rope_theta` / `rope_scaling`."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise NotImplementedError(f"Megatron conversion with RoPE scaling (rope_type={rope_type!r})")
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None)
    return float(theta or 10000.0)


def _refuse_unbuilt(hf_config, moe: bool) -> None:
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"Megatron conversion with hidden_act={hf_config.hidden_act!r} (SwiGLU only)")
    if getattr(hf_config, "use_sliding_window", False):
        raise NotImplementedError("Megatron conversion with sliding-window attention (use_sliding_window)")
    if hf_config.model_type == "llama" and (getattr(hf_config, "attention_bias", False)
                                            or getattr(hf_config, "mlp_bias", False)):
        raise NotImplementedError("Megatron conversion of Llama with attention_bias or mlp_bias")
    if hf_config.model_type == "qwen3" and getattr(hf_config, "attention_bias", False):
        raise NotImplementedError("Megatron conversion of Qwen3 with attention_bias")
    if moe:
        if getattr(hf_config, "mlp_only_layers", None) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
            raise NotImplementedError("Megatron conversion of MoE models with dense layers "
                                      "(mlp_only_layers, decoder_sparse_step)")
        if getattr(hf_config, "shared_expert_intermediate_size", None):
            raise NotImplementedError("Megatron conversion of MoE models with shared experts")
