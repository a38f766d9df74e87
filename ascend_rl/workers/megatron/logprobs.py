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


def vocab_parallel_entropy(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The entropy of softmax(logits) over the real vocabulary from this rank's slice [..., V_padded / TP];
    differentiable. H = log Σ e^l − Σ e^l·l / Σ e^l, with both sums all-reduced over the TP group (their
    backward is the identity: each rank's slice gets its own share) and the max shift detached (it cancels)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    per_rank = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * per_rank
    padding = torch.arange(start, start + per_rank, device=logits.device) >= vocab_size
    logits = logits.float()
    shift = logits.detach().masked_fill(padding, float("-inf")).amax(-1, keepdim=True)
    torch.distributed.all_reduce(shift, torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_tensor_model_parallel_group())
    shifted = (logits - shift).masked_fill(padding, 0.0)
    weights = shifted.exp().masked_fill(padding, 0.0)
    total = reduce_from_tensor_model_parallel_region(weights.sum(-1))
    weighted = reduce_from_tensor_model_parallel_region((weights * shifted).sum(-1))
    return total.log() - weighted / total
