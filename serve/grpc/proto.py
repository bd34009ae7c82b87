"""The generated gRPC stubs of `protos/mora/v1/*.proto`.

The stubs are generated from the `.proto` files (never edited by hand, never committed) into
`serve/_proto/` when the package is built (`setup.py`, so wheels and images carry them) or by
`make install` (`python protos/generate.py`). Importing them needs neither grpcio-tools nor a
writable tree; a source checkout whose stubs are missing or older than its `.proto` files fails
loudly with the command that regenerates them, instead of serving a stale API.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "serve" / "_proto"
PROTOS = ("mora/v1/inference.proto", "mora/v1/adapters.proto")
MODULES = ("inference_pb2", "inference_pb2_grpc", "adapters_pb2", "adapters_pb2_grpc")


class StubsOutOfDate(ImportError):
    pass


def _check_source_checkout() -> None:
    if not (PROTO_ROOT / PROTOS[0]).is_file():  # an installed wheel: stubs were generated at build time
        return
    newest = max((PROTO_ROOT / p).stat().st_mtime for p in PROTOS)
    outputs = [OUT / p.replace(".proto", suffix) for p in PROTOS for suffix in ("_pb2.py", "_pb2_grpc.py")]
    missing = [o for o in outputs if not o.is_file()]
    stale = [o for o in outputs if o.is_file() and o.stat().st_mtime < newest]
    if missing or stale:
        what = "missing" if missing else "older than protos/"
        raise StubsOutOfDate(f"the gRPC stubs in {OUT} are {what}: run `make install` or `python protos/generate.py`")


def load() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """`(inference_pb2, inference_pb2_grpc, adapters_pb2, adapters_pb2_grpc)`."""
    _check_source_checkout()
    base = "serve._proto.mora.v1"
    return tuple(importlib.import_module(f"{base}.{m}") for m in MODULES)  # type: ignore[return-value]


inference_pb2, inference_pb2_grpc, adapters_pb2, adapters_pb2_grpc = load()
