"""Triton backend of the fused MoRA operator (the GPU path), in the Punica/SGMV style.

Semantics: exactly `mora.kernels.mora_apply` (see its docstring)::

    for t in range(T):                       # rows with slot -1 and no merged slot: untouched
        s, m = meta.slot[t], meta.merged_slot
        if s == m != -1: continue
        upd = (mora_forward(xf[t], M[s], spec[s]) if s >= 0 else 0) - (mora_forward(xf[t], M[m], spec[m]) if m >= 0 else 0)
        y[t] += upd[out_start:out_end]      # xf: x placed at features in_start:in_end of in_f

Work decomposition. Rows are visited in `meta.order` (sorted by slot), so every row tile of
`BLOCK_T` rows lies inside one segment and uses one adapter. Segment `k` owns
`cdiv(len_k, BLOCK_T)` consecutive row tiles; a program finds its segment by walking the
(at most `max_slots + 1`) segment bounds, a few scalar loads. Program `(row tile, column tile)`
computes `[BLOCK_T, BLOCK_N]` outputs of the update as matmuls over the compressed dimension,
reading `M` rows gathered by each output column's compressed index (so decompress costs
nothing: tiling/repeating is a pointer pattern on the `M` load):

* type 6: column `o` reads `q = o % (c*n)`, chunk `k = q // n`, row `j = q % n` of `M`; for
  each chunk present in the column tile, the rotated chunk `[BLOCK_T, n]` (padding, RoPE with
  tables computed in float32 and rounded to `M`'s dtype, as the reference does) times
  `M[j, :]^T` is accumulated with the columns of other chunks masked out;
* types 1-4: the compressed vector `[BLOCK_T, n]` (chunk or group sums of `x`) times
  `M[d(o), :]^T` with `d(o) = o % n` (tile) or the group of `o` (repeat-each). The compressed
  rows are computed once per row block by a first kernel (`_compress_kernel`, grid: row tiles x
  blocks of `n`) into a workspace indexed by token, and read by every column tile of the
  second; computed in each column tile, they cost a pass over `x` per 64 output columns.

The merged adapter's update is a second pass of the same program over the same rows, with
the opposite sign, so `y` is read and written once per element. Products accumulate in
float32; the compressed operand is rounded to `M`'s dtype first (the reference computes in
that dtype), and float32 tables use IEEE dot products (no TF32).

CUDA-graph safety. The call performs no host synchronization, no allocation (the workspace
is kept, sized once for the largest step) and no data-dependent host branch: it launches both
kernels whatever the table holds (a graph is captured with the tables empty: vLLM's warm-up
adapters are stock LoRA ones), with grids `(cdiv(T, BLOCK_T) + max_slots + 1, ...)`, sized from
the token count and the table's static slot count (an upper bound on the number of row tiles,
since `sum_k cdiv(len_k, B) <= T // B + segments`, whatever the slots hold later); programs read
the segment count, the segment bounds, the merged slot and every slot's type and `n` from
device memory and return early when they have no tile or no adapter, and mask rows at or past
the forward's row count. Block sizes depend only on shapes. A graph captured once thus stays
valid when `meta`'s buffers, the slot table or the merged slot are updated in place.

Interpreter. The kernel is defined (`triton.jit`) on first use, separately for
`TRITON_INTERPRET` on and off as it is when called, because Triton decides at definition time
whether a function is interpreted: importing this module or Triton earlier has no effect.
CPU tensors need `TRITON_INTERPRET=1` (that is how the tests run it without a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from mora.kernels.table import BatchMeta, SlotTable

__all__ = ["mora_apply_triton"]

BLOCK_T = 16  # rows per tile: the smallest `tl.dot` M; decode batches have few rows per adapter


def _mora_kernel(
    y_ptr, x_ptr, m_ptr, v_ptr, types_ptr, sizes_ptr,  # noqa: ANN001
    order_ptr, seg_start_ptr, seg_slot_ptr, num_seg_ptr, merged_ptr,  # noqa: ANN001
    stride_yt, stride_yo, stride_xt, stride_xi, stride_ms, stride_mi, stride_vp, stride_vt,  # noqa: ANN001
    in_f, out_f, in_start, in_end, out_start, local_out, num_rows,  # noqa: ANN001
    COMPRESS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
) -> None:
    # COMPRESS: `v[p, t, :n] = compress(xf[t], spec)` for the types 1-4 passes (program axis 1:
    # blocks of `n`). Otherwise: `y += ` the update (program axis 1: blocks of output columns),
    # types 1-4 reading `v`.
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    w_ty = m_ptr.dtype.element_ty

    # This program's row tile: segment k owns cdiv(len_k, BLOCK_T) consecutive tiles. A scalar
    # walk over the (few) segments; Triton's reductions are library jit functions that the
    # interpreter cannot run when Triton was imported without it, so this kernel uses none.
    num_seg = tl.load(num_seg_ptr)
    seg = num_seg * 0 - 1
    row0 = num_seg * 0
    seg_end = num_seg * 0
    tiles = num_seg * 0
    lo_k = tl.load(seg_start_ptr)
    for k in range(0, num_seg):
        hi_k = tl.load(seg_start_ptr + k + 1)
        nt = (hi_k - lo_k + BLOCK_T - 1) // BLOCK_T
        hit = (pid_t >= tiles) & (pid_t < tiles + nt)
        seg = tl.where(hit, k, seg)
        row0 = tl.where(hit, lo_k + (pid_t - tiles) * BLOCK_T, row0)
        seg_end = tl.where(hit, hi_k, seg_end)
        tiles += nt
        lo_k = hi_k
    if seg < 0:
        return

    slot = tl.load(seg_slot_ptr + seg)
    merged = tl.load(merged_ptr)
    typ0 = tl.load(types_ptr + tl.maximum(slot, 0))
    typ1 = tl.load(types_ptr + tl.maximum(merged, 0))
    run0 = (slot >= 0) & (slot != merged) & (typ0 != 0)
    run1 = (merged >= 0) & (slot != merged) & (typ1 != 0)
    if (run0 == 0) & (run1 == 0):
        return  # slot -1 without a merged adapter, the merged slot's own rows, empty slots

    rows = row0 + tl.arange(0, BLOCK_T)
    rmask = rows < seg_end
    tok = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)
    # Metadata prepared for more tokens than this forward has rows (a stale step seen by a
    # warm-up forward): never touch a row past `num_rows`.
    rmask = rmask & (tok < num_rows)
    x_rows = x_ptr + tok[:, None] * stride_xt

    if COMPRESS:
        i = pid_n * BLOCK_K + tl.arange(0, BLOCK_K)
        for p in tl.static_range(2):  # pass 0: the row's own adapter, pass 1: the merged one
            s = slot if p == 0 else merged
            typ = typ0 if p == 0 else typ1
            run = run0 if p == 0 else run1
            if run & (typ != 6):
                n = tl.load(sizes_ptr + s)
                c = (in_f + n - 1) // n
                chunked = (typ == 1) | (typ == 4)
                qi = in_f // n
                mi = in_f - qi * n
                terms = tl.where(chunked, c, qi + 1)
                imask = i < n
                gstart = i * qi + tl.minimum(i, mi)
                # (a bool `|` of a scalar and a vector miscomputes under the interpreter)
                limit = tl.where(chunked, terms, qi + (i < mi).to(tl.int32))  # terms of each group
                v = tl.full((BLOCK_T, BLOCK_K), 0.0, tl.float32)
                for e in range(0, terms):
                    pos = tl.where(chunked, e * n + i, gstart + e)
                    f = tl.where(pos < in_f, pos, pos - in_f)
                    ok = imask & (e < limit) & (f >= in_start) & (f < in_end)
                    xv = tl.load(x_rows + (f - in_start)[None, :] * stride_xi, mask=rmask[:, None] & ok[None, :], other=0.0)
                    v += xv.to(w_ty).to(tl.float32)
                v_ptrs = v_ptr + p * stride_vp + tok[:, None] * stride_vt + i[None, :]
                tl.store(v_ptrs, v.to(w_ty), mask=rmask[:, None] & imask[None, :])
        return

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < local_out
    o = out_start + cols
    acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)

    for p in tl.static_range(2):  # pass 0: the row's own adapter (+), pass 1: the merged one (-)
        s = slot if p == 0 else merged
        typ = typ0 if p == 0 else typ1
        run = run0 if p == 0 else run1
        if run:
            n = tl.load(sizes_ptr + s)
            w_slot = m_ptr + s.to(tl.int64) * stride_ms
            d = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
            c = (in_f + n - 1) // n
            if typ == 6:
                period = c * n
                q = o % period
                kcol = q // n
                jcol = q - kcol * n
                half = n // 2
                # Chunks present among this tile's columns: a range, or all of them on a wrap.
                o_first = out_start + pid_n * BLOCK_N
                span = tl.minimum(local_out - pid_n * BLOCK_N, BLOCK_N) - 1
                q_first = o_first % period
                wrap = q_first + span >= period
                k_lo = tl.where(wrap, 0, q_first // n)
                k_hi = tl.where(wrap, c - 1, (q_first + span) // n)
                for k in range(k_lo, k_hi + 1):
                    colk = cmask & (kcol == k)
                    for i0 in range(0, n, BLOCK_K):
                        i = i0 + tl.arange(0, BLOCK_K)
                        imask = i < n
                        lo = i < half
                        pos = k * n + i
                        pos2 = k * n + tl.where(lo, i + half, i - half)
                        f = tl.where(pos < in_f, pos, pos - in_f)  # padding repeats the first features
                        f2 = tl.where(pos2 < in_f, pos2, pos2 - in_f)
                        ok = imask & (f >= in_start) & (f < in_end)
                        ok2 = imask & (f2 >= in_start) & (f2 < in_end)
                        u = tl.load(x_rows + (f - in_start)[None, :] * stride_xi, mask=rmask[:, None] & ok[None, :], other=0.0)
                        u2 = tl.load(x_rows + (f2 - in_start)[None, :] * stride_xi, mask=rmask[:, None] & ok2[None, :], other=0.0)
                        u = u.to(w_ty).to(tl.float32)
                        u2 = u2.to(w_ty).to(tl.float32)
                        h = tl.where(lo, i, i - half)
                        # theta_h = 10000^(-2h/n), float32 like the reference, then its dtype
                        inv = 1.0 / tl.exp2((2 * h).to(tl.float32) / n.to(tl.float32) * 13.287712379549449)
                        ang = inv * k
                        cs = tl.cos(ang).to(w_ty).to(tl.float32)
                        sn = tl.sin(ang).to(w_ty).to(tl.float32)
                        a = u * cs[None, :] + tl.where(lo[None, :], -u2, u2) * sn[None, :]
                        b = tl.load(w_slot + i[:, None] * stride_mi + jcol[None, :], mask=imask[:, None] & colk[None, :], other=0.0)
                        a = a.to(w_ty)
                        if UPCAST_DOT:
                            a, b = a.to(tl.float32), b.to(tl.float32)
                        d = tl.dot(a, b, d, input_precision=PRECISION)
            else:
                tiled = (typ == 1) | (typ == 3)
                qo = out_f // n
                big = (out_f - qo * n) * (qo + 1)  # outputs in the groups of size qo + 1
                grp = tl.where(o < big, o // (qo + 1), (out_f - qo * n) + (o - big) // tl.maximum(qo, 1))
                jcol = tl.where(tiled, o % n, grp)
                v_rows = v_ptr + p * stride_vp + tok[:, None] * stride_vt
                for i0 in range(0, n, BLOCK_K):
                    i = i0 + tl.arange(0, BLOCK_K)
                    imask = i < n
                    v = tl.load(v_rows + i[None, :], mask=rmask[:, None] & imask[None, :], other=0.0)
                    b = tl.load(w_slot + i[:, None] * stride_mi + jcol[None, :], mask=imask[:, None] & cmask[None, :], other=0.0)
                    if UPCAST_DOT:
                        v, b = v.to(tl.float32), b.to(tl.float32)
                    d = tl.dot(v, b, d, input_precision=PRECISION)
            if p == 0:
                acc += d
            else:
                acc -= d

    y_ptrs = y_ptr + tok[:, None] * stride_yt + cols[None, :] * stride_yo
    mask = rmask[:, None] & cmask[None, :]
    y_old = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool) -> Callable:
    """The jitted kernel; `interpret` keys the cache because `triton.jit` reads the flag."""
    del interpret
    # Shard bounds and sizes vary by module and rank; specializing on them (value 1, multiples
    # of 16) would only multiply compilations. Strides keep their alignment hints.
    shapes = ["in_f", "out_f", "in_start", "in_end", "out_start", "local_out", "num_rows"]
    return triton.jit(_mora_kernel, do_not_specialize=shapes)


def _interpreting() -> bool:
    """Whether `triton.jit` would make an interpreted function now (`TRITON_INTERPRET`)."""
    return triton.knobs.runtime.interpret


def launch(grid: tuple[int, int], *args: object, **kwargs: object) -> None:
    """One launch of the kernel (every launch of this backend goes through here)."""
    _kernel(_interpreting())[grid](*args, **kwargs)


_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(device: torch.device, dtype: torch.dtype, rows: int, n_max: int) -> torch.Tensor:
    """`[2, >= rows, >= n_max]`, shared by every table of this device and dtype (their calls
    run one after the other on one stream). Grown only when a larger shape comes: a step's
    metadata is sized for vLLM's largest step, which its profiling run makes before any graph
    is captured, so a captured launch never points at a freed workspace."""
    ws = _WORKSPACES.get((device, dtype))
    if ws is None or ws.shape[1] < rows or ws.shape[2] < n_max:
        r, n = (rows, n_max) if ws is None else (max(rows, ws.shape[1]), max(n_max, ws.shape[2]))
        ws = _WORKSPACES[(device, dtype)] = torch.empty(2, r, n, dtype=dtype, device=device)
    return ws


def mora_apply_triton(y: torch.Tensor, x: torch.Tensor, table: SlotTable, meta: BatchMeta) -> None:
    """`y[t] += delta_{slot[t]}(x[t])`, with the merged-slot remap; see `mora.kernels.mora_apply`.

    Shapes: `x [T, local_in]`, `y [T, local_out]` (any strides), `meta` from `prepare_batch`
    for these `T` rows (or a step's view). Asynchronous on CUDA: no host synchronization, no
    allocation after the first call at the largest size, graph-capturable.
    """
    lay = table.layout
    T = x.shape[0]
    if x.shape != (T, lay.local_in) or y.shape != (T, lay.local_out):
        raise ValueError(
            f"x {tuple(x.shape)} / y {tuple(y.shape)} do not match the layout "
            f"[T, {lay.local_in}] / [T, {lay.local_out}]"
        )
    if meta.slot.shape[0] != T:
        raise ValueError(f"meta describes {meta.slot.shape[0]} tokens, x has {T}")
    if T == 0:
        return
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton MoRA backend needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU")
    n_max = table.n_max
    block_n = 64
    block_k = max(16, min(64, triton.next_power_of_2(n_max)))
    Mt = table.Mt
    # Indexed by token: sized by the whole order buffer (a step's: its largest step), not by T.
    ws = _workspace(x.device, table.dtype, meta.order.untyped_storage().nbytes() // meta.order.element_size(), n_max)
    row_tiles = triton.cdiv(T, BLOCK_T) + table.max_slots + 1
    args = (
        y, x, Mt, ws, table.types, table.sizes,
        meta.order, meta.seg_start, meta.seg_slot, meta.num_segments, meta.merged,
        y.stride(0), y.stride(1), x.stride(0), x.stride(1), Mt.stride(0), Mt.stride(1), ws.stride(0), ws.stride(1),
        lay.in_features, lay.out_features, lay.in_start, lay.in_end, lay.out_start, lay.local_out, T,
    )
    consts = dict(
        BLOCK_T=BLOCK_T, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION="ieee" if table.dtype == torch.float32 else "tf32",  # "tf32" only affects fp32 inputs
        # The interpreter multiplies bfloat16 operands as their raw uint16 storage; the values
        # are already rounded to bfloat16, so a float32 product is the same product.
        UPCAST_DOT=_interpreting() and table.dtype == torch.bfloat16,
    )
    launch((row_tiles, triton.cdiv(n_max, block_k)), *args, COMPRESS=True, **consts)
    launch((row_tiles, triton.cdiv(lay.local_out, block_n)), *args, COMPRESS=False, **consts)
