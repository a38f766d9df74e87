"""An SGLang-compatible HTTP server for any engine of the protocol (`ascend-rl serve`).

Endpoint names and JSON shapes are SGLang's (token in, token out: the `skip_tokenizer_init` mode RL
uses), so one client (`http_client.HttpEngine`) talks to a real SGLang server and to this one. Served by
FastAPI on uvicorn, as SGLang is: each request runs the engine call in a worker thread, so concurrent
/generate requests join one running batch (the engine's continuous batching), and abort/pause reach it
while it decodes. Weight and memory calls run one at a time; a weight-group join waits for its rendezvous
outside that lock, for a bounded time. Every body is checked (`request_checks`) before the engine sees it: a
bad one is a 4xx that names the field, never a 500.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import signal
import socket
import threading
import uuid
from http import HTTPStatus
from pathlib import Path

from ascend_rl.errors import first_line
from ascend_rl.rollout import request_checks as checks
from ascend_rl.rollout.protocol import GenerateOutput, per_sample
from ascend_rl.rollout.request_checks import ApiError, Limits

logger = logging.getLogger(__name__)


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


def output_json(out: GenerateOutput, rid: str, return_logprob: bool, weight_version: str) -> dict:
    """One generation in SGLang's /generate output shape."""
    meta = {"id": rid, "finish_reason": finish_reason_json(out), "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens, "cached_tokens": 0, "weight_version": weight_version}
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(out.output_logprobs, out.output_ids)]
    return {"output_ids": out.output_ids, "meta_info": meta}


def finish_reason_json(out: GenerateOutput) -> dict | None:
    if out.finish_reason is None:  # still streaming
        return None
    if out.finish_reason == "stop":
        return {"type": "stop", "matched": out.matched}
    if out.finish_reason == "abort":
        return {"type": "abort", "message": "aborted by request", "status_code": None, "err_type": None}
    return {"type": out.finish_reason, "length": out.completion_tokens}


class EngineService:
    """The endpoints, independent of HTTP plumbing: name → handler(body) → JSON-able result.

    `weights_roots`: the directories /update_weights_from_disk may read under (default: the model path's
    parent); `group_timeout_s`: how long /init_weights_update_group waits for its rendezvous."""

    def __init__(self, engine, model_path: str, weights_roots: list[str] | None = None, limits: Limits | None = None,
                 group_timeout_s: float = 30.0):
        self.engine, self.model_path = engine, model_path
        self.weights_roots = [Path(r).resolve() for r in weights_roots or [Path(model_path).resolve().parent]]
        self.limits, self.group_timeout_s = limits or Limits(), group_timeout_s
        self.weight_version = "default"
        model = getattr(engine, "model", None)
        self.vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        self.shapes = {name: list(p.shape) for name, p in model.named_parameters()} if model is not None else {}
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
            ("GET", "/model_info"): self.model_info,
            ("GET", "/get_model_info"): self.model_info,
            ("POST", "/generate"): self.generate,
            ("PUT", "/generate"): self.generate,
            ("POST", "/abort_request"): self.abort_request,
            ("POST", "/pause_generation"): self.pause_generation,
            ("POST", "/continue_generation"): self.continue_generation,
            ("POST", "/init_weights_update_group"): self.init_weights_update_group,
        }
        locked = {
            ("POST", "/release_memory_occupation"): self.release,
            ("POST", "/resume_memory_occupation"): self.resume,
            ("GET", "/flush_cache"): self.flush_cache,
            ("POST", "/flush_cache"): self.flush_cache,
            ("POST", "/update_weights_from_disk"): self.update_weights_from_disk,
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
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
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
        return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                "weight_version": self.weight_version}

    def generate(self, body: dict):
        req = checks.generate_request(body, self.vocab_size, self.limits)
        rids = req.rids
        if req.stream:
            stream = getattr(self.engine, "generate_stream", None)
            if stream is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, "stream=true: this engine does not stream")
            rids = rids or [f"stream-{uuid.uuid4().hex}" for _ in req.prompts]  # so a reader that leaves can abort
            updates = stream(req.prompts, req.params, rids=rids)  # a bad request raises here: 400, not a broken stream
            return EventStream(self._stream_chunks(updates, self._names(rids, req.params), req.return_logprob),
                               abort=lambda: [self.engine.abort_request(rid) for rid in set(rids)])
        outputs = self.engine.generate(req.prompts, req.params, return_logprob=req.return_logprob, rids=rids)
        names = self._names(rids, req.params)
        results = [output_json(out, name, req.return_logprob, self.weight_version) for out, name in zip(outputs, names)]
        return results[0] if req.single and len(results) == 1 else results

    def _names(self, rids, params) -> list[str]:
        """Each sample's id: its request's rid, else a running number."""
        if rids:
            return per_sample(rids, params)
        return [f"req-{next(self._request_ids)}" for p in params for _ in range(p.n)]

    def _stream_chunks(self, updates, names: list[str], return_logprob: bool):
        """SGLang's stream: a chunk whenever a sample has more tokens or ends, each the sample's output so far
        (with "index" when there are several); an error becomes an error chunk."""
        last: list[tuple | None] = [None] * len(names)
        try:
            for outputs in updates:
                for i, out in enumerate(outputs):
                    state = (len(out.output_ids), out.finish_reason)
                    if state == last[i] or state == (0, None):
                        continue
                    last[i] = state
                    chunk = output_json(out, names[i], return_logprob, self.weight_version)
                    yield {**chunk, "index": i} if len(names) > 1 else chunk
        except (ValueError, RuntimeError) as err:
            yield {"error": {"message": str(err), "type": type(err).__name__, "code": 500, "retryable": False}}

    def release(self, body: dict) -> str:
        self.engine.release_memory_occupation(checks.memory_tags(body))
        return ""

    def resume(self, body: dict) -> str:
        self.engine.resume_memory_occupation(checks.memory_tags(body))
        return ""

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
    """The FastAPI app: every route of the service, SGLang's error shape, and with `api_key`, SGLang's
    bearer check (the health probe stays open, as in SGLang)."""
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
            if request.url.path != "/health" and not hmac.compare_digest(given, expected):  # constant time
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
                return answer(err.status, {"error": {"message": str(err)}})
        return serve

    async def no_endpoint(request: Request, exc) -> Response:  # 404 / 405 in SGLang's error shape
        message = f"no endpoint {request.method} {request.url.path}"
        return answer(HTTPStatus(exc.status_code), {"error": {"message": message}})

    app.add_exception_handler(HTTPStatus.NOT_FOUND, no_endpoint)
    app.add_exception_handler(HTTPStatus.METHOD_NOT_ALLOWED, no_endpoint)
    for method, path in service.routes():
        app.add_route(path, endpoint(method, path), methods=[method])  # plain Starlette routes: no DI
    return app


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


def make_server(engine, model_path: str, host: str = "127.0.0.1", port: int = 30000, api_key: str | None = None,
                weights_roots: list[str] | None = None, limits: Limits | None = None, group_timeout_s: float = 30.0,
                grace_s: float = 5.0) -> HttpServer:
    service = EngineService(engine, model_path, weights_roots, limits, group_timeout_s)
    return HttpServer(create_app(service, api_key), host, port, on_exit=service.close, grace_s=grace_s)
