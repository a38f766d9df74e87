"""Choosing the next token: temperature, top-k, top-p, min-p (shared by a batch's rows), and seeded noise
that is a pure function of (sample seed, step, token), so a sample does not depend on what else is in the
batch and a whole batch draws its noise in a few tensor ops (one generator per sample cost a call per sample
per token). Per-row penalties and logit bias come before, in `penalties`, then structured output's grammar
masks (`grammar`)."""

from __future__ import annotations

import math

import torch

from ascend_rl.rollout import cpu_kernels
from ascend_rl.rollout.protocol import SamplingParams

# splitmix64's constants, as signed int64 (torch has no uint64 arithmetic; int64 wraps the same way).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift on int64 (>> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor | int, vocab: int) -> torch.Tensor:
    """[rows, vocab] uniforms in (0, 1) from each row's seed and step: splitmix64 over (seed, step, token),
    mixed in stages so that no two different triples share an input."""
    row = _mix(_mix(seeds.to(torch.int64)) ^ steps)
    bits = _mix(row[:, None] + torch.arange(1, vocab + 1, dtype=torch.int64, device=seeds.device) * _GOLDEN)
    return (_shift_right(bits, 11).to(torch.float64) + 0.5) / 2.0**53


def sample(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor, steps: torch.Tensor | int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens and their log-probs under softmax(logits / temperature) (unfiltered, as the trainer
    recomputes them); greedy at temperature 0, where log-probs are under temperature 1. `steps`: each row's
    token index (its noise depends on it and its seed only).

    `logits` come with the rows' penalties and logit bias applied (`penalties.adjust`), and grammar masks
    (`grammar.constrain`), so the log-probs are those of the penalized, masked distribution before
    top-k/top-p/min-p: what SGLang's sampler returns (it applies them to the logits in place before its
    log-softmax). Without penalties or a grammar they are the model's, which the trainer recomputes; with
    them, the trainer's recomputation differs, as it would against SGLang."""
    if params.temperature > 0 and not filters(params, logits.shape[-1]) and cpu_kernels.usable(logits):
        steps = steps if isinstance(steps, torch.Tensor) else torch.full_like(seeds, steps)
        return cpu_kernels.sample_gumbel(logits.float(), seeds, steps, params.temperature)  # the same tokens, fused
    scaled = _scaled(logits, params.temperature)
    logprobs_all = torch.log_softmax(scaled, dim=-1)
    if params.temperature == 0:
        tokens = logits.argmax(-1)
    else:
        filtered = filter_logits(scaled.clone(), params.top_k, params.top_p, params.min_p)
        # Gumbel-max: argmax(z + g) with g = -log(-log(u)) samples softmax(z).
        uniform = uniform_noise(seeds, steps, logits.shape[-1]).to(filtered.device)
        tokens = (filtered - torch.log(-torch.log(uniform)).to(filtered.dtype)).argmax(-1)
    return tokens.cpu(), logprobs_all.gather(-1, tokens[:, None].to(logits.device)).squeeze(-1).cpu()


def token_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[rows, V] log-probs under the distribution `sample` reports its tokens' log-probs under (one definition
    for the sampled, top-N and chosen-id log-probs of `logprob_outputs`)."""
    return torch.log_softmax(_scaled(logits, temperature), dim=-1)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits at the temperature; greedy (0) reports log-probs at temperature 1."""
    return logits / temperature if temperature > 0 else logits


def filters(params: SamplingParams, vocab: int) -> bool:
    """Whether min-p, top-k or top-p removes any token."""
    return params.min_p > 0 or 0 < params.top_k < vocab or params.top_p < 1.0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Sets the tokens outside min-p, top-k and top-p to -inf (in place)."""
    if min_p > 0:  # p < min_p · p_max  ⇔  logit < max logit + log(min_p)
        logits[logits < logits.max(-1, keepdim=True).values + math.log(min_p)] = float("-inf")
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits
