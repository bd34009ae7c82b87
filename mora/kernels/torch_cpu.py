"""Vectorized torch backend of the fused MoRA operator (the CPU path).

Work is planned once per batch and module (all slices of a packed q/k/v or gate/up), never
per token, and the plan is shared by every layer whose tables hold the same adapters. Rows with
work are gathered once into a work order where each pass, one (type, n) spec on one slice,
owns contiguous rows: it compresses them (or pads and rotates them, type 6) in a few batched
ops, multiplies each adapter's rows by its `M` (one batched GEMM when the adapters' slots form
an arithmetic progression or their `M`s are gathered, else one `mm` each), and writes the
decompressed result with whole output periods broadcast. Every slice lands in one buffer that
is added to `y` with one scatter; a batch whose rows are already in work order (one adapter)
adds straight into `y`.

Type 6 only computes the chunks whose outputs land in `[out_start, out_end)` (a column shard
computes its own chunks) and rotates them in three elementwise ops with a signed sine table
(`rotate_half(u) * sin == swap_halves(u) * signed_sin`), copying the input only when the
last chunk wraps around (padding).

Multi-megabyte temporaries live in per-batch scratch buffers (`BatchMeta.scratch`): on a CPU
the page faults of fresh allocations cost about as much as the arithmetic here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mora.kernels.table import BatchMeta, ShardLayout, SlotTable
from mora.ops import compress, rope_tables
from mora.spec import MoraSpec, MoraType, group_sizes

__all__ = ["mora_apply_torch", "mora_apply_torch_slices"]

@functools.lru_cache(maxsize=256)
def _rope_factors(
    n: int, c: int, k_lo: int, k_hi: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks `k_lo..k_hi-1`'s `(cos, signed_sin[:, :n/2], signed_sin[:, n/2:])`, contiguous,
    where `signed_sin = cat(-sin[:, :n/2], sin[:, n/2:])` (`rotate_half(u) * sin ==
    swap_halves(u) * signed_sin`)."""
    cos, sin = rope_tables(n, c, dtype, device)
    half = n // 2
    cos, sin = cos[k_lo:k_hi], sin[k_lo:k_hi]
    return cos.contiguous(), (-sin[:, :half]).contiguous(), sin[:, half:].contiguous()


@functools.lru_cache(maxsize=512)
def _group_index(spec: MoraSpec, start: int, end: int, device: torch.device) -> torch.Tensor:
    """Types 2/4: the compressed output (group) feeding each output column in `[start, end)`."""
    sizes = torch.tensor(group_sizes(spec.out_features, spec.n), device=device)
    return torch.repeat_interleave(torch.arange(spec.n, device=device), sizes)[start:end]


def _scratch(meta: BatchMeta, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty(shape)`, reusing the batch's buffer `name` on the CPU.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB page on first touch, which on a
    CPU costs about as much as the arithmetic of this operator; a buffer kept on the batch's
    metadata is paid for once per step, not once per layer. Views are kept too: every layer
    asks for the same few shapes.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    view = meta.scratch.get((name, dtype, shape))
    if view is not None:
        return view
    numel = math.prod(shape)
    buf = meta.scratch.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = meta.scratch[(name, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    view = meta.scratch[(name, dtype, shape)] = buf[:numel].view(shape)
    return view


def _rope_chunk_range(spec: MoraSpec, lay: ShardLayout) -> tuple[int, int]:
    """Chunks `[k_lo, k_hi)` whose outputs reach columns `[out_start, out_end)`."""
    c, n = spec.num_chunks, spec.n
    if lay.out_end > c * n:  # outputs tile past c*n: every chunk is read
        return 0, c
    return lay.out_start // n, -(-lay.out_end // n)


def _rotated_chunks(X: torch.Tensor, spec: MoraSpec, k_lo: int, k_hi: int, out: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
    """`[R, in_f] -> [R*(k_hi-k_lo), n]`: chunks `k_lo..k_hi-1` of the padded input, RoPE-rotated.

    Semantics: `rope_chunks(X, spec)[:, k_lo:k_hi].reshape(-1, n)` (see `mora.ops`), written
    to `out` (`[R, k_hi-k_lo, n]`).
    """
    n, R, k = spec.n, X.shape[0], k_hi - k_lo
    cos, ssin_a, ssin_b = _rope_factors(n, spec.num_chunks, k_lo, k_hi, X.dtype, X.device)
    if k_hi == spec.num_chunks and spec.pad:  # the last chunk wraps around: one padded copy
        U = torch.cat([X[:, k_lo * n :], X[:, : spec.pad]], dim=1, out=_scratch(meta, "xpad", (R, k * n), X.dtype, X.device))
    else:
        U = X[:, k_lo * n : k_hi * n]
    U = U.view(R, k, n)
    half = n // 2
    # Strided half-width multiplies are fast, a strided addcmul_ is not: the sine terms go
    # first, then one contiguous addcmul_ adds the cosine terms.
    torch.mul(U[..., half:], ssin_a, out=out[..., :half])
    torch.mul(U[..., :half], ssin_b, out=out[..., half:])
    out.addcmul_(U, cos)
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


# Items of at most this many rows go through one batched GEMM when their `M`s must be gathered:
# below it a small `mm` per item costs mostly call overhead, above it the per-item GEMMs run at
# full speed and the gather and padding would only add memory traffic.
_BATCH_ROWS = 64
_MAX_PLANS = 256  # per batch; a step needs one per distinct set of table contents

Item = tuple[int, int, int]  # (slot, start, end): rows of the work order, in the chunk domain after `* chunks`


@dataclass(frozen=True)
class _Pass:
    """One (type, n) spec applied to the contiguous work rows `[a, b)` of one slice.

    `items`: (slot, start, end) per adapter, relative to `a`, slots ascending. `sign` -1 is the
    merged adapter's update, subtracted from every row. How the per-item products are made:
    `m_view` (start, stop, step) - the items' slots are an arithmetic progression and `M` is
    read through one strided view (no copy); `m_gather` - the items' `M`s are gathered; neither:
    one `mm` per item. `pad_rows`/`keep`: unequal row counts padded to the longest for the
    batched product (the padding's outputs dropped).
    """

    spec: MoraSpec
    a: int
    b: int
    items: list[Item]
    sign: float
    sizes: list[int]  # rows of each item in the compressed (chunk) domain
    k_lo: int
    chunks: int
    m_view: tuple[int, int, int] | None
    m_gather: torch.Tensor | None
    pad_rows: torch.Tensor | None
    keep: torch.Tensor | None

    @property
    def batched(self) -> str:
        """"view", "gather", "pad" (+ "-view" when the padded product reads a view) or ""."""
        if self.m_view is None and self.m_gather is None:
            return ""
        if self.pad_rows is None:
            return "view" if self.m_view is not None else "gather"
        return "pad-view" if self.m_view is not None else "pad"


@dataclass(frozen=True)
class _Plan:
    """A batch's work on one module (all its slices), shared by every layer whose tables hold
    the same adapters.

    Rows with work are taken in a work order where each pass's rows are contiguous (sorted by
    the slot's specs across slices, then slot): `x` is gathered once for all slices, each pass
    reads a view of it, and every slice's update lands in one `[R, width]` buffer that is added
    to `y` with one scatter (`rows` None: the work order is `y`'s own, passes add in place).
    """

    rows: torch.Tensor | None
    inv: torch.Tensor | None  # when `rows` permutes every row of `y`: its inverse
    passes: list[list[_Pass]]  # per slice, the merged pass (if any) first
    uncovered: list[list[tuple[int, int]]]  # per slice, work rows no pass writes


def _arith(slots: list[int]) -> tuple[int, int, int] | None:
    if len(slots) < 2:
        return None
    step = slots[1] - slots[0]
    if step <= 0 or any(b - a != step for a, b in zip(slots, slots[1:], strict=False)):
        return None
    return slots[0], slots[-1] + 1, step


def _make_pass(spec: MoraSpec, lay: ShardLayout, a: int, b: int, items: list[Item], sign: float, device: torch.device) -> _Pass:
    if spec.mora_type is MoraType.ROPE:
        k_lo, k_hi = _rope_chunk_range(spec, lay)
    else:
        k_lo, k_hi = 0, 1
    chunks = k_hi - k_lo
    sizes = [(e - s) * chunks for _, s, e in items]
    slots = [s for s, _, _ in items]
    k, r = len(items), max(sizes)
    m_view = m_gather = pad_rows = keep = None
    # Decode batches give each adapter a few rows: one batched GEMM instead of k small ones,
    # unless padding unequal row counts would waste more than it saves.
    if k >= 2 and sign > 0 and (min(sizes) == r or (r <= _BATCH_ROWS and 2 * k * r <= 3 * sum(sizes))):
        m_view = _arith(slots)
        if m_view is None and r <= _BATCH_ROWS:
            m_gather = torch.tensor(slots, device=device)
        if (m_view is not None or m_gather is not None) and min(sizes) != r:
            size = torch.tensor(sizes, device=device)
            start = torch.cumsum(size, 0) - size
            col = torch.arange(r, device=device)
            pad_rows = (start[:, None] + torch.minimum(col[None, :], size[:, None] - 1)).view(-1)
            keep = torch.nonzero((col[None, :] < size[:, None]).view(-1)).view(-1)
    return _Pass(spec, a, b, items, sign, sizes, k_lo, chunks, m_view, m_gather, pad_rows, keep)


def _plan(tables: Sequence[SlotTable | None], meta: BatchMeta, T: int) -> _Plan | None:
    """The batch's work on a module's `tables`; cached on `meta` per table contents."""
    key = (tuple(t.signature if t is not None else None for t in tables), T)
    if key in meta.plans:
        return meta.plans[key]  # type: ignore[return-value]
    live = [t for t in tables if t is not None]
    merged = meta.merged_slot
    has_merged = merged >= 0 and any(t.specs[merged] is not None for t in live)

    def specs_of(s: int) -> tuple:
        return tuple(t.specs[s] if t is not None and 0 <= s != merged else None for t in tables)

    segs = []  # (group, slot, start, end) over meta.order
    groups: dict[tuple, int] = {}
    for s, a, b in meta.host_segments():
        own = specs_of(s)
        if s == merged or (not has_merged and not any(own)):
            continue
        segs.append((groups.setdefault(own, len(groups)), s, a, b))
    segs.sort(key=lambda g: g[:2])
    plan = None
    if segs:
        order, device = meta.order, meta.order.device
        rows = torch.cat([order[a:b] for _, _, a, b in segs])
        R = rows.shape[0]
        inv = None
        if R == T:
            if torch.equal(rows, torch.arange(T, device=device)):
                rows = None
            else:
                inv = torch.empty_like(rows)
                inv[rows] = torch.arange(T, device=device)
        starts = [0]
        for _, _, a, b in segs:
            starts.append(starts[-1] + b - a)
        passes, uncovered = [], []
        for table in tables:
            slice_passes: list[_Pass] = []
            holes: list[tuple[int, int]] = []
            if table is not None and has_merged and table.specs[merged] is not None:
                slice_passes.append(_make_pass(table.specs[merged], table.layout, 0, R, [(merged, 0, R)], -1.0, device))
            run: list[tuple[int, int, int]] = []
            run_spec = None
            for j, (_, s, _, _) in enumerate([*segs, (None, -1, 0, 0)]):
                spec = table.specs[s] if table is not None and j < len(segs) and 0 <= s != merged else None
                if run and spec != run_spec:
                    a0 = run[0][1]
                    items = [(slot, a - a0, b - a0) for slot, a, b in run]
                    slice_passes.append(_make_pass(run_spec, table.layout, a0, run[-1][2], items, 1.0, device))
                    run = []
                if j == len(segs):
                    break
                if spec is None:
                    holes.append((starts[j], starts[j + 1]))
                else:
                    run_spec = spec
                    run.append((s, starts[j], starts[j + 1]))
            passes.append(slice_passes)
            uncovered.append(holes)
        plan = _Plan(rows, inv, passes, uncovered)
    if len(meta.plans) >= _MAX_PLANS:  # a long-lived meta (warm-up shapes) seeing adapter churn
        meta.plans.clear()
    meta.plans[key] = plan
    return plan


def _multiply(p: _Pass, V: torch.Tensor, M: torch.Tensor, out_c: torch.Tensor, meta: BatchMeta) -> None:
    """`out_c[item] = sign * V[item] @ M[slot].T` for every item of the pass."""
    if p.m_view is None and p.m_gather is None:
        for (s, _, _), v, o in zip(p.items, V.split(p.sizes), out_c.split(p.sizes), strict=True):
            if p.sign > 0:
                torch.mm(v, M[s].t(), out=o)
            else:
                torch.addmm(o, v, M[s].t(), beta=0, alpha=p.sign, out=o)
        return
    k, r, n = len(p.items), max(p.sizes), V.shape[1]
    if p.m_view is not None:
        lo, hi, step = p.m_view
        Mb = M[lo:hi:step]
    else:
        Mb = torch.index_select(M, 0, p.m_gather, out=_scratch(meta, "m", (k, n, n), M.dtype, M.device))
    if p.pad_rows is not None:
        V = torch.index_select(V, 0, p.pad_rows, out=_scratch(meta, "vp", (k * r, n), V.dtype, V.device))
    # Transposed (`M @ v.T`): with a few rows per adapter the GEMM then streams M's rows.
    outT = torch.bmm(Mb, V.view(k, r, n).transpose(1, 2), out=_scratch(meta, "ot", (k, n, r), V.dtype, V.device))
    if p.pad_rows is None:
        out_c.view(k, r, n).copy_(outT.transpose(1, 2))
        return
    Op = _scratch(meta, "op", (k, r, n), V.dtype, V.device)
    Op.copy_(outT.transpose(1, 2))
    torch.index_select(Op.view(k * r, n), 0, p.keep, out=out_c)


def _run_pass(p: _Pass, X: torch.Tensor, table: SlotTable, dst: torch.Tensor, copy: bool, meta: BatchMeta) -> None:
    """`dst[a:b] (+)= ` the pass's update of the work rows `X[a:b]`."""
    spec, lay = p.spec, table.layout
    Xp = X[p.a : p.b]
    if lay.local_in != lay.in_features:  # row-parallel shard: the other ranks' features are 0
        full = Xp.new_zeros(Xp.shape[0], lay.in_features)
        full[:, lay.in_start : lay.in_end] = Xp
        Xp = full
    R = Xp.shape[0]
    if spec.mora_type is MoraType.ROPE:
        V = _rotated_chunks(Xp, spec, p.k_lo, p.k_lo + p.chunks, _scratch(meta, "v", (R, p.chunks, spec.n), Xp.dtype, Xp.device), meta)
    else:
        V = compress(Xp, spec)  # [R, n]
    out_c = _scratch(meta, "out", tuple(V.shape), V.dtype, V.device)
    _multiply(p, V, table.weights(spec.n), out_c, meta)
    src, period, q0 = _expand(out_c.to(dst.dtype), spec, lay, R, p.k_lo)
    target = dst[p.a : p.b]
    if period:
        _add_periodic(target, src, lay.out_start, period, q0, copy=copy)
    elif copy:
        target.copy_(src)
    else:
        target.add_(src)


def mora_apply_torch_slices(
    y: torch.Tensor, x: torch.Tensor, tables: Sequence[SlotTable | None], meta: BatchMeta, offsets: Sequence[int]
) -> None:
    """`mora.kernels.mora_apply_slices` in one plan: one gather of `x`, one scatter into `y`."""
    plan = _plan(tables, meta, x.shape[0])
    if plan is None:
        return
    if plan.rows is None:
        X, D = x, y  # work order == y's order: passes add straight into y
    else:
        X = torch.index_select(x, 0, plan.rows, out=_scratch(meta, "x", (plan.rows.shape[0], x.shape[1]), x.dtype, x.device))
        D = _scratch(meta, "d", (X.shape[0], offsets[-1]), y.dtype, y.device)
    spans: list[tuple[int, int]] = []  # column ranges of D written, merged where adjacent
    for i, table in enumerate(tables):
        passes = plan.passes[i]
        if table is None or not passes:
            continue
        lo, hi = offsets[i], offsets[i + 1]
        dst = D[:, lo:hi]
        Xt = X if X.dtype == table.dtype else X.to(table.dtype)
        # Into the scratch buffer the first writer of a row copies (the merged pass covers every
        # row; without it the own passes are the only writers and the holes are zeroed); into y
        # everything adds.
        scratch = plan.rows is not None
        subtract_first = passes[0].sign < 0
        for p in passes:
            _run_pass(p, Xt, table, dst, scratch and (p.sign < 0 or not subtract_first), meta)
        if scratch and not subtract_first:
            for a, b in plan.uncovered[i]:
                dst[a:b].zero_()
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    if plan.rows is None:
        return
    for lo, hi in spans:
        part, yp = D[:, lo:hi], y[:, lo:hi]
        if plan.inv is not None:
            yp.add_(torch.index_select(part, 0, plan.inv, out=_scratch(meta, "src", tuple(part.shape), part.dtype, part.device)))
        else:
            yp.index_add_(0, plan.rows, part)  # fast when both are contiguous: one span of a packed y


def mora_apply_torch(y: torch.Tensor, x: torch.Tensor, table: SlotTable, meta: BatchMeta) -> None:
    """`y[t] += delta_{slot[t]}(x[t])`, with the merged-slot remap; see `mora.kernels.mora_apply`."""
    mora_apply_torch_slices(y, x, [table], meta, [0, y.shape[1]])
