"""Rule scorers, routed by `data_source` as verl's default scorer routes them.

A scorer is `fn(solution_str, ground_truth, extra_info=None) -> float | dict` (a dict carries `score` and
extra metrics).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

Scorer = Callable[..., "float | dict"]
_GSM8K_CLIP_CHARS = 300  # verl looks only at the end of long answers (regexes on long strings are slow)
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"\-?[0-9\.\,]+")
_INTEGER = re.compile(r"-?\d+")


def gsm8k_extract(solution_str: str, method: str = "strict") -> str | None:
    """strict: the last `#### <number>`; flexible: the last number. Commas and `$` removed."""
    tail = solution_str[-_GSM8K_CLIP_CHARS:]
    if method == "strict":
        found = _GSM8K_STRICT.findall(tail)
        return found[-1].replace(",", "").replace("$", "") if found else None
    numbers = [n for n in _NUMBER.findall(tail) if n not in ("", ".")]
    return numbers[-1] if numbers else None


def gsm8k_score(solution_str: str, ground_truth: str, extra_info=None, method: str = "strict",
                format_score: float = 0.0, score: float = 1.0) -> float:
    answer = gsm8k_extract(solution_str, method)
    if answer is None:
        return 0.0
    return score if answer == ground_truth else format_score


def arithmetic_score(solution_str: str, ground_truth: str, extra_info=None) -> float:
    """1 when the last integer in the answer is the ground truth, else 0."""
    found = _INTEGER.findall(solution_str)
    return 1.0 if found and found[-1] == str(ground_truth).strip() else 0.0


def math_verify_score(solution_str: str, ground_truth: str, extra_info=None) -> float:
    """Mathematical equivalence of the answer (last \\boxed{} or final expression) and the ground truth."""
    from math_verify import parse, verify

    gold = parse(ground_truth if "$" in ground_truth or "\\boxed" in ground_truth else f"${ground_truth}$")
    predicted = parse(solution_str)
    return 1.0 if gold and predicted and verify(gold, predicted) else 0.0


_DAPO_ANSWER = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)


def math_dapo_score(solution_str: str, ground_truth: str, extra_info=None) -> dict:
    """DAPO-Math style: the text after the last `Answer:` (or the last box); +1 correct, −1 otherwise."""
    found = _DAPO_ANSWER.findall(solution_str[-_GSM8K_CLIP_CHARS:])
    answer = f"${found[-1].strip()}$" if found else solution_str
    correct = math_verify_score(answer, ground_truth) == 1.0
    return {"score": 1.0 if correct else -1.0, "acc": float(correct)}


# data_source patterns (fnmatch) → scorer; first match wins.
SCORERS: dict[str, Scorer] = {
    "arithmetic": arithmetic_score,
    "openai/gsm8k": gsm8k_score,
    "lighteval/MATH": math_verify_score,
    "DigitalLearningGmbH/MATH-lighteval": math_verify_score,
    "HuggingFaceH4/MATH-500": math_verify_score,
    "math_dapo": math_dapo_score,
    "math": math_dapo_score,
    "aime*": math_dapo_score,
}


def register_scorer(pattern: str) -> Callable[[Scorer], Scorer]:
    def add(fn: Scorer) -> Scorer:
        SCORERS[pattern] = fn
        return fn

    return add


def scorer_for(data_source: str) -> Scorer:
    for pattern, fn in SCORERS.items():
        if fnmatch.fnmatchcase(data_source, pattern):
            return fn
    raise KeyError(f"no scorer for data_source {data_source!r} (known: {', '.join(SCORERS)}); set "
                   f"reward.custom_reward_function.path to score it")


def default_compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info=None, **_) -> float | dict:
    """verl's `compute_score` signature, routed by data_source."""
    return scorer_for(data_source)(solution_str, ground_truth, extra_info)
