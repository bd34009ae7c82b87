"""OpenAI-compatible routes over the same services as the gRPC API.

`/v1/completions`, `/v1/chat/completions` (SSE streaming, usage, n, logprobs, stop, seed...) and
`/v1/models` call the generation service (`serve.services.generation`) exactly as gRPC does: same tenants
(`Authorization: Bearer`), quotas, merge policy and metrics. Adapter management (`/v1/adapters`,
and vLLM's `/v1/load_lora_adapter` / `/v1/unload_lora_adapter`) calls the adapter service
(`serve.services.adapters`). Every request passes the HTTP edge (`serve.http.edge`) first: it is
authenticated from its headers and its body bounded before anything reads it. Errors are
classified once (`serve.errors.status_for`); `HTTP_STATUS` turns that code into the HTTP status,
with OpenAI's error body, for every error (body, validation, routing) alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError, StarletteHTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mora.errors import MoraError
from serve.errors import InvalidRequest, ServeError, status_for
from serve.http.edge import HttpEdge, tenant_of
from serve.http.protocol import (
    AdapterLoad,
    AdapterUnmerge,
    ChatRequest,
    CompletionRequest,
    VllmLoraLoad,
    VllmLoraUnload,
    parse_body,
)
from serve.metrics import ServerMetrics
from serve.services.adapters import AdapterInfo, AdapterService, LoadRequest
from serve.services.generation import GenerationService
from serve.services.requests import Chunk, GenerateCall, TokenLogprob, collect
from serve.tenants import TenantDirectory

__all__ = ["HTTP_STATUS", "HttpServer", "build_app", "error_body"]

log = logging.getLogger(__name__)

class _ByCodeName(dict):
    """Keyed by a status code's name; looked up by the code itself or its name."""

    def __getitem__(self, code: Any) -> int:
        return super().__getitem__(getattr(code, "name", code))

    def get(self, code: Any, default: Any = None) -> Any:
        return super().get(getattr(code, "name", code), default)


# The one translation from the server's status codes (serve.errors) to HTTP.
HTTP_STATUS = _ByCodeName({
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
})
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
               431: "invalid_request_error", 429: "rate_limit_error"}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI's error body) for any exception."""
    code, message = status_for(exc)
    status = getattr(exc, "http_status", None) or HTTP_STATUS.get(code, 500)
    if code.name == "INTERNAL":
        log.error("unhandled error in the HTTP API", exc_info=exc)
    return status, {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": None,
                              "code": code.name}}


def _usage(last: Chunk) -> dict[str, int]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def _completion_logprobs(lps: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    if lps is None:
        return None
    offsets, pos = [], offset
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for _, t, v in lp.top} for lp in lps], "text_offset": offsets}


def _chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if lps is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]} for lp in lps]}


class OpenAIRoutes:
    def __init__(self, generation: GenerationService, adapters: AdapterService, base_names: list[str]) -> None:
        self.generation = generation
        self.adapters = adapters
        self.base_names = base_names

    def _call(self, body: ChatRequest | CompletionRequest, **input_: Any) -> GenerateCall:
        adapter = None if body.model in self.base_names else body.model
        return GenerateCall(adapter_id=adapter, request_id=body.request_id, **input_)

    async def _respond(self, request: Request, body: Any, call: GenerateCall, method: str, chat: bool, echo: str = "") -> Response:
        """The answer, whole or as SSE events; `echo` (completions): the prompt, put before each choice's text."""
        rid = ("chatcmpl-" if chat else "cmpl-") + (call.request_id or uuid.uuid4().hex)
        created = int(time.time())
        stream = self.generation.run(call, tenant_of(request), method + ("Stream" if body.stream else ""))
        if not body.stream:
            choices, last = await collect(stream, call.sampling.n)
            if chat:
                out = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": _chat_logprobs(c.logprobs),
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason or None} for c in choices]
            else:
                out = [{"index": c.index, "text": echo + c.text, "logprobs": _completion_logprobs(c.logprobs, 0),
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason or None} for c in choices]
            return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                                 "model": body.model, "choices": out, "usage": _usage(last)})
        first = await anext(stream)  # errors before the first token are an HTTP status, not an event
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        obj = "chat.completion.chunk" if chat else "text_completion"
        sent: dict[int, int] = {}  # characters sent per choice (text_offset) / choices whose role was sent

        def event(chunk: Chunk) -> str:
            pos = sent.get(chunk.index)
            sent[chunk.index] = (pos or 0) + len(chunk.text)
            if chat:
                delta: dict[str, Any] = {"content": chunk.text}
                if pos is None:
                    delta["role"] = "assistant"
                choice = {"index": chunk.index, "delta": delta, "logprobs": _chat_logprobs(chunk.logprobs),
                          "finish_reason": chunk.finish_reason}
            else:
                text = chunk.text if pos is not None else echo + chunk.text
                choice = {"index": chunk.index, "text": text, "logprobs": _completion_logprobs(chunk.logprobs, pos or 0),
                          "finish_reason": chunk.finish_reason}
            data = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                chunk = first
                while True:
                    yield event(chunk)
                    if chunk.final:
                        if include_usage:
                            usage = {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                                     "usage": _usage(chunk)}
                            yield f"data: {json.dumps(usage)}\n\n"
                        break
                    chunk = await anext(stream)
                async for _ in stream:  # let the core finish (it counts the request as OK)
                    pass
            except StopAsyncIteration:
                pass
            except Exception as exc:  # noqa: BLE001 - the status line is sent: report it in the stream
                yield f"data: {json.dumps(error_body(exc)[1])}\n\n"
            finally:
                await stream.aclose()  # a client that went away aborts the engine request
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def completions(self, request: Request) -> Response:
        body = parse_body(CompletionRequest, await request.body())
        text, ids = body.single_prompt()
        if body.echo and text is None:
            raise InvalidRequest("echo: give the prompt as text (prompts of token ids are not echoed)")
        call = self._call(body, prompt=text, prompt_token_ids=ids)
        call.sampling = body.sampling(body.max_tokens, body.logprobs)
        return await self._respond(request, body, call, "Completions", chat=False, echo=text if body.echo and text else "")

    async def chat(self, request: Request) -> Response:
        body = parse_body(ChatRequest, await request.body())
        call = self._call(body, messages=[m.chat_message() for m in body.messages])
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        call.sampling = body.sampling(body.max_completion_tokens or body.max_tokens, logprobs)
        return await self._respond(request, body, call, "ChatCompletions", chat=True)

    async def models(self, request: Request) -> Response:
        caller = tenant_of(request)
        listed = await self.adapters.list(caller)
        created = int(time.time())
        data = []
        if caller.is_admin or caller.allow_base_model:
            data.append({"id": self.base_names[0], "object": "model", "created": created, "owned_by": "mora-serve",
                         "root": self.base_names[0], "parent": None})
        for a in listed:
            data.append({"id": a.adapter_id, "object": "model", "created": created, "owned_by": a.tenant or "mora-serve",
                         "root": a.adapter_id, "parent": self.base_names[0]})
        return JSONResponse({"object": "list", "data": data})


# The proto3 JSON of an AdapterInfo (field names as in protos/mora/v1/adapters.proto, enums by
# name, 64-bit integers as strings): the shape the HTTP API has always answered.
_KIND = {"mora": "ADAPTER_KIND_MORA", "lora": "ADAPTER_KIND_LORA"}


def info_json(info: AdapterInfo) -> dict[str, Any]:
    return {
        "adapter_id": info.adapter_id, "tenant": info.tenant, "kind": _KIND[info.kind], "mora_type": info.mora_type,
        "rank": info.rank, "parameters": str(info.parameters), "location": "ADAPTER_LOCATION_" + info.location.name,
        "merged": info.merged, "in_flight": info.in_flight,
        "merge_control": "MERGE_CONTROL_MANUAL" if info.manual_merge else "MERGE_CONTROL_AUTOMATIC",
        "version": info.version, "source": info.source, "requests_total": str(info.requests_total),
        "merge_backup_bytes": str(info.merge_backup_bytes), "pinned": info.pinned,
    }


def build_app(generation: GenerationService, adapters: AdapterService, tenants: TenantDirectory, metrics: ServerMetrics,
              base_names: list[str], ready: Callable[[], bool], *, max_body_bytes: int = 16 << 20) -> Any:
    """The OpenAI-compatible app behind its edge (an ASGI app)."""
    routes = OpenAIRoutes(generation, adapters, base_names)
    app = FastAPI(title="mora-serve", description="OpenAI-compatible API of mora-serve", docs_url=None, redoc_url=None,
                  openapi_url=None)

    async def _error(request: Request, exc: Exception) -> Response:
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)

    # The server's and the library's error classes (answered here, as the gRPC edge does);
    # anything else becomes a 500 with a generic message (details in the log only).
    for kind in (ServeError, MoraError, Exception):
        app.add_exception_handler(kind, _error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        return JSONResponse(error_body(InvalidRequest(f"invalid request: {problems}"))[1], status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _routing(request: Request, exc: StarletteHTTPException) -> Response:
        # unknown paths and wrong methods answer in OpenAI's shape too
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if ready() else 503)

    app.post("/v1/completions")(routes.completions)
    app.post("/v1/chat/completions")(routes.chat)
    app.get("/v1/models")(routes.models)

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> Response:
        return JSONResponse({"adapters": [info_json(i) for i in await adapters.list(tenant_of(request))]})

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> Response:
        body = parse_body(AdapterLoad, await request.body())
        load = LoadRequest(body.adapter_id, path=None if body.source is not None else (body.path or body.adapter_id),
                           source=body.source, replace=body.replace, tenant=body.tenant, pinned=body.pinned,
                           sha256=body.sha256)
        return JSONResponse({"adapter": info_json(await adapters.load(tenant_of(request), load))})

    @app.get("/v1/adapters/{adapter_id}")
    async def get_adapter(request: Request, adapter_id: str) -> Response:
        return JSONResponse({"adapter": info_json(await adapters.get(tenant_of(request), adapter_id))})

    @app.delete("/v1/adapters/{adapter_id}")
    async def unload_adapter(request: Request, adapter_id: str) -> Response:
        return JSONResponse({"adapter": info_json(await adapters.unload(tenant_of(request), adapter_id))})

    @app.post("/v1/adapters/{adapter_id}/merge")
    async def merge_adapter(request: Request, adapter_id: str) -> Response:
        info, seconds = await adapters.merge(tenant_of(request), adapter_id)
        return JSONResponse({"adapter": info_json(info), "seconds": seconds})

    @app.post("/v1/adapters/{adapter_id}/unmerge")
    async def unmerge_adapter(request: Request, adapter_id: str) -> Response:
        raw = await request.body()
        body = parse_body(AdapterUnmerge, raw) if raw.strip() else AdapterUnmerge()
        info, seconds = await adapters.unmerge(tenant_of(request), adapter_id, body.automatic)
        return JSONResponse({"adapter": info_json(info), "seconds": seconds})

    @app.post("/v1/load_lora_adapter")
    async def vllm_load(request: Request) -> Response:
        body = parse_body(VllmLoraLoad, await request.body())
        await adapters.load(tenant_of(request), LoadRequest(body.lora_name, path=body.lora_path, replace=body.load_inplace))
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def vllm_unload(request: Request) -> Response:
        body = parse_body(VllmLoraUnload, await request.body())
        await adapters.unload(tenant_of(request), body.lora_name)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    def refused(exc: ServeError) -> tuple[int, dict[str, Any]]:
        if exc.code.name == "UNAUTHENTICATED":
            metrics.unauthenticated.labels("http").inc()
        return error_body(exc)

    return HttpEdge(app, tenants.authenticate, refused, max_body_bytes=max_body_bytes, open_paths=("/health",))


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:  # the server process owns SIGTERM/SIGINT (graceful drain)
        yield


class HttpServer:
    """uvicorn serving the app in the running event loop."""

    def __init__(self, app: Any, host: str, port: int, grace_s: float) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, int(grace_s) + 2))
        self.server = _Uvicorn(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it could not start (port taken...)
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.05)

    def refuse_new(self) -> None:
        self.server.should_exit = True

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task
