"""The rollout protocol over HTTP with SGLang's endpoints: one client for a real SGLang server
(`--skip-tokenizer-init`) and for `ascend-rl serve`.

Connection errors and 5xx answers are retried with exponential backoff; 4xx answers are the caller's
mistake and raise at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence

from ascend_rl.rollout.protocol import GenerateOutput, SamplingParams, expand_samples


class HttpEngineError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def parse_output(item: dict) -> GenerateOutput:
    meta = item["meta_info"]
    finish = meta.get("finish_reason") or {}
    logprobs = [entry[0] for entry in meta.get("output_token_logprobs") or []]
    return GenerateOutput(list(item["output_ids"]), finish.get("type", "abort"), meta.get("prompt_tokens", 0), logprobs,
                          finish.get("matched"))


class HttpEngine:
    def __init__(self, url: str, timeout_s: float = 60.0, max_attempts: int = 3, retry_delay_s: float = 2.0,
                 tp_size: int = 1, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.tp_size = tp_size
        self.timeout_s, self.max_attempts, self.retry_delay_s = timeout_s, max_attempts, retry_delay_s

    # --- transport ------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        last_error: Exception | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.retry_delay_s * 2 ** (attempt - 1))
            req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=self.headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                    kind = resp.headers.get("Content-Type", "")
                    return json.loads(raw) if "json" in kind and raw else raw.decode()
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code < 500:
                    raise HttpEngineError(f"{method} {path}: {err.code} {message}", err.code) from None
                last_error = HttpEngineError(f"{method} {path}: {err.code} {message}", err.code)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
                last_error = err
        raise HttpEngineError(f"{method} {self.url}{path}: no answer after {self.max_attempts} attempt(s): "
                              f"{last_error}") from None

    def wait_until_healthy(self, timeout_s: float = 300.0, poll_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                probe_health(self.url, poll_s * 5)
                return
            except HttpEngineError as err:
                if time.monotonic() > deadline:
                    raise HttpEngineError(f"{self.url} not healthy after {timeout_s:.0f} s: {err}") from None
                time.sleep(poll_s)

    # --- the protocol ---------------------------------------------------------------------------------

    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: SamplingParams | Sequence[SamplingParams],
                 return_logprob: bool = False) -> list[GenerateOutput]:
        # One request per sample with its own seed: SGLang's n > 1 would give a group one seed.
        prompts, params = expand_samples(input_ids, sampling_params)
        body = {"input_ids": prompts, "sampling_params": [p.to_dict() for p in params],
                "return_logprob": return_logprob}
        answer = self.request("POST", "/generate", body)
        return [parse_output(item) for item in (answer if isinstance(answer, list) else [answer])]

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        self.request("POST", "/update_weights_from_disk", {"model_path": model_path, "weight_version": weight_version})

    def update_weights_from_tensor(self, named_tensors: Iterable) -> None:
        """For SGLang on this node: the tensors (on the device) travel as IPC handles, one payload per TP rank;
        the cache is flushed once after the last bucket."""
        payload = serialize_for_sglang(list(named_tensors))
        self.request("POST", "/update_weights_from_tensor",
                     {"serialized_named_tensors": [payload] * self.tp_size, "flush_cache": False})

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> None:
        _check_success(self.request("POST", "/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend}), "init_weights_update_group")

    def update_weights_from_distributed(self, meta: dict, group_name: str) -> None:
        """meta: names, dtypes, shapes of one bucket, which rank 0 broadcasts in that order."""
        _check_success(self.request("POST", "/update_weights_from_distributed",
                                    {**meta, "group_name": group_name, "flush_cache": False}),
                       "update_weights_from_distributed")

    def destroy_weights_update_group(self, group_name: str) -> None:
        self.request("POST", "/destroy_weights_update_group", {"group_name": group_name})

    def abort_request(self, rid: str | None = None, abort_all: bool = False) -> None:
        self.request("POST", "/abort_request", {"rid": rid or "", "abort_all": abort_all})

    def pause_generation(self, mode: str = "abort") -> None:
        self.request("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self.request("POST", "/continue_generation", {})

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self.request("POST", "/release_memory_occupation", {"tags": list(tags)} if tags else {})

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self.request("POST", "/resume_memory_occupation", {"tags": list(tags)} if tags else {})

    def flush_cache(self) -> None:
        self.request("POST", "/flush_cache", {})

    def model_info(self) -> dict:
        return self.request("GET", "/model_info")


def _check_success(answer, what: str) -> None:
    if isinstance(answer, dict) and answer.get("success") is False:
        raise HttpEngineError(f"{what}: {answer.get('message', 'failed')}")


def probe_health(url: str, timeout_s: float) -> None:
    HttpEngine(url, timeout_s=timeout_s, max_attempts=1).request("GET", "/health")


def serialize_for_sglang(named_tensors: list) -> str:
    """SGLang's own serializer (device IPC handles, base64): only SGLang can read it back."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize(named_tensors, output_str=True)


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(err.read())
    except (ValueError, OSError):
        return err.reason or ""
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    return error.get("message", str(error)) if isinstance(error, dict) else str(error)
