"""Vectorized torch backend of the fused MoRA operator (the CPU path).

Work is organised once per call, never per token: rows are taken in the batch's slot order,
adapters that share a (type, n) class are compressed (or padded and rotated, type 6) in one
batched op, each slot's rows then get one matrix multiply with that slot's `M`, and the
decompressed result is added to `y` in one `index_add_` (or, when the class covers the whole
batch, one un-permuting gather and in-place adds with whole output periods broadcast). A batch
with A adapters costs a handful of ops per class plus one `mm` per adapter, whatever the
number of tokens; a batch with one adapter needs no gather at all.

Type 6 only computes the chunks whose outputs land in `[out_start, out_end)` (a column shard
computes its own chunks) and rotates them in three elementwise ops with a signed sine table
(`rotate_half(u) * sin == swap_halves(u) * signed_sin`), without concatenations.

Multi-megabyte temporaries live in per-batch scratch buffers (`BatchMeta.scratch`): on a CPU
the page faults of fresh allocations cost about as much as the arithmetic here.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from mora.kernels.table import BatchMeta, ShardLayout, SlotTable
from mora.ops import compress, rope_tables
from mora.spec import MoraSpec, MoraType, group_sizes

__all__ = ["mora_apply_torch"]

@functools.lru_cache(maxsize=256)
def _rope_signed(n: int, c: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, signed_sin)`, each `[c, n]`: `signed_sin = cat(-sin[:, :n/2], sin[:, n/2:])`."""
    cos, sin = rope_tables(n, c, dtype, device)
    half = n // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=1)


@functools.lru_cache(maxsize=512)
def _group_index(spec: MoraSpec, start: int, end: int, device: torch.device) -> torch.Tensor:
    """Types 2/4: the compressed output (group) feeding each output column in `[start, end)`."""
    sizes = torch.tensor(group_sizes(spec.out_features, spec.n), device=device)
    return torch.repeat_interleave(torch.arange(spec.n, device=device), sizes)[start:end]


def _scratch(meta: BatchMeta, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty(shape)`, reusing the batch's buffer `name` on the CPU.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB page on first touch, which on a
    CPU costs about as much as the arithmetic of this operator; a buffer kept on the batch's
    metadata is paid for once per step, not once per layer.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buf = meta.scratch.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = meta.scratch[(name, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def _rope_chunk_range(spec: MoraSpec, lay: ShardLayout) -> tuple[int, int]:
    """Chunks `[k_lo, k_hi)` whose outputs reach columns `[out_start, out_end)`."""
    c, n = spec.num_chunks, spec.n
    if lay.out_end > c * n:  # outputs tile past c*n: every chunk is read
        return 0, c
    return lay.out_start // n, -(-lay.out_end // n)


def _rotated_chunks(X: torch.Tensor, spec: MoraSpec, k_lo: int, k_hi: int, out: torch.Tensor) -> torch.Tensor:
    """`[R, in_f] -> [R*(k_hi-k_lo), n]`: chunks `k_lo..k_hi-1` of the padded input, RoPE-rotated.

    Semantics: `rope_chunks(X, spec)[:, k_lo:k_hi].reshape(-1, n)` (see `mora.ops`), written
    to `out` (`[R, k_hi-k_lo, n]`).
    """
    n, c, R = spec.n, spec.num_chunks, X.shape[0]
    cos, ssin = _rope_signed(n, c, X.dtype, X.device)
    # The padded last chunk is rotated from a small copy; the others straight from views of X.
    whole = k_hi - 1 if (k_hi == c and spec.pad) else k_hi
    parts = [(X[:, k_lo * n : whole * n].view(R, whole - k_lo, n), k_lo, whole)] if whole > k_lo else []
    if whole < k_hi:
        parts.append((torch.cat([X[:, whole * n :], X[:, : spec.pad]], dim=1).view(R, 1, n), whole, k_hi))
    half = n // 2
    for U, a, b in parts:
        # Strided half-width multiplies are fast, a strided addcmul_ is not: the sine terms go
        # first, then one contiguous addcmul_ adds the cosine terms.
        dst = out[:, a - k_lo : b - k_lo]
        torch.mul(U[..., half:], ssin[a:b, :half], out=dst[..., :half])
        torch.mul(U[..., :half], ssin[a:b, half:], out=dst[..., half:])
        dst.addcmul_(U, cos[a:b])
    return out.view(-1, n)


def _add_periodic(dst: torch.Tensor, src: torch.Tensor, start: int, period: int, q0: int, *, copy: bool = False) -> None:
    """`dst[:, i] += src[:, (start + i) % period - q0]` for every column `i` of `dst` (`=` if `copy`).

    Whole periods are one broadcast op; only a partial head and tail are separate ops. `q0 > 0`
    (`src` starts inside the period) only happens when `dst` lies within one period.
    """
    op = torch.Tensor.copy_ if copy else torch.Tensor.add_
    width, q = dst.shape[1], start % period
    if q + width <= period:
        op(dst, src[:, q - q0 : q - q0 + width])
        return
    i = 0
    if q:
        i = period - q
        op(dst[:, :i], src[:, q:period])
    full = (width - i) // period
    if full:
        op(dst[:, i : i + full * period].view(dst.shape[0], full, period), src[:, None, :period])
        i += full * period
    if i < width:
        op(dst[:, i:], src[:, : width - i])


def _expand(out_c: torch.Tensor, spec: MoraSpec, lay: ShardLayout, R: int, k_lo: int) -> tuple[torch.Tensor, int, int]:
    """The compressed outputs as `(src, period, q0)`: column `j` reads `src[:, j % period - q0]`.

    Types 2/4 (repeat each) are gathered to `[R, local_out]` here (`period` 0: `src` is it).
    """
    if spec.mora_type is MoraType.ROPE:
        return out_c.view(R, -1), spec.num_chunks * spec.n, k_lo * spec.n
    if spec.mora_type.tiles_output:
        return out_c, spec.n, 0
    return out_c.index_select(1, _group_index(spec, lay.out_start, lay.out_end, out_c.device)), 0, 0


def _add_rows(
    y: torch.Tensor,
    src: torch.Tensor,
    lay: ShardLayout,
    period: int,
    q0: int,
    rows: torch.Tensor | None,
    inv: torch.Tensor | None,
    meta: BatchMeta,
) -> None:
    """`y[rows] += ` the shard's columns of `src` (see `_expand`); `rows` None: all rows, in order.

    `inv`: when `rows` is a permutation of all of `y`'s rows, its inverse. `index_add_` is only
    fast with contiguous operands; otherwise a permutation is undone once on the compressed
    outputs and added in place.
    """
    if rows is not None:
        width, q = lay.local_out, lay.out_start % period if period else 0
        direct = src if not period else src[:, q - q0 : q - q0 + width] if q + width <= period else None
        if direct is not None and direct.is_contiguous() and y.is_contiguous():
            y.index_add_(0, rows, direct)
            return
        if inv is None:
            if direct is None:
                direct = torch.empty(src.shape[0], width, dtype=src.dtype, device=src.device)
                _add_periodic(direct, src, lay.out_start, period, q0, copy=True)
            y.index_add_(0, rows, direct.contiguous())
            return
        src = torch.index_select(src, 0, inv, out=_scratch(meta, "src", tuple(src.shape), src.dtype, src.device))
    if period:
        _add_periodic(y, src, lay.out_start, period, q0)
    else:
        y.add_(src)


# Items of at most this many rows go through one batched GEMM when the table must be gathered:
# below it a small `mm` per item costs mostly call overhead, above it the per-item GEMMs run at
# full speed and the gather and padding would only add memory traffic.
_BATCH_ROWS = 64
_MAX_PLANS = 256  # per batch; a step needs one per distinct table contents

Item = tuple[int, float, int, int]  # (slot, sign, start, end) over the slot-sorted rows


@dataclass(frozen=True)
class _ClassPlan:
    """One (type, n) class of a batch's work, everything that depends only on the batch and
    the table's contents (shared by all layers whose tables hold the same adapters).

    `batch`: "" (one `mm` per item), "view" (one `bmm` over `Mt[slots[0]:slots[0]+k]`),
    "gather" (one `bmm` over the gathered `Mt[slots]`), "pad" (the same with short items
    padded by `pad_rows` and the outputs kept by `keep`).
    """

    spec: MoraSpec
    work: list[Item]
    rows: torch.Tensor | None  # the class's rows of x (None: all, in order)
    inv: torch.Tensor | None  # when `rows` permutes every row: its inverse
    sizes: list[int]  # rows of each item in the compressed (chunk) domain
    k_lo: int
    chunks: int
    batch: str
    slots: torch.Tensor | None
    pad_rows: torch.Tensor | None
    keep: torch.Tensor | None


def _batch_mode(work: list[Item], sizes: list[int]) -> str:
    """How a class's items are multiplied (see `_ClassPlan.batch`).

    Decode batches give each adapter a few rows: equal row counts in consecutive slots are one
    `bmm` over a view of the table; otherwise the items' `M`s are gathered and short items are
    padded to the longest by repeating their first row (whose extra outputs are dropped).
    """
    k, r = len(work), max(sizes)
    if k < 2 or any(sign < 0 for _, sign, _, _ in work):
        return ""
    equal = min(sizes) == r
    if equal and all(work[i][0] == work[0][0] + i for i in range(k)):
        return "view"
    if r > _BATCH_ROWS or 2 * k * r > 3 * sum(sizes):
        return ""
    return "gather" if equal else "pad"


def _plan(table: SlotTable, meta: BatchMeta, T: int) -> list[_ClassPlan]:
    """The batch's work on `table`, by (type, n) class; cached on `meta` per table contents."""
    key = (table.signature, T)
    plan = meta.plans.get(key)
    if plan is not None:
        return plan  # type: ignore[return-value]
    lay = table.layout
    segments = meta.host_segments()
    merged = meta.merged_slot
    items: list[Item] = [(s, 1.0, a, b) for s, a, b in segments if s >= 0 and s != merged and table.specs[s] is not None]
    if merged >= 0 and table.specs[merged] is not None:
        items += [(merged, -1.0, a, b) for s, a, b in segments if s != merged]
    classes: dict[MoraSpec, list[Item]] = defaultdict(list)
    for item in items:
        classes[table.specs[item[0]]].append(item)
    order, device = meta.order, meta.order.device
    plan = []
    for spec, work in classes.items():
        if len(work) == 1 and work[0][2:] == (0, T):
            rows = None  # one adapter for the whole batch: rows already in order
        elif len(work) == 1:
            rows = order[work[0][2] : work[0][3]]
        else:
            rows = torch.cat([order[a:b] for _, _, a, b in work])
        inv = None
        if rows is not None and rows.shape[0] == T and len({(a, b) for *_, a, b in work}) == len(work):
            inv = torch.empty_like(rows)
            inv[rows] = torch.arange(T, device=device)
        if spec.mora_type is MoraType.ROPE:
            k_lo, k_hi = _rope_chunk_range(spec, lay)
        else:
            k_lo, k_hi = 0, 1
        chunks = k_hi - k_lo
        sizes = [(b - a) * chunks for _, _, a, b in work]
        mode = _batch_mode(work, sizes)
        slots = pad_rows = keep = None
        if mode in ("gather", "pad"):
            slots = torch.tensor([s for s, _, _, _ in work], device=device)
        if mode == "pad":
            size = torch.tensor(sizes, device=device)
            start = torch.cumsum(size, 0) - size
            col = torch.arange(max(sizes), device=device)
            pad_rows = (start[:, None] + torch.minimum(col[None, :], size[:, None] - 1)).view(-1)
            keep = torch.nonzero((col[None, :] < size[:, None]).view(-1)).view(-1)
        plan.append(_ClassPlan(spec, work, rows, inv, sizes, k_lo, chunks, mode, slots, pad_rows, keep))
    if len(meta.plans) >= _MAX_PLANS:  # a long-lived meta (warm-up shapes) seeing adapter churn
        meta.plans.clear()
    meta.plans[key] = plan
    return plan


def _multiply(cp: _ClassPlan, V: torch.Tensor, Mt: torch.Tensor, out_c: torch.Tensor, meta: BatchMeta) -> None:
    """`out_c[item] = sign * V[item] @ Mt[slot]` for every item of the class."""
    if cp.batch:
        k, r, n = len(cp.work), max(cp.sizes), V.shape[1]
        if cp.batch == "view":
            s0 = cp.work[0][0]
            torch.bmm(V.view(k, r, n), Mt[s0 : s0 + k], out=out_c.view(k, r, n))
            return
        Mb = torch.index_select(Mt, 0, cp.slots, out=_scratch(meta, "m", (k, n, n), Mt.dtype, Mt.device))
        if cp.batch == "gather":
            torch.bmm(V.view(k, r, n), Mb, out=out_c.view(k, r, n))
            return
        Vp = torch.index_select(V, 0, cp.pad_rows, out=_scratch(meta, "vp", (k * r, n), V.dtype, V.device))
        Op = torch.bmm(Vp.view(k, r, n), Mb, out=_scratch(meta, "op", (k, r, n), V.dtype, V.device))
        torch.index_select(Op.view(k * r, n), 0, cp.keep, out=out_c)
        return
    for (s, sign, _, _), v, o in zip(cp.work, V.split(cp.sizes), out_c.split(cp.sizes), strict=True):
        if sign > 0:
            torch.mm(v, Mt[s], out=o)
        else:
            torch.addmm(o, v, Mt[s], beta=0, alpha=sign, out=o)


def mora_apply_torch(y: torch.Tensor, x: torch.Tensor, table: SlotTable, meta: BatchMeta) -> None:
    """`y[t] += delta_{slot[t]}(x[t])`, with the merged-slot remap; see `mora.kernels.mora_apply`."""
    lay = table.layout
    plan = _plan(table, meta, x.shape[0])
    if not plan:
        return
    xin = x.to(table.dtype)
    for cp in plan:
        spec, rows = cp.spec, cp.rows
        if rows is None:
            X = xin
        else:
            X = torch.index_select(xin, 0, rows, out=_scratch(meta, "x", (rows.shape[0], xin.shape[1]), xin.dtype, xin.device))
        if lay.local_in != lay.in_features:
            full = X.new_zeros(X.shape[0], lay.in_features)
            full[:, lay.in_start : lay.in_end] = X
            X = full
        R = X.shape[0]
        if spec.mora_type is MoraType.ROPE:
            V = _rotated_chunks(X, spec, cp.k_lo, cp.k_lo + cp.chunks, _scratch(meta, "v", (R, cp.chunks, spec.n), X.dtype, X.device))
        else:
            V = compress(X, spec)  # [R, n]
        out_c = _scratch(meta, "out", tuple(V.shape), V.dtype, V.device)
        Mt = table.Mt if spec.n == table.n_max else table.Mt[:, : spec.n, : spec.n]
        _multiply(cp, V, Mt, out_c, meta)
        src, period, q0 = _expand(out_c.to(y.dtype), spec, lay, R, cp.k_lo)
        _add_rows(y, src, lay, period, q0, rows, cp.inv, meta)
