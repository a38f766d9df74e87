"""The attention packed sequences run through, registered with transformers as `PACKED_ATTENTION`: causal within
each sequence of the packed row (`cu_seq_lens_q`), never across. With an SP group it is Ulysses attention: each
rank holds a slice of the row; an all-to-all trades it for all positions of a share of the heads, attention
runs on whole sequences, and a second all-to-all trades back.

Kernels: flash-attention's varlen kernel where transformers has it (flash-attn on CUDA, torch_npu's
`npu_fusion_attention` on Ascend) for 16-bit inputs; elsewhere (the CPU) exact attention that spends nothing
across sequences: micro-batches of short sequences (at most `SHORT_KEYS`) as one padded batch for attention
alone, longer ones grouped by length. 16-bit short sequences use two matmuls (SDPA's CPU kernel is slow there;
workers/cpu_attention.py says why)."""

from __future__ import annotations

import functools

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
                     cu_seq_lens_q: torch.Tensor | None = None, sp_group=None, **kwargs):
    """transformers' attention-function interface: query [1, H, n, D], key/value [1, KVH, n, D] → [1, n, H, D]."""
    if cu_seq_lens_q is None or attention_mask is not None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention takes packed rows (cu_seq_lens_q), not padded batches")
    if sp_group is not None:
        query, key, value = (_AllToAll.apply(t, sp_group, 1, 2) for t in (query, key, value))
    half = _sixteen_bit(query, value)
    if half is not None and _flash_varlen_available():
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        query, key, value = (t.to(half) for t in (query, key, value))

        out, _ = ALL_ATTENTION_FUNCTIONS[_FLASH](module, query, key, value, None, dropout=dropout, scaling=scaling,
                                                 cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_q,
                                                 max_length_q=kwargs.get("max_length_q"),
                                                 max_length_k=kwargs.get("max_length_k"))
        out = out.transpose(1, 2)  # [1, H, N, D], as the SDPA path gives it
    else:
        bounds = cu_seq_lens_q.tolist()
        if max(b - a for a, b in zip(bounds, bounds[1:])) <= SHORT_KEYS:
            out = _short_sequences(query, key, value, bounds, scaling, half is not None)
        else:
            out = _sdpa_by_length(query, key, value, bounds, scaling, short_as_matmuls=half is not None)
    if sp_group is not None:
        out = _AllToAll.apply(out, sp_group, 2, 1)
    return out.transpose(1, 2).contiguous(), None


def _sixteen_bit(query, value) -> torch.dtype | None:
    """The 16-bit dtype attention computes in, if any: the tensors', or autocast's (RoPE's fp32 tables leave q
    and k in fp32 under autocast, and SDPA then runs in autocast's dtype anyway)."""
    if value.dtype in HALF:
        return value.dtype
    device = query.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in HALF:
        return torch.get_autocast_dtype(device)
    return None


def _short_sequences(query, key, value, bounds: list[int], scaling: float | None, matmuls: bool) -> torch.Tensor:
    """Short sequences as one padded batch [S, heads, longest, D] for attention alone (a causal mask that also
    hides each row's padding): a few large ops instead of a few per sequence length, and only longest² per row."""
    starts = torch.tensor(bounds[:-1], device=query.device)
    lengths = torch.tensor(bounds, device=query.device).diff()
    longest = int(lengths.max())
    columns = torch.arange(longest, device=query.device)
    valid = columns < lengths[:, None]  # [S, L]
    index = starts[:, None] + torch.minimum(columns, (lengths - 1).clamp(min=0)[:, None])
    q, k, v = (t[0][:, index].transpose(0, 1) for t in (query, key, value))  # [S, heads, L, D]
    mask = torch.ones(longest, longest, dtype=torch.bool, device=query.device).tril() & valid[:, None, None, :]
    if matmuls:
        out = matmul_attention(q, k, v, mask, scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(0, 1)[:, valid][None]  # the real positions, in packed order


def _sdpa_by_length(query, key, value, bounds: list[int], scaling: float | None,
                    short_as_matmuls: bool = False) -> torch.Tensor:
    """Causal SDPA within each sequence, one call per distinct length: sequences of a length are gathered into a
    batch, so no mask is needed and a micro-batch of many short rows costs a few calls, not one per row. One
    gather in and one out (not one per group): each indexing op's backward fills a whole-row zero tensor."""
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    arange = torch.arange(max(by_length), device=query.device)
    order = torch.cat([(torch.tensor(starts, device=query.device)[:, None] + arange[:length]).flatten()
                       for length, starts in by_length.items()])
    sizes = [len(starts) * length for length, starts in by_length.items()]
    gqa = query.shape[1] != key.shape[1]
    # Sequences of distinct lengths (the usual case for long, uneven rows) are already in group order: no gather.
    in_place = bool(torch.equal(order, torch.arange(len(order), device=order.device)))
    grouped = zip(*((t[0] if in_place else t[0][:, order]).split(sizes, dim=1) for t in (query, key, value)))
    outs = []
    for (q, k, v), (length, starts) in zip(grouped, by_length.items()):
        q, k, v = (t.unflatten(1, (len(starts), length)).transpose(0, 1) for t in (q, k, v))  # [rows, heads, L, D]
        if short_as_matmuls and length <= SHORT_KEYS:
            out = matmul_attention(q, k, v, None, scaling)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        outs.append(out.transpose(0, 1).flatten(1, 2))
    out = torch.cat(outs, dim=1)
    return (out if in_place else out[:, order.argsort()])[None]


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
