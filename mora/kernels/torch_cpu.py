"""Vectorized torch backend of the fused MoRA operator (the CPU path).

Work is planned once per batch and module (all slices of a packed q/k/v or gate/up), never
per token (`torch_plan`), and the plan is shared by every layer whose tables hold the same
adapters. Rows with work are gathered once into a work order where each pass, one (type, n)
spec on one slice, owns contiguous rows: it compresses them (or rotates them, type 6) in a few
batched ops, multiplies each adapter's rows by its `M`, and writes the decompressed result
with whole output periods broadcast into one buffer that is added to `y` with one scatter.

The products of float32 and bfloat16 tables run in the native kernel (`torch_native`,
`mora.kernels.native`): one call per pass, and a slice's type-6 and type-1 passes run from `x`
straight into `y` with none of the buffers above (the general path then only carries its other
types). Otherwise (float16, `MORA_CPU_KERNEL=blas`, CPUs that are not x86-64) they are BLAS
calls: one batched GEMM when the adapters' slots form an arithmetic progression or their `M`s
are gathered, else one `mm` each.

A plan is bound once into a program: every op with its operands already sliced out of the
batch's scratch buffers, so that a layer runs a flat list of torch calls and reads only its
own `x`, `y` and tables. A decode step of a small model is dominated by per-op overhead; the
slicing, views and Python bookkeeping that each layer would otherwise redo cost about as much
as the arithmetic.

`x` is gathered into a buffer wide enough for the padded input (`cat(x, x[:, :pad])`), filled
once per module, so a chunked pass reads its chunks, the wrapped last one included, as a view.
Type 6 only computes the chunks whose outputs land in `[out_start, out_end)` (a column shard
computes its own chunks) and rotates them in three elementwise ops with a signed sine table
(`rotate_half(u) * sin == swap_halves(u) * signed_sin`).

Multi-megabyte temporaries live in per-batch scratch buffers (`BatchMeta.scratch`): on a CPU
the page faults of fresh allocations cost about as much as the arithmetic here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mora.kernels.table import BatchMeta, ShardLayout, SlotTable
from mora.kernels.torch_native import DirectOp, bind_direct, bind_product
from mora.kernels.torch_plan import Pass, Plan, plan_module
from mora.ops import compress, rope_signed_tables
from mora.spec import MoraSpec, MoraType, group_sizes

__all__ = ["mora_apply_torch", "mora_apply_torch_slices"]

Op = Callable[[], object]  # a torch call with every operand bound
TableOp = Callable[[SlotTable], object]  # the product: reads the layer's table


@functools.lru_cache(maxsize=256)
def _rope_factors(
    n: int, c: int, k_lo: int, k_hi: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks `k_lo..k_hi-1`'s `(cos, signed_sin[:, :n/2], signed_sin[:, n/2:])`, contiguous
    (`mora.ops.rope_signed_tables`, its halves apart)."""
    cos, signed = rope_signed_tables(n, c, k_lo, k_hi, dtype, device)
    half = n // 2
    return cos, signed[:, :half].contiguous(), signed[:, half:].contiguous()


@functools.lru_cache(maxsize=512)
def _group_index(spec: MoraSpec, start: int, end: int, device: torch.device) -> torch.Tensor:
    """Types 2/4: the compressed output (group) feeding each output column in `[start, end)`."""
    sizes = torch.tensor(group_sizes(spec.out_features, spec.n), device=device)
    return torch.repeat_interleave(torch.arange(spec.n, device=device), sizes)[start:end]


def _scratch(meta: BatchMeta, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty(shape)`, reusing the batch's buffer `name` on the CPU.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB page on first touch, which on a
    CPU costs about as much as the arithmetic of this operator; a buffer kept on the batch's
    metadata is paid for once per step, not once per layer. Views bound into programs keep
    their storage alive when a larger request replaces the buffer.
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


# --- binding: a plan's passes as flat lists of bound torch calls ------------------------------


def _bind_transform(p: Pass, X: torch.Tensor, meta: BatchMeta) -> tuple[list[Op], torch.Tensor]:
    """Ops writing the pass's compressed (types 1-4) or rotated (type 6) rows; and those rows.

    Semantics: `V = compress(xf[a:b], spec)` (`[R, n]`), or for type 6
    `V = rope_chunks(xf[a:b], spec)[:, k_lo:k_hi].reshape(-1, n)`, where `xf` is the padded
    full-width work-order input held in `X` (`[R_all, >= in_f + pad]`).
    """
    spec, n, R = p.spec, p.spec.n, p.b - p.a
    Xp = X[p.a : p.b]
    if spec.mora_type is MoraType.ROPE:
        k = p.chunks
        U = Xp[:, p.k_lo * n : (p.k_lo + k) * n].view(R, k, n)
        V = _scratch(meta, "v", (R, k, n), X.dtype, X.device)
        cos, ssin_a, ssin_b = _rope_factors(n, spec.num_chunks, p.k_lo, p.k_lo + k, X.dtype, X.device)
        half = n // 2
        # Strided half-width multiplies are fast, a strided addcmul_ is not: the sine terms go
        # first, then one contiguous addcmul_ adds the cosine terms.
        ops: list[Op] = [
            functools.partial(torch.mul, U[..., half:], ssin_a, out=V[..., :half]),
            functools.partial(torch.mul, U[..., :half], ssin_b, out=V[..., half:]),
            functools.partial(V.addcmul_, U, cos),
        ]
        return ops, V.view(R * k, n)
    V = _scratch(meta, "v", (R, n), X.dtype, X.device)
    if spec.mora_type.chunks_input:
        return [functools.partial(torch.sum, Xp[:, : spec.num_chunks * n].view(R, spec.num_chunks, n), 1, out=V)], V
    Xu = Xp[:, : spec.in_features]
    return [lambda: V.copy_(compress(Xu, spec))], V


def _bind_multiply(p: Pass, V: torch.Tensor, out_c: torch.Tensor, meta: BatchMeta, table: SlotTable,
                   rows_major: bool | None = None) -> tuple[list[Op], TableOp, list[Op]]:
    """`out_c[item] = sign * V[item] @ M[slot].T` for every item: (ops before, the product, ops after).
    A batched product runs as `v @ M.T` (`rows_major`) or `M @ v.T`; None: by the rows per item.
    `table`: one of the signature the ops will read (where its `M`s are stored padded, the
    batched product reads them so, `_stored_product`)."""
    n = p.spec.n
    native = bind_product(p, V, out_c)  # one call for every item, whatever their rows
    if native is not None:
        return [], native, []
    if p.m_view is None and p.m_gather is None:
        pairs = list(zip([s for s, _, _ in p.items], V.split(p.sizes), out_c.split(p.sizes), strict=True))
        if p.sign > 0:

            def product(table: SlotTable) -> None:
                for s, v, o in pairs:
                    torch.mm(v, table.slot_t(s, n), out=o)

        else:
            sign = p.sign

            def product(table: SlotTable) -> None:
                for s, v, o in pairs:
                    torch.addmm(o, v, table.slot_t(s, n), beta=0, alpha=sign, out=o)

        return [], product, []
    k, r = len(p.items), max(p.sizes)
    before: list[Op] = []
    if p.pad_rows is not None:
        VP = _scratch(meta, "vp", (k * r, n), V.dtype, V.device)
        before.append(functools.partial(torch.index_select, V, 0, p.pad_rows, out=VP))
        V = VP
    if rows_major is None:
        rows_major = _ROWS_MAJOR[0] < r <= _ROWS_MAJOR[1]
    Vv = V.view(k, r, n) if rows_major else V.view(k, r, n).transpose(1, 2)
    wide = _stored_width(p, table)
    if wide is not None:  # with the pad's products too, those with M copied out after
        prod = _scratch(meta, "ow", (k, r, wide) if rows_major else (k, wide, r), V.dtype, V.device)
        product = _stored_product(p, Vv, prod, rows_major)
        prod = prod[..., :n] if rows_major else prod[:, :n, :]
    else:
        if rows_major:  # `v @ M.T`, written straight into the outputs' layout
            prod = out_c.view(k, r, n) if p.pad_rows is None else _scratch(meta, "op", (k, r, n), V.dtype, V.device)
        else:  # `M @ v.T`, transposed back afterwards
            prod = _scratch(meta, "ot", (k, n, r), V.dtype, V.device)
        product = _view_product(p, Vv, prod, meta, rows_major)
    after: list[Op] = []
    rows = prod  # [k, r, n]: the products in the (padded) rows' layout
    if rows_major and wide is not None:  # (no padded rows: _stored_width)
        after.append(functools.partial(out_c.view(k, r, n).copy_, prod))
    if not rows_major:
        rows = out_c.view(k, r, n) if p.pad_rows is None else _scratch(meta, "op", (k, r, n), V.dtype, V.device)
        after.append(functools.partial(rows.copy_, prod.transpose(1, 2)))
    if p.pad_rows is not None:
        after.append(functools.partial(torch.index_select, rows.view(k * r, n), 0, p.keep, out=out_c))
    return before, product, after


def _view_product(p: Pass, Vv: torch.Tensor, prod: torch.Tensor, meta: BatchMeta, rows_major: bool) -> TableOp:
    """The batched product of pass `p` into `prod` over `[:n, :n]` views of the slots' `M`s:
    slots in arithmetic progression (`p.m_view`) read through the table's view, others gathered
    into a dense buffer first (`p.m_gather`)."""
    n = p.spec.n
    if p.m_view is not None:
        lo, hi, step = p.m_view
        if rows_major:
            return lambda table: torch.bmm(Vv, table.batch_view(n, lo, hi, step, transposed=True), out=prod)
        return lambda table: torch.bmm(table.batch_view(n, lo, hi, step), Vv, out=prod)
    MG = _scratch(meta, "m", (len(p.items), n, n), Vv.dtype, Vv.device)
    idx = p.m_gather
    operands = (Vv, MG.transpose(1, 2)) if rows_major else (MG, Vv)

    def product(table: SlotTable) -> None:
        torch.index_select(table.weights(n), 0, idx, out=MG)
        torch.bmm(*operands, out=prod)

    return product


# Rows per adapter (chunk domain) for which the batched BLAS product is computed as `v @ M.T`:
# on this CPU's BLAS about twice as fast as `M @ v.T` for 6-12 rows, no slower up to 32. With 1-4
# rows (a type 1-4 adapter's decode tokens) `M @ v.T` wins when the `M`s come from memory, as
# they do in a model's forward; beyond 32 it is a little faster.
_ROWS_MAJOR = (4, 32)


def _bind_periodic(dst: torch.Tensor, src: torch.Tensor, start: int, period: int, q0: int, copy: bool) -> list[Op]:
    """`dst[:, i] (+)= src[:, (start + i) % period - q0]` for every column `i` of `dst`.

    Whole periods are one broadcast op; only a partial head and tail are separate ops. `q0 > 0`
    (`src` starts inside the period) only happens when `dst` lies within one period.
    """

    def op(d: torch.Tensor, s: torch.Tensor) -> Op:
        return functools.partial(d.copy_ if copy else d.add_, s)

    width, q = dst.shape[1], start % period
    if q + width <= period:
        return [op(dst, src[:, q - q0 : q - q0 + width])]
    ops, i = [], 0
    if q:
        i = period - q
        ops.append(op(dst[:, :i], src[:, q:period]))
    full = (width - i) // period
    if full:
        ops.append(op(dst[:, i : i + full * period].view(dst.shape[0], full, period), src[:, None, :period]))
        i += full * period
    if i < width:
        ops.append(op(dst[:, i:], src[:, : width - i]))
    return ops


def _bind_expand(p: Pass, lay: ShardLayout, out_c: torch.Tensor, dst: torch.Tensor, copy: bool, meta: BatchMeta) -> list[Op]:
    """Ops writing the decompressed outputs' columns `[out_start, out_end)` into `dst` (`=` if `copy`)."""
    spec, R = p.spec, p.b - p.a
    ops: list[Op] = []
    src = out_c
    if src.dtype != dst.dtype:
        cast = _scratch(meta, "cast", tuple(src.shape), dst.dtype, dst.device)
        ops.append(functools.partial(cast.copy_, src))
        src = cast
    if spec.mora_type is MoraType.ROPE:
        return ops + _bind_periodic(dst, src.view(R, -1), lay.out_start, spec.num_chunks * spec.n, p.k_lo * spec.n, copy)
    if spec.mora_type.tiles_output:
        return ops + _bind_periodic(dst, src, lay.out_start, spec.n, 0, copy)
    G = _scratch(meta, "g", (R, lay.local_out), dst.dtype, dst.device)
    ops.append(functools.partial(torch.index_select, src, 1, _group_index(spec, lay.out_start, lay.out_end, src.device), out=G))
    ops.append(functools.partial(dst.copy_ if copy else dst.add_, G))
    return ops


@dataclass(frozen=True)
class _Program:
    """A plan bound to one batch's buffers: a layer runs `gather(x)`, `fill`, every slice's
    ops (each pass's product reading that slice's table), then `scatter(y)`; direct slices
    (`torch_native.bind_direct`) read `x` and add into `y` themselves."""

    gather: Callable[[torch.Tensor], object] | None  # None: every slice is direct
    fill: list[Op]
    slices: list[tuple[int, list[Op | tuple[TableOp]]]]  # (table index, ops; a 1-tuple: the product)
    scatter: list[Callable[[torch.Tensor], object]]
    direct: list[tuple[int, DirectOp]]  # (table index, one native call from x into y)


def _bind_scatter(part: torch.Tensor, lo: int, hi: int, width: int, plan: Plan, meta: BatchMeta) -> Callable[[torch.Tensor], object]:
    """`y[:, lo:hi] += part` with `part`'s rows in work order (`plan.rows`)."""
    whole = lo == 0 and hi == width
    rows, inv = plan.rows, plan.inv
    if rows is None:
        return (lambda y: y.add_(part)) if whole else (lambda y: y[:, lo:hi].add_(part))
    if inv is None:  # a subset of y's rows
        return lambda y: (y if whole else y[:, lo:hi]).index_add_(0, rows, part)
    src = _scratch(meta, "src", tuple(part.shape), part.dtype, part.device)

    def add_permuted(y: torch.Tensor) -> None:
        torch.index_select(part, 0, inv, out=src)
        (y if whole else y[:, lo:hi]).add_(src)

    return add_permuted


def _blas_product(p: Pass, table: SlotTable, meta: BatchMeta, dtype: torch.dtype, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, list[TableOp]]:
    """A direct pass's product by torch's BLAS (`bind_direct`'s `blas`): its rows' buffer V, the
    products' buffer (`out_c[:, :n]`; wider where it takes `M`'s rows as stored), and the ops
    filling one from the other, batched as the general path's."""
    n = p.spec.n
    rows = (p.b - p.a) * (p.chunks if p.spec.mora_type is MoraType.ROPE else 1)
    V = _scratch(meta, "v", (rows, n), dtype, device)
    wide = _stored_width(p, table)
    if wide is not None:  # rope_add reads the products' first n columns where they are
        k, r = len(p.items), p.sizes[0]
        out_c = _scratch(meta, "out-wide", (rows, wide), dtype, device)
        return V, out_c, [_stored_product(p, V.view(k, r, n), out_c.view(k, r, wide), rows_major=True)]
    out_c = _scratch(meta, "out", (rows, p.spec.n), dtype, device)
    # Batched as `v @ M.T` at every size: this product runs where oneDNN has AMX, on which past
    # _ROWS_MAJOR `M @ v.T` and its transpose back ran 1.9-4.3x as long (16 adapters x 64-512 rows
    # of n=256), and one `mm` per adapter 1.5-2.4x (~27 us of call each).
    before, product, after = _bind_multiply(p, V, out_c, meta, table, rows_major=True)
    return V, out_c, [*[(lambda _t, op=op: op()) for op in before], product, *[(lambda _t, op=op: op()) for op in after]]


def _stored_product(p: Pass, Vv: torch.Tensor, prod: torch.Tensor, rows_major: bool) -> TableOp:
    """The batched product of pass `p` (consecutive slots, `_stored_width`) reading the slots'
    `M`s as stored, rows padded to `wide` columns, which bmm takes in place: into `prod`
    `[k, r, wide]` as `v @ M.T` (`rows_major`; Vv `[k, r, n]`) or `[k, wide, r]` as `M @ v.T`
    (Vv `[k, n, r]`). The columns (rows) past n are products with the pad, 0, read by no one.
    Over the `[:n, :n]` view oneDNN copies every `M` first (it takes a batch of matrices only
    dense or exactly transposed): gate_proj n=348, 64 adapters of 2 tokens, 2.3 of 5.3 ms in bf16."""
    n, (start, stop, _) = p.spec.n, p.m_view
    wide = prod.shape[2] if rows_major else prod.shape[1]
    narrow = prod[..., :n] if rows_major else prod[:, :n, :]

    def product(t: SlotTable) -> None:
        stored = t.stored_rows(n, start, stop)
        if stored is not None and stored.shape[2] == wide:
            torch.bmm(*((Vv, stored) if rows_major else (stored.transpose(1, 2), Vv)), out=prod)
        else:  # a table laid out otherwise than the one bound (same signature): via the view
            narrow.copy_(torch.bmm(Vv, t.batch_view(n, start, stop, 1, transposed=True)) if rows_major
                         else torch.bmm(t.batch_view(n, start, stop, 1), Vv))

    return product


def _stored_width(p: Pass, table: SlotTable) -> int | None:
    """The row width of `table`'s stored `M`s where pass `p`'s product can read them as stored
    (`SlotTable.stored_rows`: consecutive slots, equal rows per item, every `M` filling the
    table, rows padded past `n`); None where the `[:n, :n]` view is dense or the pass gathers."""
    if p.m_view is None or p.m_view[2] != 1 or p.pad_rows is not None:
        return None
    stored = table.stored_rows(p.spec.n, p.m_view[0], p.m_view[1])
    return stored.shape[2] if stored is not None and stored.shape[2] > p.spec.n else None


def _bind(plan: Plan, tables: Sequence[SlotTable | None], x: torch.Tensor, y: torch.Tensor, offsets: Sequence[int], meta: BatchMeta) -> _Program:
    direct: list[tuple[int, DirectOp]] = []
    left: list[list[Pass]] = []  # per slice, the passes the general path runs
    blas = functools.partial(_blas_product, meta=meta, dtype=x.dtype, device=x.device)
    for i, table in enumerate(tables):
        op, rest = bind_direct(plan.passes[i], plan, table, x, y, offsets[i], offsets[i + 1], blas) if table is not None else (None, [])
        if op is not None:
            direct.append((i, op))
        left.append(rest)
    if not any(left):
        return _Program(None, [], [], [], direct)
    live = [t for t in tables if t is not None]
    lay0 = live[0].layout
    in_f, device = lay0.in_features, x.device
    R = x.shape[0] if plan.rows is None else plan.rows.shape[0]
    pad = max((p.spec.pad for ps in plan.passes for p in ps if p.spec.mora_type.chunks_input), default=0)
    X = _scratch(meta, "x", (R, in_f + pad), x.dtype, device)
    Xg = X[:, lay0.in_start : lay0.in_end]
    rows = plan.rows
    if rows is None:
        place: Callable[[torch.Tensor], object] = Xg.copy_
    else:
        def place(x: torch.Tensor) -> None:
            torch.index_select(x, 0, rows, out=Xg)
    if lay0.local_in != in_f:  # row-parallel shard: the other ranks' features are 0
        def gather(x: torch.Tensor) -> None:
            X.zero_()
            place(x)
    else:
        gather = place
    fill: list[Op] = []
    if pad:  # the padded input `cat(x, x[:, :pad])`, read by every chunked pass as a view
        fill.append(functools.partial(X[:, in_f : in_f + pad].copy_, X[:, :pad]))
    cast: dict[torch.dtype, torch.Tensor] = {x.dtype: X}
    for t in live:
        if t.dtype not in cast:
            cast[t.dtype] = _scratch(meta, f"x-{t.dtype}", (R, in_f + pad), t.dtype, device)
            fill.append(functools.partial(cast[t.dtype].copy_, X))

    D = _scratch(meta, "d", (R, offsets[-1]), y.dtype, device)
    slices: list[tuple[int, list[Op | tuple[TableOp]]]] = []
    spans: list[tuple[int, int]] = []  # column ranges of D written, merged where adjacent
    for i, table in enumerate(tables):
        passes = left[i]
        if table is None or not passes:
            continue
        lo, hi = offsets[i], offsets[i + 1]
        dst = D[:, lo:hi]
        Xt = cast[table.dtype]
        # The first writer of a row copies (the merged pass covers every row; without it the
        # own passes are the only writers and the holes are zeroed), later ones add.
        subtract_first = passes[0].sign < 0
        ops: list[Op | tuple[TableOp]] = []
        for p in passes:
            ops_t, V = _bind_transform(p, Xt, meta)
            out_c = _scratch(meta, "out", tuple(V.shape), V.dtype, device)
            before, product, after = _bind_multiply(p, V, out_c, meta, table)
            copy = p.sign < 0 or not subtract_first
            ops += ops_t + before + [(product,)] + after + _bind_expand(p, table.layout, out_c, dst[p.a : p.b], copy, meta)
        if not subtract_first:  # rows no pass writes here: none, or a direct pass's (added into y by it)
            ops += [dst[a:b].zero_ for a, b in plan.uncovered[i]]
            ops += [dst[p.a : p.b].zero_ for p in plan.passes[i] if all(p is not q for q in passes)]
        slices.append((i, ops))
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))

    scatter = [_bind_scatter(D[:, lo:hi], lo, hi, y.shape[1], plan, meta) for lo, hi in spans]
    return _Program(gather, fill, slices, scatter, direct)


def mora_apply_torch_slices(
    y: torch.Tensor, x: torch.Tensor, tables: Sequence[SlotTable | None], meta: BatchMeta, offsets: Sequence[int]
) -> None:
    """`mora.kernels.mora_apply_slices` in one plan: one gather of `x`, one scatter into `y`."""
    plan = plan_module(tables, meta, x.shape[0])
    if plan is None:
        return
    key = (x.dtype, y.dtype, x.shape[1], y.shape[1], tuple(offsets), tuple(t.dtype if t is not None else None for t in tables))
    prog = plan.programs.get(key)
    if prog is None:
        prog = plan.programs[key] = _bind(plan, tables, x, y, offsets, meta)
    if prog.gather is not None:
        prog.gather(x)
        for op in prog.fill:
            op()
        for i, ops in prog.slices:
            table = tables[i]
            for op in ops:
                if type(op) is tuple:
                    op[0](table)
                else:
                    op()
        for add in prog.scatter:
            add(y)
    for i, run in prog.direct:
        run(tables[i], x, y)


def mora_apply_torch(y: torch.Tensor, x: torch.Tensor, table: SlotTable, meta: BatchMeta) -> None:
    """`y[t] += delta_{slot[t]}(x[t])`, with the merged-slot remap; see `mora.kernels.mora_apply`."""
    mora_apply_torch_slices(y, x, [table], meta, [0, y.shape[1]])
