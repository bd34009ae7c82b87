"""The native CPU kernels of the torch backend (`grouped_mm.cpp` and its ISA paths `isa_*.cpp`).

The fused operator's CPU time is its per-adapter products `V @ M.T` with a handful of rows per
adapter, where one sgemm call per adapter packs a whole `M` for those rows (see the .cpp). These
C++ ops read every `M` straight from the slot table, registered as custom ops:

* `torch.ops.mora_native.grouped_mm` - every adapter's rows times its `M`;
* `torch.ops.mora_native.rope_apply` - type-6 adapters from `x` straight into `y`;
* `torch.ops.mora_native.share_apply` - type-1 adapters from `x` straight into `y`;
* `rope_rows`, `share_rows`, `rope_add`, `share_add` - those two ops' rows and additions alone,
  around products that torch's GEMM computes (bfloat16 prefill where oneDNN's GEMM has AMX).
* `stream_lines`, `stream_span_lines` - the schedules by which the ops stream a thread's next
  `M`, and its next run's rows, into L2 (for tests).

It is built on first use with torch's C++ extension builder (g++ and the headers torch ships)
into `MORA_NATIVE_DIR` (default `$XDG_CACHE_HOME/mora/native`, or `~/.cache/mora/native`), in a
folder named by a hash of the sources, the flags and the torch version, so a stale library is
never loaded; an existing build is loaded without writing anything (read-only images). Build
ahead of time with `python -m mora.kernels.native` (the CPU image and `make install` do).

One library runs on every x86-64 CPU: it holds the kernel once per ISA path, each compiled for
its instruction set alone, and picks the path at run time from the CPU (`native_isa`):

* `avx512_bf16` - `avx512`, with bfloat16 products on the CPU's bf16 dot products (`vdpbf16ps`,
  AVX512_BF16; AVX512DQ too); `auto` takes it on AMD CPUs, where they issue as fast as FMAs (Zen 4), and
  not on Intel's, where they issue at half that rate;
* `avx512` - AVX-512F/BW/VL;
* `avx2` - AVX2 and FMA;
* `portable` - plain C++, one `std::fma` per term (for CPUs without AVX2; slow).

Each output is the same sum in the same order with one rounding per term on every path, so
results (float32, and bfloat16 in float32 lanes or dot products) are bit-identical across paths
(`kernel_dp.h` says how the dot products keep them).

`MORA_CPU_KERNEL` (read when first needed) chooses:

* `auto` (default) - native on x86-64 CPUs, where it builds; otherwise torch's BLAS, with one
  warning saying why;
* `native` - native or an error (`NativeKernelError`) naming what is missing;
* `blas` - torch's BLAS (`bmm`/`mm`), never native.

`MORA_CPU_ISA` (read with it) forces a path: `auto` (default: the best the CPU has),
`avx512_bf16`, `avx512`, `avx2` or `portable`; a path the CPU cannot run is an error
(`NativeKernelError`) naming the features it lacks.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

__all__ = ["ENV_ISA", "ENV_KERNEL", "ISAS", "NativeKernelError", "build", "grouped_mm", "native_enabled", "native_isa",
           "native_status", "rope_add", "rope_apply", "rope_rows", "share_add", "share_apply", "share_rows",
           "stream_lines", "stream_span_lines"]

log = logging.getLogger(__name__)
ENV_KERNEL = "MORA_CPU_KERNEL"
ENV_ISA = "MORA_CPU_ISA"
ENV_DIR = "MORA_NATIVE_DIR"
MODES = ("auto", "native", "blas")
ISAS = ("avx512_bf16", "avx512", "avx2", "portable")  # best first
SOURCE_DIR = Path(__file__).parent
# No -m flags: each isa_*.cpp selects its instruction set with a target pragma, all else is
# baseline x86-64. No FMA contraction: a path must not fuse a multiply and an add that another
# path rounds twice (the paths' results are bit-identical).
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)  # torch ships libgomp.so.1 and loads it first: the op joins torch's thread pool
X86_64 = ("x86_64", "amd64")


class NativeKernelError(RuntimeError):
    """The native CPU kernel was required (`MORA_CPU_KERNEL=native`) and cannot be used."""


def _choice(env: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(env, "auto").strip().lower() or "auto"
    if value not in choices:
        raise NativeKernelError(f"{env}={value!r}: expected one of {', '.join(choices)}")
    return value


def _sources() -> list[Path]:
    """The files compiled (`*.cpp`); the headers they include are in the hash too."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def build_dir() -> Path:
    """Where the library of these sources, these flags and this torch lives."""
    root = os.environ.get(ENV_DIR)
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "mora", "native")
    digest = hashlib.sha256()
    for path in sorted([*SOURCE_DIR.glob("*.cpp"), *SOURCE_DIR.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(repr((CFLAGS, LDFLAGS, torch.__version__)).encode())
    return Path(root) / f"grouped_mm-{digest.hexdigest()[:16]}"


def build(verbose: bool = False) -> Path:
    """Build the library (if it is not built yet) and load it; its path."""
    target = build_dir()
    name = "mora_native_" + target.name.removeprefix("grouped_mm-")
    library = target / f"{name}.so"
    # A library being written by another process's build sits beside cpp_extension's lock file:
    # then `load` waits for that build instead of loading half a file.
    if not library.exists() or (target / "lock").exists():
        from torch.utils.cpp_extension import load  # imported here: it pulls in setuptools

        target.mkdir(parents=True, exist_ok=True)
        load(name=name, sources=[str(p) for p in _sources()], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
             build_directory=str(target), is_python_module=False, verbose=verbose)
    if not _loaded():
        torch.ops.load_library(str(library))
    return library


def _loaded() -> bool:
    try:
        torch.ops.mora_native.grouped_mm  # noqa: B018 (the lookup is the check)
    except (AttributeError, RuntimeError):
        return False
    return True


def native_status() -> tuple[bool, str]:
    """(whether `grouped_mm` is used, why: with the ISA path it runs), for the current
    `MORA_CPU_KERNEL` and `MORA_CPU_ISA`: decided once per process and setting (a backend binds
    its programs once per batch, so this is read rarely)."""
    return _status(_choice(ENV_KERNEL, MODES), _choice(ENV_ISA, ("auto", *ISAS)))


def native_isa() -> str | None:
    """The ISA path the native kernel runs (one of `ISAS`), or None where it is not used."""
    enabled, why = native_status()
    return why.split("isa=", 1)[1].split()[0] if enabled else None


# One entry: a change of setting (tests force paths in turn) selects the path in the library again.
@functools.lru_cache(maxsize=1)
def _status(mode: str, isa: str) -> tuple[bool, str]:
    if mode == "blas":
        return False, f"{ENV_KERNEL}=blas"
    machine = platform.machine()
    if machine.lower() not in X86_64:
        reason = f"this CPU is not x86-64 ({machine})"
    else:
        try:
            path = build()
        except Exception as exc:  # noqa: BLE001 (a compiler's failure has no one type; reported below)
            reason = f"building the native kernel failed: {type(exc).__name__}: {str(exc).strip()[-400:]}"
        else:
            missing = _missing(isa)
            if missing:
                raise NativeKernelError(f"{ENV_ISA}={isa}, but this CPU lacks {missing}")
            return True, f"native grouped_mm, isa={torch.ops.mora_native.set_isa(isa)} ({path})"
    if mode == "native":
        raise NativeKernelError(f"{ENV_KERNEL}=native, but {reason}")
    log.warning("MoRA CPU products use torch's BLAS, not the native kernel: %s", reason)
    return False, reason


def _missing(isa: str) -> str:
    """The CPU features path `isa` needs and this CPU lacks, as the library detects them ("" if none)."""
    return torch.ops.mora_native.isa_missing(isa)


def native_enabled() -> bool:
    return native_status()[0]


def grouped_mm(V: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor, Mt: torch.Tensor, n: int, alpha: float,
               out: torch.Tensor) -> None:
    """Every group's rows times its slot's `M`, in one call (CPU, any x86-64; float32 or
    bfloat16, one dtype for `V`, `Mt` and `out`; bfloat16 is multiplied and summed in float32
    and each output rounded once).

    Semantics::

        # V [R, >= n], out [R, >= n] (rows contiguous); Mt [S, >= n, >= n] with Mt[s] = M[s].T;
        # offsets int64 [G + 1], slots int64 [G]
        for g in range(G):
            a, b = offsets[g], offsets[g + 1]
            out[a:b, :n] = alpha * (V[a:b, :n] @ Mt[slots[g], :n, :n])

    Rows outside every group and columns past `n` of `out` are not written. Each output is a
    sum over `k` in order with one FMA per term from +0, whatever the other rows of the batch
    are, on every ISA path alike.
    """
    _require()
    torch.ops.mora_native.grouped_mm(V, offsets, slots, Mt, n, alpha, out)


def _require() -> None:
    enabled, why = native_status()
    if not enabled:
        raise NativeKernelError(f"the native CPU kernel is not in use: {why}")


def rope_apply(x: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor, Mt: torch.Tensor,
               cos: torch.Tensor, ssin: torch.Tensor, k_lo: int, period: int, out_start: int, alpha: float,
               y: torch.Tensor) -> None:
    """Type-6 (RoPE) adapters' updates added into `y`, read from `x`, in one call (float32 or
    bfloat16, one dtype for every tensor; in bfloat16 each step rounds where the torch ops of
    the general path round: the rotation's product and sum, the product `o`, the addition).

    Semantics::

        # x [T, in_f], y [T, width] (rows contiguous); Mt [S, >= n, >= n] with Mt[s] = M[s].T;
        # cos, ssin [chunks, n]: rows k_lo.. of rope_tables(n, c), ssin = cat(-sin[:, :n/2], sin[:, n/2:]);
        # tokens int64 [N] (rows of x and y), offsets int64 [G + 1] (into tokens), slots int64 [G]
        xp = cat(x, x[:, :in_f], dim=1)                                   # the padded input
        for g in range(G):
            for t in tokens[offsets[g]:offsets[g + 1]]:
                for i in range(chunks):
                    c = k_lo + i
                    u = xp[t, c * n:(c + 1) * n]
                    v = u * cos[i] + cat(u[n // 2:], u[:n // 2]) * ssin[i]   # rope_chunks' rotation
                    o = alpha * (v @ Mt[slots[g], :n, :n])                    # [n]
                    for j in range(width):                                   # y's columns
                        col = (out_start + j) % period                       # the output tiles
                        if c * n <= col < (c + 1) * n:
                            y[t, j] += o[col - c * n]

    Each column of `y` gets one addition per token (its chunk's product); rows of `y` not in
    `tokens` and columns of chunks outside `k_lo..k_lo + chunks - 1` are not touched.
    """
    _require()
    torch.ops.mora_native.rope_apply(x, tokens, offsets, slots, Mt, cos, ssin, k_lo, period, out_start, alpha, y)


def share_apply(x: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor, Mt: torch.Tensor,
                n: int, chunks: int, out_start: int, alpha: float, y: torch.Tensor) -> None:
    """Type-1 (sharing) adapters' updates added into `y`, read from `x`, in one call (float32
    or bfloat16, one dtype for every tensor; in bfloat16 the chunk sum is float32, rounded once,
    as torch.sum rounds it, and the product and the addition round as in `rope_apply`).

    Semantics::

        # x [T, in_f], y [T, width] (rows contiguous); Mt [S, >= n, >= n] with Mt[s] = M[s].T;
        # chunks = ceil(in_f / n); tokens int64 [N] (rows of x and y), offsets int64 [G + 1]
        # (into tokens), slots int64 [G]
        xp = cat(x, x[:, :chunks * n - in_f], dim=1)                      # the padded input
        for g in range(G):
            for t in tokens[offsets[g]:offsets[g + 1]]:
                v = xp[t].view(chunks, n).float().sum(0).to(x.dtype)     # compress: the chunks' sum
                o = alpha * (v @ Mt[slots[g], :n, :n])                    # [n]
                for j in range(width):
                    y[t, j] += o[(out_start + j) % n]                     # decompress: the tiled output

    The chunks are summed in order from +0, one rounding per addition (torch.sum may sum in
    another order: within a few ulps of it). Each column of `y` gets one addition per token;
    rows of `y` not in `tokens` are not touched.
    """
    _require()
    torch.ops.mora_native.share_apply(x, tokens, offsets, slots, Mt, n, chunks, out_start, alpha, y)


def rope_rows(x: torch.Tensor, tokens: torch.Tensor, cos: torch.Tensor, ssin: torch.Tensor, k_lo: int,
              V: torch.Tensor) -> None:
    """The rotated rows `rope_apply` multiplies, written to `V` (float32 or bfloat16, one dtype),
    for products that torch's GEMM computes (`rope_add` adds them).

    Semantics::

        # x [T, in_f]; tokens int64 [N]; cos, ssin [chunks, n] as rope_apply's; V [N * chunks, >= n]
        xp = cat(x, x[:, :in_f], dim=1)
        for j, t in enumerate(tokens):
            for i in range(chunks):
                c = k_lo + i
                u = xp[t, c * n:(c + 1) * n]
                V[j * chunks + i, :n] = u * cos[i] + cat(u[n // 2:], u[:n // 2]) * ssin[i]  # rounded as rope_apply's v

    Columns of `V` past `n` are not written.
    """
    _require()
    torch.ops.mora_native.rope_rows(x, tokens, cos, ssin, k_lo, V)


def share_rows(x: torch.Tensor, tokens: torch.Tensor, n: int, chunks: int, V: torch.Tensor) -> None:
    """The chunk sums `share_apply` multiplies, written to `V` (`share_add` adds their products).

    Semantics::

        # x [T, in_f]; tokens int64 [N]; chunks = ceil(in_f / n); V [N, >= n]
        xp = cat(x, x[:, :chunks * n - in_f], dim=1)
        for j, t in enumerate(tokens):
            V[j, :n] = xp[t].view(chunks, n).float().sum(0).to(x.dtype)  # summed in order, as share_apply's v
    """
    _require()
    torch.ops.mora_native.share_rows(x, tokens, n, chunks, V)


def rope_add(P: torch.Tensor, tokens: torch.Tensor, n: int, k_lo: int, chunks: int, period: int, out_start: int,
             y: torch.Tensor) -> None:
    """Products of `rope_rows`' rows added into `y` as `rope_apply` adds its products.

    Semantics::

        # P [N * chunks, >= n], y [T, width], one dtype; tokens int64 [N] (rows of y)
        for j, t in enumerate(tokens):
            for i in range(chunks):
                c, o = k_lo + i, P[j * chunks + i, :n]
                for col in range(width):
                    q = (out_start + col) % period
                    if c * n <= q < (c + 1) * n:
                        y[t, col] += o[q - c * n]                       # one rounding to y's dtype
    """
    _require()
    torch.ops.mora_native.rope_add(P, tokens, n, k_lo, chunks, period, out_start, y)


def share_add(P: torch.Tensor, tokens: torch.Tensor, n: int, out_start: int, y: torch.Tensor) -> None:
    """Products of `share_rows`' rows added into `y` as `share_apply` adds its products.

    Semantics::

        # P [N, >= n], y [T, width], one dtype; tokens int64 [N] (rows of y)
        for j, t in enumerate(tokens):
            for col in range(width):
                y[t, col] += P[j, (out_start + col) % n]
    """
    _require()
    torch.ops.mora_native.share_add(P, tokens, n, out_start, y)


def stream_lines(rows: int, length: int, ld: int, offset: int, work: int, done: int, step: int) -> torch.Tensor:
    """The lines the kernels request of a thread's next `M` while multiplying the current one
    (common.h's `Stream`), as byte offsets from the line holding its first byte: `rows` rows of
    `length` bytes, `ld` bytes apart, the first `offset` bytes into a 64-byte line, paced for
    `work` products of the current group, after `done` of them paced `step` at a time (a block's
    piece). Nothing is read: this is the schedule alone, for tests.

    Semantics::

        lines = []                                  # every line of each row, row after row
        for i in range(rows) if ld != length else [0]:
            lo, hi = offset + i * ld, offset + i * ld + (length if ld != length else rows * length)
            lines += range(lo // 64 * 64, hi, 64)   # a line two rows share comes twice
        rate = ceil(0.8 * est * 2**32 / work)       # est = rows * (length // 64 + 2), merged rows as one
        return lines[:min(len(lines), sum over the steps of the credit's whole lines)]
    """
    _require()
    return torch.ops.mora_native.stream_lines(rows, length, ld, offset, work, done, step)


def stream_span_lines(spans: torch.Tensor, work: int, done: int, step: int) -> torch.Tensor:
    """The lines the kernels request of a thread's next run (its rows of `x` or `V`, and the rows
    of `y` they add into) while multiplying the current one (common.h's `Stream` over listed
    ranges), as byte offsets from a 64-byte aligned origin: `spans` (int64 [S, 2], nonempty
    ranges [first, last)), paced for `work` products of the current run, after `done` of them
    paced `step` at a time. Nothing is read: the schedule alone, for tests.

    Semantics::

        lines = [line for first, last in spans for line in range(first // 64 * 64, last, 64)]
        rate = ceil(1.0 * len(lines) * 2**32 / work)    # all of them by the run's end
        return lines[:min(len(lines), sum over the steps of the credit's whole lines)]
    """
    _require()
    return torch.ops.mora_native.stream_span_lines(spans, work, done, step)
