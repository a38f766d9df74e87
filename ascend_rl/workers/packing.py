"""Packed sequences (verl's `use_remove_padding`): a micro-batch's real tokens laid end to end in one row, with
each sequence's own position ids and its boundaries (`cu_seqlens`) for an attention that never looks across
them, so no FLOP is spent on padding. Pure layout functions: from the trainer's padded batch (left-padded
prompts, right-padded responses) to the packed row, and from per-position results back to [B, R]."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceSettings:
    """How micro-batches reach the model: padded rectangles, or packed (`model.use_remove_padding`) and split
    over `ulysses_sp` ranks (`ulysses_sequence_parallel_size`; needs packing, as in verl)."""

    remove_padding: bool = False
    ulysses_sp: int = 1


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # [1, N]; N is a multiple of the SP size, the tail past the real tokens is padding
    position_ids: torch.Tensor  # [1, N]
    cu_seqlens: torch.Tensor  # int32 [S + 1]: where each sequence starts and ends (the padding tail is one)
    max_length: int  # the longest sequence
    targets: torch.Tensor  # [N]: the token each position's logits predict (the next one in the row)
    predicts_response: torch.Tensor  # bool [N]: positions whose next token is a response token
    response_valid: torch.Tensor  # bool [B, R]: the response tokens, in the order predicts_response lists them

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def attention_kwargs(self) -> dict:
        """What the model passes down to its attention layers (transformers' names for varlen attention)."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, response_length: int,
         multiple_of: int = 1) -> PackedBatch:
    """The rows' real tokens in one row, padded at the end to a multiple of `multiple_of` (the SP size)."""
    real = attention_mask.bool()
    lengths = real.sum(-1)
    ids, positions = input_ids[real], position_ids[real]
    tail = -len(ids) % multiple_of
    # Response token j of a row sits at column P+j; the position before it (the last prompt token, or response
    # token j-1, both real: prompts are left-padded, responses right-padded) predicts it.
    response_valid = real[:, -response_length:]
    predictor = torch.zeros_like(real)
    predictor[:, -response_length - 1:-1] = response_valid
    bounds = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    if tail:
        bounds = torch.cat([bounds, bounds[-1:] + tail])
    return PackedBatch(
        input_ids=_pad_tail(ids, tail)[None],
        position_ids=_pad_tail(positions, tail)[None],
        cu_seqlens=bounds.to(torch.int32),
        max_length=int(max(lengths.max().item(), tail)),
        targets=_pad_tail(ids.roll(-1), tail),
        predicts_response=_pad_tail(predictor[real], tail),
        response_valid=response_valid,
    )


def unpack_responses(values: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """One value per response token (in `predicts_response` order) → [B, R], zero on padding (differentiable)."""
    out = values.new_zeros(packed.response_valid.shape)
    return out.masked_scatter(packed.response_valid, values)


def _pad_tail(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(n)]) if n else t
