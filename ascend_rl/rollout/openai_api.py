"""OpenAI's completions and chat completions API on the native engine, with SGLang 0.5.8's answers
(srt/entrypoints/openai): /v1/completions, /v1/chat/completions (the model's chat template), /v1/models.

A body becomes token prompts and SGLang sampling parameters (`openai_checks` reads every field); the engine
generates as for /generate (`seed` is SGLang's sampling_seed: sample j of a prompt is seeded seed + j), and
the outputs are detokenized as SGLang's detokenizer does it (`text_codec`). Streams are SSE chunks that end with
`data: [DONE]`; a reader that leaves ends its requests."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from itertools import accumulate

from ascend_rl.rollout import openai_checks as oc
from ascend_rl.rollout.generate_json import EventStream, error_chunk, logprob_kwargs, sample_changes
from ascend_rl.rollout.protocol import GenerateOutput, SamplingParams
from ascend_rl.rollout.request_checks import ApiError, check_size, token_prompts
from ascend_rl.rollout.server_info import models_list
from ascend_rl.rollout.text_codec import SampleText, TextCodec


@dataclass(frozen=True)
class Call:
    """One OpenAI request, ready for the engine."""

    kind: str  # "completion" | "chat"
    id: str
    model: str
    prompts: list[list[int]]
    params: SamplingParams  # every prompt's (n samples each)
    rids: list[str]  # one per prompt
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: the chosen token's and k alternatives
    echo: list[str] | None  # completions: each prompt's text, put before its samples' text

    @property
    def prompt_logprobs(self) -> bool:
        """echo with logprobs: the prompt's tokens come first in the log-probs, as in SGLang."""
        return self.echo is not None and self.logprobs is not None


class OpenAIEndpoints:
    """The OpenAI routes of an `http_server.EngineService` (its engine, tokenizer, model and limits)."""

    def __init__(self, service):
        self.service = service

    def routes(self) -> dict:
        return {("POST", "/v1/completions"): self.completions, ("POST", "/v1/chat/completions"): self.chat,
                ("GET", "/v1/models"): self.models}

    def models(self, body: dict) -> dict:
        return models_list(self.service.model, self.service.engine)

    # --- requests -------------------------------------------------------------------------------------

    def completions(self, body: dict):
        codec = self._codec()
        draft = oc.read_fields(body, oc.COMPLETION_FIELDS, "/v1/completions", self.service.vocab_size)
        fields = draft.fields
        self._check_model(fields.get("model"))
        prompts, texts = self._completion_prompts(codec, fields.get("prompt"))
        draft.sampling.setdefault("max_new_tokens", 16)  # OpenAI's default
        logprobs, echo = fields.get("logprobs"), fields.get("echo", False)
        if fields.get("best_of") not in (None, draft.sampling.get("n", 1)):
            raise oc.FieldError("best_of", "best_of must equal n here: every sample generated is returned")
        return self._run(self._call("completion", "cmpl", draft, prompts, logprobs, texts if echo else None))

    def chat(self, body: dict):
        codec = self._codec()
        draft = oc.read_fields(body, oc.CHAT_FIELDS, "/v1/chat/completions", self.service.vocab_size)
        fields = draft.fields
        self._check_model(fields.get("model"))
        if "messages" not in fields:
            raise oc.FieldError("messages", "messages is required")
        prompt = codec.chat_prompt(fields["messages"], fields.get("chat_template_kwargs"))
        limit = fields.get("max_completion_tokens")
        if limit is not None and draft.sampling.setdefault("max_new_tokens", limit) != limit:
            raise oc.FieldError("max_completion_tokens", "max_tokens and max_completion_tokens differ: send one")
        if "max_new_tokens" not in draft.sampling:
            draft.sampling["max_new_tokens"] = self._rest_of_context(len(prompt))
        top = fields.get("top_logprobs")
        if top is not None and not fields.get("logprobs"):
            raise oc.FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        logprobs = (top or 0) if fields.get("logprobs") else None
        return self._run(self._call("chat", "chatcmpl", draft, [prompt], logprobs, None))

    def _check_model(self, model) -> None:
        if model is None:
            raise oc.FieldError("model", "model is required")
        if not self.service.model.answers_to(model):
            raise ApiError(HTTPStatus.NOT_FOUND, f"The model '{model}' does not exist; this server serves "
                                                 f"'{self.service.model.name}'", "model", "model_not_found")

    def _rest_of_context(self, prompt: int) -> int:
        """SGLang's chat default for max_tokens: what the context (and the KV cache budget) leaves after the
        prompt, less one."""
        engine = self.service.engine
        bounds = [getattr(engine, "context_length", None), getattr(getattr(engine, "budget", None),
                                                                   "kv_cache_tokens", None)]
        room = min((b for b in bounds if b is not None), default=None)
        return 128 if room is None else max(room - prompt - 1, 0)  # 128: SGLang's default without a bound

    def _codec(self) -> TextCodec:
        if self.service.codec is None:
            raise ValueError("this server runs with --skip-tokenizer-init: the OpenAI endpoints need the model's "
                             "tokenizer; send token ids to /generate")
        return self.service.codec

    def _completion_prompts(self, codec: TextCodec, prompt) -> tuple[list[list[int]], list[str]]:
        """prompt: a string, a list of strings, token ids, or a list of token-id lists → (ids, texts)."""
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            prompts = [codec.encode(text) for text in texts]
            if not all(prompts):
                raise oc.FieldError("prompt", "Prompt cannot be empty")
            return prompts, texts
        try:
            prompts, _ = token_prompts(prompt, self.service.vocab_size)
        except ValueError as err:
            raise oc.FieldError("prompt", f"prompt must be a string, a list of strings, token ids or a list of "
                                          f"token-id lists ({err})") from None
        return prompts, [codec.decode(ids) for ids in prompts]

    def _call(self, kind: str, prefix: str, draft: oc.Draft, prompts: list[list[int]], logprobs: int | None,
              echo: list[str] | None) -> Call:
        fields = draft.fields
        params = SamplingParams.from_dict(draft.sampling, self.service.vocab_size)
        check_size(prompts, [params] * len(prompts), self.service.limits)
        call_id = f"{prefix}-{uuid.uuid4().hex}"
        rid = fields.get("rid")
        rids = [rid] * len(prompts) if isinstance(rid, str) else rid or [f"{call_id}-{i}" for i in range(len(prompts))]
        if len(rids) != len(prompts):
            raise oc.FieldError("rid", f"{len(prompts)} prompts but {len(rids)} rids")
        options = fields.get("stream_options") or {}
        if options and not fields.get("stream"):
            raise oc.FieldError("stream_options", "stream_options needs stream: true")
        return Call(kind, call_id, fields["model"], prompts, params, rids, fields.get("stream", False),
                    options.get("include_usage", False), logprobs, echo)

    # --- answers ----------------------------------------------------------------------------------------

    def _run(self, call: Call):
        engine = self.service.engine
        try:
            extra = logprob_kwargs(engine, top_logprobs_num=call.logprobs or 0,
                                   logprob_start_len=0 if call.prompt_logprobs else -1)
        except ValueError as err:
            raise oc.FieldError("top_logprobs" if call.kind == "chat" else "logprobs", str(err)) from None
        params = [call.params] * len(call.prompts)
        answer = Answer(call, self.service.codec, self.service.weight_version)
        logprobs = call.logprobs is not None
        if call.stream:
            updates = engine.generate_stream(call.prompts, params, rids=call.rids, return_logprob=logprobs, **extra)
            return EventStream(answer.stream(updates), abort=lambda: [engine.abort_request(r) for r in set(call.rids)])
        return answer.whole(engine.generate(call.prompts, params, return_logprob=logprobs, rids=call.rids, **extra))


class Answer:
    """The response to one call, whole or as stream chunks (SGLang's OpenAI shapes)."""

    def __init__(self, call: Call, codec: TextCodec, weight_version: str):
        self.call, self.codec, self.weight_version = call, codec, weight_version
        self.created = int(time.time())
        samples = len(call.prompts) * call.params.n
        self.prompt_of = [i // call.params.n for i in range(samples)]
        self.texts = [SampleText(codec, call.prompts[p], call.params) for p in self.prompt_of]

    def whole(self, outputs: list[GenerateOutput]) -> dict:
        choices = []
        for i, out in enumerate(outputs):
            text = self.texts[i].update(out)
            echo = self.call.echo[self.prompt_of[i]] if self.call.echo else ""
            logprobs = self._logprobs(out, 0, len(echo), self.call.prompt_logprobs)
            body = {"text": echo + text} if self.call.kind == "completion" else {
                "message": {"role": "assistant", "content": text or None, "reasoning_content": None,
                            "tool_calls": None}}
            choices.append({"index": i, **body, "logprobs": logprobs, **finish(out)})
        kind = "text_completion" if self.call.kind == "completion" else "chat.completion"
        return {"id": self.call.id, "object": kind, "created": self.created, "model": self.call.model,
                "choices": choices, "usage": self._usage(outputs), "metadata": {"weight_version": self.weight_version}}

    def stream(self, updates):
        """Completion chunks: each change of a sample, its new text. Chat chunks: the role first, then each piece
        of new text, then the finish reason; log-probs travel with the text their tokens made."""
        sent = [""] * len(self.texts)  # text so far, echo left out
        tokens_sent = [0] * len(self.texts)  # tokens whose log-probs went out
        finals: dict[int, GenerateOutput] = {}
        started: set[int] = set()
        try:
            for i, out in sample_changes(updates):
                first = i not in started
                started.add(i)
                if first and self.call.kind == "chat":
                    yield self._chunk(i, {"role": "assistant", "content": ""}, None, {})
                text = self.texts[i].update(out)
                delta, sent[i] = text[len(sent[i]):], text
                offset = len(text) - len(delta)
                if first and self.call.echo:
                    delta = self.call.echo[self.prompt_of[i]] + delta
                if out.finish_reason is not None:
                    finals[i] = out
                if self.call.kind == "completion" or delta or out.finish_reason is not None:
                    logprobs = self._logprobs(out, tokens_sent[i], offset, first and self.call.prompt_logprobs)
                    tokens_sent[i] = len(out.output_ids)
                    yield from self._pieces(i, out, delta, logprobs)
            if self.call.include_usage:
                yield {"id": self.call.id, "object": self._chunk_object(), "created": self.created,
                       "model": self.call.model, "choices": [], "usage": self._usage(list(finals.values()))}
        except (ValueError, RuntimeError) as err:
            yield error_chunk(err)

    def _pieces(self, i: int, out: GenerateOutput, delta: str, logprobs):
        if self.call.kind == "completion":
            yield self._chunk(i, delta, logprobs, finish(out) if out.finish_reason is not None else {})
            return
        if delta:
            yield self._chunk(i, {"content": delta}, logprobs, {})
            logprobs = None
        if out.finish_reason is not None:
            yield self._chunk(i, {}, logprobs, finish(out))

    def _chunk(self, i: int, delta, logprobs, finished: dict) -> dict:
        body = {"text": delta} if self.call.kind == "completion" else {"delta": delta}
        choice = {"index": i, **body, "logprobs": logprobs, "finish_reason": None, "matched_stop": None, **finished}
        return {"id": self.call.id, "object": self._chunk_object(), "created": self.created, "model": self.call.model,
                "choices": [choice]}

    def _chunk_object(self) -> str:
        return "text_completion" if self.call.kind == "completion" else "chat.completion.chunk"

    def _usage(self, outputs: list[GenerateOutput]) -> dict:
        prompt = sum(len(p) for p in self.call.prompts)
        completion = sum(out.completion_tokens for out in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _logprobs(self, out: GenerateOutput, start: int, offset: int, prompt: bool = False):
        """The log-probs of a sample's tokens from `start` (after its prompt's, with `prompt`) in the endpoint's
        shape; None when not asked for. `offset`: where the first output token's text begins."""
        if self.call.logprobs is None:
            return None
        pairs = list(zip(out.output_logprobs[start:], out.output_ids[start:]))
        rows = list(out.output_top_logprobs[start:])
        if prompt:
            pairs, rows, offset = list(out.input_token_logprobs) + pairs, list(out.input_top_logprobs) + rows, 0
        tokens = self.codec.token_texts([tok for _, tok in pairs])
        tops = [None if row is None else list(zip(self.codec.token_texts([t for _, t in row]), [lp for lp, _ in row]))
                for row in rows] if self.call.logprobs else []
        values = [lp for lp, _ in pairs]
        if self.call.kind == "chat":
            return {"content": [{"token": tok, "bytes": list(tok.encode()), "logprob": lp,
                                 "top_logprobs": [{"token": t, "bytes": list(t.encode()), "logprob": v}
                                                  for t, v in (tops[k] or [] if k < len(tops) else [])]}
                                for k, (tok, lp) in enumerate(zip(tokens, values))]}
        offsets = list(accumulate((len(t) for t in tokens), initial=offset))[:len(tokens)]
        return {"text_offset": offsets, "token_logprobs": values, "tokens": tokens,
                "top_logprobs": [None if row is None else dict(row) for row in tops]}


def finish(out: GenerateOutput) -> dict:
    """A choice's finish_reason (stop, length, abort) and, for a stop, what matched (SGLang's matched_stop)."""
    return {"finish_reason": out.finish_reason, "matched_stop": out.matched if out.finish_reason == "stop" else None}
