"""The checks on OpenAI-style bodies (/v1/completions, /v1/chat/completions), apart from HTTP and the engine.

Every field a body may carry has a reader in a table (`COMPLETION_FIELDS`, `CHAT_FIELDS`): OpenAI's fields that
this server honours, SGLang's extensions to them (under SGLang's names, as its OpenAI server reads them), and
the fields it cannot honour, whose readers refuse any value but the default. A field outside the tables is
refused too: a 400 that names the field, never a request served as if the field were not there. `null` is the
default everywhere."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ascend_rl.rollout.request_checks import show
from ascend_rl.rollout.sampling_params import GRAMMAR_KEYS, SamplingParams

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


class FieldError(ValueError):
    """A 400 about one field of the body (OpenAI's error `param`)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class Draft:
    """What the readers gather from one body."""

    vocab_size: int | None
    sampling: dict = field(default_factory=dict)  # SGLang's sampling_params
    fields: dict = field(default_factory=dict)  # the rest, by name: model, prompt, messages, stream, ...


# --- value checks --------------------------------------------------------------------------------------

def _integer(name: str, value, low: int, high: int | None = None) -> int:
    if type(value) is not int or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise FieldError(name, f"{name} must be an integer {bounds}, got {show(value)}")
    return value


def _boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise FieldError(name, f"{name} must be true or false, got {show(value)}")
    return value


def _string(name: str, value) -> str:
    if not isinstance(value, str):
        raise FieldError(name, f"{name} must be a string, got {show(value)}")
    return value


def _object(name: str, value) -> dict:
    if not isinstance(value, dict):
        raise FieldError(name, f"{name} must be an object, got {show(value)}")
    return value


# --- readers: (draft, field name, value) -------------------------------------------------------------------

def keep(check=None):
    """A field kept as it is (checked by `check(name, value)`), for the endpoint to read."""
    def read(draft: Draft, name: str, value) -> None:
        draft.fields[name] = check(name, value) if check else value
    return read


def sampling(key: str | None = None, check=None):
    """A sampling parameter under SGLang's name `key` (default: the field's own). A field of another name is
    checked here (`check`), so that the message names the field the client sent; one of the same name is
    checked as SGLang checks it, alone, before the whole set is checked together."""
    def read(draft: Draft, name: str, value) -> None:
        if check:
            check(name, value)
        else:
            try:
                SamplingParams.from_dict({name: value}, draft.vocab_size)
            except ValueError as err:
                raise FieldError(name, str(err)) from None
        draft.sampling[key or name] = value
    return read


def refused(reason: str, allowed=lambda value: False):
    """A field this server cannot honour: any value but a default (`allowed`) is a 400 that says why."""
    def read(draft: Draft, name: str, value) -> None:
        if not allowed(value):
            raise FieldError(name, f"{name}: {reason}")
    return read


def _identifier(name: str, value) -> str:
    """End-user and cache-routing identifiers: honoured by there being nothing to do with them (no logs kept
    per user, no prompt cache)."""
    return _string(name, value)


def _stream_options(name: str, value) -> dict:
    options = _object(name, value)
    unknown = sorted(set(options) - {"include_usage", "continuous_usage_stats"})
    if unknown:
        raise FieldError(name, f"stream_options: unknown keys {unknown}; this server reads include_usage")
    if options.get("continuous_usage_stats"):
        raise FieldError(name, "stream_options.continuous_usage_stats: usage comes only in the last chunk here")
    return {"include_usage": _boolean("stream_options.include_usage", options.get("include_usage") or False)}


def _rid(name: str, value):
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(r, str) for r in value)):
        return value
    raise FieldError(name, f"rid must be a string or a list of strings, got {show(value)}")


def _positive(name: str, value) -> int:
    return _integer(name, value, 1)


def _seed(name: str, value) -> int:
    return _integer(name, value, -2**63, 2**63 - 1)


def _at_least_zero(name: str, value) -> int:
    return _integer(name, value, 0)


def _top_logprobs(name: str, value) -> int:
    return _integer(name, value, 0, MAX_TOP_LOGPROBS)


RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")


def _response_format(draft: Draft, name: str, value) -> None:
    """SGLang's mapping (CompletionRequest and ChatCompletionRequest.to_sampling_params): json_object → json_schema
    {"type": "object"}; json_schema → its schema, as JSON text; structural_tag → the whole object, as JSON text;
    text → nothing. Kept aside until every field is read (`read_fields`)."""
    fmt = _object(name, value)
    kind = fmt.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        draft.fields[name] = ("json_schema", '{"type": "object"}')
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if spec is None and isinstance(fmt.get("schema"), dict):  # SGLang's set_json_schema: a bare schema
            spec = {"name": fmt["schema"].get("title", "Schema"), "schema": fmt["schema"]}
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise FieldError(name, f"response_format.json_schema must be an object with a name and a schema, got "
                                   f"{show(spec)}")
        if not isinstance(spec.get("schema"), dict):
            raise FieldError(name, "response_format.json_schema.schema is required for a json_schema response "
                                   f"format and must be an object, got {show(spec.get('schema'))}")
        draft.fields[name] = ("json_schema", json.dumps(spec["schema"]))
    elif kind == "structural_tag":
        draft.fields[name] = ("structural_tag", json.dumps(fmt))
    else:
        raise FieldError(name, f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}, got {show(kind)}")


def _messages(name: str, value) -> list:
    if not isinstance(value, list) or not value:
        raise FieldError(name, "messages must be a non-empty list of messages")
    return [_message(i, m) for i, m in enumerate(value)]


ROLES = ("system", "developer", "user", "assistant")


def _message(i: int, message) -> dict:
    """One message as the chat template reads it: a role and text content (a list of text parts is joined)."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise FieldError("messages", f"{where} must be an object with role and content, got {show(message)}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise FieldError("messages", f"{where}.role must be one of {', '.join(ROLES)} (this server calls no tools), "
                                     f"got {show(role)}")
    unknown = sorted(set(message) - {"role", "content", "name"} - {k for k, v in message.items() if v is None})
    if unknown:
        raise FieldError("messages", f"{where}: {', '.join(unknown)} not available here (no tools, text only)")
    if isinstance(content, list):
        content = "".join(_text_part(where, part) for part in content)
    if not isinstance(content, str):
        raise FieldError("messages", f"{where}.content must be a string or a list of text parts, got {show(content)}")
    return {"role": role, "content": content, **({"name": message["name"]} if message.get("name") else {})}


def _text_part(where: str, part) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else None
    raise FieldError("messages", f"{where}.content: parts must be text parts ({{'type': 'text', 'text': ...}}); "
                                 f"this server reads text only, got {show(kind or part)}")


# --- the tables ------------------------------------------------------------------------------------------

NO_TOOLS = "this server calls no tools (no tool-call parser)"
COMMON_FIELDS = {
    "model": keep(_string),
    "stream": keep(_boolean),
    "stream_options": keep(_stream_options),
    "n": sampling(), "temperature": sampling(), "top_p": sampling(), "stop": sampling(),
    "presence_penalty": sampling(), "frequency_penalty": sampling(), "logit_bias": sampling(),
    "seed": sampling("sampling_seed", _seed),
    "user": keep(_identifier),
    # SGLang's extensions (the OpenAI client's extra_body), as SGLang's OpenAI server reads them
    "top_k": sampling(), "min_p": sampling(), "repetition_penalty": sampling(), "stop_token_ids": sampling(),
    "stop_regex": sampling(), "no_stop_trim": sampling(), "ignore_eos": sampling(), "skip_special_tokens": sampling(),
    "regex": sampling(), "json_schema": sampling(), "ebnf": sampling(), "custom_params": sampling(),
    "response_format": _response_format,
    "min_tokens": sampling("min_new_tokens", _at_least_zero),
    "rid": keep(_rid),
}
COMPLETION_FIELDS = {
    **COMMON_FIELDS,
    "prompt": keep(),
    "max_tokens": sampling("max_new_tokens", _positive),
    "logprobs": keep(_top_logprobs),
    "echo": keep(_boolean),
    "best_of": keep(_positive),  # must equal n: checked with n
    "suffix": refused("inserting text before a suffix is not available (no fill-in-the-middle template)"),
}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "messages": keep(_messages),
    "max_tokens": sampling("max_new_tokens", _positive),
    "max_completion_tokens": keep(_positive),  # one limit with max_tokens: checked together
    "logprobs": keep(_boolean),
    "top_logprobs": keep(_top_logprobs),
    "chat_template_kwargs": keep(_object),
    "tools": refused(NO_TOOLS, lambda v: v == []),
    "tool_choice": refused(NO_TOOLS, lambda v: v == "none"),
    "parallel_tool_calls": refused(NO_TOOLS, lambda v: isinstance(v, bool)),  # means nothing without tools
    "functions": refused(NO_TOOLS, lambda v: v == []),
    "function_call": refused(NO_TOOLS, lambda v: v == "none"),
    "modalities": refused("this server answers text only", lambda v: v == ["text"]),
    "audio": refused("this server answers text only"),
    "prediction": refused("predicted outputs are not available in this build"),
    "reasoning_effort": refused("this model has no reasoning-effort setting"),
    "verbosity": refused("this model has no verbosity setting"),
    "web_search_options": refused("this server has no web search"),
    "store": refused("this server stores no completions", lambda v: v is False),
    "metadata": keep(_object),  # tags for stored completions; nothing is stored
    "service_tier": refused("this server has one tier: auto or default", lambda v: v in ("auto", "default")),
    "safety_identifier": keep(_identifier),
    "prompt_cache_key": keep(_identifier),
    "moderation": refused("this server runs no moderation"),
    "continue_final_message": refused("continuing the last assistant message is not available in this build",
                                      lambda v: v is False),
}


def read_fields(body: dict, table: dict, endpoint: str, vocab_size: int | None) -> Draft:
    """Run each field through its reader; a field outside the table is a 400 naming it."""
    draft = Draft(vocab_size)
    for name, value in body.items():
        reader = table.get(name)
        if reader is None:
            raise FieldError(name, f"unknown field {name!r}: not one that {endpoint} reads (OpenAI's fields and "
                                   f"SGLang's extensions)")
        if value is not None:
            reader(draft, name, value)
    constraint = draft.fields.pop("response_format", None)
    if constraint is not None:
        given = [key for key in GRAMMAR_KEYS if key in draft.sampling]
        if given:  # SGLang lets response_format override json_schema and refuses it with regex or ebnf
            raise FieldError("response_format", f"response_format and {given[0]} both constrain the output: "
                                                f"send one")
        draft.sampling[constraint[0]] = constraint[1]
    return draft
