"""An SGLang-compatible HTTP server for any engine of the protocol (`ascend-rl serve`).

Endpoint names and JSON shapes are SGLang's, so SGLang's own clients, verl's HTTP adapter and our
`http_client.HttpEngine` talk to a real SGLang server and to this one. With the model's tokenizer (SGLang's
default) /generate takes `text` and answers with `text` too, and the OpenAI API is served (`openai_api`); with
--skip-tokenizer-init it is token in, token out (the mode RL uses). Served by FastAPI on uvicorn, as SGLang is:
each request runs the engine call in a worker thread, so concurrent requests join one running batch (the
engine's continuous batching), and abort/pause reach it while it decodes. Weight and memory calls run one at a
time; a weight-group join waits for its rendezvous outside that lock, for a bounded time. Every body is checked
(`request_checks`, `openai_checks`) before the engine sees it: a bad one is a 4xx that names the field, never
a 500.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import signal
import socket
import threading
import time
import uuid
from http import HTTPStatus
from pathlib import Path

from ascend_rl.errors import first_line
from ascend_rl.rollout import request_checks as checks
from ascend_rl.rollout import server_info as info
from ascend_rl.rollout.generate_json import (
    EventStream,
    LogprobView,
    error_chunk,
    logprob_kwargs,
    output_json,
    sample_changes,
)
from ascend_rl.rollout.openai_api import OpenAIEndpoints
from ascend_rl.rollout.protocol import SamplingParams, per_sample
from ascend_rl.rollout.request_checks import ApiError, Limits
from ascend_rl.rollout.server_info import ServedModel
from ascend_rl.rollout.tensor_transfer import decode_update_weights_from_tensor
from ascend_rl.rollout.text_codec import SampleText, TextCodec

logger = logging.getLogger(__name__)
OPEN_PATHS = "/health"  # SGLang leaves /health and /health_generate open under --api-key (probes hold no key)
HEALTH_CHECK = SamplingParams(max_new_tokens=1, temperature=0.0)  # SGLang's: one token from token 0


class EngineService:
    """The endpoints, independent of HTTP plumbing: name → handler(body) → JSON-able result.

    `model`: the model path, or what the server says about the model (`ServedModel`: its tokenizer, served
    name, ...); `weights_roots`: the directories /update_weights_from_disk may read under (default: the model
    path's parent); `group_timeout_s`: how long /init_weights_update_group waits for its rendezvous."""

    def __init__(self, engine, model: str | ServedModel, weights_roots: list[str] | None = None,
                 limits: Limits | None = None, group_timeout_s: float = 30.0):
        self.model = model if isinstance(model, ServedModel) else ServedModel(model)
        self.engine, self.model_path = engine, self.model.model_path
        flag = "--tokenizer-path" if self.model.tokenizer_path else "--model-path"
        self.codec = TextCodec.load(self.model.tokenizer, flag) if self.model.tokenizer else None
        self.openai = OpenAIEndpoints(self)
        self.weights_roots = [Path(r).resolve() for r in weights_roots or [Path(self.model_path).resolve().parent]]
        self.limits, self.group_timeout_s = limits or Limits(), group_timeout_s
        self.weight_version = "default"
        net = getattr(engine, "model", None)
        self.vocab_size = getattr(getattr(net, "config", None), "vocab_size", None)
        self.shapes = {name: list(p.shape) for name, p in net.named_parameters()} if net is not None else {}
        self._lock = threading.Lock()  # weight and memory calls: one at a time
        self._request_ids = itertools.count(1)  # next() is atomic: requests arrive on several threads
        self._groups: dict[str, object] = {}  # weight-update process groups by name
        self._joining: set[str] = set()  # group names a join is waiting for
        self._closing = threading.Event()

    def routes(self) -> dict[tuple[str, str], tuple[object, bool]]:
        """(method, path) → (handler(body), whether it takes the lock). Generation and the calls that act on
        a generation in progress (abort, pause) must not wait for the lock; nor must a group join, whose
        rendezvous may take long (it locks for its bookkeeping only)."""
        unlocked = {
            ("GET", "/health"): lambda b: "",
            ("GET", "/health_generate"): self.health_generate,
            ("GET", "/model_info"): self.model_info,
            ("GET", "/get_model_info"): self.model_info,
            ("GET", "/server_info"): self.server_info,
            ("GET", "/get_server_info"): self.server_info,
            ("POST", "/generate"): self.generate,
            ("PUT", "/generate"): self.generate,
            ("POST", "/abort_request"): self.abort_request,
            ("POST", "/pause_generation"): self.pause_generation,
            ("POST", "/continue_generation"): self.continue_generation,
            ("POST", "/init_weights_update_group"): self.init_weights_update_group,
            **self.openai.routes(),
        }
        locked = {  # SGLang takes GET and POST for these
            ("GET", "/release_memory_occupation"): self.release,
            ("POST", "/release_memory_occupation"): self.release,
            ("GET", "/resume_memory_occupation"): self.resume,
            ("POST", "/resume_memory_occupation"): self.resume,
            ("GET", "/flush_cache"): self.flush_cache,
            ("POST", "/flush_cache"): self.flush_cache,
            ("POST", "/update_weights_from_disk"): self.update_weights_from_disk,
            ("POST", "/update_weights_from_tensor"): self.update_weights_from_tensor,
            ("POST", "/update_weights_from_distributed"): self.update_weights_from_distributed,
            ("POST", "/destroy_weights_update_group"): self.destroy_weights_update_group,
        }
        return {**{k: (h, False) for k, h in unlocked.items()}, **{k: (h, True) for k, h in locked.items()}}

    def handle(self, method: str, path: str, raw: bytes):
        """Answer one request whose body is `raw` (JSON bytes)."""
        handler, locked = self.routes().get((method, path), (None, False))
        if handler is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {method} {path}")
        try:
            body = checks.json_object(raw)
            if not locked:
                return handler(body)
            with self._lock:
                return handler(body)
        except ValueError as err:  # the request's fault: a field's type or value, too long, unknown tags
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err), getattr(err, "param", None)) from None
        except RuntimeError as err:  # the engine's state: memory released, requests running
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(err)) from None

    def close(self) -> None:
        """The server is stopping: running generations end (finish reason abort) and waits give up, so that
        every answer goes out within seconds."""
        self._closing.set()
        self.engine.abort_request(None, abort_all=True)

    def abort_request(self, body: dict) -> str:
        rid, abort_all = checks.request_ids(body), checks.flag(body, "abort_all")
        for one in [rid] if isinstance(rid, str) else rid or [None]:
            self.engine.abort_request(one or None, abort_all)  # "" is no rid, as in SGLang
        return ""

    def pause_generation(self, body: dict) -> dict:
        self.engine.pause_generation(checks.text(body, "mode", "abort"))  # an unknown mode: ValueError, 400
        return {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body: dict) -> dict:
        self.engine.continue_generation()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def model_info(self, body: dict) -> dict:
        return info.model_info(self.model, self.engine, self.weight_version)

    def server_info(self, body: dict) -> dict:
        return info.server_info(self.model, self.engine, self.weight_version, info.sglang_version())

    def health_generate(self, body: dict) -> str:
        """SGLang's deep probe: one token from the engine. A busy engine is healthy without it (SGLang counts any
        output), a paused one is not (a probe would wait until it continues)."""
        if self._closing.is_set():
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")
        if getattr(getattr(self.engine, "scheduler", None), "busy", False):
            return ""
        if getattr(getattr(self.engine, "control", None), "paused", False):
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "generation is paused (/continue_generation)")
        self.engine.generate([[0]], HEALTH_CHECK, rids=[f"HEALTH_CHECK_{time.time()}"])
        return ""

    def generate(self, body: dict):
        req = checks.generate_request(body, self.vocab_size, self.limits, self.codec and self.codec.encode)
        rids = req.rids
        extra = logprob_kwargs(self.engine, logprob_start_len=req.logprob_start_len,
                               top_logprobs_num=req.top_logprobs_num, token_ids_logprob=req.token_ids_logprob)
        view = LogprobView(req.return_logprob, "top_logprobs_num" in extra, "token_ids_logprob" in extra,
                           self.codec.token_texts if self.codec and req.return_text_in_logprobs else None)
        texts = [SampleText(self.codec, ids, p) for ids, p in zip(req.prompts, req.params) for _ in range(p.n)] \
            if self.codec else None  # each sample's text, in the engine's output order
        if req.stream:
            stream = getattr(self.engine, "generate_stream", None)
            if stream is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, "stream=true: this engine does not stream")
            rids = rids or [f"stream-{uuid.uuid4().hex}" for _ in req.prompts]  # so a reader that leaves can abort
            # a bad request raises here: a 400, not a broken stream
            updates = stream(req.prompts, req.params, rids=rids, return_logprob=req.return_logprob, **extra)
            return EventStream(self._stream_chunks(updates, self._names(rids, req.params), view, texts),
                               abort=lambda: [self.engine.abort_request(rid) for rid in set(rids)])
        outputs = self.engine.generate(req.prompts, req.params, return_logprob=req.return_logprob, rids=rids, **extra)
        names = self._names(rids, req.params)
        results = [output_json(out, name, self.weight_version, view, texts[i].update(out) if texts else None)
                   for i, (out, name) in enumerate(zip(outputs, names))]
        return results[0] if req.single and len(results) == 1 else results

    def _names(self, rids, params) -> list[str]:
        """Each sample's id: its request's rid, else a running number."""
        if rids:
            return per_sample(rids, params)
        return [f"req-{next(self._request_ids)}" for p in params for _ in range(p.n)]

    def _stream_chunks(self, updates, names: list[str], view: LogprobView, texts: list[SampleText] | None):
        """SGLang's stream: a chunk whenever a sample has more tokens or ends, each the sample's output (and
        text) so far, with "index" when there are several; an error becomes an error chunk."""
        try:
            for i, out in sample_changes(updates):
                chunk = output_json(out, names[i], self.weight_version, view, texts[i].update(out) if texts else None)
                yield {**chunk, "index": i} if len(names) > 1 else chunk
        except (ValueError, RuntimeError) as err:
            yield error_chunk(err)

    def release(self, body: dict) -> None:  # SGLang answers null
        self.engine.release_memory_occupation(checks.memory_tags(body))

    def resume(self, body: dict) -> None:
        self.engine.resume_memory_occupation(checks.memory_tags(body))

    def flush_cache(self, body: dict) -> str:
        self.engine.flush_cache()
        return "Cache flushed."

    def update_weights_from_disk(self, body: dict) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = checks.weights_dir(body, self.weights_roots)
        version, flush = checks.after_update(body)
        try:  # a link inside the directory may point out of the roots: such a file is not read
            files = sorted(f for f in path.glob("*.safetensors") if checks.within(f.resolve(), self.weights_roots))
            if not files:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"model_path {str(path)!r}: no *.safetensors files")
            tensors = {}
            for file in files:
                tensors.update(load_file(str(file)))
        except (OSError, SafetensorError) as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"model_path {str(path)!r}: {err}") from None
        known = {name: tensor for name, tensor in tensors.items() if name in self.shapes}
        checks.check_shapes(known, self.shapes)
        self.engine.update_weights_from_tensor(known.items())
        self._weights_updated(version, flush)
        return {"success": True, "message": f"Succeeded to update model weights from {path}.", "num_paused_requests": 0}

    def update_weights_from_tensor(self, body: dict) -> dict:
        """SGLang's body: base64 of serialized (name, tensor) pairs per TP rank: the tensors' data, or
        ForkingPickler's handles to shared memory (CPU, file_system strategy) or to this server's device,
        decoded without running code (rollout/tensor_transfer.py, tensor_handles.py). Every name, shape and
        dtype is checked before any weight is copied."""
        update = decode_update_weights_from_tensor(body, device=getattr(self.engine, "device", "cpu"))
        tensors = dict(update.named_tensors)
        unknown = sorted(set(tensors) - set(self.shapes))
        if unknown:
            raise ValueError(f"serialized_named_tensors: {len(unknown)} name(s) the model does not have, e.g. "
                             f"{unknown[0]!r}")
        try:
            checks.check_shapes(tensors, self.shapes)
            checks.check_floating(tensors)
        except ValueError as err:
            raise ValueError(f"serialized_named_tensors: {err}") from None
        if update.abort_all_requests:
            self.engine.abort_request(None, True)
        self.engine.update_weights_from_tensor(update.named_tensors, load_format=update.load_format,
                                               flush_cache=False)
        self._weights_updated(update.weight_version, update.flush_cache)
        label = f" Weight version updated to {update.weight_version}." if update.weight_version else ""
        return {"success": True, "message": f"Success.{label}"}

    def _weights_updated(self, version: str | None, flush: bool) -> None:
        """What every weight update ends with: the new version label, and the cache flushed unless asked not to."""
        self.weight_version = version or self.weight_version
        if flush:
            self.engine.flush_cache()

    def init_weights_update_group(self, body: dict) -> dict:
        from ascend_rl.rollout.weight_group import join_weight_group_within

        join = checks.group_join(body)
        name = join.group_name
        with self._lock:
            if name in self._groups or name in self._joining:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"weight update group {name!r} exists or is being joined")
            self._joining.add(name)
        try:  # without the lock: other weight and memory calls go on while this waits
            group = join_weight_group_within(self.group_timeout_s, self._closing, join.backend, join.master_address,
                                             join.master_port, join.rank_offset, join.world_size, name)
        except Exception as err:  # torch's errors for an address that does not answer: the request's
            with self._lock:
                self._joining.discard(name)
            if self._closing.is_set():
                raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down") from None
            raise ApiError(HTTPStatus.BAD_REQUEST, f"init_weights_update_group: {first_line(err)}") from None
        with self._lock:
            self._joining.discard(name)
            self._groups[name] = group
        return {"success": True, "message": f"joined weight update group {name}"}

    def update_weights_from_distributed(self, body: dict) -> dict:
        import torch
        import torch.distributed as dist

        group = self._groups.get(checks.group_name(body))
        if group is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, "no weight update group: call /init_weights_update_group first")
        bucket = checks.weight_bucket(body, self.shapes)
        version, flush = checks.after_update(body)
        tensors = [torch.empty(shape, dtype=dtype, device=self.engine.device) for _, dtype, shape in bucket]
        for tensor in tensors:  # in the order rank 0 broadcasts them
            dist.broadcast(tensor, src=0, group=group)
        self.engine.update_weights_from_tensor((name, t) for (name, _, _), t in zip(bucket, tensors))
        self._weights_updated(version, flush)
        return {"success": True, "message": f"received {len(tensors)} tensors"}

    def destroy_weights_update_group(self, body: dict) -> dict:
        import torch.distributed as dist

        group = self._groups.pop(checks.group_name(body), None)
        if group is not None:
            dist.destroy_process_group(group)
        return {"success": True, "message": ""}


def create_app(service: EngineService, api_key: str | None = None):
    """The FastAPI app: every route of the service, SGLang's error shape (OpenAI's under /v1/), and with
    `api_key`, SGLang's bearer check (the health probes stay open, as in SGLang)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    class NanJSONResponse(JSONResponse):
        def render(self, content) -> bytes:  # a NaN log-prob (a degenerate temperature) as in the stream: no 500
            return json.dumps(content, separators=(",", ":")).encode()

    async def event_lines(stream: EventStream):
        finished = False
        try:
            while (line := await run_in_threadpool(stream.next_line)) is not None:
                yield line
            finished = True
        finally:
            if not finished:  # the reader left (the task is being cancelled): end its requests all the same
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(stream.drain)

    def answer(status: HTTPStatus, payload) -> Response:
        if isinstance(payload, EventStream):
            return StreamingResponse(event_lines(payload), media_type="text/event-stream")
        if isinstance(payload, str):
            return PlainTextResponse(payload, status_code=status)
        return NanJSONResponse(payload, status_code=status)

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def check_api_key(request: Request, call_next):
            given = request.headers.get("Authorization", "").encode("latin-1")  # the header's own bytes
            if not request.url.path.startswith(OPEN_PATHS) and not hmac.compare_digest(given, expected):
                return JSONResponse({"error": "Unauthorized"}, status_code=HTTPStatus.UNAUTHORIZED)
            return await call_next(request)

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) once it passes the limit: by its Content-Length before reading, else while
        reading."""
        limit = service.limits.max_body_bytes
        too_large = ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"request body over {limit} bytes (--max-request-bytes)")
        declared = request.headers.get("Content-Length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    def endpoint(method: str, path: str):
        async def serve(request: Request) -> Response:
            try:
                raw = await read_body(request)
                # The engine call blocks (decoding): a worker thread keeps the event loop serving. A call
                # cancelled at shutdown is left to its thread rather than waited for.
                result = await anyio.to_thread.run_sync(service.handle, method, path, raw, abandon_on_cancel=True)
                return answer(HTTPStatus.OK, result)
            except ApiError as err:
                return answer(err.status, error_json(path, err))
        return serve

    async def no_endpoint(request: Request, exc) -> Response:  # 404 / 405 in SGLang's error shape
        error = ApiError(HTTPStatus(exc.status_code), f"no endpoint {request.method} {request.url.path}")
        return answer(error.status, error_json(request.url.path, error))

    app.add_exception_handler(HTTPStatus.NOT_FOUND, no_endpoint)
    app.add_exception_handler(HTTPStatus.METHOD_NOT_ALLOWED, no_endpoint)
    for method, path in service.routes():
        app.add_route(path, endpoint(method, path), methods=[method])  # plain Starlette routes: no DI
    return app


def error_json(path: str, err: ApiError) -> dict:
    """SGLang's error body, or OpenAI's (type, param, code) for the OpenAI API."""
    if not path.startswith("/v1/"):
        return {"error": {"message": str(err)}}
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return {"error": {"message": str(err), "type": kind, "param": err.param, "code": err.code or err.status}}


class HttpServer:
    """uvicorn on a socket bound at construction (port 0 picks a free one; an address in use fails here).

    Stopping (SIGTERM, SIGINT, `shutdown`) calls `on_exit` first, so running requests end, then gives requests
    still open `grace_s` before it cancels them: a stop takes seconds, whatever the requests wait for."""

    def __init__(self, app, host: str, port: int, on_exit=lambda: None, grace_s: float = 5.0):
        import uvicorn

        self.socket = socket.create_server((host, port))
        self.server_port = self.socket.getsockname()[1]
        self._on_exit = on_exit
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                     timeout_graceful_shutdown=grace_s))
        uvicorn_exit = self._server.handle_exit

        def handle_exit(sig, frame) -> None:  # uvicorn's signal handler (main thread only), ours first
            logger.warning("%s: shutting down", signal.Signals(sig).name)
            on_exit()
            uvicorn_exit(sig, frame)

        self._server.handle_exit = handle_exit
        self._stopped = threading.Event()
        self._stopped.set()

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop serving (from another thread) and wait until the server has let go of the socket."""
        self._on_exit()
        self._server.should_exit = True
        self._stopped.wait(timeout_s)

    def server_close(self) -> None:
        self.socket.close()


def make_server(engine, model: str | ServedModel, host: str = "127.0.0.1", port: int = 30000,
                api_key: str | None = None, weights_roots: list[str] | None = None, limits: Limits | None = None,
                group_timeout_s: float = 30.0, grace_s: float = 5.0) -> HttpServer:
    """`model`: the model path (its tokenizer loaded from there), or a `ServedModel`."""
    service = EngineService(engine, model, weights_roots, limits, group_timeout_s)
    return HttpServer(create_app(service, api_key), host, port, on_exit=service.close, grace_s=grace_s)
