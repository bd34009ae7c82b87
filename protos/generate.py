"""Generate the gRPC stubs of `protos/mora/v1/*.proto` (build and install time only: needs grpcio-tools).

    python protos/generate.py [OUT]      # default OUT: serve/_proto (what `make install` does)

`setup.py` calls `generate` when the package is built, so wheels and images carry the stubs and
the server never needs grpcio-tools, protoc or a writable source tree at run time.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTOS = ("mora/v1/inference.proto", "mora/v1/adapters.proto")
DEFAULT_OUT = PROTO_ROOT.parent / "serve" / "_proto"


def generate(out: Path = DEFAULT_OUT) -> None:
    """Run protoc (grpcio-tools) on the API definitions into the package `out` (serve/_proto)."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}"]
    if protoc.main([*args, *(str(PROTO_ROOT / p) for p in PROTOS)]) != 0:
        raise RuntimeError("protoc failed on protos/mora/v1")
    # protoc writes absolute imports (`from mora.v1 import x_pb2`) that would resolve to this
    # project's `mora` package; the stubs live in `serve._proto`, so make them package-relative.
    for f in (out / "mora" / "v1").glob("*_pb2_grpc.py"):
        f.write_text(re.sub(r"^from mora\.v1 import", "from . import", f.read_text(), flags=re.M))
    for d in (out, out / "mora", out / "mora" / "v1"):
        (d / "__init__.py").touch()


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    generate(target)
    print(f"generated gRPC stubs in {target}")
