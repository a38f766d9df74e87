"""Model forward helpers shared by the actor, the reference policy, the critic and SFT: per-response-token
log-probs, entropy and values from a padded micro-batch, or from the same micro-batch packed (and split over a
Ulysses group), always returned in the padded [B, R] layout the algorithms use."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ascend_rl.algorithms import entropy_from_logits, log_probs_from_logits, masked_mean
from ascend_rl.workers.packing import PackedBatch, SequenceSettings, pack, pack_shared_prefixes, unpack_responses
from ascend_rl.workers.varlen_attention import GatherPositions, register


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


def response_values(model, batch) -> torch.Tensor:
    """A value model's V(s_t) for each response token t: the head's output at the position before it (the state
    the token was chosen in), [B, R] — the positions whose logits predict the response in the actor."""
    response_length = batch["responses"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return out.logits[:, -response_length - 1:-1, 0].float()


class ModelForward:
    """How a model sees a micro-batch: padded rectangles, or packed into one row (`remove_padding`; with each
    distinct prompt once: `shared_prefix`), whose positions are split over `sp_group` (Ulysses) when given. All
    give the same [B, R] results."""

    def __init__(self, settings: SequenceSettings, sp_group=None):
        if settings.shared_prefix and sp_group is not None:
            raise ValueError("shared prefixes (actor.use_prefix_grouper) with Ulysses sequence parallelism are not "
                             "built")
        self.packed, self.shared_prefix = settings.packed, settings.shared_prefix
        self.sp_group = sp_group

    @property
    def attn_implementation(self) -> str | None:
        """What the model must be loaded with (None: its default)."""
        return register() if self.packed else None

    def log_probs(self, model, batch, temperature: float = 1.0, with_entropy: bool = False):
        if not self.packed:
            return response_log_probs(model, batch, temperature, with_entropy)

        def per_position(out, keep, targets):
            logits = out.logits[0]
            if temperature != 1.0:
                logits = logits / temperature
            return [log_probs_from_logits(logits, targets)] + ([entropy_from_logits(logits)] if with_entropy else [])

        results = self._packed(model, batch, per_position, logits=True)
        return results[0], results[1] if with_entropy else None

    def values(self, model, batch) -> torch.Tensor:
        if not self.packed:
            return response_values(model, batch)
        (values,) = self._packed(model, batch, lambda out, keep, targets: [out.logits[0, keep, 0].float()])
        return values

    def _packed(self, model, batch, per_position, logits: bool = False) -> list[torch.Tensor]:
        """Runs `model` on this rank's slice of the packed micro-batch; `per_position(out, keep, targets)` gives
        values at the kept positions (those predicting a response token, one per token); each comes back as
        [B, R]."""
        group = self.sp_group
        size, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
        args = (batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["responses"].shape[1])
        packed = pack_shared_prefixes(*args) if self.shared_prefix else pack(*args, multiple_of=size)
        n = packed.length // size
        keep, targets = packed.predictors, packed.targets
        if group is not None:  # this rank's slice of the row; the predictors ascend (no shared prompt)
            mine = (keep >= rank * n) & (keep < (rank + 1) * n)
            keep, targets = keep[mine] - rank * n, targets[mine]
        rows = slice(rank * n, (rank + 1) * n)
        out = model(input_ids=packed.input_ids[:, rows], position_ids=packed.position_ids[:, rows], use_cache=False,
                    sp_group=group, **packed.attention_kwargs(), **({"logits_to_keep": keep} if logits else {}))
        return [self._to_responses(values, keep, n, packed) for values in per_position(out, keep, targets)]

    def _to_responses(self, values: torch.Tensor, keep: torch.Tensor, n: int, packed: PackedBatch) -> torch.Tensor:
        if self.sp_group is None:  # every response token is here, in order
            return unpack_responses(values, packed)
        local = values.new_zeros(n).index_put((keep,), values)
        whole = GatherPositions.apply(local, self.sp_group)
        return unpack_responses(whole[packed.predictors], packed)


def logprob_metrics(log_prob: torch.Tensor, entropy: torch.Tensor, rollout_log_probs: torch.Tensor,
                    response_mask: torch.Tensor) -> dict[str, float]:
    """The policy's entropy and how far the engine's log-probs are from the trainer's, over response tokens
    (train/inference mismatch: what users chase most)."""
    diff = (log_prob - rollout_log_probs).abs()[response_mask.bool()]
    return {"actor/entropy": masked_mean(entropy, response_mask).item(),
            "rollout/logprob_diff_max": diff.max().item(), "rollout/logprob_diff_mean": diff.mean().item()}
