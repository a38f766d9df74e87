"""Attention for 16-bit compute on a CPU: SDPA for long sequences, plain matmuls for short ones.

PyTorch's CPU flash-attention kernel (what SDPA picks) is fast for long sequences, but its bf16 backward
over many short ones is slower than fp32: on the embedded shape (512 rows × 40 tokens, 4 heads) it took
0.51 s of a 0.99 s update where fp32 took 0.04 s, eating the whole matmul gain. Two batched matmuls with an
fp32 softmax (transformers' eager attention) beat it up to about 128 keys and lose beyond 256
(forward + backward, one thread: 0.52 s vs 0.96 s at 512 × 40, 0.51 vs 0.64 at 128 × 128, 0.77 vs 0.59 at
64 × 256). The model reads its attention through transformers' AttentionInterface, so the switch is one
registered function; fp32 models keep SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "ascend_rl_cpu"
SHORT_KEYS = 128  # at most this many keys: matmuls; more: SDPA's flash kernel


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention signature: q [B, H, T, D], k/v [B, KVH, S, D], mask [B, 1, T, S] bool (True =
    attend) or None (causal); returns [B, T, H, D] and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if key.shape[2] > SHORT_KEYS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = matmul_attention(query, key, value, attention_mask, scaling, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def matmul_attention(query, key, value, attention_mask=None, scaling: float | None = None, dropout: float = 0.0):
    """Attention as two batched matmuls with an fp32 softmax: q [B, H, T, D], k/v [B, KVH, S, D], mask
    [B, 1, T, S] bool or None (causal) → [B, H, T, D]."""
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    scaling = dim ** -0.5 if scaling is None else scaling
    # grouped heads against their shared K/V without repeating K/V: [B, KVH, G·T, D] @ [B, KVH, D, S]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    scores = (grouped @ key.transpose(-1, -2)).view(batch, heads, length, keys).float() * scaling
    if attention_mask is None:  # transformers leaves the mask out when it is plainly causal
        attention_mask = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)
    # the lowest finite value, not -inf: a row with no key to attend (left padding) stays finite
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    out = weights.view(batch, kv_heads, heads // kv_heads * length, keys) @ value
    return out.view(batch, heads, length, dim)


def use_cpu_attention(model) -> bool:
    """Switch a model that uses SDPA to `attention` (registered once); returns whether it switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
