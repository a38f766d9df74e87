"""SGLang 0.5.8's `sampling_params`: every key it takes, checked as its `SamplingParams.verify` checks them.

Where each key takes effect here:
- the sampler (`sampling.py`): temperature, top_p, top_k, min_p, sampling_seed;
- per row in the batched sampler (`penalties.py`): frequency_penalty, presence_penalty, repetition_penalty,
  min_new_tokens, logit_bias;
- the scheduler's stop checks: max_new_tokens, stop, stop_regex, stop_token_ids, ignore_eos;
- text output only (`text_codec`, where the server has the tokenizer): skip_special_tokens,
  spaces_between_special_tokens, no_stop_trim; they are passed on to a real SGLang too;
- stream_interval: checked and kept (passed on to a real SGLang); `ascend-rl serve` streams after every token;
- custom_params: carried for a custom logit processor (the native engine has none);
- json_schema, regex, ebnf, structural_tag (structured output): checked here (strings, at most one of the first
  three); compiled and applied per row by `grammar.py` with xgrammar (`pip install ascend-rl[structured]`;
  without it, a 400 that says so).
"""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass, field, fields

# The keys every request sent before the others existed: to_dict always writes them (when not null).
BASE_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "stop_token_ids",
             "ignore_eos", "sampling_seed")
GRAMMAR_KEYS = ("json_schema", "regex", "ebnf", "structural_tag")  # structured output
_INTEGERS = ("max_new_tokens", "top_k", "n", "sampling_seed", "min_new_tokens", "stream_interval")
_NUMBERS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
_FLAGS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")
_STRING_LISTS = ("stop", "stop_regex")  # one string or a list of them

# SGLang's verify(): (whether the value is in range, the message). NaN fails every comparison, so it is out of
# range too. repetition_penalty: SGLang takes [0, 2] because it ignores the value (see penalties.py); applied, 0
# divides by zero, so it must be above 0 here.
_RANGES = {
    "top_p": (lambda v: 0 < v <= 1, "top_p must be in (0, 1], got {}."),
    "min_p": (lambda v: 0 <= v <= 1, "min_p must be in [0, 1], got {}."),
    "top_k": (lambda v: v == -1 or v >= 1, "top_k must be -1 (disable) or at least 1, got {}."),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "frequency_penalty must be in [-2, 2], got {}."),
    "presence_penalty": (lambda v: -2 <= v <= 2, "presence_penalty must be in [-2, 2], got {}."),
    "repetition_penalty": (lambda v: 0 < v <= 2, "repetition_penalty must be in (0, 2], got {}."),
    "max_new_tokens": (lambda v: v >= 0, "max_new_tokens must be at least 0, got {}."),
    "min_new_tokens": (lambda v: v >= 0, "min_new_tokens must be in [0, max_new_tokens], got {}."),
    "n": (lambda v: v >= 1, "n must be at least 1, got {}."),
    "stream_interval": (lambda v: v is None or v >= 0, "stream_interval must be at least 0, got {}."),
}


def show(value) -> str:
    return reprlib.repr(value)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0  # drop tokens below min_p × the most likely token's probability
    n: int = 1
    stop: tuple[str, ...] = ()  # strings that end a sample (needs the engine's tokenizer)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    sampling_seed: int | None = None
    # Penalties over the tokens a sample generated (not its prompt), and a bias: per row in the sampler.
    frequency_penalty: float = 0.0  # logit −= f · count
    presence_penalty: float = 0.0  # logit −= p once a token appeared
    repetition_penalty: float = 1.0  # a generated token's logit ÷ r if positive, × r if negative
    min_new_tokens: int = 0  # EOS and stop_token_ids cannot end a sample shorter than this
    logit_bias: dict[str, float] | None = field(default=None, hash=False)  # token id (a string, as JSON) → bias
    stop_regex: tuple[str, ...] = ()  # patterns whose match in the output text ends a sample
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    # Text output only (detokenization, `text_codec`): no effect on token ids.
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False  # keep the matched stop string at the end of the text
    custom_params: dict | None = field(default=None, hash=False)  # for a custom logit processor
    stream_interval: int | None = None  # tokens per stream chunk; None or 0: the server's default

    @classmethod
    def from_dict(cls, params: dict, vocab_size: int | None = None) -> SamplingParams:
        """SGLang's `sampling_params` JSON object, checked (`verify`); null means the default. A wrong type or
        value is a ValueError naming the key."""
        if not isinstance(params, dict):
            raise ValueError(f"sampling_params must be an object, got {type(params).__name__}")
        unknown = sorted(set(params) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling_params {unknown}; expected some of {', '.join(SAMPLING_KEYS)}")
        values = {k: v for k, v in params.items() if v is not None}
        if "stop_token_ids" in values:
            if not isinstance(values["stop_token_ids"], list):
                raise ValueError("stop_token_ids must be a list of token ids")
            values["stop_token_ids"] = tuple(values["stop_token_ids"])
        for key in _STRING_LISTS:
            if key in values:
                strings = values[key]
                if not isinstance(strings, (str, list)):
                    raise ValueError(f"{key} must be a string or a list of strings")
                values[key] = (strings,) if isinstance(strings, str) else tuple(strings)
        for key in _NUMBERS:  # as floats: a huge int would overflow in torch
            if type(values.get(key)) is int:
                values[key] = _as_float(key, values[key])
        if isinstance(values.get("logit_bias"), dict):
            values["logit_bias"] = {k: _as_float("logit_bias", v) if type(v) is int else v
                                    for k, v in values["logit_bias"].items()}
        return cls(**values).verify(vocab_size)

    def verify(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ValueError (SGLang's messages where it has them) for a value of the wrong type or out of range;
        with `vocab_size`, stop_token_ids and logit_bias keys must be in the vocabulary too. Returns self."""
        self._verify_types()
        for token in self.stop_token_ids:
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                raise ValueError(f"Token id {token} is out of vocabulary (vocab size: {vocab_size or 'unknown'}).")
        if self.temperature < 0 or isinstance(self.temperature, float) and not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        for key, (within, message) in _RANGES.items():
            if not within(getattr(self, key)):
                raise ValueError(message.format(show(getattr(self, key))))
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], "
                             f"got {self.min_new_tokens}.")
        # samples are seeded sampling_seed + j, j < n, as int64
        if self.sampling_seed is not None and not -2**63 <= self.sampling_seed <= 2**63 - self.n:
            raise ValueError(f"sampling_seed must fit in 64 bits (seeds sampling_seed … sampling_seed + n - 1), "
                             f"got {self.sampling_seed}.")
        for token in self.bias_by_token():
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                high = "vocab size − 1" if vocab_size is None else vocab_size - 1
                raise ValueError(f"logit_bias must have keys in [0, {high}], got {token}.")
        if sum(getattr(self, key) is not None for key in GRAMMAR_KEYS[:3]) > 1:
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")
        for pattern in self.stop_regex:
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as err:
                raise ValueError(f"stop_regex {show(pattern)} is not a regular expression: {err}") from None
        return self

    def _verify_types(self) -> None:
        for key in _INTEGERS:
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{key} must be an integer, got {show(value)}")
        for key in _NUMBERS:
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{key} must be a number, got {show(value)}")
        for key in _FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {show(getattr(self, key))}")
        for key in _STRING_LISTS:
            if not all(isinstance(s, str) for s in getattr(self, key)):
                raise ValueError(f"{key} must be a string or a list of strings")
        for token in self.stop_token_ids:
            if not isinstance(token, int) or isinstance(token, bool):
                raise ValueError(f"stop_token_ids must be integers, got {show(token)}")
        for key in GRAMMAR_KEYS:
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {show(getattr(self, key))}")
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise ValueError(f"custom_params must be an object, got {show(self.custom_params)}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be an object of token id → bias, got {show(self.logit_bias)}")
            for key, bias in self.logit_bias.items():
                if _token_id(key) is None:
                    raise ValueError(f"logit_bias keys must be token ids, got {show(key)}")
                if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
                    raise ValueError(f"logit_bias[{show(key)}] must be a finite number, got {show(bias)}")

    def bias_by_token(self) -> dict[int, float]:
        """logit_bias with integer token ids (SGLang's keys are strings, as JSON's are)."""
        return {_token_id(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def grammar_keys(self) -> list[str]:
        """The structured-output keys this request sets."""
        return [key for key in GRAMMAR_KEYS if getattr(self, key) is not None]

    def to_dict(self) -> dict:
        """SGLang's `sampling_params` JSON: the base keys (not null), and any other key away from its default,
        so that a request using none of the newer keys reads as before."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name not in BASE_KEYS and value == f.default):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value
        return out


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))


def _as_float(key: str, value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{key} must be a finite number, got {show(value)}") from None


def _token_id(key) -> int | None:
    """A logit_bias key as a token id: SGLang's int(key), so "5" and 5 (from Python) but not "5.0" or true."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    try:
        return int(key) if isinstance(key, str) else None
    except ValueError:  # not an integer, or more digits than Python converts
        return None
