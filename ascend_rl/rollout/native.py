"""The built-in rollout engine (`rollout.name=native`): batched sampling with a KV cache over a
transformers model, behind the SGLang-shaped protocol.

Every sample draws its noise from its own generator seeded with `sampling_seed`, so a sample does not
depend on what else is in the batch, and samples of one prompt (different seeds) differ.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Sequence
from itertools import groupby
from typing import NamedTuple

import torch

from ascend_rl.data.collate import pad_rows, position_ids_from_mask
from ascend_rl.rollout.lean_decoder import LeanDecoder
from ascend_rl.rollout.protocol import GenerateOutput, SamplingParams, expand_samples, per_sample
from ascend_rl.rollout.sampling import sample

MEMORY_TAGS = ("weights", "kv_cache")
PAUSE_MODES = ("abort", "retract", "in_place")  # SGLang's; retract keeps the KV cache here (nothing to recompute)


class _Request(NamedTuple):
    input_ids: list[int]
    params: SamplingParams  # n = 1: one request per sample
    rid: str | None  # for abort_request
    epoch: int  # GenerationControl.epoch when it arrived (abort_all ends the requests running then)


class GenerationControl:
    """Abort and pause, set from other threads while a batch decodes (checked once per token).

    abort_all ends the requests running at that moment (an epoch counter), not those sent later."""

    def __init__(self):
        self.epoch = 0
        self._aborted_rids: set[str] = set()
        self._running = threading.Event()
        self._running.set()

    def abort(self, rid: str | None, abort_all: bool) -> None:
        if abort_all:
            self.epoch += 1
        elif rid is not None:
            self._aborted_rids.add(rid)

    def any_abort(self, started_epoch: int) -> bool:
        """Cheap check before looking at rows: has anything been aborted that could concern this call?"""
        return started_epoch < self.epoch or bool(self._aborted_rids)

    def aborted(self, rid: str | None, started_epoch: int) -> bool:
        return started_epoch < self.epoch or (rid is not None and rid in self._aborted_rids)

    def forget(self, rids) -> None:
        """A finished call's rids: aborting them no longer means anything (and must not hit a later reuse)."""
        self._aborted_rids.difference_update(r for r in rids if r is not None)

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def wait_while_paused(self) -> None:
        self._running.wait()


class NativeEngine:
    def __init__(self, model, eos_token_ids: Iterable[int], pad_token_id: int, max_batch_size: int = 256,
                 decode=None):
        """Serve `model` (a transformers causal LM, used in place: the caller may share it). `decode` (token
        ids → text, e.g. a tokenizer's) is what stop strings are matched against."""
        self.decode = decode
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.pad_token_id = pad_token_id
        self._released: set[str] = set()
        self._weights_stale = False
        self._buffers: dict[str, torch.Tensor] = {}
        # transformers 5 renamed the KV-cache argument and output field from past_key_values to cache.
        self._cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._lean = LeanDecoder.for_model(model)  # None: this architecture runs the transformers forward
        self.control = GenerationControl()

    @classmethod
    def from_pretrained(cls, model_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        max_batch_size: int = 256) -> NativeEngine:
        from transformers import AutoModelForCausalLM, GenerationConfig

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(model, eos_ids, model.config.pad_token_id or 0, max_batch_size, decode=_tokenizer_decode(model_path))

    # --- generation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams],
                 return_logprob: bool = False, rids: Sequence[str] | None = None) -> list[GenerateOutput]:
        """`rids` (one per prompt) name requests for `abort_request`."""
        self._check_ready()
        prompts, params = expand_samples(input_ids, sampling_params)
        rids = per_sample(rids, sampling_params) if rids else [None] * len(prompts)
        epoch = self.control.epoch
        requests = [_Request(ids, p, rid, epoch) for ids, p, rid in zip(prompts, params, rids)]
        outputs: list[GenerateOutput | None] = [None] * len(requests)
        # Rows of one batch share the sampling settings (seeds aside); group requests by them.
        order = sorted(range(len(requests)), key=lambda r: _batch_key(requests[r].params))
        for _, group in groupby(order, key=lambda r: _batch_key(requests[r].params)):
            group = list(group)
            for start in range(0, len(group), self.max_batch_size):
                chunk = group[start:start + self.max_batch_size]
                results = self._generate_batch([requests[r] for r in chunk])
                for r, out in zip(chunk, results):
                    outputs[r] = out
        self.control.forget(rids)
        return outputs

    def _generate_batch(self, requests: list[_Request]) -> list[GenerateOutput]:
        """Decode one batch of requests with the same settings. Per-token work is tensor ops over the rows;
        Python loops over rows only for stop strings and aborts."""
        params = requests[0].params
        prompts = [r.input_ids for r in requests]
        batch, steps = len(prompts), params.max_new_tokens
        if params.stop and self.decode is None:
            raise ValueError("stop strings need the engine's tokenizer; give stop_token_ids instead")
        ids, mask = pad_rows(prompts, self.pad_token_id, "left")  # every row's last token in the same column
        seeds = torch.tensor([_seed_of(r.params.sampling_seed) for r in requests], dtype=torch.int64)
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids) | (set() if params.ignore_eos
                                                                   else set(self.eos_token_ids))), dtype=torch.long)
        window = max((len(text.encode()) for text in params.stop), default=0) + 1  # tokens are ≥ 1 byte
        stepper = _LeanStepper(self._lean) if self._lean is not None else _TransformersStepper(self.model, self._cache_key)

        tokens = torch.zeros((batch, steps), dtype=torch.long)
        logprobs = torch.zeros((batch, steps))
        lengths = torch.zeros(batch, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool)
        reasons = ["length"] * batch
        matched: list[int | str | None] = [None] * batch
        active = torch.arange(batch)  # the original row of each row the stepper still computes

        def end(rows: list[int], reason: str, what: list | None = None) -> None:
            for i, row in enumerate(rows):
                finished[row], reasons[row], matched[row] = True, reason, what[i] if what else None

        def end_aborted() -> bool:
            if self.control.any_abort(requests[0].epoch):
                end([r for r in range(batch) if not finished[r]
                     and self.control.aborted(requests[r].rid, requests[r].epoch)], "abort")  # keeps their tokens
            return bool(finished.all())

        logits = stepper.start(ids.to(self.device), mask.to(self.device), steps)
        for step in range(steps):
            if end_aborted():
                break
            self.control.wait_while_paused()  # in_place / retract: hold here with the KV cache
            if end_aborted():  # an abort may have come during the pause
                break
            next_ids, next_logprobs = sample(logits.float(), params, seeds[active], step)
            live = ~finished[active]
            rows = active[live]
            tokens[rows, step], logprobs[rows, step], lengths[rows] = next_ids[live], next_logprobs[live], step + 1
            stopped = rows[torch.isin(next_ids[live], stop_ids)].tolist()
            end(stopped, "stop", tokens[stopped, step].tolist())
            if params.stop:
                hits = {r: self._stop_string_hit(tokens[r, :step + 1], params.stop, window)
                        for r in rows.tolist() if not finished[r]}
                hits = {r: text for r, text in hits.items() if text is not None}
                end(list(hits), "stop", list(hits.values()))
            if finished.all():
                break
            alive = ~finished[active]
            # Dropping rows copies the KV cache: worth it once a quarter of the rows are done.
            if stepper.can_drop_rows and alive.sum() <= 0.75 * len(active):
                kept = alive.nonzero().squeeze(-1)
                stepper.keep_rows(kept.to(self.device))
                active, next_ids = active[kept], next_ids[kept]
            logits = stepper.step(next_ids.to(self.device))
        return [GenerateOutput(tokens[r, :lengths[r]].tolist(), reasons[r], len(prompts[r]),
                               logprobs[r, :lengths[r]].tolist(), matched[r]) for r in range(batch)]

    def _stop_string_hit(self, row_tokens: torch.Tensor, stops, window: int) -> str | None:
        tail = self.decode(row_tokens[-window:].tolist())
        return next((text for text in stops if text in tail), None)

    # --- control from other threads (the HTTP server's) ---------------------------------------------

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> None:
        self.control.abort(rid, abort_all)

    def pause_generation(self, mode: str = "abort") -> None:
        """abort: running requests end now (finish reason abort); in_place / retract: they wait, with their
        KV cache, until continue_generation. New requests wait too."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r}: expected one of {', '.join(PAUSE_MODES)}")
        if mode == "abort":
            self.control.abort(None, abort_all=True)
        self.control.pause()

    def continue_generation(self) -> None:
        self.control.resume()

    # --- weights and memory -------------------------------------------------------------------------

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if "weights" in self._released:
            raise RuntimeError("weights are released: call resume_memory_occupation(['weights']) first")
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"update_weights_from_tensor: the engine's model has no parameter {name!r}")
            params[name].data.copy_(tensor.to(params[name].device, params[name].dtype))
        self._weights_stale = False

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Free the weights (their content is lost, as in SGLang without a CPU backup) and/or the KV cache
        (this engine keeps none between calls)."""
        tags = _check_tags(tags)
        if "weights" in tags and "weights" not in self._released:
            # Buffers (rotary frequencies) are not weights a trainer pushes: keep them.
            self._buffers = {name: b.clone() for name, b in self.model.named_buffers()}
            self.model.to("meta")
        self._released |= set(tags)

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        tags = _check_tags(tags)
        if "weights" in tags and "weights" in self._released:
            self.model.to_empty(device=self.device)
            for name, buffer in self.model.named_buffers():
                buffer.copy_(self._buffers[name])
            self.model.tie_weights()
            self._weights_stale = True  # memory is back, content is not: push weights before generating
        self._released -= set(tags)

    def flush_cache(self) -> None:
        """Prefix caching is not implemented, so there is nothing to flush."""

    def _check_ready(self) -> None:
        if self._released:
            raise RuntimeError(f"engine memory released ({', '.join(sorted(self._released))}): "
                               f"call resume_memory_occupation first")
        if self._weights_stale:
            raise RuntimeError("weights were resumed but not updated: call update_weights_from_tensor first")


class _LeanStepper:
    """Decoding through LeanDecoder: preallocated KV cache, finished rows dropped."""

    can_drop_rows = True

    def __init__(self, decoder: LeanDecoder):
        self.decoder = decoder

    def start(self, ids, mask, max_new_tokens):
        # The n samples of a prompt share it: prefill each distinct prompt once, then copy its KV rows.
        rows = torch.cat([ids, mask], dim=1)
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
        width = ids.shape[1]
        logits = self.decoder.prefill(distinct[:, :width], distinct[:, width:], max_new_tokens)
        self.decoder.keep_rows(inverse)
        return logits[inverse]

    def step(self, next_ids):
        return self.decoder.decode(next_ids)

    def keep_rows(self, rows):
        self.decoder.keep_rows(rows)


class _TransformersStepper:
    """Decoding through the model's own forward and cache (any architecture)."""

    can_drop_rows = False

    def __init__(self, model, cache_key: str):
        self.model, self.cache_key = model, cache_key

    def start(self, ids, mask, max_new_tokens):
        self.mask = mask
        self.positions = position_ids_from_mask(mask)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=self.positions, use_cache=True)
        self.cache = out[self.cache_key]
        return out.logits[:, -1]

    def step(self, next_ids):
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1
        out = self.model(input_ids=next_ids[:, None], attention_mask=self.mask, position_ids=self.positions,
                         use_cache=True, **{self.cache_key: self.cache})
        self.cache = out[self.cache_key]
        return out.logits[:, -1]


def _check_tags(tags: Sequence[str] | None) -> tuple[str, ...]:
    tags = tuple(tags) if tags else MEMORY_TAGS
    unknown = set(tags) - set(MEMORY_TAGS)
    if unknown:
        raise ValueError(f"unknown memory tags {sorted(unknown)}; expected {MEMORY_TAGS}")
    return tags


def _batch_key(p: SamplingParams) -> tuple:
    return (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.stop, p.stop_token_ids, p.ignore_eos)


def _seed_of(seed: int | None) -> int:
    """A request's noise seed: its sampling_seed, else one drawn from torch's generator (so torch.manual_seed
    makes unseeded runs reproducible)."""
    return seed if seed is not None else int(torch.randint(0, 2**62, (1,)))


def _tokenizer_decode(model_path: str):
    """The model directory's tokenizer as ids → text, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
