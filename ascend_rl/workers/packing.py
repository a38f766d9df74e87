"""Packed sequences (verl's `use_remove_padding`): a micro-batch's real tokens laid end to end in one row, with
each sequence's own position ids and its boundaries (`cu_seqlens`) for an attention that never looks across
them, so no FLOP is spent on padding. With shared prefixes (verl's `actor.use_prefix_grouper`) rows with the same
prompt (GRPO's n samples of a prompt) lay it down once: the prompt, then each row's response, which attends to the
prompt and to itself. Pure layout functions: from the trainer's padded batch (left-padded prompts, right-padded
responses) to the packed row, and from per-response-token results back to [B, R]."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceSettings:
    """How micro-batches reach the model: padded rectangles, or packed (`model.use_remove_padding`) and split
    over `ulysses_sp` ranks (`ulysses_sequence_parallel_size`; needs packing, as in verl); `shared_prefix`
    (`actor.use_prefix_grouper`): packed with each distinct prompt once."""

    remove_padding: bool = False
    ulysses_sp: int = 1
    shared_prefix: bool = False

    @property
    def packed(self) -> bool:
        return self.remove_padding or self.shared_prefix


@dataclass(frozen=True)
class SharedKeys:
    """Where the packed row's attention rows find their keys when a row attends to more than its own positions:
    `index` lists each row's key positions (its prompt's, then its own), rows one after the other."""

    index: torch.Tensor  # [K] positions in the packed row
    cu_seqlens: torch.Tensor  # int32 [S + 1]: where each attention row's keys start and end in `index`
    max_length: int


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # [1, N]; N is a multiple of the SP size, the tail past the real tokens is padding
    position_ids: torch.Tensor  # [1, N]
    cu_seqlens: torch.Tensor  # int32 [S + 1]: the attention rows' query positions (the padding tail is one)
    max_length: int  # the longest attention row (queries)
    predictors: torch.Tensor  # [T]: the position whose logits predict response token t (response_valid order)
    targets: torch.Tensor  # [T]: the response tokens, in the same order
    response_valid: torch.Tensor  # bool [B, R]: the response tokens
    keys: SharedKeys | None = None  # None: each attention row attends to its own positions only

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def attention_kwargs(self) -> dict:
        """What the model passes down to its attention layers (transformers' names for varlen attention)."""
        q = {"cu_seq_lens_q": self.cu_seqlens, "max_length_q": self.max_length}
        if self.keys is None:
            return {**q, "cu_seq_lens_k": self.cu_seqlens, "max_length_k": self.max_length}
        return {**q, "cu_seq_lens_k": self.keys.cu_seqlens, "max_length_k": self.keys.max_length,
                "key_index": self.keys.index}


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
    bounds = _boundaries(lengths)
    if tail:
        bounds = torch.cat([bounds, bounds[-1:] + tail])
    return PackedBatch(
        input_ids=_pad_tail(ids, tail)[None],
        position_ids=_pad_tail(positions, tail)[None],
        cu_seqlens=bounds.to(torch.int32),
        max_length=int(max(lengths.max().item(), tail)),
        predictors=predictor[real].nonzero().squeeze(-1),
        targets=input_ids[:, -response_length:][response_valid],
        response_valid=response_valid,
    )


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """Which group each row's prompt falls in (rows with the same real prompt tokens share one): [B] on the CPU,
    numbered in order of first appearance."""
    width = input_ids.shape[1] - response_length
    prompts = torch.where(attention_mask[:, :width].bool(), input_ids[:, :width], -1).cpu()
    _, group = torch.unique(prompts, dim=0, return_inverse=True)
    return _first_rows(group).argsort().argsort()[group]


def _first_rows(group: torch.Tensor) -> torch.Tensor:
    """Each group's first row: [groups]."""
    rows = torch.arange(len(group))
    return torch.full((int(group.max()) + 1,), len(group)).scatter_reduce(0, group, rows, "amin")


def pack_shared_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                         response_length: int) -> PackedBatch:
    """Each distinct prompt once, followed by the responses of its rows: [prompt A, response a1, a2, ..., prompt
    B, ...]. Attention rows: each prompt (causal), and each response, whose keys are its prompt's positions then
    its own (causal within the response). Response positions keep their row's position ids (continuing the
    prompt's). The prompt's last position predicts the first token of each of its responses. The layout is index
    arithmetic on the CPU (a few hundred rows); what the model reads goes to the batch's device."""
    device = input_ids.device
    input_ids, attention_mask, position_ids = (t.cpu() for t in (input_ids, attention_mask, position_ids))
    real = attention_mask.bool()
    rows, width, total_width = input_ids.shape[0], input_ids.shape[1] - response_length, input_ids.shape[1]
    response_valid = real[:, width:]
    group = prompt_groups(input_ids, attention_mask, response_length)
    groups = int(group.max()) + 1
    first_row = _first_rows(group)
    prompt_len, response_len = real[first_row, :width].sum(-1), response_valid.sum(-1)
    # Segments in packed order: each group's prompt, then its rows (ascending). A row's slot: the rows of earlier
    # groups and of its own before it, plus the prompts up to its own.
    order = torch.empty(rows, dtype=torch.long).scatter_(0, torch.argsort(group, stable=True), torch.arange(rows))
    row_slot = order + group + 1
    prompt_slot = _boundaries(torch.bincount(group, minlength=groups))[:-1] + torch.arange(groups)
    seg_len = torch.zeros(groups + rows, dtype=torch.long).index_copy(0, prompt_slot, prompt_len).index_copy(
        0, row_slot, response_len)
    starts = _boundaries(seg_len)
    # Each segment is a run of columns in one row of the padded batch: a prompt ends at column `width`, its
    # responses start there.
    seg_source = torch.zeros(groups + rows, dtype=torch.long).index_copy(
        0, prompt_slot, first_row * total_width + width - prompt_len).index_copy(
        0, row_slot, torch.arange(rows) * total_width + width)
    source = _runs(seg_source, seg_len)
    # Keys, as (prompt part, own part) per segment: a prompt's segment attends to itself, a response's to its
    # prompt and itself. Empty responses have no queries: their attention rows are left out.
    prompt_start = starts[prompt_slot]
    key_start = torch.stack([starts[:-1], starts[:-1]], 1)
    key_len = torch.stack([torch.zeros_like(seg_len), seg_len], 1)
    key_start[row_slot, 0], key_len[row_slot, 0] = prompt_start[group], prompt_len[group]
    queried = seg_len > 0
    key_start, key_len = key_start[queried], key_len[queried]
    # Response token j is predicted by the prompt's last position (j = 0) or by response token j-1.
    row, column = response_valid.nonzero(as_tuple=True)
    predictors = torch.where(column == 0, (prompt_start + prompt_len - 1)[group][row],
                             starts[row_slot][row] + column - 1)
    keys = SharedKeys(_runs(key_start.flatten(), key_len.flatten()).to(device),
                      _boundaries(key_len.sum(-1)).to(torch.int32).to(device),
                      int(key_len.sum(-1).max()))
    return PackedBatch(
        input_ids=input_ids.flatten()[source][None].to(device),
        position_ids=position_ids.flatten()[source][None].to(device),
        cu_seqlens=_boundaries(seg_len[queried]).to(torch.int32).to(device),
        max_length=int(seg_len.max()),
        predictors=predictors.to(device),
        targets=input_ids[:, width:][response_valid].to(device),
        response_valid=response_valid.to(device),
        keys=keys,
    )


def _boundaries(lengths: torch.Tensor) -> torch.Tensor:
    """Where runs of these lengths, laid one after the other, start and end: [0, l0, l0 + l1, ...]."""
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def _runs(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The indices start_i, start_i + 1, ..., start_i + length_i - 1 of every run, one run after the other."""
    return torch.repeat_interleave(starts - _boundaries(lengths)[:-1], lengths) + torch.arange(int(lengths.sum()))


def unpack_responses(values: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """One value per response token (in `response_valid` order) → [B, R], zero on padding (differentiable)."""
    out = values.new_zeros(packed.response_valid.shape)
    return out.masked_scatter(packed.response_valid, values)


def _pad_tail(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(n)]) if n else t
