"""The authenticated caller of the gRPC call being handled.

The gRPC edge (`serve.grpc.edge.GrpcEdge`) authenticates a call from its metadata before its
request is parsed and sets `CALLER` around the servicer; servicers read it with `caller()` and
hand it to the transport-free services. (The HTTP edge keeps it in the request's state.)
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve.tenants import Tenant

__all__ = ["CALLER", "caller"]

CALLER: ContextVar[Tenant | None] = ContextVar("mora_caller", default=None)


def caller() -> Tenant:
    """The caller the edge authenticated; a servicer reached without one is a wiring bug."""
    tenant = CALLER.get()
    if tenant is None:
        raise RuntimeError("no authenticated caller: the gRPC edge did not run for this call")
    return tenant
