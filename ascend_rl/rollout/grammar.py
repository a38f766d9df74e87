"""Structured output for the native engine (sampling_params json_schema, regex, ebnf, structural_tag), with
xgrammar as SGLang 0.5.8's default grammar backend (srt/constrained/xgrammar_backend.py) uses it.

- A request's constraint is compiled when it is submitted, in the caller's thread (a bad one is a ValueError
  naming the key, so a 400, and nothing is queued). Compiled grammars are kept in a bounded LRU by (key, text),
  so the n samples of a prompt, and repeated requests, compile once. Each sample gets its own GrammarMatcher.
- The running batch keeps one matcher or None per row (`joined` / `select`, as `penalties` keeps its tables).
  Each decode step fills a token bitmask for the rows that have a matcher (xgrammar's call per row) and applies
  it to those rows' logits in one call (`constrain`), after penalties and logit bias and before sampling; rows
  without a matcher are not touched, so they come out as they would alone.
- After sampling, each matcher accepts its row's token (`advance`). A matcher terminates when it accepts a stop
  token (the model's EOS ids, which the grammar allows once it is complete); the row then ends with finish
  reason stop and `matched` that token id, SGLang's FINISH_MATCHED_TOKEN(matched=output_ids[-1]). Under
  ignore_eos SGLang lets such a row draw one more unconstrained token before it ends; here it ends at the stop
  token. A row left with nothing to sample (e.g. min_new_tokens holding off the EOS that a complete grammar
  requires), or whose token the matcher rejects, ends with abort, as SGLang aborts a request whose token its
  grammar rejects.

xgrammar is optional (`pip install ascend-rl[structured]`) and imported only here, when a request needs it.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch

INSTALL_HINT = "pip install ascend-rl[structured]"
CACHE_SIZE = 128  # compiled grammars kept (a large JSON schema's can take megabytes)
ANY_JSON = "$$ANY$$"  # SGLang's json_schema for "any JSON value" (its builtin JSON grammar)
_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")  # xgrammar's "[12:00:00] /project/cpp/x.cc:94: " on errors


def _xgrammar(key: str):
    """The xgrammar module, or the ValueError (a 400) that says how to get it."""
    try:
        import xgrammar
    except ImportError:
        raise ValueError(f"{key}: structured output is not available in this build: it needs xgrammar "
                         f"({INSTALL_HINT})") from None
    return xgrammar


class Grammars:
    """Compiles the constraints of one engine's requests against its tokenizer (built on first use, so an engine
    that never sees a structured request never pays for xgrammar's token table)."""

    def __init__(self, tokenizer, vocab_size: int | None, stop_ids: Iterable[int], cache_size: int = CACHE_SIZE):
        """`tokenizer`: a transformers tokenizer, or None (then every structured request is refused, saying why);
        `vocab_size`: the width of the model's logits; `stop_ids`: the model's EOS ids, the tokens that end a
        grammar (SGLang passes the model's EOS ids too)."""
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(set(stop_ids))
        self.cache_size = cache_size
        self._compiler = None
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, params):
        """A fresh GrammarMatcher for the constraint in `params` (a SamplingParams that sets one)."""
        key = params.grammar_keys()[0]  # SGLang's order too: json_schema, regex, ebnf, then structural_tag
        xgr = _xgrammar(key)
        return xgr.GrammarMatcher(self.compiled(key, getattr(params, key)))

    def compiled(self, key: str, text: str):
        """The CompiledGrammar of `text` under `key`, from the LRU or compiled now; ValueError naming the key."""
        with self._lock:
            hit = self._cache.get((key, text))
            if hit is not None:
                self._cache.move_to_end((key, text))
                return hit
        grammar = self._compile(key, text)  # outside the lock: xgrammar's compiler is thread-safe
        with self._lock:
            self._cache[(key, text)] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, key: str, text: str):
        xgr, compiler = _xgrammar(key), self._compiler_for(key)
        try:
            if key == "json_schema":
                if text == ANY_JSON:
                    return compiler.compile_builtin_json_grammar()
                return compiler.compile_json_schema(text, any_whitespace=True)  # SGLang's default
            if key == "regex":
                return compiler.compile_regex(text)
            if key == "ebnf":
                return compiler.compile_grammar(text)
            return _compile_structural_tag(xgr, compiler, text)
        except (RuntimeError, ValueError, TypeError, KeyError, UnicodeError) as err:
            raise ValueError(f"{key} does not compile: {_message(err)}") from None

    def _compiler_for(self, key: str):
        xgr = _xgrammar(key)
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError(f"{key}: structured output needs the model's tokenizer (the grammar is matched "
                                     f"against its tokens), and this engine has none")
                try:
                    info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                              stop_token_ids=self.stop_ids or None)
                except Exception as err:  # xgrammar cannot read this tokenizer: SGLang disables grammars then
                    raise ValueError(f"{key}: structured output is not available for this model: xgrammar cannot "
                                     f"read its tokenizer ({_message(err)})") from None
                # our own LRU bounds what is kept; xgrammar's cache would keep every grammar ever compiled
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            return self._compiler


def _compile_structural_tag(xgr, compiler, text: str):
    """SGLang's two forms: legacy {"structures": [{begin, schema, end}], "triggers"} and xgrammar's
    {"format": {...}}, where a json_schema format without its schema means any JSON object ({})."""
    tag = json.loads(text)
    if not isinstance(tag, dict):
        raise ValueError("expected a JSON object")
    if tag.get("structures") is not None:
        if tag.get("triggers") is None:
            raise ValueError("a structural tag with structures needs triggers")
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema") or {}), end=s["end"])
                 for s in tag["structures"]]
        return compiler.compile_structural_tag(items, tag["triggers"])
    if not isinstance(tag.get("format"), dict):
        raise ValueError("a structural tag needs a format object (or legacy structures and triggers)")
    _fill_missing_schemas(tag["format"])
    return compiler.compile_structural_tag(json.dumps(tag))


def _fill_missing_schemas(fmt) -> None:
    """SGLang's _sanitize_structural_format: a json_schema (or qwen_xml_parameter) format without one gets {}."""
    if not isinstance(fmt, dict):
        return
    if fmt.get("type") in ("json_schema", "qwen_xml_parameter") and fmt.get("json_schema") is None:
        fmt["json_schema"] = {}
    children = {"tag": [fmt.get("content")], "sequence": fmt.get("elements"), "or": fmt.get("elements"),
                "triggered_tags": fmt.get("tags"), "tags_with_separator": fmt.get("tags")}.get(fmt.get("type"))
    for child in children or ():
        _fill_missing_schemas(child)


def _message(err: BaseException) -> str:
    text = str(err).strip()
    return _LOG_PREFIX.sub("", text) or type(err).__name__


# --- the state of a batch: one matcher or None per row ----------------------------------------------------

Matchers = list  # [R] GrammarMatcher | None; a batch without any constrained row keeps None instead


def joined(kept: Matchers | None, kept_rows: int, new: list) -> Matchers | None:
    """The matchers of `kept_rows` running rows followed by the joining rows' (None where unconstrained)."""
    rows = (kept or [None] * kept_rows) + list(new)
    return rows if any(m is not None for m in rows) else None


def select(state: Matchers | None, rows: torch.Tensor) -> Matchers | None:
    """The matchers of these rows (the scheduler dropping finished ones)."""
    if state is None:
        return None
    return joined(None, 0, [state[r] for r in rows.tolist()])


def constrain(logits: torch.Tensor, state: Matchers, rows: torch.Tensor) -> torch.Tensor:
    """Masks, in place, the logits ([r, V], one per row in `rows`) of the constrained rows to the tokens their
    grammar allows next; returns `logits`. Unconstrained rows are left as they are (not rewritten)."""
    matchers = [state[r] for r in rows.tolist()]
    local = [i for i, m in enumerate(matchers) if m is not None]
    if not local:
        return logits
    xgr = _xgrammar("structured output")
    bitmask = xgr.allocate_token_bitmask(len(matchers), logits.shape[-1])  # all allowed; int32 on the CPU
    for i in local:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    if logits.device.type == "cpu":  # xgrammar's C++ kernel (its CPU path in every version)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=local)
    else:  # plain torch ops: xgrammar would JIT a Triton kernel (CUDA) or use torch.compile (other devices)
        apply_bitmask_torch(logits, bitmask, local)
    return logits


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, local: list[int]) -> None:
    """xgrammar's apply_token_bitmask_inplace for rows `local`, in tensor ops on the logits' device: bit j of
    int32 word w of a row's bitmask allows token 32·w + j (xgrammar's layout)."""
    device, vocab = logits.device, logits.shape[-1]
    words = bitmask[local].to(device)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((words[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()
    on_device = torch.tensor(local, device=device)
    logits[on_device] = logits[on_device].masked_fill(~allowed, float("-inf"))


def advance(state: Matchers, rows: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor
            ) -> tuple[list[tuple[int, int]], list[int]]:
    """Each constrained row in `rows` accepts its new token (`logprobs`: theirs, as sampled). Returns the rows
    whose grammar is now complete (with the token that completed it) and the rows that could not go on: the
    grammar rejected the token, or nothing was left to sample (every allowed token at -inf, so a NaN log-prob;
    e.g. min_new_tokens holding off the EOS a complete grammar requires)."""
    done, rejected = [], []
    for row, token, logprob in zip(rows.tolist(), tokens.tolist(), logprobs.tolist()):
        matcher = state[row]
        if matcher is None:
            continue
        if not math.isfinite(logprob) or not matcher.accept_token(token):
            rejected.append(row)
        elif matcher.is_terminated():
            done.append((row, token))
    return done, rejected
