"""SGLang's /generate answers, built from GenerateOutputs: the output shape, log-prob entries, and the SSE
stream (`EventStream`) that /generate and the OpenAI endpoints share."""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ascend_rl.rollout.protocol import GenerateOutput


class EventStream:
    """A streamed answer: the chunks (JSON-able dicts) of an SSE stream that ends with [DONE]. Each line is
    read in a worker thread (it may drive a decode step); `drain` is for a reader that left: it ends the
    stream's requests and lets the stream run out (a lock keeps it from racing a read in flight)."""

    def __init__(self, chunks, abort):
        self._lines = self._all_lines(chunks)
        self._abort = abort
        self._lock = threading.Lock()

    @staticmethod
    def _all_lines(chunks):
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    def next_line(self) -> str | None:
        with self._lock:
            return next(self._lines, None)

    def drain(self) -> None:
        self._abort()
        with self._lock:
            for _ in self._lines:
                pass


def error_chunk(err: Exception) -> dict:
    """What a stream sends when generation fails after it started (SGLang's shape)."""
    return {"error": {"message": str(err), "type": type(err).__name__, "code": 500, "retryable": False}}


def sample_changes(updates: Iterable[list[GenerateOutput]]) -> Iterator[tuple[int, GenerateOutput]]:
    """(sample index, its output so far) whenever a sample has more tokens or ends."""
    last: dict[int, tuple] = {}
    for outputs in updates:
        for i, out in enumerate(outputs):
            state = (len(out.output_ids), out.finish_reason)
            if state != last.get(i, (0, None)):
                last[i] = state
                yield i, out


# --- log-probs ------------------------------------------------------------------------------------------

# SGLang's request-level log-prob fields and their defaults: a request that sets one needs an engine that
# takes it (the native engine does; `logprob_outputs`).
LOGPROB_DEFAULTS = {"logprob_start_len": -1, "top_logprobs_num": 0, "token_ids_logprob": None}


def logprob_kwargs(engine, **asked) -> dict:
    """The engine's keyword arguments for the log-prob fields a request sets (those away from their defaults);
    a 400 naming the field where the engine takes no such argument."""
    given = {key: value for key, value in asked.items() if value != LOGPROB_DEFAULTS[key]}
    takes = inspect.signature(engine.generate).parameters
    missing = [key for key in given if key not in takes]
    if missing:
        raise ValueError(f"{missing[0]}: this engine returns the output tokens' log-probs only")
    return given


Pairs = Iterable[tuple]  # (logprob, token id) per position, the engine's order


@dataclass(frozen=True)
class LogprobView:
    """What a /generate answer shows of log-probs (SGLang's meta_info keys): with return_logprob the chosen
    tokens' (prompt and output), the top alternatives and the asked-for ids' where the request set those
    fields, each entry [logprob, token id, text] (text with return_text_in_logprobs, else null)."""

    chosen: bool = False  # return_logprob
    top: bool = False  # top_logprobs_num > 0
    token_ids: bool = False  # token_ids_logprob set
    token_text: Callable[[list[int]], list[str]] | None = None

    def meta(self, out: GenerateOutput) -> dict:
        if not self.chosen:
            return {}
        meta = {"input_token_logprobs": self.entries(getattr(out, "input_token_logprobs", [])),
                "output_token_logprobs": self.entries(zip(out.output_logprobs, out.output_ids))}
        for asked, kind in ((self.top, "top_logprobs"), (self.token_ids, "token_ids_logprobs")):
            if asked:
                for side in ("input", "output"):
                    rows = getattr(out, f"{side}_{kind}", [])
                    meta[f"{side}_{kind}"] = [None if row is None else self.entries(row) for row in rows]
        return meta

    def entries(self, pairs: Pairs) -> list[list]:
        pairs = list(pairs)
        texts = self.token_text([tok for _, tok in pairs]) if self.token_text else [None] * len(pairs)
        return [[lp, tok, text] for (lp, tok), text in zip(pairs, texts)]


# --- one output ---------------------------------------------------------------------------------------

def output_json(out: GenerateOutput, rid: str, weight_version: str, logprobs: LogprobView = LogprobView(),
                text: str | None = None) -> dict:
    """One generation in SGLang's /generate output shape (`text` first where the server detokenizes)."""
    meta = {"id": rid, "finish_reason": finish_reason_json(out), "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "cached_tokens": 0, "weight_version": weight_version,
            "total_retractions": 0, **logprobs.meta(out)}
    if getattr(out, "e2e_latency", None) is not None:
        meta["e2e_latency"] = out.e2e_latency
    answer = {"output_ids": out.output_ids, "meta_info": meta}
    return answer if text is None else {"text": text, **answer}


def finish_reason_json(out: GenerateOutput) -> dict | None:
    if out.finish_reason is None:  # still streaming
        return None
    if out.finish_reason == "stop":
        return {"type": "stop", "matched": out.matched}
    if out.finish_reason == "abort":
        return {"type": "abort", "message": "aborted by request", "status_code": None, "err_type": None}
    return {"type": out.finish_reason, "length": out.completion_tokens}
