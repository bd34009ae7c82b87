"""The server's error types and their status codes, mapped in one place (`status_for`).

The codes are gRPC's canonical ones; each transport turns them into its own (the gRPC edge,
serve/grpc/edge.py; the HTTP app's `HTTP_STATUS`). Library errors (`mora.errors`) are mapped by
type; the engine face turns vLLM's into these. Anything unexpected becomes INTERNAL with a
generic message (details go to the log, never to another tenant).
"""

from __future__ import annotations

import errno
import logging

import grpc

from mora import errors as mora_errors

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


class SourceNotFound(InvalidRequest):
    """No adapter at the source URI a load names (no adapter_config.json there, no such bucket or repo)."""


class SourceDenied(PermissionDenied):
    """The storage refused the server's own credentials for a source URI (its bucket policy, its keys)."""


class SourceUnavailable(Unavailable):
    """The storage could not be reached or a transfer failed (timeouts, cut connections, truncated
    transfers) after the retries; nothing was registered, and the load may be retried."""


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
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


