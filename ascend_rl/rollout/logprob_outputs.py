"""SGLang's log-prob outputs for the native engine: prompt (input) log-probs, top-N log-probs and the
log-probs of chosen token ids, per position, in the shapes of SGLang 0.5.8's meta_info.

SGLang's request-level fields (GenerateReqInput, one value or one per prompt): `return_logprob`,
`logprob_start_len` (−1: SGLang's scheduler makes it len(prompt) − 1, or len(prompt) for a request with
max_new_tokens = 0), `top_logprobs_num`, `token_ids_logprob`. With a start s < len(prompt), the prompt's
entries cover tokens s … len − 1 and the first is None: SGLang computes the log-prob of token j from the
logits at j − 1 for j > s only (scheduler_output_processor_mixin: `[None] + input_token_logprobs[:-1]`).

Every value is under the distribution the sampled tokens' log-probs are (`sampling.token_logprobs`):
log-softmax of the logits at the request's temperature, penalties included for output positions. The
prompt positions are scored once, in the prefill, from its logits (no penalties apply to a prompt).
Work is batched: one forward, one log-softmax and one top-k per chunk of positions, never a Python loop
over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ascend_rl.rollout.sampling import token_logprobs

# Prompt positions scored at a time: bounds the [positions, vocab] log-prob table (2^26 floats = 256 MiB).
CHUNK_ELEMENTS = 1 << 26

Pair = tuple[float, int]  # (logprob, token_id): SGLang's order; the HTTP layer adds the text (None)


@dataclass(frozen=True)
class LogprobRequest:
    """One sample's log-prob fields, as SGLang's GenerateReqInput has them."""

    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: tuple[int, ...] | None = None

    def start(self, prompt_len: int, max_new_tokens: int) -> int:
        """The first prompt position reported (SGLang's scheduler rule); prompt_len: none."""
        if self.logprob_start_len == -1:
            return prompt_len if max_new_tokens == 0 else prompt_len - 1
        return self.logprob_start_len

    def check(self, prompt_len: int, vocab: int | None) -> None:
        """SGLang aborts such a request; here it is refused before anything runs."""
        if self.logprob_start_len < -1 or self.logprob_start_len > prompt_len:
            raise ValueError(f"logprob_start_len={self.logprob_start_len} is outside [-1, {prompt_len}] (the prompt "
                             f"has {prompt_len} tokens)")
        if self.top_logprobs_num < 0 or (vocab is not None and self.top_logprobs_num > vocab):
            raise ValueError(f"top_logprobs_num={self.top_logprobs_num} is outside [0, {vocab}] (the vocabulary)")
        bad = [t for t in self.token_ids_logprob or () if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise ValueError(f"token_ids_logprob: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")


def logprob_requests(prompts: int, logprob_start_len: int | Sequence[int] = -1,
                     top_logprobs_num: int | Sequence[int] = 0,
                     token_ids_logprob: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
                     ) -> list[LogprobRequest]:
    """One LogprobRequest per prompt from SGLang's fields: each a value for every prompt or a list with one per
    prompt; token_ids_logprob a list of ids for every prompt, or a list of such lists (SGLang's normalization)."""
    starts = _per_prompt(logprob_start_len, prompts, "logprob_start_len")
    tops = _per_prompt(top_logprobs_num, prompts, "top_logprobs_num")
    if not token_ids_logprob:  # SGLang: None and [] both mean none
        ids: list = [None] * prompts
    elif all(_is_int(t) for t in token_ids_logprob):
        ids = [tuple(token_ids_logprob)] * prompts
    else:
        ids = list(token_ids_logprob)
        if len(ids) != prompts or not all(i is None or (isinstance(i, (list, tuple)) and all(map(_is_int, i)))
                                          for i in ids):
            raise ValueError(f"token_ids_logprob: expected a list of token ids, or one such list per prompt "
                             f"({prompts})")
        ids = [tuple(i) if i else None for i in ids]
    return [LogprobRequest(s, n, i) for s, n, i in zip(starts, tops, ids)]


def _per_prompt(value, prompts: int, name: str) -> list[int]:
    values = [value] * prompts if _is_int(value) else list(value) if isinstance(value, (list, tuple)) else None
    if values is None or len(values) != prompts or not all(map(_is_int, values)):
        raise ValueError(f"{name}: expected an integer or a list of {prompts} integers (one per prompt), got "
                         f"{value!r}")
    return values


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LogprobRecord:
    """What one sample has gathered so far (the scheduler appends an output position per decode step)."""

    request: LogprobRequest
    start: int  # resolved: the first prompt position reported; len(prompt): none
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[Pair] | None] = field(default_factory=list)
    input_token_ids_logprobs: list[list[Pair] | None] = field(default_factory=list)
    output_top_logprobs: list[list[Pair]] = field(default_factory=list)
    output_token_ids_logprobs: list[list[Pair]] = field(default_factory=list)

    @property
    def top_n(self) -> int:
        return self.request.top_logprobs_num

    @property
    def token_ids(self) -> tuple[int, ...] | None:
        return self.request.token_ids_logprob

    @property
    def per_step(self) -> bool:
        """Whether decode steps have anything to add (the sampled token's log-prob is kept anyway)."""
        return self.top_n > 0 or self.token_ids is not None

    def fields(self) -> dict:
        """GenerateOutput's log-prob fields (copies: the record grows while a stream reads them)."""
        return {"input_token_logprobs": list(self.input_token_logprobs),
                "input_top_logprobs": list(self.input_top_logprobs),
                "input_token_ids_logprobs": list(self.input_token_ids_logprobs),
                "output_top_logprobs": list(self.output_top_logprobs),
                "output_token_ids_logprobs": list(self.output_token_ids_logprobs)}


# --- prompt positions (from the prefill) --------------------------------------------------------------------

PositionLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (prompt index, position) → [N, V] logits


def prompt_logprobs(position_logits: PositionLogits | None, vocab: int, jobs: list[tuple[LogprobRecord, list[int], int]],
                    temperature: float) -> None:
    """Fill each record's input fields. jobs: (record, prompt ids, the prompt's index for `position_logits`),
    records with start < len(prompt); vocab: the logits' width. The logits at position j give token j + 1's
    log-prob, so positions start … len − 2 are scored; the first entry (token `start`) is None, as in SGLang.
    position_logits may be None when no job has a position to score (start = len − 1)."""
    spans = [range(r.start, len(ids) - 1) for r, ids, _ in jobs]
    owner = torch.repeat_interleave(torch.arange(len(jobs)), torch.tensor([len(s) for s in spans], dtype=torch.long))
    rows = torch.tensor([index for (_, _, index), s in zip(jobs, spans) for _ in s], dtype=torch.long)
    cols = torch.tensor([j for s in spans for j in s], dtype=torch.long)
    targets = torch.tensor([ids[j + 1] for (_, ids, _), s in zip(jobs, spans) for j in s], dtype=torch.long)
    records = [r for r, _, _ in jobs]
    token, top, chosen = [], [], []
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    for a in range(0, len(rows), chunk):
        b = min(a + chunk, len(rows))
        logprobs = token_logprobs(position_logits(rows[a:b], cols[a:b]).float(), temperature)
        token += logprobs.gather(-1, targets[a:b, None].to(logprobs.device)).squeeze(-1).tolist()
        tops, ids = _extras(logprobs, [records[i] for i in owner[a:b].tolist()])
        top += tops
        chosen += ids
    done = 0
    for (record, ids, _), span in zip(jobs, spans):
        part = slice(done, done + len(span))
        done += len(span)
        record.input_token_logprobs = [(None, ids[record.start])] + list(zip(token[part], ids[record.start + 1:]))
        if record.top_n > 0:
            record.input_top_logprobs = [None] + top[part]
        if record.token_ids is not None:
            record.input_token_ids_logprobs = [None] + chosen[part]


# --- decode steps --------------------------------------------------------------------------------------------

def step_logprobs(logprobs: torch.Tensor, records: list[LogprobRecord]) -> None:
    """Append one output position to each record: `logprobs` [rows, V] are this step's (the sampler's)."""
    tops, ids = _extras(logprobs, records)
    for record, top, chosen in zip(records, tops, ids):
        if record.top_n > 0:
            record.output_top_logprobs.append(top)
        if record.token_ids is not None:
            record.output_token_ids_logprobs.append(chosen)


def _extras(logprobs: torch.Tensor, records: list[LogprobRecord]) -> tuple[list, list]:
    """Per row of `logprobs` [N, V] (row i for records[i]): its top-N (logprob, id) pairs, sorted from the most
    likely, and the log-probs of its token_ids_logprob; [] where the record asks for none. One top-k with the
    largest N and one gather over padded id lists serve every row."""
    k = max((r.top_n for r in records), default=0)
    tops: list = [[] for _ in records]
    if k > 0:
        values, indices = logprobs.topk(k, dim=-1)
        tops = [list(zip(v[:r.top_n], i[:r.top_n])) for r, v, i in zip(records, values.tolist(), indices.tolist())]
    wanted = [r.token_ids or () for r in records]
    width = max(map(len, wanted), default=0)
    chosen: list = [[] for _ in records]
    if width:
        table = torch.tensor([list(w) + [0] * (width - len(w)) for w in wanted], dtype=torch.long)
        values = logprobs.gather(-1, table.to(logprobs.device)).tolist()
        chosen = [list(zip(v[:len(w)], w)) for v, w in zip(values, wanted)]
    return tops, chosen
