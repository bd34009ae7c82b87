"""Planning for the torch backend: which rows each (type, n) pass of a module reads and how
its products are batched. Plans depend on the batch's slot mapping and the tables' specs, never
on tensor values, so one plan serves every layer whose tables hold the same adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mora.kernels.table import BatchMeta, ShardLayout, SlotTable
from mora.spec import MoraSpec, MoraType

__all__ = ["Item", "Pass", "Plan", "plan_module", "rope_chunk_range"]


def rope_chunk_range(spec: MoraSpec, lay: ShardLayout) -> tuple[int, int]:
    """Chunks `[k_lo, k_hi)` whose outputs reach columns `[out_start, out_end)`."""
    c, n = spec.num_chunks, spec.n
    if lay.out_end > c * n:  # outputs tile past c*n: every chunk is read
        return 0, c
    return lay.out_start // n, -(-lay.out_end // n)


# Items of at most this many rows go through one batched GEMM when their `M`s must be gathered:
# below it a small `mm` per item costs mostly call overhead, above it the per-item GEMMs run at
# full speed and the gather and padding would only add memory traffic.
_BATCH_ROWS = 64
MAX_PLANS = 256  # per batch; a step needs one per distinct set of table contents

Item = tuple[int, int, int]  # (slot, start, end): rows of the work order, in the chunk domain after `* chunks`


@dataclass(frozen=True)
class Pass:
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
class Plan:
    """A batch's work on one module (all its slices), shared by every layer whose tables hold
    the same adapters.

    Rows with work are taken in a work order where each pass's rows are contiguous (sorted by
    the slot's specs across slices, then slot): `x` is gathered once for all slices, each pass
    reads a view of it, and every slice's update lands in one `[R, width]` buffer that is added
    to `y` with one scatter (`rows` None: the work order is `y`'s own, passes add in place).
    """

    rows: torch.Tensor | None
    inv: torch.Tensor | None  # when `rows` permutes every row of `y`: its inverse
    passes: list[list[Pass]]  # per slice, the merged pass (if any) first
    uncovered: list[list[tuple[int, int]]]  # per slice, work rows no pass writes
    # Bound programs (`torch_cpu`), by the dtypes they were bound for.
    programs: dict[tuple, object] = field(default_factory=dict, compare=False, repr=False)


def _arith(slots: list[int]) -> tuple[int, int, int] | None:
    if len(slots) < 2:
        return None
    step = slots[1] - slots[0]
    if step <= 0 or any(b - a != step for a, b in zip(slots, slots[1:], strict=False)):
        return None
    return slots[0], slots[-1] + 1, step


def _make_pass(spec: MoraSpec, lay: ShardLayout, a: int, b: int, items: list[Item], sign: float, device: torch.device) -> Pass:
    if spec.mora_type is MoraType.ROPE:
        k_lo, k_hi = rope_chunk_range(spec, lay)
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
    return Pass(spec, a, b, items, sign, sizes, k_lo, chunks, m_view, m_gather, pad_rows, keep)


def plan_module(tables: Sequence[SlotTable | None], meta: BatchMeta, T: int) -> Plan | None:
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
            slice_passes: list[Pass] = []
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
        plan = Plan(rows, inv, passes, uncovered)
    if len(meta.plans) >= MAX_PLANS:  # a long-lived meta (warm-up shapes) seeing adapter churn
        meta.plans.clear()
    meta.plans[key] = plan
    return plan
