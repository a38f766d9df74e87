"""The rollout engine protocol, shaped like SGLang's Engine (token in, token out).

Sampling keys are SGLang 0.5.8's, every one of them (`sampling_params.SamplingParams`, re-exported here).
Memory tags are SGLang's: `weights`, `kv_cache`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ascend_rl.rollout.sampling_params import SAMPLING_KEYS, SamplingParams

__all__ = ["SAMPLING_KEYS", "GenerateOutput", "RolloutEngine", "SamplingParams", "expand_samples", "per_prompt",
           "per_sample"]


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
        if p.n == 1:  # already one sample (the trainer's requests): as it is, without a copy
            prompts.append(list(ids))
            params.append(p)
            continue
        for j in range(p.n):
            prompts.append(list(ids))
            params.append(_sample_of(p, None if p.sampling_seed is None else p.sampling_seed + j))
    return prompts, params


def _sample_of(p: SamplingParams, seed: int | None) -> SamplingParams:
    """`replace(p, n=1, sampling_seed=seed)` without re-running __init__ over ~40 fields (12 µs a sample: 6 ms of
    a 512-sample rollout); frozen dataclasses set their own fields with object.__setattr__ the same way."""
    sample = copy.copy(p)
    object.__setattr__(sample, "n", 1)
    object.__setattr__(sample, "sampling_seed", seed)
    return sample


def per_sample(values: Sequence, sampling_params: SamplingParams | Sequence[SamplingParams]) -> list:
    """One value per prompt (e.g. a request id) repeated for each of its n samples, in `expand_samples`' order."""
    return [value for value, p in zip(values, per_prompt(sampling_params, len(values))) for _ in range(p.n)]


@dataclass
class GenerateOutput:
    """One sample. With return_logprob, SGLang's log-prob outputs (`logprob_outputs`) as (logprob, token_id)
    pairs, SGLang's order (its meta_info adds the token's text, None without return_text_in_logprobs):
    input_* from logprob_start_len, one per prompt token from there, the first None (as SGLang's);
    *_top_logprobs with top_logprobs_num, *_token_ids_logprobs with token_ids_logprob, one list per position.
    Empty when not asked for."""

    output_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"; None while streaming
    prompt_tokens: int
    output_logprobs: list[float] = field(default_factory=list)
    matched: int | str | None = None  # what ended a "stop": the token id or the stop string
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    input_token_ids_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_token_ids_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    # Seconds from arrival to finish (SGLang's meta_info e2e_latency); None while running. Timing, not
    # content: outputs compare equal without it.
    e2e_latency: float | None = field(default=None, compare=False)

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
