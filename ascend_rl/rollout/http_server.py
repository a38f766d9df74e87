"""An SGLang-compatible HTTP server for any engine of the protocol (`ascend-rl serve`).

Endpoint names and JSON shapes are SGLang's (token in, token out: the `skip_tokenizer_init` mode RL
uses), so one client (`http_client.HttpEngine`) talks to a real SGLang server and to this one. Served by
FastAPI on uvicorn, as SGLang is: each request runs the engine call in a worker thread, so concurrent
/generate requests join one running batch (the engine's continuous batching), and abort/pause reach it
while it decodes. Weight and memory calls run one at a time.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import uuid
from http import HTTPStatus
from pathlib import Path

from ascend_rl.rollout.protocol import GenerateOutput, SamplingParams, per_sample


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


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


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
    """The endpoints, independent of HTTP plumbing: name → handler(body) → JSON-able result."""

    def __init__(self, engine, model_path: str):
        self.engine, self.model_path = engine, model_path
        self.weight_version = "default"
        self._lock = threading.Lock()  # weight and memory calls: one at a time
        self._request_ids = itertools.count(1)  # next() is atomic: requests arrive on several threads
        self._groups: dict[str, object] = {}  # weight-update process groups by name

    def routes(self) -> dict[tuple[str, str], tuple[object, bool]]:
        """(method, path) → (handler(body), whether it takes the lock). Generation and the calls that act on
        a generation in progress (abort, pause) must not wait for the lock."""
        unlocked = {
            ("GET", "/health"): lambda b: "",
            ("GET", "/model_info"): self.model_info,
            ("GET", "/get_model_info"): self.model_info,
            ("POST", "/generate"): self.generate,
            ("PUT", "/generate"): self.generate,
            ("POST", "/abort_request"): self.abort_request,
            ("POST", "/pause_generation"): self.pause_generation,
            ("POST", "/continue_generation"): self.continue_generation,
        }
        locked = {
            ("POST", "/release_memory_occupation"): self.release,
            ("POST", "/resume_memory_occupation"): self.resume,
            ("GET", "/flush_cache"): self.flush_cache,
            ("POST", "/flush_cache"): self.flush_cache,
            ("POST", "/update_weights_from_disk"): self.update_weights_from_disk,
            ("POST", "/init_weights_update_group"): self.init_weights_update_group,
            ("POST", "/update_weights_from_distributed"): self.update_weights_from_distributed,
            ("POST", "/destroy_weights_update_group"): self.destroy_weights_update_group,
        }
        return {**{k: (h, False) for k, h in unlocked.items()}, **{k: (h, True) for k, h in locked.items()}}

    def handle(self, method: str, path: str, body: dict):
        handler, locked = self.routes().get((method, path), (None, False))
        if handler is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {method} {path}")
        try:
            if not locked:
                return handler(body)
            with self._lock:
                return handler(body)
        except ValueError as err:  # the request's fault: bad sampling keys, too long, unknown tags
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        except RuntimeError as err:  # the engine's state: memory released, requests running
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(err)) from None

    def abort_request(self, body: dict) -> str:
        self.engine.abort_request(body.get("rid") or None, bool(body.get("abort_all", False)))
        return ""

    def pause_generation(self, body: dict) -> dict:
        try:
            self.engine.pause_generation(body.get("mode", "abort"))
        except ValueError as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body: dict) -> dict:
        self.engine.continue_generation()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def model_info(self, body: dict) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                "weight_version": self.weight_version}

    def generate(self, body: dict):
        if "text" in body:
            raise ApiError(HTTPStatus.BAD_REQUEST, "this server runs token-in/token-out (skip_tokenizer_init): "
                                                   "send input_ids, not text")
        ids = body.get("input_ids")
        single = bool(ids) and isinstance(ids[0], int)
        prompts = [ids] if single else ids
        if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
            raise ApiError(HTTPStatus.BAD_REQUEST, "input_ids must be a non-empty list of token ids or of such lists")
        raw = body.get("sampling_params") or {}
        raw_list = raw if isinstance(raw, list) else [raw] * len(prompts)
        if len(raw_list) != len(prompts):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"{len(prompts)} prompts but {len(raw_list)} sampling_params")
        try:
            params = [SamplingParams.from_dict(p) for p in raw_list]
        except (TypeError, ValueError) as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return_logprob = bool(body.get("return_logprob", False))
        rid = body.get("rid")
        rids = None if rid is None else ([rid] * len(prompts) if isinstance(rid, str) else list(rid))
        if rids is not None and len(rids) != len(prompts):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"{len(prompts)} prompts but {len(rids)} rids")
        if body.get("stream"):
            stream = getattr(self.engine, "generate_stream", None)
            if stream is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, "stream=true: this engine does not stream")
            rids = rids or [f"stream-{uuid.uuid4().hex}" for _ in prompts]  # so a reader that leaves can abort
            updates = stream(prompts, params, rids=rids)  # a bad request raises here: a 400, not a broken stream
            return EventStream(self._stream_chunks(updates, self._names(rids, params), return_logprob),
                               abort=lambda: [self.engine.abort_request(rid) for rid in set(rids)])
        outputs = self.engine.generate(prompts, params, return_logprob=return_logprob, rids=rids)
        names = self._names(rids, params)
        results = [output_json(out, name, return_logprob, self.weight_version) for out, name in zip(outputs, names)]
        return results[0] if single and len(results) == 1 else results

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
        self.engine.release_memory_occupation(body.get("tags"))
        return ""

    def resume(self, body: dict) -> str:
        self.engine.resume_memory_occupation(body.get("tags"))
        return ""

    def flush_cache(self, body: dict) -> str:
        self.engine.flush_cache()
        return "Cache flushed."

    def update_weights_from_disk(self, body: dict) -> dict:
        from safetensors.torch import load_file

        path = Path(body.get("model_path") or "")
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"model_path {str(path)!r}: no *.safetensors files")
        tensors = {}
        for file in files:
            tensors.update(load_file(str(file)))
        known = dict(self.engine.model.named_parameters())
        try:
            self.engine.update_weights_from_tensor((k, v) for k, v in tensors.items() if k in known)
        except (KeyError, RuntimeError) as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        self._weights_updated(body)
        return {"success": True, "message": f"Succeeded to update model weights from {path}.", "num_paused_requests": 0}

    def _weights_updated(self, body: dict) -> None:
        """What every weight update ends with: the new version label, and the cache flushed unless asked not to."""
        self.weight_version = body.get("weight_version") or self.weight_version
        if body.get("flush_cache", True):
            self.engine.flush_cache()

    def init_weights_update_group(self, body: dict) -> dict:
        from ascend_rl.rollout.weight_group import join_weight_group

        try:
            name = body.get("group_name", "weight_update_group")
            self._groups[name] = join_weight_group(body.get("backend", "gloo"), body["master_address"],
                                                   int(body["master_port"]), int(body["rank_offset"]),
                                                   int(body["world_size"]), name)
        except KeyError as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"init_weights_update_group: missing {err}") from None
        return {"success": True, "message": f"joined weight update group {name}"}

    def update_weights_from_distributed(self, body: dict) -> dict:
        import torch
        import torch.distributed as dist

        group = self._groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, "no weight update group: call /init_weights_update_group first")
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype), device=self.engine.device)
                   for dtype, shape in zip(body["dtypes"], body["shapes"])]
        for tensor in tensors:  # in the order rank 0 broadcasts them
            dist.broadcast(tensor, src=0, group=group)
        self.engine.update_weights_from_tensor(zip(body["names"], tensors))
        self._weights_updated(body)
        return {"success": True, "message": f"received {len(tensors)} tensors"}

    def destroy_weights_update_group(self, body: dict) -> dict:
        import torch.distributed as dist

        group = self._groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is not None:
            dist.destroy_process_group(group)
        return {"success": True, "message": ""}


def create_app(service: EngineService, api_key: str | None = None):
    """The FastAPI app: every route of the service, SGLang's error shape, and with `api_key`, SGLang's
    bearer check (health probes stay open, as in SGLang)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

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
        return JSONResponse(payload, status_code=status)

    if api_key:
        @app.middleware("http")
        async def check_api_key(request: Request, call_next):
            if not request.url.path.startswith("/health") and \
                    request.headers.get("Authorization") != f"Bearer {api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=HTTPStatus.UNAUTHORIZED)
            return await call_next(request)

    def endpoint(method: str, path: str):
        async def serve(request: Request) -> Response:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise ApiError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
                # The engine call blocks (decoding); a worker thread keeps the event loop serving.
                return answer(HTTPStatus.OK, await run_in_threadpool(service.handle, method, path, body))
            except json.JSONDecodeError as err:
                return answer(HTTPStatus.BAD_REQUEST, {"error": {"message": f"request body is not JSON: {err}"}})
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
    """uvicorn on a socket bound at construction (port 0 picks a free one; an address in use fails here)."""

    def __init__(self, app, host: str, port: int):
        import uvicorn

        self.socket = socket.create_server((host, port))
        self.server_port = self.socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
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
        self._server.should_exit = True
        self._stopped.wait(timeout_s)

    def server_close(self) -> None:
        self.socket.close()


def make_server(engine, model_path: str, host: str = "127.0.0.1", port: int = 30000,
                api_key: str | None = None) -> HttpServer:
    return HttpServer(create_app(EngineService(engine, model_path), api_key), host, port)
