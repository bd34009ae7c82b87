"""Vectorized torch backend of the fused MoRA operator (the CPU path).

Work is organised once per call, never per token: rows are taken in the batch's slot order,
adapters that share a (type, n) class are compressed (or padded and rotated, type 6) in one
batched op, each slot's rows then get one matrix multiply with that slot's `M`, and one
batched decompress and `index_add_` puts the result into `y`. A batch with A adapters costs
about 6 ops per class plus one `addmm` per adapter, whatever the number of tokens.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch

from mora.kernels.table import BatchMeta, ShardLayout, SlotTable
from mora.ops import compress, rope_tables
from mora.spec import MoraSpec, MoraType, group_sizes

__all__ = ["mora_apply_torch"]


@functools.lru_cache(maxsize=512)
def _out_index(spec: MoraSpec, start: int, end: int, period_chunks: int, device: torch.device) -> torch.Tensor | None:
    """Compressed-output index of each output column in `[start, end)`; `None` if a plain slice works."""
    j = torch.arange(start, end, device=device)
    if spec.mora_type is MoraType.ROPE:
        period = period_chunks * spec.n
        if end <= period:
            return None
        return j % period
    if spec.mora_type.tiles_output:
        return None if end <= spec.n else j % spec.n
    g = torch.repeat_interleave(torch.arange(spec.n, device=device), torch.tensor(group_sizes(spec.out_features, spec.n), device=device))
    return g[start:end]


def _rope_chunks_needed(spec: MoraSpec, out_end: int) -> int:
    """Chunks whose outputs reach column `out_end` (all when outputs tile past `c*n`)."""
    c, n = spec.num_chunks, spec.n
    if out_end > c * n:
        return c
    return -(-out_end // n)


def _compress_rows(X: torch.Tensor, spec: MoraSpec, chunks: int) -> torch.Tensor:
    """`[R, in_f] -> [R*chunks, n]` (type 6, rotated chunks) or `[R, n]` (types 1-4)."""
    if spec.mora_type is not MoraType.ROPE:
        return compress(X, spec)
    n, c = spec.n, spec.num_chunks
    if chunks < c or spec.pad == 0:
        U = X[:, : chunks * n].reshape(-1, chunks, n)
    else:
        U = torch.cat([X, X[:, : spec.pad]], dim=1).reshape(-1, c, n)
    cos, sin = rope_tables(n, c, X.dtype, X.device)
    cos, sin = cos[:chunks], sin[:chunks]
    half = n // 2
    rotated = torch.cat((-U[..., half:], U[..., :half]), dim=-1)
    out = U * cos
    out.addcmul_(rotated, sin)
    return out.reshape(-1, n)


def _decompress_cols(out_c: torch.Tensor, spec: MoraSpec, lay: ShardLayout, chunks: int, rows: int) -> torch.Tensor:
    if spec.mora_type is MoraType.ROPE:
        out_c = out_c.reshape(rows, chunks * spec.n)
    idx = _out_index(spec, lay.out_start, lay.out_end, chunks, out_c.device)
    if idx is None:
        return out_c[:, lay.out_start : lay.out_end]
    return out_c.index_select(1, idx)


def mora_apply_torch(y: torch.Tensor, x: torch.Tensor, table: SlotTable, meta: BatchMeta) -> None:
    """`y[t] += delta_{slot[t]}(x[t])`, with the merged-slot remap; see `mora.kernels.mora_apply`."""
    lay = table.layout
    segments = meta.segments
    if segments is None:
        n = int(meta.num_segments.item())
        starts = meta.seg_start[: n + 1].tolist()
        segments = [(int(s), starts[k], starts[k + 1]) for k, s in enumerate(meta.seg_slot[:n].tolist())]
    merged = meta.merged_slot
    # (slot, sign, start, end) work items over the slot-sorted rows
    items: list[tuple[int, float, int, int]] = []
    for s, a, b in segments:
        if s >= 0 and s != merged and table.specs[s] is not None:
            items.append((s, 1.0, a, b))
    if merged >= 0 and table.specs[merged] is not None:
        items += [(merged, -1.0, a, b) for s, a, b in segments if s != merged]
    if not items:
        return
    classes: dict[MoraSpec, list[tuple[int, float, int, int]]] = defaultdict(list)
    for item in items:
        classes[table.specs[item[0]]].append(item)
    order = meta.order
    xin = x.to(table.dtype)
    for spec, work in classes.items():
        rows = order[work[0][2] : work[0][3]] if len(work) == 1 else torch.cat([order[a:b] for _, _, a, b in work])
        X = xin.index_select(0, rows)
        if lay.local_in != lay.in_features:
            full = X.new_zeros(X.shape[0], lay.in_features)
            full[:, lay.in_start : lay.in_end] = X
            X = full
        chunks = _rope_chunks_needed(spec, lay.out_end) if spec.mora_type is MoraType.ROPE else 1
        V = _compress_rows(X, spec, chunks)  # [R*chunks, n]
        out_c = torch.empty_like(V)
        pos = 0
        for s, sign, a, b in work:
            lo, hi = pos * chunks, (pos + b - a) * chunks
            torch.addmm(out_c[lo:hi], V[lo:hi], table.weight(s).t(), beta=0, alpha=sign, out=out_c[lo:hi])
            pos += b - a
        y.index_add_(0, rows, _decompress_cols(out_c, spec, lay, chunks, X.shape[0]).to(y.dtype))
