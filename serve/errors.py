"""The server's error types and their gRPC status codes, mapped in one place.

Servicers raise; `ErrorInterceptor` turns every exception into a status with a message that
names the problem. Library errors (`mora.errors`) are mapped by type. Anything unexpected
becomes INTERNAL with a generic message (details go to the log, never to another tenant).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from mora import errors as mora_errors
from serve.caller import CALLER

log = logging.getLogger(__name__)


MAX_MESSAGE_CHARS = 1024  # status details travel in trailing metadata (16 KiB limit by default)
SHORT_CHARS = 48


def short(value: str, limit: int = SHORT_CHARS) -> str:
    """`repr` of at most a short prefix of caller input, for error messages."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


class ServeError(Exception):
    """Base of the errors the server reports to clients."""

    code = grpc.StatusCode.INTERNAL
    http_status: int | None = None  # where HTTP has a more precise status than the code's

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdapterNotFound(ServeError):
    code = grpc.StatusCode.NOT_FOUND


class AdapterExists(ServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidRequest(ServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class PathNotAllowed(ServeError):
    """A path that resolves outside the adapter root."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServeError):
    code = grpc.StatusCode.UNAVAILABLE


class PayloadTooLarge(ServeError):
    """An HTTP body over the server's limit (refused while it streams in)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class HeadersTooLarge(ServeError):
    """More HTTP headers than the server reads."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 431


class NonFiniteOutput(ServeError):
    """The model produced NaN/inf for one request (its adapter, its prompt); only it fails."""

    code = grpc.StatusCode.FAILED_PRECONDITION


_LIBRARY_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (mora_errors.AdapterNotFoundError, grpc.StatusCode.INVALID_ARGUMENT),  # a path given by the caller
    (mora_errors.AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (mora_errors.NonFiniteMergeError, grpc.StatusCode.FAILED_PRECONDITION),
    (mora_errors.MergeError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for `exc`."""
    if isinstance(exc, ServeError):
        return exc.code, _bounded(exc.message)
    for kind, code in _LIBRARY_CODES:
        if isinstance(exc, kind):
            return code, _bounded(str(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is out of disk space ({exc.strerror})"
    from vllm.exceptions import VLLMClientError  # the engine's own "bad request" errors

    if isinstance(exc, VLLMClientError):
        return grpc.StatusCode.INVALID_ARGUMENT, _bounded(str(exc))
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
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
