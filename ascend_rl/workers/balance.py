"""Which rows each rank takes (`trainer.balance_batch`): equal row counts, since every rank must run the same
number of forward/backward passes for FSDP's collectives, and token totals as even as a greedy pass makes them,
since the slowest rank sets the pace."""

from __future__ import annotations

from collections.abc import Sequence


def balanced_partition(weights: Sequence[float], parts: int) -> list[list[int]]:
    """Indices 0..len-1 into `parts` groups of len/parts (the first groups one more when it does not divide):
    heaviest rows first, each to the lightest group with room. Indices ascend within a group."""
    n = len(weights)
    capacity = [n // parts + (1 if g < n % parts else 0) for g in range(parts)]
    groups: list[list[int]] = [[] for _ in range(parts)]
    sums = [0.0] * parts
    for i in sorted(range(n), key=lambda i: (-weights[i], i)):
        g = min((g for g in range(parts) if len(groups[g]) < capacity[g]), key=lambda g: (sums[g], g))
        groups[g].append(i)
        sums[g] += weights[i]
    return [sorted(group) for group in groups]


def contiguous_partition(n: int, parts: int) -> list[list[int]]:
    bounds = [n * g // parts for g in range(parts + 1)]
    return [list(range(bounds[g], bounds[g + 1])) for g in range(parts)]


def token_budget_groups(tokens: Sequence[int], budget: int, groups: int | None = None) -> list[list[int]]:
    """Rows into micro-batches of at most `budget` tokens each (verl's use_dynamic_bsz): as few groups as the
    total allows (or exactly `groups`, which every rank must agree on for FSDP), heaviest rows first, each to the
    lightest group; a group goes over the budget only when a row alone does, or `groups` forces it. Indices
    ascend within a group; empty groups are left out."""
    n = len(tokens)
    count = groups or max(1, -(-sum(tokens) // budget))
    while True:
        members: list[list[int]] = [[] for _ in range(count)]
        sums = [0] * count
        for i in sorted(range(n), key=lambda i: (-tokens[i], i)):
            g = min(range(count), key=lambda g: (sums[g], g))
            members[g].append(i)
            sums[g] += tokens[i]
        over = any(s > budget and len(m) > 1 for s, m in zip(sums, members))
        if groups is not None or not over or count >= n:
            return [sorted(m) for m in members if m]
        count += 1
