"""The attention packed sequences run through, registered with transformers as `PACKED_ATTENTION`: causal within
each sequence of the packed row (`cu_seq_lens_q`), never across. With an SP group it is Ulysses attention: each
rank holds a slice of the row; an all-to-all trades it for all positions of a share of the heads, attention
runs on whole sequences, and a second all-to-all trades back.

Kernels: flash-attention's varlen kernel where transformers has it (flash-attn on CUDA, torch_npu's
`npu_fusion_attention` on Ascend) for 16-bit inputs; elsewhere (the CPU) exact attention that spends nothing
across sequences: micro-batches of short sequences (at most `SHORT_KEYS` keys) as one padded batch for attention
alone, longer ones grouped by shape. With shared prefixes a response's keys are its prompt's positions and its
own (`key_index`), read where the prompt lies, so every response's gradient flows back to the one prompt. 16-bit short
rows use two matmuls (SDPA's CPU kernel is slow there; workers/cpu_attention.py says why)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ascend_rl.workers.cpu_attention import SHORT_KEYS, matmul_attention

PACKED_ATTENTION = "ascend_rl_packed"
HALF = (torch.float16, torch.bfloat16)
_FLASH = "flash_attention_2"


def register() -> str:
    """Make `PACKED_ATTENTION` a name transformers' `attn_implementation` accepts; returns it."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    return PACKED_ATTENTION


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                     key_index: torch.Tensor | None = None, sp_group=None, **kwargs):
    """transformers' attention-function interface: query [1, H, n, D], key/value [1, KVH, n, D] → [1, n, H, D].
    Attention row i's queries are positions cu_seq_lens_q[i]:[i + 1]; its keys are the same positions, or with
    `key_index` (shared prefixes) positions key_index[cu_seq_lens_k[i]:[i + 1]]; either way the queries are the
    last of the keys, and attend causally."""
    if cu_seq_lens_q is None or attention_mask is not None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention takes packed rows (cu_seq_lens_q), not padded batches")
    if sp_group is not None:
        query, key, value = (_AllToAll.apply(t, sp_group, 1, 2) for t in (query, key, value))
    if key_index is None:
        cu_seq_lens_k = cu_seq_lens_q
    half = _sixteen_bit(query, value)
    if half is not None and _flash_varlen_available():
        from transformers.modeling_flash_attention_utils import flash_attn_supports_top_left_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if key_index is not None:  # each row's keys end to end; a shared prompt's are read by each of its rows
            if flash_attn_supports_top_left_mask():
                raise RuntimeError("shared prefixes (actor.use_prefix_grouper) need a flash-attention kernel whose "
                                   "causal mask is aligned to the bottom right; this one aligns it top-left "
                                   "(unset NPU_FA2_SPARSE_MODE, or flash-attn >= 2.1)")
            key, value = key.index_select(2, key_index), value.index_select(2, key_index)
        query, key, value = (t.to(half) for t in (query, key, value))
        out, _ = ALL_ATTENTION_FUNCTIONS[_FLASH](module, query, key, value, None, dropout=dropout, scaling=scaling,
                                                 cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k,
                                                 max_length_q=kwargs.get("max_length_q"),
                                                 max_length_k=kwargs.get("max_length_k"))
        out = out.transpose(1, 2)  # [1, H, N, D], as the SDPA path gives it
    else:
        rows = _Rows.from_bounds(cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist(), key_index)
        if rows.longest_keys <= SHORT_KEYS:
            out = _short_rows(query, key, value, rows, scaling, half is not None)
        else:
            out = _sdpa_by_shape(query, key, value, rows, scaling, short_as_matmuls=half is not None)
    if sp_group is not None:
        out = _AllToAll.apply(out, sp_group, 2, 1)
    return out.transpose(1, 2).contiguous(), None


@dataclass(frozen=True)
class _Rows:
    """The attention rows of a packed row: each one's query positions and its keys (the queries are the last of
    them): entries k_start … k_start + k_length - 1 of the key list, which is `key_index` (None: every position
    once). The key list is never built: its indices are mapped to positions (`key_positions`), one gather per
    use."""

    q_starts: list[int]
    q_lengths: list[int]
    k_starts: list[int]
    k_lengths: list[int]
    key_index: torch.Tensor | None = None

    @classmethod
    def from_bounds(cls, q_bounds: list[int], k_bounds: list[int], key_index: torch.Tensor | None) -> _Rows:
        return cls(q_bounds[:-1], [b - a for a, b in zip(q_bounds, q_bounds[1:])],
                   k_bounds[:-1], [b - a for a, b in zip(k_bounds, k_bounds[1:])], key_index)

    @property
    def longest_keys(self) -> int:
        return max(self.k_lengths)

    def subset(self, rows: list[int]) -> _Rows:
        return _Rows(*([values[i] for i in rows] for values in (self.q_starts, self.q_lengths, self.k_starts,
                                                                 self.k_lengths)), self.key_index)

    def by_query_length(self) -> list[list[int]]:
        """The rows in buckets whose query lengths are within a factor of 4 (longest first), so padding a bucket to
        its longest wastes at most 3/4 of its queries: shared prompts and their short responses are padded apart."""
        buckets: dict[int, list[int]] = {}
        longest = max(self.q_lengths)
        for i, length in enumerate(self.q_lengths):
            if length:
                buckets.setdefault((longest // length).bit_length() // 2, []).append(i)
        return [buckets[b] for b in sorted(buckets)]

    def key_positions(self, index: torch.Tensor) -> torch.Tensor:
        """Indices into the key list → positions in the packed row."""
        return index if self.key_index is None else self.key_index[index]


def _sixteen_bit(query, value) -> torch.dtype | None:
    """The 16-bit dtype attention computes in, if any: the tensors', or autocast's (RoPE's fp32 tables leave q
    and k in fp32 under autocast, and SDPA then runs in autocast's dtype anyway)."""
    if value.dtype in HALF:
        return value.dtype
    device = query.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in HALF:
        return torch.get_autocast_dtype(device)
    return None


def _padded_index(starts: list[int], lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of positions padded to the longest (padding repeats a row's last position): index [S, L], lengths [S],
    valid [S, L]."""
    start, length = torch.tensor(starts, device=device), torch.tensor(lengths, device=device)
    columns = torch.arange(max(lengths), device=device)
    index = start[:, None] + torch.minimum(columns, (length - 1).clamp(min=0)[:, None])
    return index, length, columns < length[:, None]


def _short_rows(query, key, value, rows: _Rows, scaling: float | None, matmuls: bool) -> torch.Tensor:
    """Short rows as a few padded batches [S, heads, longest, D] for attention alone (a causal mask, aligned to
    the last key, that also hides each row's padding): a few large ops instead of a few per length. → [1, heads,
    N, D], the positions in packed order."""
    parts, positions = [], []
    for bucket in rows.by_query_length():
        out, at = _padded_attention(query, key, value, rows.subset(bucket), scaling, matmuls)
        parts.append(out)
        positions.append(at)
    out = torch.cat(parts)  # [N, heads, D]
    if len(parts) > 1:
        out = out.index_select(0, torch.cat(positions).argsort())
    return out.transpose(0, 1)[None]


def _padded_attention(query, key, value, rows: _Rows, scaling: float | None,
                      matmuls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` as one padded batch → [their query positions, heads, D], row after row, and those positions.
    Gathers are `index_select`s: their backward adds rows up (`index_add_`), where advanced indexing's
    accumulating `index_put_` took 2.6 ms a call on the embedded shape."""
    device = query.device
    q_index, q_length, q_valid = _padded_index(rows.q_starts, rows.q_lengths, device)
    k_index, k_length, k_valid = _padded_index(rows.k_starts, rows.k_lengths, device)
    q = _gather_positions(query, q_index)  # [S, heads, Lq, D]
    k, v = (_gather_positions(t, rows.key_positions(k_index)) for t in (key, value))  # [S, KV heads, Lk, D]
    # query t of a row (its keys' (Lk - Lq + t)-th) sees keys up to itself
    offset = (k_length - q_length)[:, None, None]
    causal = torch.arange(k.shape[2], device=device) <= offset + torch.arange(q.shape[2], device=device)[:, None]
    mask = (causal & k_valid[:, None, :])[:, None]  # [S, 1, Lq, Lk]
    if matmuls:
        out = matmul_attention(q, k, v, mask, scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
    real = q_valid.flatten().nonzero().squeeze(-1)
    return out.transpose(1, 2).flatten(0, 1).index_select(0, real), q_index.flatten()[real]


def _gather_positions(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[1, heads, N, D] at positions `index` [S, L] → [S, heads, L, D]."""
    return _positions_first(t, index.flatten()).unflatten(0, index.shape).transpose(1, 2)


def _sdpa_by_shape(query, key, value, rows: _Rows, scaling: float | None,
                   short_as_matmuls: bool = False) -> torch.Tensor:
    """Causal SDPA within each row, one call per distinct (queries, keys) shape: rows of a shape are gathered into
    a batch, so no padding is needed and a micro-batch of many short rows costs a few calls, not one per row. One
    gather in and one out (not one per group): each gather's backward fills a whole-row zero tensor."""
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for q_start, q_len, k_start, k_len in zip(rows.q_starts, rows.q_lengths, rows.k_starts, rows.k_lengths):
        if q_len:
            by_shape.setdefault((q_len, k_len), []).append((q_start, k_start))
    device = query.device
    q_order, k_order = (torch.cat([(torch.tensor([s[part] for s in starts], device=device)[:, None]
                                    + torch.arange(shape[part], device=device)).flatten()
                                   for shape, starts in by_shape.items()]) for part in (0, 1))
    k_order = rows.key_positions(k_order)
    # Rows of distinct shapes (the usual case for long, uneven rows) are already in group order: no gather.
    q_in_place = bool(torch.equal(q_order, torch.arange(query.shape[2], device=device)))
    k_in_place = bool(torch.equal(k_order, torch.arange(key.shape[2], device=device)))
    q_all = _positions_first(query, None if q_in_place else q_order)
    k_all, v_all = (_positions_first(t, None if k_in_place else k_order) for t in (key, value))
    qs = q_all.split([len(starts) * q_len for (q_len, _), starts in by_shape.items()])
    ks, vs = (t.split([len(starts) * k_len for (_, k_len), starts in by_shape.items()]) for t in (k_all, v_all))
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for q, k, v, ((q_len, k_len), starts) in zip(qs, ks, vs, by_shape.items()):
        q = q.unflatten(0, (len(starts), q_len)).transpose(1, 2)  # [rows, heads, Lq, D]
        k, v = (t.unflatten(0, (len(starts), k_len)).transpose(1, 2) for t in (k, v))
        mask = None if q_len == k_len else torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(
            k_len - q_len)
        if short_as_matmuls and k_len <= SHORT_KEYS:
            out = matmul_attention(q, k, v, mask, scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                                 enable_gqa=gqa)
        outs.append(out.transpose(1, 2).flatten(0, 1))
    out = torch.cat(outs)  # [N, heads, D]
    if not q_in_place:
        out = out.index_select(0, q_order.argsort())
    return out.transpose(0, 1)[None]


def _positions_first(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """[1, heads, N, D] → [N, heads, D], at positions `order` when given."""
    t = t[0].transpose(0, 1)
    return t if order is None else t.index_select(0, order)


@functools.cache
def _flash_varlen_available() -> bool:
    from transformers.utils import is_flash_attn_2_available, is_torch_npu_available

    return is_flash_attn_2_available() or is_torch_npu_available()


class _AllToAll(torch.autograd.Function):
    """Ulysses' exchange on [1, heads, positions, D]: split dim `scatter` (heads, or positions) into the group's
    shares, send share i to rank i, and join what arrives along dim `gather` in rank order. Its gradient is the
    reverse exchange. Hand-written: torch's autograd all-to-all (torch.distributed.nn) is deprecated."""

    @staticmethod
    def forward(ctx, t, group, scatter: int, gather: int):
        ctx.group, ctx.scatter, ctx.gather = group, scatter, gather
        return _exchange(t, group, scatter, gather)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.gather, ctx.scatter), None, None, None


def _exchange(t: torch.Tensor, group, scatter: int, gather: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    send = torch.stack(t.chunk(size, dim=scatter)).contiguous()  # [size, ...share]
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather)


class GatherPositions(torch.autograd.Function):
    """Every rank's equal slice of a per-position tensor, joined along dim 0 on every rank. Each rank then
    computes the same loss from the whole; its gradient is its own slice of the whole's (no exchange: the
    ranks' gradients of the whole are equal)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(t) for _ in range(ctx.size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.size)[ctx.rank], None
