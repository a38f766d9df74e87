"""What `ascend-rl serve` says about itself, in SGLang 0.5.8's shapes: /server_info (its server args with
the scheduler's numbers and `version`), /model_info, and OpenAI's /v1/models. Clients read these to learn the
model path, the tokenizer, the context length and the batch limits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ascend_rl.stack import versions

SGLANG_DEFAULT_MODEL = "default"  # SGLang's default `model` in OpenAI requests


@dataclass(frozen=True)
class ServedModel:
    """The model as served: its path, its tokenizer (None: token ids only, SGLang's --skip-tokenizer-init),
    the name OpenAI clients call it by, and the rest of the command line for /server_info."""

    model_path: str
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    skip_tokenizer_init: bool = False
    args: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model_path

    @property
    def tokenizer(self) -> str | None:
        return None if self.skip_tokenizer_init else self.tokenizer_path or self.model_path

    def answers_to(self, name: str) -> bool:
        """Whether an OpenAI request's `model` means this one: its served name, its path, or SGLang's default."""
        return name in (self.name, self.model_path, SGLANG_DEFAULT_MODEL)


def engine_numbers(engine) -> dict:
    """The engine's limits under SGLang's server-arg names (what a protocol engine lacks is null)."""
    budget = getattr(engine, "budget", None)
    context = getattr(engine, "context_length", None)
    return {
        "context_length": context,
        "max_running_requests": getattr(budget, "max_num_seqs", None),
        "max_prefill_tokens": getattr(budget, "max_num_batched_tokens", None),
        # the KV cache's token budget; null: no limit set (--mem-fraction-static)
        "max_total_num_tokens": getattr(budget, "kv_cache_tokens", None),
        "max_req_input_len": None if context is None else context - 1,
        "device": str(getattr(engine, "device", "")) or None,
    }


def server_info(model: ServedModel, engine, weight_version: str, version: str) -> dict:
    """SGLang's /server_info: server args, scheduler info, internal states, version. The API key is never
    shown."""
    return {
        **{key: value for key, value in model.args.items() if key not in ("api_key", "api_key_file")},
        "model_path": model.model_path, "tokenizer_path": model.tokenizer_path or model.model_path,
        "tokenizer_mode": "auto", "skip_tokenizer_init": model.skip_tokenizer_init,
        "served_model_name": model.name, "is_embedding": False, "disable_radix_cache": True,  # no prefix cache
        "stream_output": False, "weight_version": weight_version, **engine_numbers(engine),
        "internal_states": [{}], "version": version,
    }


def model_info(model: ServedModel, engine, weight_version: str) -> dict:
    config = getattr(getattr(engine, "model", None), "config", None)
    return {"model_path": model.model_path, "tokenizer_path": model.tokenizer_path or model.model_path,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": weight_version,
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": getattr(config, "model_type", None), "architectures": getattr(config, "architectures", None)}


def models_list(model: ServedModel, engine) -> dict:
    """OpenAI's model list: the one model, under its served name."""
    card = {"id": model.name, "object": "model", "created": int(time.time()), "owned_by": "ascend-rl",
            "root": model.name, "parent": None, "max_model_len": getattr(engine, "context_length", None)}
    return {"object": "list", "data": [card]}


def sglang_version() -> str:
    """The SGLang release whose API this server answers (versions.toml)."""
    return versions()["minimum"]["sglang"]
