"""The fused MoRA operator as a torch custom op (`torch.ops.mora.fused_apply`), for compiled
and graph-captured forwards.

`torch.compile` treats a custom op as opaque: it neither traces into it nor bakes the host-side
decisions a backend makes (segment lists, `.item()`, set membership) into the graph, and its
fake (meta) implementation tells the compiler that the op only writes `y` in place. This is
how vLLM registers its own LoRA kernels (`torch.ops.vllm.lora_shrink`/`lora_expand`), and,
like them, it is registered directly with the dispatcher (`custom_op.py`: no per-call wrapper).

The op's tensor arguments are the step's persistent metadata (`StepMeta.tensors`) and the
layer's merged slot, so a compiled graph and a captured CUDA graph read the buffers that
`StepMeta.prepare` and merges rewrite in place. The slot tables of a module are named by an
integer handle (`TableGroup`), a constant per layer, the way vLLM's attention op names its
layer; the step metadata by its handle too. The op's body runs on every eager call and on every
capture, never on a replay: it launches the kernels of the step's kind (`StepMeta.kind`), which
on a GPU is the graph key being captured, and nothing for a step without MoRA work.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

import torch

from mora.kernels.custom_op import direct_op
from mora.kernels.dispatch import mora_apply_slices
from mora.kernels.step import StepKind, StepMeta, step_by_handle
from mora.kernels.table import SlotTable

__all__ = ["TableGroup", "mora_fused_apply"]

_GROUPS: weakref.WeakValueDictionary[int, TableGroup] = weakref.WeakValueDictionary()
_next_handle = itertools.count(1)


class TableGroup:
    """The slot tables of one module (its slices), where each slice writes in `y`, and the
    module's merged slot.

    `merged` ([1] int32 on the tables' device, -1: none) says which table row the module's base
    weights hold merged; each module has its own, so that a merge can fold layer after layer
    between steps, every step exact. Registered under `handle` for as long as this object lives
    (the layer holds it). `backend`: the fused operator's backend (None: chosen by device).
    """

    def __init__(self, tables: Sequence[SlotTable | None], offsets: Sequence[int], backend: str | None = None,
                 device: torch.device | str | None = None) -> None:
        if len(offsets) != len(tables) + 1:
            raise ValueError(f"{len(tables)} tables need {len(tables) + 1} offsets, got {len(offsets)}")
        self.tables = list(tables)
        self.offsets = list(offsets)
        self.backend = backend
        if device is None:
            device = next(t.device for t in self.tables if t is not None)
        self.merged = torch.full((1,), -1, dtype=torch.int32, device=device)
        self.merged_row = -1  # host mirror of `merged`
        self.handle = next(_next_handle)
        _GROUPS[self.handle] = self

    def set_merged(self, row: int) -> None:
        """Between steps: the module's weights now hold table row `row` merged (-1: none)."""
        with torch.inference_mode(self.merged.is_inference()), torch.no_grad():
            self.merged.fill_(row)
        self.merged_row = row

    def apply(self, y: torch.Tensor, x: torch.Tensor, step: StepMeta) -> None:
        """`torch.ops.mora.fused_apply(y, x, *step.tensors, self.merged, self.handle, step.handle)`."""
        torch.ops.mora.fused_apply(y, x, *step.tensors, self.merged, self.handle, step.handle)


@direct_op("mora::fused_apply", mutates_args=("y",))
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
    step: int,
) -> None:
    """`mora_apply_slices(y, x, tables, meta, offsets)` over the step's persistent metadata.

    Shapes: `x [T, local_in]`, `y [T, sum of slice widths]`, the metadata buffers as in
    `StepMeta` (sized for `max_tokens >= T` rows), `merged [1]`. Semantics::

        if StepKind.MORA not in step.kind:
            return                                   # nothing launched
        meta = BatchMeta(slot[:T], order[:T], seg_start, seg_slot, num_segments, merged)
        for i, table in enumerate(group.tables):
            mora_apply(y[:, offsets[i]:offsets[i + 1]], x, table, meta)

    Rows past the step's tokens are in no segment and left bit-identical.
    """
    grp = _GROUPS.get(group)
    if grp is None:
        raise RuntimeError(f"MoRA table group {group} is gone (its layer was freed)")
    st = step_by_handle(step)
    if StepKind.MORA not in st.kind:
        return
    mora_apply_slices(y, x, grp.tables, st.view(x.shape[0], merged), grp.offsets, backend=grp.backend)


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
    step: int,
) -> None:
    return None
