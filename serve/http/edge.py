"""The HTTP edge: every request is authenticated from its headers, and its body bounded, before
any route reads a byte of it.

A pure ASGI middleware in front of the FastAPI app (FastAPI would parse a body before the route
that authenticates runs). In order, for every path but the open ones (`/health`):

1. more than `max_headers` headers: 431;
2. the `Authorization` headers (all of them: two are refused, never "first wins") are checked
   against the tenants: 401 without reading the body, so an unauthenticated caller costs O(1)
   whatever it sends;
3. a `Content-Length` over `max_body_bytes`: 413 at once; otherwise the body is read as it
   streams in and refused with 413 as soon as it crosses the limit;
4. the route gets the tenant (`tenant_of(request)`) and the body, replayed from memory.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fastapi import Request

from serve.errors import HeadersTooLarge, InvalidRequest, PayloadTooLarge, ServeError
from serve.tenants import Tenant

__all__ = ["MAX_HEADERS", "HttpEdge", "tenant_of"]

MAX_HEADERS = 100
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def tenant_of(request: Request) -> Tenant:
    """The tenant the edge authenticated for `request`."""
    tenant = request.scope.get("state", {}).get("tenant")
    if tenant is None:
        raise RuntimeError("no authenticated caller: the HTTP edge did not run for this request")
    return tenant


class HttpEdge:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 authenticate: Callable[[Sequence[tuple[str, str]]], Tenant],
                 refused: Callable[[ServeError], tuple[int, dict[str, Any]]], *, max_body_bytes: int,
                 max_headers: int = MAX_HEADERS, open_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.authenticate = authenticate
        self.refused = refused  # (status, body) of a refusal; also counts it
        self.max_body_bytes = max_body_bytes
        self.max_headers = max_headers
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        try:
            tenant = self._authenticate(scope["headers"])
            body = await self._read_body(scope["headers"], receive)
        except ServeError as e:
            status, payload = self.refused(e)
            await _send_json(send, status, payload)
            return
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, _replay(body, receive), send)

    def _authenticate(self, headers: list[tuple[bytes, bytes]]) -> Tenant:
        if len(headers) > self.max_headers:
            raise HeadersTooLarge(f"more than {self.max_headers} request headers")
        values = [("authorization", v.decode("latin-1")) for k, v in headers if k == b"authorization"]
        return self.authenticate(values)

    async def _read_body(self, headers: list[tuple[bytes, bytes]], receive: Receive) -> bytes:
        lengths = {v for k, v in headers if k == b"content-length"}
        if len(lengths) > 1:
            raise InvalidRequest("conflicting Content-Length headers")
        if lengths:
            try:
                declared = int(next(iter(lengths)))
            except ValueError:
                raise InvalidRequest("Content-Length is not a number") from None
            if declared > self.max_body_bytes:
                raise PayloadTooLarge(f"the request body ({declared} bytes) is larger than the server's limit of "
                                      f"{self.max_body_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"the request body is larger than the server's limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body read by the edge once, then the connection's own events
    (a disconnect, which a streaming response watches for)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    # Connection: close: the body of a refused request may still be arriving; the connection
    # is not reused for another request.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})
