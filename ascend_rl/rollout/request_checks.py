"""The checks on `ascend-rl serve`'s request bodies, apart from HTTP and the engine: each field's type and
range, with a one-line message that names the field (SGLang's message where SGLang has one).

A check raises ValueError, which the server answers with 400, or ApiError for another status. Messages show
client values through `reprlib`, so a huge or deeply nested value cannot blow up the answer."""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import torch

from ascend_rl.rollout.protocol import SamplingParams

MEMORY_TAGS = ("weights", "kv_cache")  # SGLang's
GROUP_BACKENDS = ("gloo", "nccl", "hccl")
DEFAULT_GROUP = "weight_update_group"
# update_weights_from_distributed allocates tensors of these: a name, never getattr(torch, <client string>)
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-]*|\[[0-9A-Fa-f:.]+\]")  # a name, IPv4, or [IPv6]: nothing for a URL


class ApiError(Exception):
    """A 4xx/5xx answer; `param` and `code` fill OpenAI's error fields (the field at fault, a code name)."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for: beyond the body size 413, beyond the rest 400."""

    max_body_bytes: int = 64 << 20
    max_samples: int = 65536  # prompts × n
    max_tokens: int = 1 << 27  # prompt + max_new_tokens, summed over the samples


def show(value) -> str:
    return reprlib.repr(value)


def json_object(raw: bytes) -> dict:
    """The body: a JSON object (no body: an empty one)."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ValueError("request body is not JSON this server reads: nested too deeply") from None
    except ValueError as err:  # not JSON, not UTF-8, an integer of thousands of digits
        raise ValueError(f"request body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


# --- fields: null or absent means the default ------------------------------------------------------------

def flag(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {show(value)}")
    return value


def text(body: dict, key: str, default: str | None = None, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise ValueError(f"{key} is required")
        return default
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {show(value)}")
    return value


def integer(body: dict, key: str, low: int, high: int | None = None) -> int:
    """A required integer in [low, high]."""
    value = body.get(key)
    if value is None:
        raise ValueError(f"{key} is required")
    if type(value) is not int or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise ValueError(f"{key} must be an integer {bounds}, got {show(value)}")
    return value


def choice(body: dict, key: str, choices: tuple[str, ...], default: str) -> str:
    value = text(body, key, default)
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {show(value)}")
    return value


def request_ids(body: dict) -> str | list[str] | None:
    value = body.get("rid")
    if value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(r, str) for r in value)):
        return value
    raise ValueError(f"rid must be a string or a list of strings, got {show(value)}")


def memory_tags(body: dict) -> list[str] | None:
    tags = body.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) and t in MEMORY_TAGS
                                                                for t in tags)):
        raise ValueError(f"tags must be a list of memory tags ({', '.join(MEMORY_TAGS)}), got {show(tags)}")
    return tags


def group_name(body: dict) -> str:
    name = text(body, "group_name", DEFAULT_GROUP)
    if not name:
        raise ValueError("group_name must not be empty")
    return name


def after_update(body: dict) -> tuple[str | None, bool]:
    """What every weight update ends with: the new version label (None: keep), and whether to flush the cache.
    Checked before the update, so a bad field does not leave new weights behind a 400."""
    return text(body, "weight_version"), flag(body, "flush_cache", True)


# --- /generate ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateRequest:
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per prompt
    single: bool  # one prompt, not a list of them: one answer, not a list
    rids: list[str] | None  # one per prompt
    return_logprob: bool
    stream: bool
    # SGLang's log-prob fields (each one value or one per prompt), with return_logprob; the engine checks ranges
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    token_ids_logprob: list | None = None
    return_text_in_logprobs: bool = False


def generate_request(body: dict, vocab_size: int | None, limits: Limits, tokenize=None) -> GenerateRequest:
    """`tokenize` (text → ids): the server's tokenizer; None: token ids only (--skip-tokenizer-init)."""
    _no_custom_logit_processor(body.get("custom_logit_processor"))
    prompts, single = _inputs(body, vocab_size, tokenize)
    raw = body.get("sampling_params")
    raw_list = raw if isinstance(raw, list) else [raw] * len(prompts)
    if len(raw_list) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(raw_list)} sampling_params")
    params = [SamplingParams.from_dict({} if p is None else p, vocab_size) for p in raw_list]
    rid = request_ids(body)
    rids = None if rid is None else [rid] * len(prompts) if isinstance(rid, str) else rid
    if rids is not None and len(rids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(rids)} rids")
    check_size(prompts, params, limits)
    return GenerateRequest(prompts, params, single, rids, flag(body, "return_logprob"), flag(body, "stream"),
                           _per_prompt_int(body, "logprob_start_len", -1), _per_prompt_int(body, "top_logprobs_num", 0),
                           _token_ids_logprob(body), flag(body, "return_text_in_logprobs"))


def _per_prompt_int(body: dict, key: str, default: int) -> int | list[int]:
    value = body.get(key)
    if value is None:
        return default
    if type(value) is int or (isinstance(value, list) and value and all(type(v) is int for v in value)):
        return value
    raise ValueError(f"{key} must be an integer or a list of integers (one per prompt), got {show(value)}")


def _token_ids_logprob(body: dict) -> list | None:
    """Token ids for every prompt, or one list (or null) per prompt."""
    value = body.get("token_ids_logprob")
    if value is None or (isinstance(value, list) and all(
            type(v) is int or v is None or (isinstance(v, list) and all(type(t) is int for t in v)) for v in value)):
        return value
    raise ValueError(f"token_ids_logprob must be a list of token ids, or one such list per prompt, got {show(value)}")


def check_size(prompts: list[list[int]], params: list[SamplingParams], limits: Limits) -> None:
    """The request's samples and tokens within the server's limits."""
    samples = sum(p.n for p in params)
    if samples > limits.max_samples:
        raise ValueError(f"{samples} samples (prompts × n) in one request: this server takes at most "
                         f"{limits.max_samples} (--max-request-samples)")
    tokens = sum((len(ids) + p.max_new_tokens) * p.n for ids, p in zip(prompts, params))
    if tokens > limits.max_tokens:
        raise ValueError(f"{tokens} tokens (prompt + max_new_tokens, every sample) in one request: this server takes "
                         f"at most {limits.max_tokens} (--max-request-tokens)")


def _inputs(body: dict, vocab_size: int | None, tokenize) -> tuple[list[list[int]], bool]:
    """The prompts as token ids: `input_ids`, or `text` (a string or a list of them) through the tokenizer."""
    text = body.get("text")
    if text is None:
        return token_prompts(body.get("input_ids"), vocab_size)
    if body.get("input_ids") is not None:
        raise ValueError("send text or input_ids, not both")
    if tokenize is None:
        raise ValueError("this server runs token-in/token-out (--skip-tokenizer-init): send input_ids, not text")
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"text must be a string or a non-empty list of strings, got {show(text)}")
    prompts = [tokenize(t) for t in texts]
    if not all(prompts):
        raise ValueError(f"text {show(texts[prompts.index([])])} has no tokens: a prompt needs at least one")
    return token_prompts(prompts, vocab_size)[0], isinstance(text, str)


def _no_custom_logit_processor(processor) -> None:
    """SGLang runs a request's serialized logit processor (one, or one per prompt) only when started with
    --enable-custom-logit-processor; this server has none to run. custom_params alone is fine (carried)."""
    given = processor if isinstance(processor, list) else [processor]
    if any(given):
        raise ValueError("custom_logit_processor: this server runs no custom logit processors (SGLang's "
                         "--enable-custom-logit-processor); send sampling_params.custom_params without one")


def token_prompts(ids, vocab_size: int | None) -> tuple[list[list[int]], bool]:
    """input_ids: one prompt (token ids) or a list of prompts; each non-empty, each id in the vocabulary."""
    single = isinstance(ids, list) and bool(ids) and type(ids[0]) is int
    prompts = [ids] if single else ids
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, list) and p for p in prompts):
        raise ValueError("input_ids must be a non-empty list of token ids or of such lists")
    for prompt in prompts:
        if set(map(type, prompt)) != {int}:  # exact types: true/false are no token ids
            bad = next(t for t in prompt if type(t) is not int)
            raise ValueError(f"input_ids must be token ids (integers), got {show(bad)}")
        low, high = min(prompt), max(prompt)
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            raise ValueError(f"Token id {low if low < 0 else high} is out of vocabulary "
                             f"(vocab size: {vocab_size or 'unknown'}).")
    return prompts, single


# --- weights --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupJoin:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str


def group_join(body: dict) -> GroupJoin:
    """/init_weights_update_group: rank 0 is the trainer's, so this server's rank is 1 … world_size − 1."""
    address = text(body, "master_address", required=True)
    if not _HOST.fullmatch(address):
        raise ValueError(f"master_address must be a host name or an IP address, got {show(address)}")
    port = integer(body, "master_port", 1, 65535)
    world_size = integer(body, "world_size", 2)
    rank = integer(body, "rank_offset", 1, world_size - 1)
    return GroupJoin(address, port, rank, world_size, group_name(body), choice(body, "backend", GROUP_BACKENDS, "gloo"))


def weight_bucket(body: dict, shapes: dict[str, list[int]]) -> list[tuple[str, torch.dtype, list[int]]]:
    """/update_weights_from_distributed: (name, dtype, shape) of each tensor the trainer broadcasts; each must be
    one of the model's parameters, with its shape."""
    names, dtypes, sizes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(sizes, list)
            and len(names) == len(dtypes) == len(sizes)):
        raise ValueError("names, dtypes and shapes must be lists of the same length")
    bucket = []
    for name, dtype, size in zip(names, dtypes, sizes):
        if not isinstance(name, str) or name not in shapes:
            raise ValueError(f"names: the model has no parameter {show(name)}")
        if not isinstance(dtype, str) or dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtypes: {show(dtype)} for {name}: expected one of {', '.join(WEIGHT_DTYPES)}")
        if not isinstance(size, list) or any(type(d) is not int for d in size) or size != shapes[name]:
            raise ValueError(f"shapes: {show(size)} for {name}: the model's is {shapes[name]}")
        bucket.append((name, WEIGHT_DTYPES[dtype], shapes[name]))
    return bucket


def weights_dir(body: dict, roots: list[Path]) -> Path:
    """/update_weights_from_disk's model_path, resolved (links followed): it must lie under a weights root."""
    given = text(body, "model_path")
    if not given:
        raise ValueError("model_path is required")
    path = Path(given).resolve()
    if not within(path, roots):
        raise ApiError(HTTPStatus.FORBIDDEN, f"model_path {str(path)!r} is outside this server's weights roots "
                                             f"(--weights-root): {', '.join(map(str, roots))}")
    return path


def within(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def check_shapes(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    """Every tensor to load has its parameter's shape: checked before any is copied in."""
    for name, tensor in tensors.items():
        if list(tensor.shape) != shapes[name]:
            raise ValueError(f"{name}: shape {list(tensor.shape)} where the model has {shapes[name]}")


def check_floating(tensors: dict[str, torch.Tensor]) -> None:
    """A weight pushed as a tensor is floating point: the engine casts it to its parameter's dtype, and an
    integer, boolean or complex tensor cast to a weight is a sender's mistake, not new weights."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: dtype {str(tensor.dtype).removeprefix('torch.')}, a weight must be a "
                             f"floating-point tensor")
