"""The fused operator's definition in plain torch: a loop over slots, the library's operators.

Every other backend is tested against this one.
"""

from __future__ import annotations

import torch

from mora.kernels.table import BatchMeta, SlotTable
from mora.merge import remapped_update
from mora.ops import mora_forward

__all__ = ["mora_apply_reference"]


def _full_input(x: torch.Tensor, table: SlotTable) -> torch.Tensor:
    lay = table.layout
    if lay.local_in == lay.in_features:
        return x
    full = x.new_zeros(x.shape[0], lay.in_features)
    full[:, lay.in_start : lay.in_end] = x
    return full


def mora_apply_reference(y: torch.Tensor, x: torch.Tensor, table: SlotTable, meta: BatchMeta) -> None:
    """`y[t] += delta_{slot[t]}(x[t])`, with the merged-slot remap; see `mora_apply`."""
    lay = table.layout
    xf = _full_input(x, table).to(table.dtype)
    merged = meta.merged_slot
    for s, a, b in meta.host_segments():  # rows in no segment (a padded forward's) are untouched
        rows = meta.order[a:b]

        def delta(slot: int, rows: torch.Tensor = rows) -> torch.Tensor | None:
            if table.specs[slot] is None:
                return None
            return mora_forward(xf[rows], table.weight(slot), table.specs[slot])

        upd = remapped_update(s if s >= 0 else None, merged if merged >= 0 else None, delta)
        if upd is not None:
            y.index_add_(0, rows, upd[:, lay.out_start : lay.out_end].to(y.dtype))
