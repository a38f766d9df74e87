"""Validation: generate on held-out prompts with `val_kwargs` (greedy by default), score, and report
verl's `val-core/<data_source>/acc/mean@N`."""

from __future__ import annotations

from collections import defaultdict

from ascend_rl.rollout.protocol import SamplingParams


def run_validation(engine, records, decode, rewards, val_kwargs, max_new_tokens: int, seed: int) -> dict[str, float]:
    n = val_kwargs.n
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=val_kwargs.temperature,
                             top_p=val_kwargs.top_p, top_k=val_kwargs.top_k, sampling_seed=seed + i)
              for i in range(len(records) * n)]
    expanded = [r for r in records for _ in range(n)]
    outputs = engine.generate([r.input_ids for r in expanded], params)
    scored = rewards.score([r.data_source for r in expanded], decode([o.output_ids for o in outputs]),
                           [r.ground_truth for r in expanded], [r.extra_info for r in expanded])
    acc, reward = defaultdict(list), defaultdict(list)
    for record, result in zip(expanded, scored):
        reward[record.data_source].append(result.score)
        acc[record.data_source].append(result.extra.get("acc", float(result.score > 0)))
    metrics = {}
    for source in acc:
        metrics[f"val-core/{source}/acc/mean@{n}"] = sum(acc[source]) / len(acc[source])
        metrics[f"val-aux/{source}/reward/mean@{n}"] = sum(reward[source]) / len(reward[source])
    return metrics
