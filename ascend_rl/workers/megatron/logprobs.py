"""Log-probs from vocab-parallel logits: each TP rank holds a slice of the vocabulary and only the max, the
target's logit and the sum of exponentials cross ranks (Megatron's vocab-parallel cross entropy). The rows
Megatron adds to pad the vocabulary are masked out, so the result is the HF model's over its real vocabulary."""

from __future__ import annotations

import torch


def vocab_parallel_log_probs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log softmax(logits)[target] over the real vocabulary. `logits` [..., V_padded / TP] is this rank's
    slice, `targets` [...] the token ids (every rank passes the same); differentiable."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    per_rank = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    padding = torch.arange(start, start + per_rank, device=logits.device) >= vocab_size
    # A zero-weight padding row still has logit 0, which would take probability mass. masked_fill also makes
    # the copy Megatron needs: it subtracts the max in place, which must not reach the caller's logits.
    masked = logits.masked_fill(padding, float("-inf")).float()
    return -vocab_parallel_cross_entropy(masked, targets)
