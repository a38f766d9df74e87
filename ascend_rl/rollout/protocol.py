"""The rollout engine protocol, shaped like SGLang's Engine (token in, token out).

Sampling keys are SGLang's: `max_new_tokens, temperature, top_p, top_k, n, stop_token_ids, ignore_eos,
sampling_seed`. Memory tags are SGLang's: `weights`, `kv_cache`.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "stop_token_ids",
                 "ignore_eos", "sampling_seed")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0  # drop tokens below min_p × the most likely token's probability
    n: int = 1
    stop: tuple[str, ...] = ()  # strings that end a sample (needs the engine's tokenizer)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None

    @classmethod
    def from_dict(cls, params: dict, vocab_size: int | None = None) -> SamplingParams:
        """SGLang's `sampling_params` JSON object, checked (`verify`); null means the default. A wrong type or
        value is a ValueError naming the key."""
        if not isinstance(params, dict):
            raise ValueError(f"sampling_params must be an object, got {type(params).__name__}")
        unknown = sorted(set(params) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling_params {unknown}; expected some of {', '.join(SAMPLING_KEYS)}")
        values = {k: v for k, v in params.items() if v is not None}
        if "stop_token_ids" in values:
            if not isinstance(values["stop_token_ids"], list):
                raise ValueError("stop_token_ids must be a list of token ids")
            values["stop_token_ids"] = tuple(values["stop_token_ids"])
        if "stop" in values:  # SGLang takes one string or a list
            stop = values["stop"]
            if not isinstance(stop, (str, list)):
                raise ValueError("stop must be a string or a list of strings")
            values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        for key in ("temperature", "top_p", "min_p"):  # as floats: a huge int would overflow in torch
            if type(values.get(key)) is int:
                try:
                    values[key] = float(values[key])
                except OverflowError:
                    raise ValueError(f"{key} must be a finite number, got {reprlib.repr(values[key])}") from None
        return cls(**values).verify(vocab_size)

    def verify(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ValueError (SGLang's messages where it has them) for a value of the wrong type or out of range;
        with `vocab_size`, stop_token_ids must be in the vocabulary too. Returns self."""
        for key in ("max_new_tokens", "top_k", "n", "sampling_seed"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{key} must be an integer, got {reprlib.repr(value)}")
        for key in ("temperature", "top_p", "min_p"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{key} must be a number, got {reprlib.repr(value)}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {reprlib.repr(self.ignore_eos)}")
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a string or a list of strings")
        for token in self.stop_token_ids:
            if not isinstance(token, int) or isinstance(token, bool):
                raise ValueError(f"stop_token_ids must be integers, got {reprlib.repr(token)}")
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                raise ValueError(f"Token id {token} is out of vocabulary (vocab size: {vocab_size or 'unknown'}).")
        if self.temperature < 0 or isinstance(self.temperature, float) and not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0 < self.top_p <= 1:  # NaN fails these comparisons too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        # samples are seeded sampling_seed + j, j < n, as int64
        if self.sampling_seed is not None and not -2**63 <= self.sampling_seed <= 2**63 - self.n:
            raise ValueError(f"sampling_seed must fit in 64 bits (seeds sampling_seed … sampling_seed + n - 1), "
                             f"got {self.sampling_seed}.")
        return self


def per_prompt(sampling_params: SamplingParams | Sequence[SamplingParams], prompts: int) -> list[SamplingParams]:
    """The protocol takes one SamplingParams for every prompt or a list with one per prompt: always the list."""
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * prompts
    return list(sampling_params)


def expand_samples(input_ids: Sequence[Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams],
                   ) -> tuple[list[list[int]], list[SamplingParams]]:
    """One n=1 request per sample, prompt i's samples at i·n … i·n + n − 1; sample j is seeded
    `sampling_seed + j`, so the samples of a group differ and the order is the protocol's."""
    sampling_params = per_prompt(sampling_params, len(input_ids))
    if len(sampling_params) != len(input_ids):
        raise ValueError(f"{len(input_ids)} prompts but {len(sampling_params)} sampling_params")
    prompts, params = [], []
    for ids, p in zip(input_ids, sampling_params):
        for j in range(p.n):
            prompts.append(list(ids))
            params.append(replace(p, n=1, sampling_seed=None if p.sampling_seed is None else p.sampling_seed + j))
    return prompts, params


def per_sample(values: Sequence, sampling_params: SamplingParams | Sequence[SamplingParams]) -> list:
    """One value per prompt (e.g. a request id) repeated for each of its n samples, in `expand_samples`' order."""
    return [value for value, p in zip(values, per_prompt(sampling_params, len(values))) for _ in range(p.n)]


@dataclass
class GenerateOutput:
    output_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"; None while streaming
    prompt_tokens: int
    output_logprobs: list[float] = field(default_factory=list)
    matched: int | str | None = None  # what ended a "stop": the token id or the stop string

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


class RolloutEngine(Protocol):
    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams],
                 return_logprob: bool = False) -> list[GenerateOutput]:
        """One output per (prompt, sample): prompt i's n samples are outputs i·n … i·n + n − 1."""

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None: ...

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None: ...

    def flush_cache(self) -> None: ...
