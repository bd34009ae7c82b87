"""A wrapped linear layer's MoRA state, without vLLM: slot tables, the merged row, the forward.

`MoraSlots` is mixed into vLLM's LoRA wrappers (`layers.py`) and into `bench/gpu_contract.py`'s
decoder layers, so that the CPU harness of the GPU path runs the very code the wrappers run:
slot writes, the reserved merged row, the per-layer merged mark merges flip, and the graph-safe
MoRA update. It imports no vLLM.

A layer has one `SlotTable` per output slice. A slice belongs to one module of the checkpoint
(`mora_children[child]`); usually each slice is its own module (q, k, v of a packed qkv_proj),
but a checkpoint module packed in one piece (Phi-3's `qkv_proj`, `gate_up_proj`) is cut into
several slices under tensor parallelism, each rank holding its shard of every part: those
slices share the module's adapter, each with its own `ShardLayout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mora.kernels import ShardLayout, SlotTable, TableGroup
from mora.spec import MoraSpec

if TYPE_CHECKING:
    from mora.vllm_plugin.runtime import MoraRuntime

__all__ = ["Entry", "MoraSlots"]

Entry = tuple[torch.Tensor, MoraSpec] | None  # one module's (M, spec), None: not targeted


class MoraSlots:
    """MoRA slot tables of one linear layer, indexed like vLLM's LoRA slots (plus a reserved
    last row, `merged_row`, for the adapter being merged or merged)."""

    mora_tables: list[SlotTable]
    mora_group: TableGroup
    mora_runtime: MoraRuntime | None
    mora_children: list[str]  # the checkpoint module of each child (set by the model manager)

    def init_mora(self, layouts: Sequence[tuple[int, ShardLayout]], max_loras: int, max_rank: int,
                  dtype: torch.dtype, device: torch.device) -> None:
        """`layouts`: `(child, layout)` per output slice, in output order."""
        self.mora_tables = [SlotTable(lay, max_loras + 1, max_rank=max_rank, dtype=dtype, device=device)
                            for _, lay in layouts]
        self._mora_child = [child for child, _ in layouts]
        self.merged_row = max_loras
        widths = [lay.local_out for _, lay in layouts]
        self._mora_offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.mora_group = TableGroup(self.mora_tables, self._mora_offsets, device=device)  # the custom op's handle
        self._mora_slots: set[int] = set()  # table rows holding an adapter (the merged row included)
        self.mora_runtime = None
        self.mora_children = [f"child{i}" for i in range(max(self._mora_child) + 1)]
        self.mora_merge_state = None

    def attach(self, runtime: MoraRuntime, children: list[str]) -> None:
        """Join the model's MoRA runtime (its kernel backend, chosen once for the engine) and
        name the checkpoint module of each child (set by the model manager)."""
        if len(children) != len(self.mora_children):
            raise ValueError(f"{len(self.mora_children)} modules packed here, {len(children)} names given: {children}")
        self.mora_runtime = runtime
        self.mora_children = list(children)
        self.mora_group.backend = runtime.backend

    def mora_slices(self) -> list[tuple[str, SlotTable]]:
        """`(checkpoint module, table)` of every output slice."""
        return [(self.mora_children[c], t) for c, t in zip(self._mora_child, self.mora_tables, strict=True)]

    def mora_entries(self, modules: dict[str, tuple[torch.Tensor, MoraSpec]]) -> list[Entry]:
        """An adapter's `(M, spec)` by checkpoint module, as one entry per slice of this layer."""
        return [modules.get(self.mora_children[c]) for c in self._mora_child]

    def set_mora(self, index: int, entries: Sequence[Entry]) -> None:
        """Put a MoRA adapter into row `index`: one entry per slice (`mora_entries`)."""
        for table, entry in zip(self.mora_tables, entries, strict=True):
            if entry is None:
                table.clear_slot(index)
            else:  # asynchronous from the pinned host copy the manager keeps (a GPU)
                table.set_slot(index, entry[0].to(device=table.device, dtype=table.dtype, non_blocking=True), entry[1])
        if any(e is not None for e in entries):
            self._mora_slots.add(index)
        else:
            self._mora_slots.discard(index)

    def clear_mora(self, index: int) -> None:
        for table in self.mora_tables:
            table.clear_slot(index)
        self._mora_slots.discard(index)

    def set_merged_row(self, entries: Sequence[Entry] | None) -> None:
        """Put the merged adapter's `M`s into the reserved row (`None`: clear it)."""
        if entries is None:
            self.clear_mora(self.merged_row)
        else:
            self.set_mora(self.merged_row, entries)

    def set_weights_merged(self, merged: bool) -> None:
        """Between steps: this layer's base weights now hold the reserved row's adapter (or not)."""
        self.mora_group.set_merged(self.merged_row if merged else -1)

    def mora_update(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """Graph-safe: `output += ` the step's MoRA updates (the custom op, over the step's
        persistent metadata; it launches nothing in a step without MoRA work)."""
        x2 = x.flatten(0, -2) if x.ndim == 3 else x
        out2 = output.flatten(0, -2) if output.ndim == 3 else output
        self.mora_runtime.apply(out2, x2, self.mora_group)
