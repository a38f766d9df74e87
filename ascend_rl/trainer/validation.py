"""Validation: generate on held-out prompts with `val_kwargs` (greedy by default), score, and report as verl:
`val-core/<data_source>/acc/mean@N` (or `reward` when a scorer's dict has no `acc`) and `val-aux/...` for the
reward and every other numeric key a scorer returns."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from ascend_rl.rollout.protocol import SamplingParams


@dataclass
class Validator:
    """The held-out prompts and how to score them (`rollout.val_kwargs`, greedy by default)."""

    records: list
    rewards: object  # a RewardRunner
    decode: Callable[[list], list[str]]
    val_kwargs: object
    max_new_tokens: int
    seed: int

    def __bool__(self) -> bool:
        return bool(self.records)

    def run(self, engine) -> dict[str, float]:
        return run_validation(engine, self.records, self.decode, self.rewards, self.val_kwargs, self.max_new_tokens,
                              self.seed)


def run_validation(engine, records, decode, rewards, val_kwargs, max_new_tokens: int, seed: int) -> dict[str, float]:
    n = val_kwargs.n
    shared = dict(max_new_tokens=max_new_tokens, temperature=val_kwargs.temperature, top_p=val_kwargs.top_p,
                  top_k=val_kwargs.top_k)  # read once: OmegaConf lookups are slow per sample
    params = [SamplingParams(**shared, sampling_seed=seed + i) for i in range(len(records) * n)]
    expanded = [r for r in records for _ in range(n)]
    outputs = engine.generate([r.input_ids for r in expanded], params)
    scored = rewards.score([r.data_source for r in expanded], decode([o.output_ids for o in outputs]),
                           [r.ground_truth for r in expanded], [r.extra_info for r in expanded])
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record, result in zip(expanded, scored):
        for name, value in sample_values(result.score, result.extra).items():
            values[record.data_source][name].append(value)
    metrics = {}
    for source, by_name in values.items():
        core = "acc" if "acc" in by_name else "reward"  # verl's choice of the headline value
        for name, column in by_name.items():
            section = "val-core" if name == core else "val-aux"
            metrics[f"{section}/{source}/{name}/mean@{n}"] = sum(column) / len(column)
    return metrics


def sample_values(score: float, extra: dict) -> dict[str, float]:
    """What verl's reward managers record for a sample: `reward` (the score), each numeric key a scorer's dict
    returned, and `acc` = the score when the scorer returned a plain number."""
    values = {"reward": float(score)}
    values.update({k: float(v) for k, v in extra.items() if isinstance(v, (int, float))})  # bools count as 0/1
    if not extra:
        values["acc"] = float(score)
    return values
