"""The gRPC edge: every call to the mora services is authenticated from its metadata before its
request message is parsed, the caller handed to the servicer (`serve.grpc.caller`), and every
exception a servicer raises mapped to a status (`serve.errors.status_for`).

An unauthenticated call costs its bytes on the wire (the transport bounds a message at 16 MiB)
and nothing proportional to what it asks for: its deserializer never runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from serve.errors import ServeError, status_for
from serve.grpc.caller import CALLER

__all__ = ["GrpcEdge"]

log = logging.getLogger(__name__)


class _Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can answer
    INVALID_ARGUMENT (gRPC's default for a failed deserializer is INTERNAL)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def wrapper(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field...
            return _Undecodable(e)

    return wrapper


async def _reject_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {type(request.error).__name__}")


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], caller: Any) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _reject_undecodable(request, context)
        token = CALLER.set(caller)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", getattr(behavior, "__qualname__", behavior))
            await context.abort(code, message)
        finally:
            CALLER.reset(token)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any], caller: Any) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _reject_undecodable(request, context)
        token = CALLER.set(caller)
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", getattr(behavior, "__qualname__", behavior))
            await context.abort(code, message)
        finally:
            CALLER.reset(token)

    return wrapper


def _unread(data: bytes) -> None:
    """The deserializer of a call refused before its request is read: the bytes are never parsed."""
    return None


def _refusal(handler: Any, error: ServeError) -> Any:
    """A handler of the same shape as `handler` that answers `error` without parsing the request."""
    code, message = status_for(error)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_unread,
                                                   response_serializer=handler.response_serializer)
    return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=_unread,
                                                response_serializer=handler.response_serializer)


class GrpcEdge(grpc.aio.ServerInterceptor):
    """The gRPC edge: authenticates calls to `protected` services from their metadata before the
    request message is parsed (an unauthenticated call costs its bytes on the wire, nothing
    proportional to what it asks for), hands the caller to the servicer (`CALLER`), and maps
    exceptions raised by any servicer to status codes (`status_for`)."""

    def __init__(self, authenticate: Callable[[Any], Any] | None = None, protected: tuple[str, ...] = ()) -> None:
        self.authenticate = authenticate
        self.protected = tuple(f"/{name}/" for name in protected)

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is None and handler.unary_stream is None:
            return handler
        caller = None
        if self.authenticate is not None and handler_call_details.method.startswith(self.protected):
            try:
                caller = self.authenticate(handler_call_details.invocation_metadata)
            except ServeError as e:
                return _refusal(handler, e)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, caller),
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, caller),
            request_deserializer=_safe_deserializer(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
