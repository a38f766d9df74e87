"""The built-in rollout engine (`rollout.name=native`): continuous batching with a KV cache over a
transformers model, behind the SGLang-shaped protocol (generation, weights, memory, abort and pause).

Every sample's noise is a function of its `sampling_seed` and token index, so a sample does not depend on
what else is in the batch, and samples of one prompt (seeds sampling_seed + j) differ.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence

import torch

from ascend_rl.errors import UserError
from ascend_rl.rollout.grammar import Grammars
from ascend_rl.rollout.lean_decoder import attention_dtype
from ascend_rl.rollout.logprob_outputs import logprob_requests
from ascend_rl.rollout.protocol import GenerateOutput, SamplingParams, expand_samples, per_prompt, per_sample
from ascend_rl.rollout.scheduler import Budget, GenerationControl, Request, Scheduler
from ascend_rl.rollout.steppers import stepper_for
from ascend_rl.rollout.tensor_transfer import TENSOR_LOAD_FORMATS
from ascend_rl.rollout.weights_backup import EngineWeights

MEMORY_TAGS = ("weights", "kv_cache")
LOAD_FORMATS = ("auto", "dummy")
PAUSE_MODES = ("abort", "retract", "in_place")  # SGLang's; retract keeps the KV cache here (nothing to recompute)


class NativeEngine:
    def __init__(self, model, eos_token_ids: Iterable[int], pad_token_id: int, budget: Budget | None = None,
                 decode=None, context_length: int | None = None, enable_weights_cpu_backup: bool = False,
                 weights_loaded: bool = True, tokenizer=None):
        """Serve `model` (a transformers causal LM, used in place: the caller may share it). `decode` (token
        ids → text, e.g. a tokenizer's) is what stop strings are matched against; `tokenizer` (the model's, a
        transformers tokenizer) is what structured output's grammars are matched against (None: refused). A request's prompt and
        max_new_tokens together must fit `context_length` (default: the model's max_position_embeddings).
        `enable_weights_cpu_backup` (SGLang's): released weights come back on resume, no push needed.
        `weights_loaded` False: the model's values are placeholders until pushed (load_format=dummy)."""
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None)
        self.budget = budget or Budget()
        self._released: set[str] = set()
        self.weights = EngineWeights(model, self.device, enable_weights_cpu_backup, weights_loaded)
        self.control = GenerationControl()
        self.stepper = stepper_for(model, pad_token_id)
        vocab = getattr(model.config, "vocab_size", None)
        grammars = None if tokenizer is None else Grammars(tokenizer, vocab, eos_token_ids)
        self.scheduler = Scheduler(self.stepper, self.budget, self.control, frozenset(eos_token_ids), decode,
                                   grammars)

    @classmethod
    def from_pretrained(cls, model_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        max_num_seqs: int = Budget.max_num_seqs,
                        max_num_batched_tokens: int = Budget.max_num_batched_tokens,
                        memory_utilization: float | None = None, context_length: int | None = None,
                        load_format: str = "auto", enable_weights_cpu_backup: bool = False) -> NativeEngine:
        """`memory_utilization` (verl's gpu_memory_utilization, SGLang's mem_fraction_static): the share of
        the device's memory (RAM on CPU) for weights and KV cache; None: no cache limit. `load_format`: auto
        reads the weights; dummy (verl's default, as in SGLang) only builds the model, whose weights the trainer
        pushes before the first generation. `enable_weights_cpu_backup`: see `__init__`."""
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        if load_format not in LOAD_FORMATS:
            raise UserError(f"actor_rollout_ref.rollout.load_format={load_format}: the native engine reads "
                            f"{' or '.join(LOAD_FORMATS)}")
        if load_format == "dummy":
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=dtype).to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        kv_tokens = None if memory_utilization is None else kv_cache_tokens(model, device, memory_utilization)
        budget = Budget(max_num_seqs, max_num_batched_tokens, kv_tokens)
        tokenizer = _load_tokenizer(model_path)
        decode = None if tokenizer is None else lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        return cls(model, eos_ids, model.config.pad_token_id or 0, budget, decode, context_length,
                   enable_weights_cpu_backup, weights_loaded=load_format != "dummy", tokenizer=tokenizer)

    # --- generation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams],
                 return_logprob: bool = False, rids: Sequence[str] | None = None,
                 logprob_start_len: int | Sequence[int] = -1, top_logprobs_num: int | Sequence[int] = 0,
                 token_ids_logprob: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
                 ) -> list[GenerateOutput]:
        """`rids` (one per prompt) name requests for `abort_request`. Calls from several threads share the
        running batch (continuous batching). `output_logprobs` are always filled; with `return_logprob`, SGLang's
        other log-prob outputs too (`GenerateOutput`), from its request-level fields: `logprob_start_len`,
        `top_logprobs_num`, `token_ids_logprob` (each one value, or one per prompt; ignored without
        return_logprob, as in SGLang)."""
        logprobs = _logprob_args(return_logprob, len(input_ids), logprob_start_len, top_logprobs_num,
                                 token_ids_logprob)
        tickets, rids = self._submit(input_ids, sampling_params, rids, logprobs)
        try:
            return self.scheduler.run(tickets)
        finally:
            self.control.forget(rids)

    def generate_stream(self, input_ids: Sequence[Sequence[int]],
                        sampling_params: SamplingParams | Sequence[SamplingParams],
                        rids: Sequence[str] | None = None, return_logprob: bool = False,
                        logprob_start_len: int | Sequence[int] = -1, top_logprobs_num: int | Sequence[int] = 0,
                        token_ids_logprob: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
                        ) -> Iterator[list[GenerateOutput]]:
        """As `generate`, but yields every sample's output so far after each decode step (finish reason None
        until it ends). Bad requests raise here, before anything is yielded; closing the iterator early
        aborts what is still running."""
        rids = list(rids) if rids else [f"stream-{uuid.uuid4().hex}" for _ in input_ids]  # so closing can abort
        logprobs = _logprob_args(return_logprob, len(input_ids), logprob_start_len, top_logprobs_num,
                                 token_ids_logprob)
        tickets, sample_rids = self._submit(input_ids, sampling_params, rids, logprobs)
        return self._stream(tickets, sample_rids)

    @torch.no_grad()
    def _stream(self, tickets, rids) -> Iterator[list[GenerateOutput]]:
        try:
            yield from self.scheduler.progress(tickets)
        finally:
            if not all(t.done for t in tickets):  # the reader left: end its requests at the next step
                for rid in set(rids):
                    self.control.abort(rid, abort_all=False)
                self.scheduler.run(tickets)
            self.control.forget(rids)

    def _submit(self, input_ids, sampling_params, rids, logprobs=None):
        self._check_ready()
        vocab = getattr(self.model.config, "vocab_size", None)
        # Each distinct object once, before the expansion: a sample's copy differs only in n = 1 and its seed,
        # which verify's range for sampling_seed … sampling_seed + n − 1 covers.
        for p in {id(p): p for p in per_prompt(sampling_params, len(input_ids))}.values():
            p.verify(vocab)
        prompts, params = expand_samples(input_ids, sampling_params)
        rids = per_sample(rids, sampling_params) if rids else [None] * len(prompts)
        logprobs = per_sample(logprobs, sampling_params) if logprobs else [None] * len(prompts)
        for ids, p, lp in zip(prompts, params, logprobs):
            self._check_length(len(ids), p.max_new_tokens)
            if lp is not None:
                lp.check(len(ids), vocab)
        epoch = self.control.epoch
        requests = [Request(ids, p, rid, epoch, lp) for ids, p, rid, lp in zip(prompts, params, rids, logprobs)]
        return self.scheduler.submit(requests, [_seed_of(p.sampling_seed) for p in params]), rids

    def _check_length(self, prompt: int, max_new_tokens: int) -> None:
        """SGLang's rule: prompt + max_new_tokens must fit the context; and here, the KV cache budget."""
        total = prompt + max_new_tokens
        if self.context_length is not None and total > self.context_length:
            raise ValueError(f"Requested token count exceeds the model's maximum context length of "
                             f"{self.context_length} tokens. You requested a total of {total} tokens: {prompt} "
                             f"tokens from the input and {max_new_tokens} tokens for the completion.")
        if self.budget.kv_cache_tokens is not None and total > self.budget.kv_cache_tokens:
            raise ValueError(f"a request of {total} tokens does not fit the KV cache budget of "
                             f"{self.budget.kv_cache_tokens} tokens; raise gpu_memory_utilization")

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

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                   load_format: str | None = None, flush_cache: bool = True) -> None:
        """SGLang's Engine.update_weights_from_tensor: (name, tensor) pairs by HF parameter name, copied in
        between decode steps (running requests go on with the new weights, as in SGLang). `flush_cache`: after
        the update (a no-op here: no prefix cache). Over HTTP, decode the body with
        `tensor_transfer.decode_update_weights_from_tensor`."""
        if load_format not in TENSOR_LOAD_FORMATS:
            raise ValueError(f"load_format={load_format!r}: the native engine loads named tensors directly "
                             f"(None or 'direct'), not SGLang's flattened buckets or custom loaders")
        with self.scheduler.step_lock:
            self.weights.load(named_tensors)
        if flush_cache:
            self.flush_cache()

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Free the weights (their content is lost unless `enable_weights_cpu_backup`, as in SGLang) and/or
        the KV cache (this engine keeps none between calls)."""
        tags = _check_tags(tags)
        if self.scheduler.busy:  # SGLang asserts the same
            raise RuntimeError("release_memory_occupation while requests run: pause or abort them first")
        if "weights" in tags:
            self.weights.release()
        self._released |= set(tags)

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """The memory comes back; the weights' values too with `enable_weights_cpu_backup`, otherwise only
        after a push (generating before it is an error)."""
        tags = _check_tags(tags)
        if "weights" in tags:
            self.weights.resume()
        self._released -= set(tags)

    def flush_cache(self) -> None:
        """Prefix caching is not implemented, so there is nothing to flush."""

    def _check_ready(self) -> None:
        if self._released:
            raise RuntimeError(f"engine memory released ({', '.join(sorted(self._released))}): "
                               f"call resume_memory_occupation first")
        self.weights.check_loaded()


def _logprob_args(return_logprob: bool, prompts: int, logprob_start_len, top_logprobs_num, token_ids_logprob):
    """One LogprobRequest per prompt, or None without return_logprob (SGLang ignores the other fields then)."""
    if not return_logprob:
        return None
    return logprob_requests(prompts, logprob_start_len, top_logprobs_num, token_ids_logprob)


def _check_tags(tags: Sequence[str] | None) -> tuple[str, ...]:
    tags = tuple(tags) if tags else MEMORY_TAGS
    unknown = set(tags) - set(MEMORY_TAGS)
    if unknown:
        raise ValueError(f"unknown memory tags {sorted(unknown)}; expected {MEMORY_TAGS}")
    return tags


def _seed_of(seed: int | None) -> int:
    """A request's noise seed: its sampling_seed, else one drawn from torch's generator (so torch.manual_seed
    makes unseeded runs reproducible)."""
    return seed if seed is not None else int(torch.randint(0, 2**62, (1,)))


def kv_cache_tokens(model, device: str, memory_utilization: float) -> int:
    """Rows × columns of KV cache that fit `memory_utilization` of the device's memory after the weights."""
    from ascend_rl.platform import total_memory_bytes

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    total = total_memory_bytes(device)
    budget = memory_utilization * total - weights
    per_token = _kv_bytes_per_token(model)
    if budget < per_token:
        raise UserError(f"actor_rollout_ref.rollout.gpu_memory_utilization={memory_utilization}: "
                        f"{memory_utilization * total / 2**30:.2f} GiB of {total / 2**30:.1f} GiB leaves no room for "
                        f"a KV cache after the {weights / 2**30:.2f} GiB of weights")
    return int(budget // per_token)


def _kv_bytes_per_token(model) -> int:
    """K and V of one token, every layer."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * attention_dtype(model).itemsize


def _load_tokenizer(model_path: str):
    """The model directory's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None
