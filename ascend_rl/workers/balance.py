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


def prompt_units(group: Sequence[int], prompt_tokens: Sequence[int], row_tokens: Sequence[int],
                 budget: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Rows that share a prompt (`group` ids) as one unit, weighed as shared prefixes pack them: the prompt once
    and each row's response. A unit heavier than `budget` is left as its rows (each a prompt and a response).
    → (the units' rows, their weights), units in order of their first row."""
    members: dict[int, list[int]] = {}
    for row, g in enumerate(group):
        members.setdefault(g, []).append(row)
    units, weights = [], []
    for rows in members.values():
        weight = prompt_tokens[rows[0]] + sum(row_tokens[r] - prompt_tokens[r] for r in rows)
        if budget is not None and weight > budget and len(rows) > 1:
            units += [[r] for r in rows]
            weights += [row_tokens[r] for r in rows]
        else:
            units.append(rows)
            weights.append(weight)
    return units, weights


def balanced_unit_partition(units: Sequence[Sequence[int]], weights: Sequence[float],
                            parts: int) -> list[list[int]] | None:
    """Whole units into `parts` of equal row counts, weights as even as `balanced_partition` makes them; None
    when units of unequal sizes, or a count `parts` does not divide, cannot give equal row counts."""
    if len({len(u) for u in units}) != 1 or len(units) % parts:
        return None
    return [sorted(r for u in part for r in units[u]) for part in balanced_partition(weights, parts)]
