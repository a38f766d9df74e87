"""Score a batch of responses in worker processes, so a scorer that raises, hangs, returns garbage, prints
megabytes or kills its process costs one sample (score 0, with a reason) and never the run.

Processes rather than threads: a hung pure-Python scorer in a thread would keep the GIL busy for the rest
of training and cannot be stopped; a process can be terminated. pebble's pool times each task out on its
own and replaces a worker that died or hung, failing only that worker's task, within its 0.1 s poll.

Samples go to the workers in chunks (one task per sample cost ~0.4 ms of scheduling and output capture each:
0.2 s of a 0.7 s step at 512 samples, where TRL scores in-process). In a chunk each sample has its own time
limit (SIGALRM, which interrupts Python code); a chunk that dies, is lost, or outlasts its backstop (a scorer
stuck in C code, or one that swallows the alarm) gives no verdict on its samples: they are scored again one
task each, as before, so a bad sample still costs only itself.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pebble import ProcessExpired, ProcessPool

from ascend_rl.errors import UserError
from ascend_rl.reward.scorers import default_compute_score

logger = logging.getLogger(__name__)

_OUTPUT_CHARS = 300  # of a failed sample's output kept for its reason
_LOST_AFTER_S = 10.0  # no task done for timeout + this: pebble lost them (a worker died as it took one)
_CHUNKS_PER_WORKER = 4  # enough chunks to keep every worker busy to the end of a batch
_MAX_CHUNK = 64


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
    except (Exception, SystemExit) as err:  # the user's module failing to import is their error, not ours
        raise UserError(f"{key}.path={path}: importing it failed: {_describe(err)}") from None
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
    error: str | None = None  # why the sample got 0, ending with the function's name in parentheses
    output: str = ""  # the end of what the scorer printed, on one line, when it failed


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _finite(value: Any, what: str) -> float:
    """A finite float; bool counts as 0/1 (as in verl), a string or None is not a number."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{what} {value!r:.80} ({type(value).__name__}), not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} {number}")
    return number


def _parse(result: Any) -> tuple[float, dict]:
    if isinstance(result, dict):
        if "score" not in result:
            raise ValueError(f"returned a dict without 'score': {sorted(result)}")
        return _finite(result["score"], "returned score"), {k: float(v) for k, v in result.items() if k != "score"}
    return _finite(result, "returned"), {}


_worker_fn: Callable | None = None
_worker_kwargs: dict = {}


def _init_worker(reward: RewardFunction) -> None:
    global _worker_fn, _worker_kwargs
    _worker_fn, _worker_kwargs = reward.resolve(), reward.kwargs
    # Unbuffered, so that what a scorer printed before an os._exit or a kill is there to read.
    sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), errors="replace",
                                               write_through=True) for fd in (1, 2))


def _capture_output(path: str) -> None:
    """Send stdout and stderr, C-level writes included, to `path` and not to the console."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _score_one(args: tuple, output_path: str) -> ScoredSample:
    _capture_output(output_path)
    return _score(args)


def _score(args: tuple) -> ScoredSample:
    data_source, solution, truth, extra_info = args
    try:
        return ScoredSample(*_parse(_worker_fn(data_source, solution, truth, extra_info, **_worker_kwargs)))
    except (Exception, SystemExit) as err:  # a scorer's bug or sys.exit() costs its sample, not the worker
        return ScoredSample(0.0, {}, _describe(err))


class _SampleTimeout(BaseException):
    """Raised by SIGALRM inside a scorer (a BaseException, so `except Exception` in the scorer lets it pass)."""


def _alarm(signum, frame):
    raise _SampleTimeout


def _score_chunk(chunk: list[tuple], output_path: str, timeout_s: float) -> list[ScoredSample]:
    """Each sample under its own time limit; a failed sample's output is what it printed itself."""
    _capture_output(output_path)
    signal.signal(signal.SIGALRM, _alarm)
    out = []
    for args in chunk:
        start = os.lseek(1, 0, os.SEEK_CUR)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            sample = _score(args)
        except _SampleTimeout:
            sample = ScoredSample(0.0, {}, f"timeout after {timeout_s:g} s")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if sample.error is not None:
            sample = ScoredSample(0.0, {}, sample.error, _output_tail(output_path, start))
        out.append(sample)
    return out


def _output_tail(path: str, begin: int = 0) -> str:
    """The end of what was written to `path` from offset `begin` on, on one line."""
    try:
        with open(path, "rb") as f:
            start = max(begin, f.seek(0, os.SEEK_END) - 4 * _OUTPUT_CHARS)  # bytes to spare for blank lines
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    one_line = " | ".join(line.strip() for line in text.splitlines() if line.strip())
    cut = start > begin or len(one_line) > _OUTPUT_CHARS
    return "…" + one_line[-_OUTPUT_CHARS:] if cut else one_line


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"worker died with exit code {exitcode}"


class RewardRunner:
    """A pool of scorer processes; `score` returns one ScoredSample per response, in order."""

    def __init__(self, reward: RewardFunction, num_workers: int = 2, timeout_s: float = 10.0):
        fn = reward.resolve()  # fail at start-up, in this process, with a clear message
        self.name = getattr(fn, "__name__", reward.custom_name)
        self.reward, self.num_workers, self.timeout_s = reward, max(1, num_workers), timeout_s
        self._pool: ProcessPool | None = None

    def _ensure_pool(self) -> ProcessPool:
        if self._pool is not None and not self._pool.active:  # pebble gave it up: a worker died while idle
            self.close()
        if self._pool is None:
            # fork: workers inherit the resolved imports; the initializer loads the reward function once each
            self._pool = ProcessPool(self.num_workers, initializer=_init_worker, initargs=(self.reward,),
                                     context=multiprocessing.get_context("fork"))
        return self._pool

    def score(self, data_sources: Sequence[str], solutions: Sequence[str], ground_truths: Sequence[Any],
              extra_infos: Sequence[dict | None] | None = None) -> list[ScoredSample]:
        extra_infos = extra_infos or [None] * len(solutions)
        work = list(zip(data_sources, solutions, ground_truths, extra_infos))
        results: list[ScoredSample | None] = [None] * len(work)
        with tempfile.TemporaryDirectory(prefix="ascend-rl-reward-", ignore_cleanup_errors=True) as out_dir:
            self._run_chunks(work, results, out_dir)
            for _ in range(2):  # what no chunk settled, one task per sample; what a broken pool dropped, once more
                todo = [i for i, r in enumerate(results) if r is None]
                if todo:
                    self._run(work, todo, results, out_dir)
        broke = f"no result from the scorer pool, twice ({self.name})"
        return [r or ScoredSample(0.0, {}, broke) for r in results]

    def _run_chunks(self, work: list, results: list, out_dir: str) -> None:
        """Fill results from chunks of samples; a chunk that fails as a whole leaves its samples None."""
        n = len(work)
        size = min(_MAX_CHUNK, max(1, math.ceil(n / (self.num_workers * _CHUNKS_PER_WORKER))))
        chunks = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
        if len(chunks) == n:  # one sample per chunk: the per-sample tasks do that
            return
        pool = self._ensure_pool()
        # A chunk's samples each have timeout_s in the worker; the backstop only catches what the alarm cannot.
        backstop = self.timeout_s * 2 + 1.0 + 0.01 * size
        try:
            futures = {pool.schedule(_score_chunk, ([work[i] for i in chunk], os.path.join(out_dir, f"c{k}.out"),
                                                     self.timeout_s), timeout=backstop): chunk
                       for k, chunk in enumerate(chunks)}
        except RuntimeError:  # the pool broke as we scheduled
            self.close()
            return
        remaining = _wait_unless_lost(futures, backstop)
        settled = True
        for future, chunk in futures.items():
            samples = self._chunk_outcome(future) if future not in remaining else None
            settled &= samples is not None
            for i, sample in zip(chunk, samples or ()):
                results[i] = sample if sample.error is None else ScoredSample(
                    0.0, {}, f"{sample.error} ({self.name})", sample.output)
        if not settled:  # a worker died or hung: start the per-sample passes from a fresh pool
            self.close()

    @staticmethod
    def _chunk_outcome(future) -> list[ScoredSample] | None:
        """The chunk's samples, or None: it timed out, its worker died, the pool broke, or something in it did
        not pickle (the per-sample tasks then say which sample and why)."""
        try:
            return future.result()
        except Exception:
            return None

    def _run(self, work: list, todo: list[int], results: list, out_dir: str) -> None:
        """Fill results[i] for i in todo; one stays None when the pool broke or lost its task."""
        pool = self._ensure_pool()
        paths = {i: os.path.join(out_dir, f"{i}.out") for i in todo}
        try:
            futures = {pool.schedule(_score_one, (work[i], paths[i]), timeout=self.timeout_s): i for i in todo}
        except RuntimeError:  # the pool broke as we scheduled
            self.close()
            return
        remaining = _wait_unless_lost(futures, self.timeout_s)
        for future, i in futures.items():
            if future not in remaining:
                results[i] = self._outcome(future, paths[i])
        if remaining or any(results[i] is None for i in todo):
            self.close()

    def _outcome(self, future, output_path: str) -> ScoredSample | None:
        try:
            sample = future.result()
            if sample.error is None:
                return sample
            reason = sample.error
        except TimeoutError:
            reason = f"timeout after {self.timeout_s:g} s"
        except ProcessExpired as err:
            reason = _died(err.exitcode)
        except BrokenExecutor:
            return None
        except Exception as err:  # e.g. an extra_info that does not pickle
            reason = _describe(err)
        return ScoredSample(0.0, {}, f"{reason} ({self.name})", _output_tail(output_path))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wait_unless_lost(futures, task_timeout_s: float) -> set:
    """Wait for every task; the ones still pending when none has finished for a task's timeout + _LOST_AFTER_S
    (pebble lost them) are returned."""
    remaining = set(futures)
    while remaining:
        done, remaining = wait(remaining, timeout=task_timeout_s + _LOST_AFTER_S, return_when=FIRST_COMPLETED)
        if not done:
            break
    return remaining


def failure_summary(scored: Sequence[ScoredSample], limit: int = 3) -> list[str]:
    """The commonest failure reasons, counted, each with the output of its first sample, e.g.
    `3× ValueError: bad answer (compute_score)`."""
    counts = Counter(s.error for s in scored if s.error is not None)
    output = {}
    for s in scored:
        if s.error is not None:
            output.setdefault(s.error, s.output)
    lines = [f"{n}× {reason}" + (f"; it printed: {output[reason]}" if output[reason] else "")
             for reason, n in counts.most_common(limit)]
    if len(counts) > limit:
        lines.append(f"and {len(counts) - limit} other reason(s)")
    return lines


def log_failures(scored: Sequence[ScoredSample]) -> int:
    """Warn, in one message, why samples failed; return how many did."""
    failures = sum(s.error is not None for s in scored)
    if failures:
        logger.warning("%d of %d reward(s) failed and scored 0: %s", failures, len(scored),
                       "; ".join(failure_summary(scored)))
    return failures
