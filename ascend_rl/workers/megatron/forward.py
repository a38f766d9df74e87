"""A micro-batch through a Megatron `GPTModel`: per-response-token log-probs and entropy in the padded [B, R]
layout the algorithms use, from vocab-parallel logits.

Megatron's RoPE numbers positions 0..S-1 whatever `position_ids` say, so each left-padded row is shifted to
start at column 0 (its padding moves to the end, which causal attention keeps from every real token), and the
logits that predict the response are gathered back per row."""

from __future__ import annotations

import torch

from ascend_rl.workers.megatron.logprobs import vocab_parallel_entropy, vocab_parallel_log_probs


def left_aligned(input_ids: torch.Tensor, attention_mask: torch.Tensor, multiple_of: int = 1):
    """Each row's tokens moved to start at column 0, the row length rounded up to `multiple_of` (sequence
    parallelism splits positions evenly over TP); and each row's shift (its left padding)."""
    lead = (attention_mask.cumsum(-1) == 0).sum(-1)
    length = -(-input_ids.shape[1] // multiple_of) * multiple_of
    columns = torch.arange(length, device=input_ids.device)
    source = columns[None] + lead[:, None]
    inside = source < input_ids.shape[1]
    shifted = input_ids.gather(1, source.clamp(max=input_ids.shape[1] - 1)) * inside
    return shifted, lead


def stage_forward(model, batch, multiple_of: int = 1):
    """This pipeline stage's output for a micro-batch (vocab-parallel logits [B, S, V / TP] on the last stage,
    hidden states for the next stage elsewhere) and each row's shift."""
    ids, lead = left_aligned(batch["input_ids"], batch["attention_mask"], multiple_of)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return model(ids, positions, attention_mask=None), lead  # causal


def logits_log_probs(logits, lead, batch, vocab_size: int, temperature: float = 1.0, with_entropy: bool = False):
    """log π(response token) per position under softmax(logits / temperature), and optionally the entropy;
    [B, R] each, zero-padded like the responses. Every TP rank gets the same (the vocabulary is reduced over)."""
    picked = at_responses(logits, lead, batch)
    if temperature != 1.0:
        picked = picked / temperature
    mask = batch["response_mask"]  # zero past each response's end, as the FSDP actor's
    log_probs = vocab_parallel_log_probs(picked, batch["responses"], vocab_size) * mask
    entropy = vocab_parallel_entropy(picked, vocab_size) * mask if with_entropy else None
    return log_probs, entropy


def response_values(output, lead, batch) -> torch.Tensor:
    """A critic's V(s_t) for each response token t, [B, R] in fp32: its output at the position before the token
    (the state it was chosen in), as the FSDP critic takes it."""
    return at_responses(output, lead, batch)[..., 0].float()


def at_responses(output: torch.Tensor, lead: torch.Tensor, batch) -> torch.Tensor:
    """The stage output [B, S, ...] of left-aligned rows at the positions that predict each response token."""
    rows, width = batch["responses"].shape
    # Response token j sits at column S - R + j before the shift; the position before it predicts it.
    start = batch["input_ids"].shape[1] - width - 1
    predicting = (start + torch.arange(width, device=output.device))[None] - lead[:, None]
    return output.gather(1, predicting.clamp(min=0)[..., None].expand(rows, width, output.shape[-1]))


def response_log_probs(model, batch, vocab_size: int, temperature: float = 1.0, with_entropy: bool = False,
                       multiple_of: int = 1):
    """`logits_log_probs` of one stage's whole model (no pipeline parallelism)."""
    logits, lead = stage_forward(model, batch, multiple_of)
    return logits_log_probs(logits, lead, batch, vocab_size, temperature, with_entropy)
