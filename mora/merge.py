"""Merging a MoRA module into its base weight in place, and unmerging it exactly.

`merge_(W, M, spec)` makes `x @ W.T` equal the base layer plus the unmerged update (up to
rounding), without building the dense `delta_W` and without Python loops over blocks:

* types 1-4: row `j` of `delta_W` is row `d(j)` of the small `M @ C` (`[n, in_f]`), so the
  update is two or three broadcast adds over strided views of `W`;
* type 6: `delta_W` is block diagonal; only the `out_f * min(n, in_f)` elements of its blocks
  are read and written, through a constant number of `as_strided` views.

Exact unmerge. Floats do not round-trip (`(w + d) - d != w` for a few percent of elements),
so exactness needs the original values of what the merge changes. Two ways to keep them:

* `keep_storage=True`: `W` keeps its storage (required when something else holds its address,
  e.g. a captured CUDA graph or a packed view); the changed elements are copied to
  `backup_device` first and copied back on unmerge.
* `keep_storage=False` (types 1-4, where every element changes): the merged values are written
  into a second buffer that then becomes `W`'s storage, and the untouched original storage is
  the backup; unmerge swaps it back without a copy. One pass over `W` instead of three.
  `unmerge_` returns the freed buffer so the next merge can reuse it (`spare=`) instead of
  paying fresh page faults.

`safe=True` refuses (with `W` unchanged) a merge whose result is not finite.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from mora.delta import compressed_rows, rope_blocks, rope_chunks_used
from mora.errors import MergeError, NonFiniteMergeError
from mora.spec import MoraSpec, MoraType

__all__ = ["MergeRecord", "backup_copy", "merge_", "remapped_update", "unmerge_"]


@dataclass
class MergeRecord:
    """Everything `unmerge_` needs, returned by `merge_`."""

    spec: MoraSpec
    M: torch.Tensor
    exact: bool
    swapped: bool  # W's storage was replaced; `backup` is the original storage
    backup: list[torch.Tensor] = field(default_factory=list)  # originals of changed elements
    shape: tuple[int, int] = (0, 0)
    dtype: torch.dtype = torch.float32
    changed_elements: int = 0

    @property
    def backup_bytes(self) -> int:
        """Memory held for an exact unmerge (0 in inexact mode)."""
        return sum(t.numel() * t.element_size() for t in self.backup)


# --- views -------------------------------------------------------------------------------


def _row_group_views(W: torch.Tensor, spec: MoraSpec) -> list[tuple[torch.Tensor, slice, bool]]:
    """Types 1-4: views of `W` paired with the rows of `M @ C` they receive.

    Returns `(view, rows_selected, broadcast_middle)`; `view` is `[G, R, in_f]` receiving
    `rows[sel]` (`[R, in_f]`) broadcast over `G`, or `[R, Q, in_f]` receiving `rows[sel, None]`
    when `broadcast_middle` (consecutive repeats of one row).
    """
    out_f, in_f, n = spec.out_features, spec.in_features, spec.n
    if spec.mora_type.tiles_output:  # row j <- rows[j % n]
        full, rem = divmod(out_f, n)
        parts = []
        if full:
            parts.append((W[: full * n].view(full, n, in_f), slice(0, n), False))
        if rem:
            parts.append((W[full * n :].view(1, rem, in_f), slice(0, rem), False))
        return parts
    q, m = divmod(out_f, n)  # repeat each: m groups of q+1 rows, then n-m groups of q rows
    parts = []
    if m:
        parts.append((W[: m * (q + 1)].view(m, q + 1, in_f), slice(0, m), True))
    if q:
        parts.append((W[m * (q + 1) :].view(n - m, q, in_f), slice(m, n), True))
    return parts


def _rope_block_views(
    W: torch.Tensor, spec: MoraSpec, B: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Type 6: disjoint strided views of `W` covering exactly the changed elements, each
    paired with the block values (broadcastable to the view) to add to it (`None` without `B`).

    Rows come in periods of `P = c*n` (outputs beyond `c*n` tile); within a period, rows
    `[k*n, (k+1)*n)` read chunk `k`. Chunks before the last (all of them when `in_f % n == 0`)
    are regular `n x n` blocks on the diagonal; the last chunk, when padded, reads columns
    `[(c-1)*n, in_f)` and the wrapped-around `[0, pad)`.
    """
    in_f, out_f, n, c, pad = spec.in_features, spec.out_features, spec.n, spec.num_chunks, spec.pad
    P = c * n
    T, rem = divmod(out_f, P)
    kfull, h = divmod(rem, n)  # in the partial period: kfull whole chunks, then h rows
    s_row, s_diag = in_f, n * in_f + n
    rem0 = T * P * in_f  # storage offset of the partial period
    views: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def sub(*index: slice | int) -> torch.Tensor | None:
        return None if B is None else B[index]

    def strided(shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> torch.Tensor:
        return W.as_strided(shape, strides, W.storage_offset() + offset)

    regular = c if pad == 0 else c - 1
    if T and regular:
        views.append((strided((T, regular, n, n), (P * in_f, s_diag, s_row, 1), 0), sub(slice(0, regular))))
    kr = min(kfull, regular)
    if kr:
        views.append((strided((kr, n, n), (s_diag, s_row, 1), rem0), sub(slice(0, kr))))
    if h and kfull < regular:
        views.append((strided((h, n), (s_row, 1), rem0 + kfull * s_diag), sub(kfull, slice(0, h))))
    last = c - 1
    if pad == 0 or not (T or (h and kfull == last)):
        return views
    if c == 1:  # in_f < n: the padding re-reads columns [0, pad) of the only chunk; fold it
        folded = None
        if B is not None:
            folded = B[0, :, :in_f].clone()
            folded[:, :pad] += B[0, :, in_f:]
        ranges = [(0, in_f, folded)]
    else:
        ranges = [(last * n, in_f, sub(last, slice(None), slice(0, n - pad))), (0, pad, sub(last, slice(None), slice(n - pad, n)))]
    for col0, col1, vals in ranges:
        width = col1 - col0
        if T:
            views.append((strided((T, n, width), (P * in_f, s_row, 1), last * n * s_row + col0), vals))
        if h and kfull == last:
            views.append((strided((h, width), (s_row, 1), rem0 + last * n * s_row + col0), None if vals is None else vals[:h]))
    return views


# --- merge / unmerge ---------------------------------------------------------------------


def _check_weight(W: torch.Tensor, M: torch.Tensor, spec: MoraSpec) -> None:
    if W.dim() != 2 or tuple(W.shape) != (spec.out_features, spec.in_features):
        raise MergeError(
            f"weight shape {tuple(W.shape)} does not match the module "
            f"({spec.out_features}, {spec.in_features})"
        )
    if tuple(M.shape) != (spec.n, spec.n):
        raise MergeError(f"M has shape {tuple(M.shape)}, expected ({spec.n}, {spec.n})")
    if not W.is_contiguous():
        raise MergeError("the weight must be contiguous to be merged in place")
    if not W.dtype.is_floating_point:
        raise MergeError(f"cannot merge into a {W.dtype} weight")


def _owns_storage(W: torch.Tensor) -> bool:
    return W.storage_offset() == 0 and W.untyped_storage().nbytes() == W.numel() * W.element_size()


def _all_finite(*tensors: torch.Tensor) -> bool:
    # aminmax propagates NaN and is several times faster than isfinite().all() on CPU.
    for t in tensors:
        if t.numel():
            lo, hi = torch.aminmax(t)
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                return False
    return True


def _rounded(update: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The float32 update rounded once to `W`'s dtype: adds then run in W's own dtype, which
    on CPU is an order of magnitude faster than a mixed-dtype add."""
    return update if W.dtype in (torch.float32, torch.float64) else update.to(W.dtype)


def _bound_ok(W: torch.Tensor, update: torch.Tensor, weight_absmax: float | None) -> bool:
    """True when `|W| + |update|` provably stays finite, so no pass over the result is needed."""
    if weight_absmax is None:
        return False
    lo, hi = torch.aminmax(update)
    return max(abs(lo.item()), abs(hi.item())) + weight_absmax < torch.finfo(W.dtype).max / 2


def backup_copy(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A copy of `t` on `device`. From a GPU to the host: into pinned memory, asynchronously;
    whatever the stream does to `t` afterwards (the merge's additions) runs after the copy,
    and the host does not wait for it."""
    device = torch.device(device)
    if device.type == "cpu" and t.device.type == "cuda":
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
    return t.to(device, copy=True)


def _broadcast(rows: torch.Tensor, sel: slice, middle: bool) -> torch.Tensor:
    return rows[sel, None] if middle else rows[sel]


def merge_(
    W: torch.Tensor,
    M: torch.Tensor,
    spec: MoraSpec,
    *,
    exact: bool = True,
    safe: bool = True,
    keep_storage: bool | None = None,
    backup_device: torch.device | str | None = None,
    spare: torch.Tensor | None = None,
    weight_absmax: float | None = None,
) -> MergeRecord:
    """Add the module's update to `W [out_f, in_f]` in place; return how to undo it.

    Semantics::

        record = MergeRecord(backup=[W[changed].clone()] if exact else [])
        W += delta_weight(M, spec, dtype=W.dtype)
        return record

    `keep_storage=None` picks the storage swap for types 1-4 when `W` owns its storage and
    the backup stays on `W`'s device; pass `True` when `W`'s address must not change.
    `spare` is a buffer like `W` that the merge may use (swap mode: for the merged values;
    in-place types 1-4 with the backup on `W`'s device: for the backup), typically the one
    the previous `unmerge_` returned. `weight_absmax`, the largest `|W|` when already known (it
    is a property of the base model), lets safe mode prove finiteness without a pass over
    the result. Raises `NonFiniteMergeError`, `W` unchanged, when `safe` and the merged
    weight would not be finite.
    """
    _check_weight(W, M, spec)
    backup_device = torch.device(backup_device) if backup_device is not None else W.device
    rope = spec.mora_type is MoraType.ROPE
    swap_ok = not rope and exact and backup_device == W.device and _owns_storage(W)
    if keep_storage is None:
        keep_storage = not swap_ok
    elif not keep_storage and not swap_ok:
        raise MergeError(
            "a storage swap needs types 1-4, exact mode, the backup on W's device and a W that owns its storage"
        )
    record = MergeRecord(spec, M.detach(), exact, swapped=not keep_storage, shape=tuple(W.shape), dtype=W.dtype)
    with torch.no_grad():
        M = M.to(W.device)
        if rope:
            update = _rounded(rope_blocks(M, spec, table_dtype=W.dtype, chunks=rope_chunks_used(spec)), W)
            views = _rope_block_views(W, spec, update)
        else:
            update = _rounded(compressed_rows(M, spec), W)
            views = [(v, _broadcast(update, sel, mid)) for v, sel, mid in _row_group_views(W, spec)]
        checked = safe and not _bound_ok(W, update, weight_absmax)
        targets = views
        originals: list[torch.Tensor] = []
        usable = (
            spare is not None and spare.shape == W.shape and spare.dtype == W.dtype
            and spare.device == W.device and spare.is_contiguous()
        )
        if not keep_storage:
            spare = spare if usable else torch.empty_like(W, memory_format=torch.contiguous_format)
            targets = [(d, u) for (d, _, _), (_, u) in zip(_row_group_views(spare, spec), views, strict=True)]
        elif exact or checked:  # the originals of what is about to change
            if rope:
                originals = [backup_copy(v, backup_device) for v, _ in views]
            elif usable and backup_device == W.device:
                originals = [spare.copy_(W)]  # reuse: no fresh pages to fault in
            else:
                originals = [backup_copy(W, backup_device)]
        for (src, u), (dst, _) in zip(views, targets, strict=True):
            torch.add(src, u, out=dst)
        if checked and not _all_finite(*(dst for dst, _ in targets)):
            _restore(W, spec, originals, rope)
            raise NonFiniteMergeError(f"merging would make weights non-finite ({spec})")
        record.changed_elements = sum(dst.numel() for dst, _ in targets)
        if not keep_storage:
            record.backup = [W.data]
            W.data = spare
        elif exact:
            record.backup = [o.to(backup_device) for o in originals]
    return record


def _restore(W: torch.Tensor, spec: MoraSpec, originals: list[torch.Tensor], rope: bool) -> None:
    if not originals:  # swap mode: W was never written
        return
    if rope:
        for (view, _), original in zip(_rope_block_views(W, spec), originals, strict=True):
            view.copy_(original)
    else:
        W.copy_(originals[0])


def unmerge_(W: torch.Tensor, record: MergeRecord) -> torch.Tensor | None:
    """Undo `merge_`: bit-exact in exact mode (`torch.equal` to the original), otherwise
    subtract the update again. Returns a freed full-size buffer (the merged storage after a
    swap, or the backup of an in-place merge) to pass as `spare` to the next `merge_` of this
    weight, else `None`.

    Semantics::

        if record.exact: W[changed] = record.backup
        else:            W -= delta_weight(record.M, spec, dtype=W.dtype)
    """
    spec = record.spec
    if tuple(W.shape) != record.shape or W.dtype != record.dtype:
        raise MergeError(
            f"weight {tuple(W.shape)}/{W.dtype} is not the one merged ({record.shape}/{record.dtype})"
        )
    rope = spec.mora_type is MoraType.ROPE
    with torch.no_grad():
        if record.swapped:
            merged = W.data
            W.data = record.backup[0]
            record.backup = []
            return merged
        if record.exact:
            backup = record.backup
            _restore(W, spec, [b.to(W.device, non_blocking=True) for b in backup], rope)
            record.backup = []
            if not rope and backup and backup[0].device == W.device:
                return backup[0]
        else:
            M = record.M.to(W.device)
            if rope:
                views = _rope_block_views(W, spec, _rounded(rope_blocks(M, spec, table_dtype=W.dtype, chunks=rope_chunks_used(spec)), W))
            else:
                update = _rounded(compressed_rows(M, spec), W)
                views = [(v, _broadcast(update, sel, mid)) for v, sel, mid in _row_group_views(W, spec)]
            for view, u in views:
                view.sub_(u)
        record.backup = []
    return None


def remapped_update(adapter: Hashable | None, merged: Hashable | None,
                    delta: Callable[[Hashable], torch.Tensor | None]) -> torch.Tensor | None:
    """The update rows of `adapter` (None: no adapter) get while `merged` (None: nothing) is
    merged into the base weights they are multiplied by: the merged-slot remap.

    Semantics::

        if adapter is not None and adapter == merged:
            return None                           # the merged weights hold its update already
        upd = delta(adapter) if adapter is not None else None
        if merged is not None and delta(merged) is not None:
            upd = -delta(merged) if upd is None else upd - delta(merged)   # undo what the weights hold
        return upd

    `delta(key)`: the update of adapter `key` for these rows, or None where it has none here.
    """
    if adapter is not None and adapter == merged:
        return None
    upd = delta(adapter) if adapter is not None else None
    undo = delta(merged) if merged is not None else None
    if undo is not None:
        upd = -undo if upd is None else upd - undo
    return upd
