"""Score a batch of responses in worker processes, so a scorer that raises or hangs costs one sample
(score 0, counted) and never the run.

Processes rather than threads: a hung pure-Python scorer in a thread would keep the GIL busy for the rest
of training and cannot be stopped; a process can be terminated.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ascend_rl.errors import UserError
from ascend_rl.reward.scorers import default_compute_score


def load_custom_reward_fn(path: str, name: str = "compute_score") -> Callable:
    """The user's `compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw)`."""
    file = Path(path)
    key = "reward.custom_reward_function"
    if not file.is_file():
        raise UserError(f"{key}.path={path}: no such file")
    spec = importlib.util.spec_from_file_location(f"ascend_rl_custom_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's module failing to import is their error, not ours
        raise UserError(f"{key}.path={path}: importing it failed: {type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{key}.name={name}: {path} defines no function {name!r}")
    return fn


@dataclass(frozen=True)
class RewardFunction:
    """What to call, described so that a worker process can rebuild it."""

    custom_path: str | None = None
    custom_name: str = "compute_score"
    kwargs: dict = field(default_factory=dict)

    def resolve(self) -> Callable:
        if self.custom_path:
            return load_custom_reward_fn(self.custom_path, self.custom_name)
        return default_compute_score


@dataclass(frozen=True)
class ScoredSample:
    score: float
    extra: dict  # extra metrics a scorer returned in its dict
    error: str | None = None  # why the sample got 0: "timeout" or the exception


_worker_fn: Callable | None = None
_worker_kwargs: dict = {}


def _init_worker(reward: RewardFunction) -> None:
    global _worker_fn, _worker_kwargs
    _worker_fn, _worker_kwargs = reward.resolve(), reward.kwargs


def _score_one(args: tuple) -> tuple[float, dict]:
    data_source, solution, truth, extra_info = args
    result = _worker_fn(data_source, solution, truth, extra_info, **_worker_kwargs)
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"scorer returned a dict without 'score': {sorted(result)}")
        return float(result["score"]), {k: float(v) for k, v in result.items() if k != "score"}
    return float(result), {}


def _collect(job) -> ScoredSample:
    try:
        score, extra = job.get(timeout=0)
        return ScoredSample(score, extra)
    except Exception as err:
        return ScoredSample(0.0, {}, f"{type(err).__name__}: {err}")


class RewardRunner:
    """A pool of scorer processes; `score` returns one ScoredSample per response, in order."""

    def __init__(self, reward: RewardFunction, num_workers: int = 2, timeout_s: float = 10.0):
        reward.resolve()  # fail at start-up, in this process, with a clear message
        self.reward, self.num_workers, self.timeout_s = reward, max(1, num_workers), timeout_s
        self._pool = None

    def _ensure_pool(self):
        if self._pool is None:
            ctx = multiprocessing.get_context("fork")
            self._pool = ctx.Pool(self.num_workers, initializer=_init_worker, initargs=(self.reward,))
        return self._pool

    def score(self, data_sources: Sequence[str], solutions: Sequence[str], ground_truths: Sequence[Any],
              extra_infos: Sequence[dict | None] | None = None) -> list[ScoredSample]:
        extra_infos = extra_infos or [None] * len(solutions)
        work = list(zip(data_sources, solutions, ground_truths, extra_infos))
        results: list[ScoredSample | None] = [None] * len(work)
        pending = list(range(len(work)))
        while pending:
            pool = self._ensure_pool()
            jobs = [(i, pool.apply_async(_score_one, (work[i],))) for i in pending]
            pending = []
            for k, (i, job) in enumerate(jobs):
                try:
                    score, extra = job.get(timeout=self.timeout_s)
                    results[i] = ScoredSample(score, extra)
                except multiprocessing.TimeoutError:
                    results[i] = ScoredSample(0.0, {}, "timeout")
                    # A hung worker never comes back and the samples queued behind it would time out too:
                    # keep what is done, replace the pool, and score the rest again.
                    later = jobs[k + 1:]
                    for j, other in later:
                        if other.ready():
                            results[j] = _collect(other)
                    pending = [j for j, other in later if results[j] is None]
                    self.close()
                    break
                except Exception as err:  # a scorer bug costs its sample, not the run
                    results[i] = ScoredSample(0.0, {}, f"{type(err).__name__}: {err}")
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
