"""`sglang.Engine` in the trainer process, behind our rollout protocol (token in, token out)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ascend_rl.rollout.http_client import parse_output
from ascend_rl.rollout.protocol import GenerateOutput, SamplingParams, expand_samples


class SGLangEngine:
    def __init__(self, server_kwargs: dict):
        import sglang

        self.engine = sglang.Engine(**server_kwargs)

    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams],
                 return_logprob: bool = False) -> list[GenerateOutput]:
        # One request per sample with its own seed: SGLang's n > 1 would give a group one seed. Every sampling
        # key goes through under SGLang's name (to_dict: the newer ones when set).
        prompts, params = expand_samples(input_ids, sampling_params)
        answer = self.engine.generate(input_ids=prompts, sampling_params=[p.to_dict() for p in params],
                                      return_logprob=return_logprob)
        return [parse_output(item) for item in (answer if isinstance(answer, list) else [answer])]

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The cache is flushed once after the last bucket, not after each.
        _check(self.engine.update_weights_from_tensor(list(named_tensors), flush_cache=False),
               "update_weights_from_tensor")

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self.engine.release_memory_occupation(list(tags) if tags else None)

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self.engine.resume_memory_occupation(list(tags) if tags else None)

    def flush_cache(self) -> None:
        _check(self.engine.flush_cache(), "flush_cache")

    def close(self) -> None:
        self.engine.shutdown()


def _check(result, what: str) -> None:
    """SGLang answers (success, message) tuples or objects with .success; a failure must not pass silently."""
    success, message = (result[0], result[1]) if isinstance(result, tuple) else \
        (getattr(result, "success", True), getattr(result, "message", ""))
    if not success:
        raise RuntimeError(f"SGLang {what} failed: {message}")
