"""The generated gRPC stubs of `protos/mora/v1/*.proto`.

The stubs are generated from the `.proto` files (never edited by hand, never committed) into
`serve/_proto/` by `make install` (`python -m serve.proto`). Importing this module regenerates
them when they are missing or older than the `.proto` files, so a source checkout always runs
with stubs that match its API.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = Path(__file__).resolve().parent / "_proto"
PROTOS = ("mora/v1/inference.proto", "mora/v1/adapters.proto")


def _stale() -> bool:
    if not PROTO_ROOT.is_dir():  # an installed wheel: stubs were generated at build time
        return False
    newest = max((PROTO_ROOT / p).stat().st_mtime for p in PROTOS)
    outputs = [OUT / p.replace(".proto", suffix) for p in PROTOS for suffix in ("_pb2.py", "_pb2_grpc.py")]
    return not all(o.is_file() and o.stat().st_mtime >= newest for o in outputs)


def generate() -> None:
    """Run protoc (grpcio-tools) on the API definitions."""
    from grpc_tools import protoc

    OUT.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={OUT}", f"--grpc_python_out={OUT}", f"--pyi_out={OUT}"]
    if protoc.main([*args, *(str(PROTO_ROOT / p) for p in PROTOS)]) != 0:
        raise RuntimeError("protoc failed on protos/mora/v1")
    # protoc writes absolute imports (`from mora.v1 import x_pb2`) that would resolve to this
    # project's `mora` package; the stubs live in `serve._proto`, so make them package-relative.
    for f in (OUT / "mora" / "v1").glob("*_pb2_grpc.py"):
        f.write_text(re.sub(r"^from mora\.v1 import", "from . import", f.read_text(), flags=re.M))
    for d in (OUT, OUT / "mora", OUT / "mora" / "v1"):
        (d / "__init__.py").touch()


def load() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """`(inference_pb2, inference_pb2_grpc, adapters_pb2, adapters_pb2_grpc)`."""
    if _stale():
        generate()
        for name in [m for m in sys.modules if m.startswith("serve._proto")]:
            del sys.modules[name]
    base = "serve._proto.mora.v1"
    return tuple(importlib.import_module(f"{base}.{m}") for m in ("inference_pb2", "inference_pb2_grpc", "adapters_pb2", "adapters_pb2_grpc"))  # type: ignore[return-value]


inference_pb2, inference_pb2_grpc, adapters_pb2, adapters_pb2_grpc = load()

if __name__ == "__main__":
    generate()
    print(f"generated gRPC stubs in {OUT}")
