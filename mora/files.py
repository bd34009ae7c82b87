"""Bounded reads of adapter files: a file confined to a folder, JSON of bounded depth, and the
safetensors format read header first.

Nothing here allocates in proportion to what a file claims before the claim is checked:
a file's size against its limit, a safetensors header's size and every tensor's dtype, shape
and byte range (through the caller's `check`) before any tensor data is read. Files are
never memory-mapped (a file truncated under a mapping kills the process with SIGBUS) and
their contents are never echoed in errors.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mora.errors import AdapterError, AdapterNotFoundError, AdapterPathError, AdapterWeightsError

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_JSON_DEPTH",
    "ReadScope",
    "json_depth",
    "loads_bounded",
    "read_inside",
    "read_safetensors",
]

MAX_FILE_BYTES = 8 << 30
MAX_HEADER_BYTES = 16 << 20
SMALL_READ_BYTES = 1 << 20  # a safetensors file up to this size is read in one go
MAX_JSON_DEPTH = 32
ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}

# What is left of a JSON text without its strings (a string's bytes are never brackets): the
# brackets alone, and one level of innermost pairs, removed a pass at a time.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: 3.5x faster than (a|b)*
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


@dataclass(frozen=True)
class ReadScope:
    """Where an adapter's files may be read from (`allowed=` of the readers; a plain path is
    `ReadScope(path)`), and whether they must be the folder's own.

    `exclusive` (a non-admin tenant's folder): each file must also have exactly one link and lie
    on the folder's filesystem, checked on the open file. A name inside the folder can be a hard
    link to another tenant's file, which no check of names or real paths can tell apart.
    """

    folder: Path
    exclusive: bool = False


def read_scope(allowed: Path | ReadScope | None) -> ReadScope | None:
    return allowed if isinstance(allowed, ReadScope) or allowed is None else ReadScope(Path(allowed))


def read_inside(path: Path, allowed: Path | ReadScope | None, name: str, limit: int, *, prefix: int | None = None) -> bytes:
    """The bytes of `path` (at most `limit`; only the first `prefix` if given), if it is a regular
    file whose real path lies inside `allowed` (and, for an exclusive scope, the folder's own file).

    Refused: symlinks leading out of `allowed` (to another tenant's files, `/proc/...`), FIFOs,
    devices, directories. The file is opened without following a final symlink and re-checked
    through its descriptor, so swapping it between the check and the open does not help.
    Without a scope symlinks are followed, as by `open`.
    """
    scope = read_scope(allowed)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if scope is None:
        real, root = path, None  # nothing to confine to: no path to resolve (a page-in reads two files)
    else:
        real = Path(os.path.realpath(path))
        root = Path(os.path.realpath(scope.folder))
        if not real.is_relative_to(root):
            raise AdapterPathError(f"{path.name} resolves outside the folder adapters may be read from", adapter=name)
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{path.name} is missing", adapter=name) from None
    except OSError as e:
        raise AdapterPathError(f"{path.name} cannot be opened: {e.strerror}", adapter=name) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterPathError(f"{path.name} is not a regular file", adapter=name)
        if scope is not None and os.path.realpath(f"/proc/self/fd/{fd}") != str(real) and os.path.exists("/proc/self/fd"):
            raise AdapterPathError(f"{path.name} changed while it was opened", adapter=name)
        if scope is not None and scope.exclusive:
            if st.st_nlink != 1:
                raise AdapterPathError(f"{path.name} has {st.st_nlink} hard links; an adapter file must be the folder's "
                                       f"own (one link)", adapter=name)
            if st.st_dev != os.stat(root).st_dev:
                raise AdapterPathError(f"{path.name} is on another filesystem than the adapter folder", adapter=name)
        if st.st_size > limit:
            raise AdapterWeightsError(f"{path.name} is larger than {limit} bytes", adapter=name)
        want = st.st_size if prefix is None else min(prefix, st.st_size)
        chunks, got = [], 0
        while got < want:
            chunk = os.read(fd, min(want - got, 64 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion on hostile input)."""
    if not isinstance(value, dict | list):
        return 0
    depth, stack = 0, [(value, 1)]
    while stack:  # containers only: a header's scalars outnumber them
        v, d = stack.pop()
        depth = max(depth, d)
        stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, dict | list))
    return depth


def text_deeper_than(text: bytes, limit: int) -> bool:
    """Whether valid JSON `text` nests deeper than `limit`, from its brackets alone: each pass
    removes the innermost pairs, one level, and a text of depth `d` is empty after `d` passes.
    In C throughout (regex and translate), at most `limit + 1` passes over the brackets."""
    brackets = _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = _INNERMOST.sub(b"", brackets)
    return bool(brackets)


def loads_bounded(text: str | bytes, what: str, name: str, error: type[AdapterError]) -> Any:
    """`json.loads` that refuses nesting deeper than `MAX_JSON_DEPTH` with `error`."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", adapter=name) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} is not valid JSON ({type(e).__name__} at position {getattr(e, 'pos', '?')})", adapter=name) from None
    # nesting needs an opening bracket per level: a text with few cannot be deep (a page-in
    # parses two small files); a safetensors header has three containers per tensor, for
    # which walking the parsed value cost a sixth of a page-in's read
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and text_deeper_than(raw, MAX_JSON_DEPTH):
        raise error(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", adapter=name)
    return value


TensorCheck = Callable[[str, list[int]], None]


def _header(name: str, what: str, text: bytes, check: TensorCheck) -> tuple[int, list[tuple[str, torch.dtype, list[int], int, int]]]:
    """The end of the data and the tensors `(key, dtype, shape, start, stop)` in file order,
    every one checked; their byte ranges must tile the data exactly (as safetensors requires)."""
    header = loads_bounded(text, what + " header", name, AdapterWeightsError)
    if not isinstance(header, dict):
        raise AdapterWeightsError(f"{what} is unreadable: bad header", adapter=name)
    tensors = []
    for key, meta in header.items():
        if key == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise AdapterWeightsError(f"{what} is unreadable: bad __metadata__", adapter=name)
            continue
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise AdapterWeightsError(f"{what} is unreadable: bad shape for {key[:96]!r}", adapter=name)
        dtype = ST_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise AdapterWeightsError("tensor is not floating point", adapter=name, expected="F16/BF16/F32/F64",
                                      found=str(meta.get("dtype"))[:16])
        check(key, shape)
        offsets = meta.get("data_offsets")
        numel = 1
        for d in shape:
            numel *= d
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or offsets[1] - offsets[0] != numel * dtype.itemsize or offsets[0] < 0):
            raise AdapterWeightsError(f"{what} is unreadable: bad data offsets for {key[:96]!r}", adapter=name)
        tensors.append((key, dtype, shape, offsets[0], offsets[1]))
    end = 0
    for key, _, _, start, stop in sorted(tensors, key=lambda t: (t[3], t[4])):
        if start != end:
            raise AdapterWeightsError(f"{what} is unreadable: data of {key[:96]!r} does not follow the tensor "
                                      f"before it", adapter=name)
        end = stop
    return end, tensors


def read_safetensors(file: Path, name: str, allowed: Path | ReadScope | None, check: TensorCheck) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors `file`, header first: `check(key, shape)` sees every tensor
    (and may raise) before any tensor data is read, so memory is bounded by what it allows, not
    by the file.

    Semantics::

        return safetensors.torch.load_file(file)   # (with `check` on each tensor first)

    Each tensor owns its bytes (one copy out of the file's), little-endian as the format is.
    """
    what = file.name
    # A first read of up to SMALL_READ_BYTES: a small adapter's whole file (one open instead of
    # three: page-ins under spread traffic read many), a large one's header's start. Memory is
    # bounded by that read, then by the header.
    head = read_inside(file, allowed, name, MAX_FILE_BYTES, prefix=SMALL_READ_BYTES)
    if len(head) < 8:
        raise AdapterWeightsError(f"{what} is unreadable: shorter than its header", adapter=name)
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise AdapterWeightsError(f"{what} is unreadable: header of {n} bytes (limit {MAX_HEADER_BYTES})", adapter=name)
    data = head if len(head) >= 8 + n else read_inside(file, allowed, name, MAX_FILE_BYTES, prefix=8 + n)
    if len(data) < 8 + n:
        raise AdapterWeightsError(f"{what} is unreadable: header claims {n} bytes, file has {len(data) - 8}", adapter=name)
    end, tensors = _header(name, what, data[8 : 8 + n], check)
    # the first read holds the data, or was the whole file (then shorter than its header says)
    if len(head) >= 8 + n + end or len(head) < SMALL_READ_BYTES:
        data = head
    else:
        data = read_inside(file, allowed, name, MAX_FILE_BYTES, prefix=8 + n + end)
    if len(data) < 8 + n + end:
        raise AdapterWeightsError(f"{what} is unreadable: truncated tensor data", adapter=name)
    if sys.byteorder != "little":  # the format is little-endian; no serving CPU here is not
        raise AdapterWeightsError(f"{what}: reading safetensors needs a little-endian CPU", adapter=name)
    body = memoryview(data)[8 + n :]
    out = {}
    for key, dtype, shape, start, stop in tensors:
        if stop == start:  # frombuffer refuses empty buffers
            out[key] = torch.empty(shape, dtype=dtype)
        else:  # one copy: the bytes -> a buffer the tensor owns (writable, as torch wants)
            out[key] = torch.frombuffer(bytearray(body[start:stop]), dtype=torch.uint8).view(dtype).reshape(shape)
    return out
