"""Model forward helpers shared by the actor, the reference policy and SFT."""

from __future__ import annotations

import torch

from ascend_rl.algorithms import entropy_from_logits, log_probs_from_logits, masked_mean


def response_logits(model, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
    """Logits that predict the last `response_length` tokens: [B, R, V] (only those are computed)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=response_length + 1, use_cache=False)
    return out.logits[:, :-1]


def response_log_probs(model, batch, temperature: float = 1.0, with_entropy: bool = False):
    """log π(response token) per position under softmax(logits / temperature), and optionally the entropy."""
    responses = batch["responses"]
    logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                             responses.shape[1])
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = log_probs_from_logits(logits, responses)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return log_probs, entropy


def logprob_metrics(log_prob: torch.Tensor, entropy: torch.Tensor, rollout_log_probs: torch.Tensor,
                    response_mask: torch.Tensor) -> dict[str, float]:
    """The policy's entropy and how far the engine's log-probs are from the trainer's, over response tokens
    (train/inference mismatch: what users chase most)."""
    diff = (log_prob - rollout_log_probs).abs()[response_mask.bool()]
    return {"actor/entropy": masked_mean(entropy, response_mask).item(),
            "rollout/logprob_diff_max": diff.max().item(), "rollout/logprob_diff_mean": diff.mean().item()}
