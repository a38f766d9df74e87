"""Penalties and logit bias per row of a running batch: SGLang's penaltylib as tensors indexed by row, so rows
with different settings share one batch and a decode step applies them all in a few tensor ops.

The meaning is SGLang's, over the tokens a row has generated (never its prompt), in SGLang's order:
- frequency_penalty f, presence_penalty p: logit −= f · count + p · [count > 0];
- repetition_penalty r: a generated token's logit is divided by r when positive, multiplied by r when negative.
  SGLang 0.5.8 checks r but applies nothing (its BatchedRepetitionPenalizer was removed; sgl-project/sglang
  #28179); here it acts as that penalizer did: generated tokens only, after the additive penalties;
- min_new_tokens m: EOS and the stop_token_ids are −inf while a row has fewer than m tokens (EOS even under
  ignore_eos, as in SGLang);
- logit_bias: added last.

A batch whose rows use none of these has no state (None) and its logits are untouched: the default path is
bit-identical to sampling without this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ascend_rl.rollout.sampling_params import SamplingParams

NEUTRAL = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0}
COUNTED = ("frequency_penalty", "presence_penalty", "repetition_penalty")  # these need each row's token counts


@dataclass
class RowPenalties:
    values: dict[str, torch.Tensor]  # NEUTRAL's keys → [R], on the CPU like the scheduler's step counters
    counts: torch.Tensor | None  # [R, V] float32 counts of generated tokens, on the logits' device; None: unused
    bias: torch.Tensor | None  # [R, V] float32 on the logits' device; None: no row has a bias


# --- the math (pure) ------------------------------------------------------------------------------------

def frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
                       presence: torch.Tensor) -> torch.Tensor:
    """logits − f · count − p · [count > 0], with f and p per row ([r, 1])."""
    return logits + (-(counts * frequency) - (counts > 0) * presence)


def repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Seen tokens' logits ÷ penalty where positive, × penalty where negative (penalty per row, [r, 1])."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def suppress(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """−inf where a row in `rows` ([r] bool) meets a token in `tokens` ([V] bool)."""
    return logits.masked_fill(rows[:, None] & tokens, float("-inf"))


# --- the state of a batch -------------------------------------------------------------------------------

def joined(kept: RowPenalties | None, kept_rows: int, params: list[SamplingParams], width: int,
           device: torch.device) -> RowPenalties | None:
    """The state of `kept_rows` running rows (state `kept`) followed by rows joining with `params`."""
    before = kept or _neutral(kept_rows)
    values = {key: torch.cat([before.values[key], _vector(key, params)]) for key in NEUTRAL}
    counts = None
    if any(_used(values)[key] for key in COUNTED):  # joining rows have generated nothing yet
        counts = torch.cat([_table(before.counts, kept_rows, width, device),
                            torch.zeros((len(params), width), device=device)])
    biases = [p.bias_by_token() for p in params]
    bias = None
    if before.bias is not None or any(biases):
        bias = torch.zeros((len(params), width), device=device)
        for row, table in enumerate(biases):  # once per joining row, not per step
            if table:
                bias[row, list(table)] = torch.tensor(list(table.values()), device=device)
        bias = torch.cat([_table(before.bias, kept_rows, width, device), bias])
    return _trimmed(RowPenalties(values, counts, bias))


def select(state: RowPenalties | None, rows: torch.Tensor) -> RowPenalties | None:
    """The state of these rows (the scheduler dropping finished ones)."""
    if state is None:
        return None

    def pick(table: torch.Tensor | None) -> torch.Tensor | None:
        return None if table is None else table[rows.to(table.device)]

    return _trimmed(RowPenalties({key: value[rows] for key, value in state.values.items()}, pick(state.counts),
                                 pick(state.bias)))


def adjust(logits: torch.Tensor, state: RowPenalties, rows: torch.Tensor, generated: torch.Tensor,
           stop_ids: Iterable[int]) -> torch.Tensor:
    """The logits of `rows` ([r, V]) with their penalties and bias; `generated`: each row's tokens so far."""
    device = logits.device
    on_device = rows.to(device)
    values = {key: value[rows] for key, value in state.values.items()}
    if state.counts is not None:
        counts = state.counts[on_device]
        frequency, presence, penalty = (values[key].to(device)[:, None] for key in COUNTED)
        logits = repetition(frequency_presence(logits, counts, frequency, presence), counts > 0, penalty)
    short = generated < values["min_new_tokens"]
    if short.any():
        stop = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
        stop[[t for t in stop_ids if t < logits.shape[-1]]] = True
        logits = suppress(logits, short.to(device), stop)
    if state.bias is not None:
        logits = logits + state.bias[on_device]
    return logits


def record(state: RowPenalties | None, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """Count the token each of `rows` just generated."""
    if state is None or state.counts is None:
        return
    device = state.counts.device
    state.counts.index_put_((rows.to(device), tokens.to(device)), torch.ones(len(rows), device=device),
                            accumulate=True)


def _vector(key: str, params: list[SamplingParams]) -> torch.Tensor:
    dtype = torch.long if key == "min_new_tokens" else torch.float32
    return torch.tensor([getattr(p, key) for p in params], dtype=dtype)


def _neutral(rows: int) -> RowPenalties:
    return RowPenalties({key: torch.full((rows,), value) for key, value in NEUTRAL.items()}, None, None)


def _table(table: torch.Tensor | None, rows: int, width: int, device: torch.device) -> torch.Tensor:
    return torch.zeros((rows, width), device=device) if table is None else table


def _used(values: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Which settings some row moves away from neutral."""
    return {key: bool((value != NEUTRAL[key]).any()) for key, value in values.items()}


def _trimmed(state: RowPenalties) -> RowPenalties | None:
    """Drop what no row uses any more (SGLang's penalizers tear down the same way); None if nothing is left."""
    used = _used(state.values)
    if not any(used[key] for key in COUNTED):
        state.counts = None
    if state.bias is not None and not bool(state.bias.any()):
        state.bias = None
    if state.counts is None and state.bias is None and not used["min_new_tokens"]:
        return None
    return state
