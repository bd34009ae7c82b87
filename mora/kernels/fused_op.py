"""The fused MoRA operator as a torch custom op (`torch.ops.mora.fused_apply`), for compiled
and graph-captured forwards.

`torch.compile` treats a custom op as opaque: it neither traces into it nor bakes the host-side
decisions a backend makes (segment lists, `.item()`, set membership) into the graph, and its
fake (meta) implementation tells the compiler that the op only writes `y` in place. This is
how vLLM registers its own LoRA kernels (`torch.ops.vllm.lora_shrink`/`lora_expand`).

The op's tensor arguments are the step's persistent metadata (`StepMeta.tensors`), so a
compiled graph and a captured CUDA graph read the buffers that `StepMeta.prepare` rewrites in
place. The slot tables of a module are named by an integer handle (`TableGroup`), a constant
per layer, the way vLLM's attention op names its layer: the tables themselves are persistent
buffers updated in place, so a graph keeps seeing their contents.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch

from mora.kernels.dispatch import mora_apply_slices
from mora.kernels.table import BatchMeta, SlotTable

__all__ = ["TableGroup", "mora_fused_apply"]

_GROUPS: weakref.WeakValueDictionary[int, TableGroup] = weakref.WeakValueDictionary()
_next_handle = itertools.count(1)


class TableGroup:
    """The slot tables of one module (its slices) and where each slice writes in `y`.

    Registered under `handle` for as long as this object lives (the layer holds it).
    `backend`: the fused operator's backend (None: chosen by device, see `select_backend`).
    """

    def __init__(self, tables: Sequence[SlotTable | None], offsets: Sequence[int], backend: str | None = None) -> None:
        if len(offsets) != len(tables) + 1:
            raise ValueError(f"{len(tables)} tables need {len(tables) + 1} offsets, got {len(offsets)}")
        self.tables = list(tables)
        self.offsets = list(offsets)
        self.backend = backend
        self.handle = next(_next_handle)
        _GROUPS[self.handle] = self

    def apply(self, y: torch.Tensor, x: torch.Tensor, step_tensors: Sequence[torch.Tensor]) -> None:
        """`torch.ops.mora.fused_apply(y, x, *step_tensors, self.handle)`."""
        torch.ops.mora.fused_apply(y, x, *step_tensors, self.handle)


@torch.library.custom_op("mora::fused_apply", mutates_args=("y",))
def mora_fused_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    slot: torch.Tensor,
    order: torch.Tensor,
    seg_start: torch.Tensor,
    seg_slot: torch.Tensor,
    num_segments: torch.Tensor,
    merged: torch.Tensor,
    group: int,
) -> None:
    """`mora_apply_slices(y, x, tables, meta, offsets)` over the step's persistent metadata.

    Shapes: `x [T, local_in]`, `y [T, sum of slice widths]`, the metadata buffers as in
    `StepMeta` (sized for `max_tokens >= T` rows). Semantics::

        meta = BatchMeta(slot[:T], order[:T], seg_start, seg_slot, num_segments, merged)
        for i, table in enumerate(group.tables):
            mora_apply(y[:, offsets[i]:offsets[i + 1]], x, table, meta)

    Rows past the step's tokens are left bit-identical (see `StepMeta`).
    """
    grp = _GROUPS.get(group)
    if grp is None:
        raise RuntimeError(f"MoRA table group {group} is gone (its layer was freed)")
    T = x.shape[0]
    meta = BatchMeta(slot[:T], order[:T], seg_start, seg_slot, num_segments, None, merged)
    mora_apply_slices(y, x, grp.tables, meta, grp.offsets, backend=grp.backend)


@mora_fused_apply.register_fake
def _fused_apply_fake(
    y: torch.Tensor,
    x: torch.Tensor,
    slot: torch.Tensor,
    order: torch.Tensor,
    seg_start: torch.Tensor,
    seg_slot: torch.Tensor,
    num_segments: torch.Tensor,
    merged: torch.Tensor,
    group: int,
) -> None:
    return None
