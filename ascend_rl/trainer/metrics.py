"""Step metrics with verl's names, and timing."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ascend_rl.trainer.batch import RolloutBatch


@contextmanager
def timed(timings: dict[str, float], name: str):
    """Adds the block's seconds to timing_s/<name>; in a profiled step, the block is a named range."""
    start = time.perf_counter()
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        timings[f"timing_s/{name}"] = timings.get(f"timing_s/{name}", 0.0) + time.perf_counter() - start


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    values = values.float()
    return {f"{prefix}/mean": values.mean().item(), f"{prefix}/max": values.max().item(),
            f"{prefix}/min": values.min().item()}


def data_metrics(batch: RolloutBatch, max_response_length: int) -> dict[str, float]:
    mask = batch["response_mask"]
    lengths = mask.sum(-1)
    valid = mask.bool()
    prompt_lengths = (batch["attention_mask"].sum(-1) - lengths).float()
    return {
        **_stats("critic/score", batch["token_level_scores"].sum(-1)),
        **_stats("critic/rewards", batch["token_level_rewards"].sum(-1)),
        **_stats("critic/advantages", batch["advantages"][valid]),
        **_stats("critic/returns", batch["returns"][valid]),
        **_stats("response_length", lengths),
        "response_length/clip_ratio": (lengths >= max_response_length).float().mean().item(),
        **_stats("prompt_length", prompt_lengths),
        **(value_metrics(batch["values"][valid], batch["returns"][valid]) if "values" in batch.tensors else {}),
    }


def value_metrics(values: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
    """The critic's values over response tokens, and the share of the returns' variance they explain (verl's
    definition: 1 − Var(R − V) / (Var(R) + 1e-5))."""
    explained = 1.0 - torch.var(returns - values) / (torch.var(returns) + 1e-5)
    return {**_stats("critic/values", values), "critic/vf_explained_var": explained.item()}


def throughput_metrics(batch: RolloutBatch, step_seconds: float, n_devices: int) -> dict[str, float]:
    tokens = batch["attention_mask"].sum().item()
    return {"perf/total_num_tokens": tokens, "perf/time_per_step": step_seconds,
            "perf/throughput": tokens / (step_seconds * n_devices)}
