"""Continuous batching for the native engine.

Requests (one per sample) wait in a queue. Every step: aborted requests end, waiting requests join the
running batch as far as the budget allows (`max_num_seqs` rows, `max_num_batched_tokens` prefill tokens, the
KV cache's token budget), every running row samples one token, finished rows hand their result to whoever
waits for it, and the model runs one decode step. Rows of one batch share their sampler and stop settings
(`_batch_key`); requests with other such settings wait until the batch drains. Penalties, min_new_tokens and
logit_bias are per row (`penalties.RowPenalties`), as are structured output (`grammar`: one matcher per row),
max_new_tokens and the seed.

No thread of our own: every caller of `run` drives steps in turn (one at a time, under `step_lock`) until
its own requests are done, so requests sent from several threads (the HTTP server's) share one batch, and a
lone caller (the trainer) runs its rollout on its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ascend_rl.rollout import grammar, penalties
from ascend_rl.rollout.logprob_outputs import LogprobRecord, LogprobRequest, prompt_logprobs, step_logprobs
from ascend_rl.rollout.penalties import RowPenalties
from ascend_rl.rollout.protocol import GenerateOutput, SamplingParams
from ascend_rl.rollout.sampling import sample, token_logprobs
from ascend_rl.rollout.stop_text import first_hit, tail_tokens

# Joining copies the running cache; with rows waiting, join once a quarter of the batch is free.
JOIN_FRACTION = 0.25
# Dropping finished rows copies the cache too: worth it once a quarter of the rows are done.
DROP_FRACTION = 0.75
PAUSE_POLL_S = 0.05  # how soon a paused caller notices that its request was aborted


class Request(NamedTuple):
    input_ids: list[int]
    params: SamplingParams  # n = 1: one request per sample
    rid: str | None  # for abort_request
    epoch: int  # GenerationControl.epoch when it arrived (abort_all ends the requests sent before it)
    logprobs: LogprobRequest | None = None  # return_logprob: SGLang's log-prob outputs beyond the sampled tokens'


@dataclass
class Ticket:
    """One request and, once it finished, its output (or the error that ended it)."""

    request: Request
    seed: int
    output: GenerateOutput | None = None
    error: BaseException | None = None
    record: LogprobRecord | None = None  # the log-prob outputs gathered so far (return_logprob)
    matcher: object | None = None  # structured output: the sample's xgrammar GrammarMatcher
    created: float = field(default_factory=time.monotonic)  # for e2e_latency

    def __post_init__(self):
        spec = self.request.logprobs
        if spec is not None and self.record is None:
            ids, limit = self.request.input_ids, self.request.params.max_new_tokens
            self.record = LogprobRecord(spec, spec.start(len(ids), limit))

    @property
    def scores_prompt(self) -> bool:
        """Whether the prefill has prompt positions to report for this request."""
        return self.record is not None and self.record.start < len(self.request.input_ids)

    def result(self, reason: str | None, ids: list[int], logprobs: list[float], matched=None) -> GenerateOutput:
        """Its output with what it has so far; finish reason None: still running."""
        extra = self.record.fields() if self.record is not None else {}
        latency = None if reason is None else time.monotonic() - self.created
        return GenerateOutput(ids, reason, len(self.request.input_ids), logprobs, matched, e2e_latency=latency, **extra)

    @property
    def done(self) -> bool:
        return self.output is not None or self.error is not None


@dataclass(frozen=True)
class Budget:
    max_num_seqs: int = 256  # rows decoded together
    max_num_batched_tokens: int = 8192  # prompt tokens one join may prefill (padded, shared prompts once)
    kv_cache_tokens: int | None = None  # rows × cache columns the KV cache may hold; None: no limit


class GenerationControl:
    """Abort and pause, set from other threads while a batch decodes (checked once per step).

    abort_all ends the requests sent before it (an epoch counter), not those sent later."""

    def __init__(self):
        self.epoch = 0
        self.calls = 0  # abort calls so far: running rows need checking only after a new one
        self._aborted_rids: set[str] = set()
        self._running = threading.Event()
        self._running.set()

    def abort(self, rid: str | None, abort_all: bool) -> None:
        if abort_all:
            self.epoch += 1
        elif rid is not None:
            self._aborted_rids.add(rid)
        self.calls += 1  # after: a scan that read the old count may miss this abort, the next one sees it

    def aborted(self, request: Request) -> bool:
        return request.epoch < self.epoch or (request.rid is not None and request.rid in self._aborted_rids)

    def forget(self, rids) -> None:
        """A finished call's rids: aborting them no longer means anything (and must not hit a later reuse)."""
        self._aborted_rids.difference_update(r for r in rids if r is not None)

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self, timeout_s: float) -> None:
        self._running.wait(timeout_s)


@dataclass
class _Batch:
    """The running rows, in the stepper's row order."""

    tickets: list[Ticket]
    params: SamplingParams  # the shared settings (`_batch_key`); the per-row ones are in the tensors
    seeds: torch.Tensor  # [R] int64
    limits: torch.Tensor  # [R] max_new_tokens
    tokens: torch.Tensor  # [R, max limit]
    logprobs: torch.Tensor  # [R, max limit]
    generated: torch.Tensor  # [R] tokens so far
    finished: torch.Tensor  # [R] bool
    logits: torch.Tensor  # [R, V] next-token logits
    penalties: RowPenalties | None  # per-row penalties and bias; None: no row uses any
    matchers: grammar.Matchers | None = None  # per-row grammar matchers (None where free); None: no row has one

    def alive(self) -> torch.Tensor:
        return (~self.finished).nonzero().squeeze(-1)

    def room(self, rows: torch.Tensor) -> int:
        """Decode steps the longest of these rows may still need."""
        return int((self.limits[rows] - self.generated[rows]).max()) if len(rows) else 0


class Scheduler:
    def __init__(self, stepper, budget: Budget, control: GenerationControl, stop_ids: frozenset[int],
                 decode: Callable[[list[int]], str] | None, grammars: grammar.Grammars | None = None):
        """`grammars`: compiles structured-output constraints; None: such requests are refused (no tokenizer)."""
        self.stepper, self.budget, self.control = stepper, budget, control
        self.eos_ids, self.decode = stop_ids, decode
        self.grammars = grammars or grammar.Grammars(None, 0, ())
        self.step_lock = threading.Lock()  # one step at a time; weight updates take it to land between steps
        self._queue_lock = threading.Lock()
        self._waiting: list[Ticket] = []
        self._batch: _Batch | None = None
        self._aborts_checked = 0  # control.calls when the running rows were last checked

    @property
    def busy(self) -> bool:
        return self._batch is not None or bool(self._waiting)

    def submit(self, requests: list[Request], seeds: list[int]) -> list[Ticket]:
        if self.decode is None and any(r.params.stop or r.params.stop_regex for r in requests):
            raise ValueError("stop strings need the engine's tokenizer (stop, stop_regex); give stop_token_ids instead")
        tickets = [Ticket(r, s, matcher=self._matcher(r)) for r, s in zip(requests, seeds)]  # compiled before any queues
        for ticket in tickets:  # nothing to generate; a prompt to score still needs its prefill
            if ticket.request.params.max_new_tokens <= 0 and not ticket.scores_prompt:
                ticket.output = ticket.result("length", [], [])
        with self._queue_lock:
            self._waiting.extend(t for t in tickets if not t.done)
        return tickets

    def _matcher(self, request: Request):
        """The request's grammar matcher (structured output), or None; a ValueError (a 400) when refused."""
        return self.grammars.matcher(request.params) if request.params.grammar_keys() else None

    def run(self, tickets: list[Ticket]) -> list[GenerateOutput]:
        """Drive steps until these tickets are done; raises what ended a ticket with an error."""
        for _ in self.progress(tickets, snapshots=False):
            pass
        return [t.output for t in tickets]

    def progress(self, tickets: list[Ticket], snapshots: bool = True) -> Iterator[list[GenerateOutput]]:
        """Drive steps until these tickets are done, yielding after each step what each has so far (finish
        reason None while it runs; taken under the step lock, so never half-written). While paused, steps only
        end aborted requests, and nobody holds the step lock between them."""
        while True:
            with self.step_lock:
                if not all(t.done for t in tickets):
                    self._step_or_fail_all()
                outputs = [self._snapshot(t) for t in tickets] if snapshots else []
            error = next((t.error for t in tickets if t.error is not None), None)
            if error is not None:
                raise error
            yield outputs
            if all(t.done for t in tickets):
                return
            if self.control.paused:
                self.control.wait_while_paused(PAUSE_POLL_S)

    def _snapshot(self, ticket: Ticket) -> GenerateOutput:
        if ticket.output is not None:
            return ticket.output
        batch = self._batch
        row = next((r for r, t in enumerate(batch.tickets) if t is ticket), None) if batch else None
        if row is None:  # still waiting
            return ticket.result(None, [], [])
        count = int(batch.generated[row])
        return ticket.result(None, batch.tokens[row, :count].tolist(), batch.logprobs[row, :count].tolist())

    # --- one step ---------------------------------------------------------------------------------------

    def _step_or_fail_all(self) -> None:
        try:
            self._step()
        except BaseException as err:  # a bug or out of memory: every caller learns it, the next call starts clean
            with self._queue_lock:
                waiting, self._waiting = self._waiting, []
            for ticket in waiting + (self._batch.tickets if self._batch else []):
                if not ticket.done:
                    ticket.error = err
            self._end_batch()
            raise

    def _step(self) -> None:
        self._end_aborted()
        if self.control.paused:  # in_place / retract: the rows wait with their KV cache
            return
        self._admit()
        batch = self._batch
        if batch is None or not len(batch.alive()):  # nothing to do, or aborts ended every row
            self._end_batch()
            return
        next_ids = self._sample(batch)
        alive = batch.alive()
        if not len(alive):
            self._end_batch()
            return
        if self.stepper.can_join and len(alive) <= DROP_FRACTION * len(batch.tickets):
            self.stepper.keep_rows(alive, batch.room(alive))
            batch = self._batch = _select(batch, alive)
            next_ids = next_ids[alive]
        batch.logits = self.stepper.step(next_ids)

    def _end_batch(self) -> None:
        self._batch = None
        self.stepper.reset()  # frees the KV cache

    def _sample(self, batch: _Batch) -> torch.Tensor:
        """Every live row draws its next token; finished rows get a placeholder (0) for the decode step."""
        params, rows = batch.params, batch.alive()
        every_row = len(rows) == len(batch.tickets)  # then no copy: batch.logits is replaced after this step
        logits = (batch.logits if every_row else batch.logits[rows.to(batch.logits.device)]).float()
        if batch.penalties is not None:  # log-probs are then under the penalized logits, as SGLang's
            logits = penalties.adjust(logits, batch.penalties, rows, batch.generated[rows],
                                      set(params.stop_token_ids) | self.eos_ids)
        if batch.matchers is not None:
            # In place: `logits` is this step's copy. Log-probs (sampled, top-N, chosen ids) are then under the
            # masked logits, as SGLang's: its sampler takes them after apply_logits_bias, which applies the
            # vocab mask; the allowed tokens' probabilities are renormalized, the others' are -inf.
            grammar.constrain(logits, batch.matchers, rows)
        ids, logprobs = sample(logits, params, batch.seeds[rows], batch.generated[rows])
        self._record_steps(batch, rows, logits)
        penalties.record(batch.penalties, rows, ids)
        columns = batch.generated[rows]
        batch.tokens[rows, columns], batch.logprobs[rows, columns] = ids, logprobs
        batch.generated[rows] += 1
        complete, rejected = grammar.advance(batch.matchers, rows, ids, logprobs) if batch.matchers else ([], [])
        for row in rejected:  # nothing the grammar allows was left to sample (SGLang aborts such a request)
            self._finish(batch, row, "abort")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        if stop_ids:
            stopped = torch.isin(ids, torch.tensor(sorted(stop_ids), dtype=torch.long))
            for row, token in zip(rows[stopped].tolist(), ids[stopped].tolist()):
                if not batch.finished[row]:
                    self._finish(batch, row, "stop", token)
        for row, token in complete:  # the grammar took a stop token: SGLang's FINISH_MATCHED_TOKEN(that token)
            if not batch.finished[row]:
                self._finish(batch, row, "stop", token)
        if params.stop or params.stop_regex:
            for row in rows[~batch.finished[rows]].tolist():
                text = self._stop_string_hit(batch, row)
                if text is not None:
                    self._finish(batch, row, "stop", text)
        for row in rows[batch.generated[rows] >= batch.limits[rows]].tolist():
            if not batch.finished[row]:
                self._finish(batch, row, "length")
        next_ids = torch.zeros(len(batch.tickets), dtype=torch.long)
        next_ids[rows] = ids
        return next_ids

    @staticmethod
    def _record_steps(batch: _Batch, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Top-N and token-id log-probs of this step, for the rows that asked (`logits`: the live rows' as
        sampled, penalties included), from the sampler's own distribution."""
        records = [batch.tickets[row].record for row in rows.tolist()]
        wanted = [i for i, r in enumerate(records) if r is not None and r.per_step]
        if wanted:
            local = torch.tensor(wanted, dtype=torch.long, device=logits.device)
            step_logprobs(token_logprobs(logits[local], batch.params.temperature), [records[i] for i in wanted])

    def _stop_string_hit(self, batch: _Batch, row: int) -> str | None:
        """The stop string or stop regex the row's text now contains (decoding only its tail)."""
        stop, patterns = batch.params.stop, batch.params.stop_regex
        window, end = tail_tokens(stop, patterns), int(batch.generated[row])
        tail = self.decode(batch.tokens[row, 0 if window is None else max(0, end - window):end].tolist())
        return first_hit(tail, stop, patterns)

    def _finish(self, batch: _Batch, row: int, reason: str, matched: int | str | None = None) -> None:
        """The row's result goes to its ticket now (its caller may return while the batch runs on)."""
        batch.finished[row] = True
        ticket, count = batch.tickets[row], int(batch.generated[row])
        ticket.output = ticket.result(reason, batch.tokens[row, :count].tolist(), batch.logprobs[row, :count].tolist(),
                                      matched)

    def _end_aborted(self) -> None:
        """Aborted requests end with the tokens they have (none, if still waiting)."""
        with self._queue_lock:
            aborted = [t for t in self._waiting if self.control.aborted(t.request)]
            self._waiting = [t for t in self._waiting if not self.control.aborted(t.request)]
        for ticket in aborted:
            ticket.output = ticket.result("abort", [], [])
        batch, calls = self._batch, self.control.calls  # read first: an abort during the scan is seen next step
        if batch is not None and calls != self._aborts_checked:  # rows that joined were checked while waiting
            for row in batch.alive().tolist():
                if self.control.aborted(batch.tickets[row].request):
                    self._finish(batch, row, "abort")
        self._aborts_checked = calls

    # --- joining ----------------------------------------------------------------------------------------

    def _admit(self) -> None:
        batch = self._batch
        if batch is not None and not self.stepper.can_join:
            return
        with self._queue_lock:
            if not self._waiting:
                return
            key = _batch_key(batch.params if batch else self._waiting[0].request.params)
            candidates = [t for t in self._waiting if _batch_key(t.request.params) == key]
        alive = batch.alive() if batch else torch.arange(0)
        free = self.budget.max_num_seqs - len(alive)
        if batch is not None and len(candidates) > free and free < JOIN_FRACTION * self.budget.max_num_seqs:
            return
        joining = self._fitting(candidates[:free], alive, batch)
        if not joining:
            return
        joined = {id(t) for t in joining}
        with self._queue_lock:
            self._waiting = [t for t in self._waiting if id(t) not in joined]
        room = max(batch.room(alive) if batch else 0, max(t.request.params.max_new_tokens for t in joining))
        prompts, scorer = [t.request.input_ids for t in joining], _prompt_scorer(joining)
        # on_prefill only when asked for: the plain call is the steppers' (and their stand-ins') minimal one
        logits = (self.stepper.admit(alive, prompts, room) if scorer is None
                  else self.stepper.admit(alive, prompts, room, on_prefill=scorer))
        self._batch = _joined(_select(batch, alive) if batch else None, joining, logits)
        for row in (self._batch.limits <= 0).nonzero().flatten().tolist():  # scored prompts, nothing to generate
            self._finish(self._batch, row, "length")

    def _fitting(self, candidates: list[Ticket], alive: torch.Tensor, batch: _Batch | None) -> list[Ticket]:
        """The longest prefix of `candidates` within the prefill and KV budgets (at least one if nothing runs)."""
        width = self.stepper.width if batch else 0
        room = batch.room(alive) if batch else 0
        joining, prompts, longest = [], set(), 0
        for ticket in candidates:
            ids, params = ticket.request.input_ids, ticket.request.params
            prompt, longest_after = tuple(ids), max(longest, len(ids))
            prefill = (len(prompts) + (prompt not in prompts)) * longest_after
            cache = (len(alive) + len(joining) + 1) * (max(width, longest_after) + max(room, params.max_new_tokens))
            within = prefill <= self.budget.max_num_batched_tokens and (
                self.budget.kv_cache_tokens is None or cache <= self.budget.kv_cache_tokens)
            if not within and (joining or len(alive)):
                break
            joining.append(ticket)
            prompts.add(prompt)
            longest = longest_after
            room = max(room, params.max_new_tokens)
        return joining


def _prompt_scorer(joining: list[Ticket]):
    """The stepper's on_prefill for the joining requests that asked for prompt log-probs; None: none did. Prompt
    log-probs are of the model's raw distribution (temperature 1), as SGLang 0.5.8 reports them (its
    temp_scaled_logprobs is off); output log-probs are at the sampling temperature."""
    jobs = [(t.record, t.request.input_ids, j) for j, t in enumerate(joining) if t.scores_prompt]
    temperature = 1.0
    if all(record.start >= len(ids) - 1 for record, ids, _ in jobs):
        # SGLang's default start (the last prompt token) reports it with None: no logits needed
        prompt_logprobs(None, 1, jobs, temperature)
        return None
    return lambda position_logits, vocab: prompt_logprobs(position_logits, vocab, jobs, temperature)


def _batch_key(p: SamplingParams) -> tuple:
    """What the rows of one batch must share: the sampler's settings and the stop checks."""
    return p.temperature, p.top_p, p.top_k, p.min_p, p.stop, p.stop_regex, p.stop_token_ids, p.ignore_eos


def _select(batch: _Batch, rows: torch.Tensor) -> _Batch:
    return _Batch([batch.tickets[r] for r in rows.tolist()], batch.params, batch.seeds[rows], batch.limits[rows],
                  batch.tokens[rows], batch.logprobs[rows], batch.generated[rows], batch.finished[rows],
                  batch.logits[rows.to(batch.logits.device)], penalties.select(batch.penalties, rows),
                  grammar.select(batch.matchers, rows))


def _joined(kept: _Batch | None, joining: list[Ticket], logits: torch.Tensor) -> _Batch:
    """The kept rows followed by the joining ones (the stepper's row order)."""
    count, width = len(joining), max(t.request.params.max_new_tokens for t in joining)
    row_penalties = penalties.joined(kept.penalties if kept else None, len(kept.tickets) if kept else 0,
                                     [t.request.params for t in joining], logits.shape[-1], logits.device)
    matchers = grammar.joined(kept.matchers if kept else None, len(kept.tickets) if kept else 0,
                              [t.matcher for t in joining])
    new = _Batch(joining, joining[0].request.params, torch.tensor([t.seed for t in joining], dtype=torch.int64),
                 torch.tensor([t.request.params.max_new_tokens for t in joining], dtype=torch.long),
                 torch.zeros((count, width), dtype=torch.long), torch.zeros((count, width)),
                 torch.zeros(count, dtype=torch.long), torch.zeros(count, dtype=torch.bool), logits,
                 row_penalties if kept is None else None, matchers if kept is None else None)
    if kept is None:
        return new
    width = max(width, kept.tokens.shape[1])

    def cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b.to(a.device, a.dtype)])

    def cat_tables(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per-token tables, padded to one width
        return cat(*(torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (a, b)))

    return _Batch(kept.tickets + joining, kept.params, cat(kept.seeds, new.seeds), cat(kept.limits, new.limits),
                  cat_tables(kept.tokens, new.tokens), cat_tables(kept.logprobs, new.logprobs),
                  cat(kept.generated, new.generated), cat(kept.finished, new.finished), cat(kept.logits, new.logits),
                  row_penalties, matchers)
