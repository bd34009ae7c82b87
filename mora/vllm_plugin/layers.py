"""MoRA-capable versions of vLLM's LoRA linear wrappers.

Each class subclasses the stock wrapper (so `can_replace_layer`, tensor-parallel slicing and
plain LoRA keep working) and adds, per output slice, a `SlotTable` of MoRA adapters indexed by
the same slot numbers as vLLM's LoRA buffers. A slot holds either a LoRA adapter (stock
buffers) or a MoRA adapter (our tables). The forward adds the stock LoRA update for LoRA slots
and then calls the fused MoRA operator, driven by vLLM's per-token slot mapping.

Two fixes over the stock CPU path, both needed for correct multi-tenant results:
* vLLM's torch LoRA ops index the stacked weights with the token's slot, and `-1` (no
  adapter) silently picks the last slot; the stacked buffers get one extra, always-zero slot
  at the end so that `-1` reads zeros.
* slot types are tracked, and on the CPU a step whose tokens use no LoRA slot skips the stock
  LoRA math (which otherwise runs over every token of every step while any LoRA adapter is
  resident, halving decode throughput), and one with no unmerged MoRA work skips the MoRA op.

On a GPU (a graph-safe runtime, see `runtime.py`) the forward branches on nothing the batch
holds: the stock LoRA update, then the custom op `torch.ops.mora.fused_apply` over the step's
persistent metadata, so `torch.compile` and CUDA-graph replay see the same calls every step.
"""

from __future__ import annotations

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

from mora.kernels import BatchMeta, ShardLayout, SlotTable, TableGroup, mora_apply_slices
from mora.spec import MoraSpec
from mora.vllm_plugin.runtime import MoraRuntime

__all__ = ["MORA_LAYER_CLASSES", "MoraLayerMixin"]


class MoraLayerMixin:
    """Adds MoRA slot tables and the fused MoRA update to a stock LoRA linear wrapper."""

    mora_tables: list[SlotTable]
    mora_runtime: MoraRuntime | None
    mora_children: list[str]  # HF module name of each slice (set by the model manager)

    def _mora_layouts(self) -> list[ShardLayout]:  # overridden per wrapper kind
        raise NotImplementedError

    def create_lora_weights(self, max_loras: int, lora_config, model_config=None) -> None:  # noqa: ANN001
        # Our forward replaces the dual-stream path (it would bypass the MoRA update).
        self._enable_aux_cuda_stream = False
        super().create_lora_weights(max_loras, lora_config, model_config)
        if self.device.type == "cpu":
            # Slot -1 ("no adapter") must read zeros in the stock torch ops: one extra zero slot.
            self.lora_a_stacked = tuple(torch.cat([t, torch.zeros_like(t[:1])]) for t in self.lora_a_stacked)
            self.lora_b_stacked = tuple(torch.cat([t, torch.zeros_like(t[:1])]) for t in self.lora_b_stacked)
        # One row per vLLM slot plus a reserved last row (`merged_row`) for the merged adapter:
        # its update must stay subtractable even when vLLM gives its slot to another adapter.
        self.mora_tables = [
            SlotTable(lay, max_loras + 1, max_rank=lora_config.max_lora_rank, dtype=lora_config.lora_dtype, device=self.device)
            for lay in self._mora_layouts()
        ]
        self.merged_row = max_loras
        widths = [lay.local_out for lay in self._mora_layouts()]
        self._mora_offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.mora_group = TableGroup(self.mora_tables, self._mora_offsets)  # the custom op's handle
        self._lora_slots: set[int] = set()
        self._mora_slots: set[int] = set()
        self.mora_runtime = None
        self.mora_children = []
        self.mora_merge_state = None

    def attach(self, runtime: MoraRuntime, children: list[str]) -> None:
        """Join the model's MoRA runtime (its kernel backend, chosen once for the engine) and
        name the HF module of each slice (set by the model manager)."""
        self.mora_runtime = runtime
        self.mora_children = children
        self.mora_group.backend = runtime.backend

    # -- slots ----------------------------------------------------------------------------

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        for table in self.mora_tables:
            table.clear_slot(index)
        self._lora_slots.discard(index)
        self._mora_slots.discard(index)

    def set_lora(self, index: int, lora_a, lora_b) -> None:  # noqa: ANN001
        super().set_lora(index, lora_a, lora_b)
        for table in self.mora_tables:
            table.clear_slot(index)
        self._mora_slots.discard(index)
        self._lora_slots.add(index)

    def set_mora(self, index: int, entries: list[tuple[torch.Tensor, MoraSpec] | None]) -> None:
        """Put a MoRA adapter into slot `index`: one `(M, spec)` per slice, `None` if untargeted."""
        super().reset_lora(index)
        self._lora_slots.discard(index)
        for table, entry in zip(self.mora_tables, entries, strict=True):
            if entry is None:
                table.clear_slot(index)
            else:
                table.set_slot(index, entry[0].to(device=table.M.device, dtype=table.dtype), entry[1])
        if any(e is not None for e in entries):
            self._mora_slots.add(index)
        else:
            self._mora_slots.discard(index)

    def set_merged_row(self, entries: list[tuple[torch.Tensor, MoraSpec] | None] | None) -> None:
        """Put the merged adapter's `M`s into the reserved row (`None`: clear it)."""
        for i, table in enumerate(self.mora_tables):
            entry = None if entries is None else entries[i]
            if entry is None:
                table.clear_slot(self.merged_row)
            else:
                table.set_slot(self.merged_row, entry[0].to(device=table.M.device, dtype=table.dtype), entry[1])

    # -- forward --------------------------------------------------------------------------

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        rt = self.mora_runtime
        if (rt is not None and rt.graph_safe) or (rt is None and self.device.type != "cpu"):
            # GPU: no host branch on the batch's contents (CUDA graphs replay every step).
            output = super()._apply_lora_to_output(x, output)
            if rt is not None:
                x2 = x.flatten(0, -2) if x.ndim == 3 else x
                rt.apply(output.flatten(0, -2) if output.ndim == 3 else output, x2, self.mora_group)
            return output
        if rt is None:
            return super()._apply_lora_to_output(x, output) if self._lora_slots else output
        # CPU: the host knows which slots this step's tokens use, so each layer runs only the
        # work they need. A resident LoRA adapter costs nothing in steps without its tokens,
        # and a merged adapter's own steps take the plain base path.
        meta = rt.meta_for(self._num_rows(x))
        present = meta.present_slots
        if not present.isdisjoint(self._lora_slots):
            output = super()._apply_lora_to_output(x, output)
        merged = rt.merged_slot
        if not present.isdisjoint(self._mora_slots) or (merged >= 0 and not present <= {merged}):
            self._apply_mora(x, output, meta)
        return output

    @staticmethod
    def _num_rows(x: torch.Tensor) -> int:
        return x.shape[0] * x.shape[1] if x.ndim == 3 else x.shape[0]

    def _apply_mora(self, x: torch.Tensor, output: torch.Tensor, meta: BatchMeta) -> None:
        x2 = x.flatten(0, -2) if x.ndim == 3 else x
        out2 = output.flatten(0, -2) if output.ndim == 3 else output
        mora_apply_slices(out2, x2, self.mora_tables, meta, self._mora_offsets, backend=self.mora_runtime.backend)


def _tp(layer: object) -> tuple[int, int]:
    return getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)


class MoraColumnParallelLinearWithLoRA(MoraLayerMixin, ColumnParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[ShardLayout]:
        rank, size = _tp(self)
        base = self.base_layer
        if self.is_merged_col_linear and size > 1:
            raise NotImplementedError("MoRA on a single-LoRA merged column layer needs tp_size == 1")
        local = base.output_size_per_partition
        return [ShardLayout(base.input_size, base.output_size, out_start=rank * local, out_end=(rank + 1) * local)]


class MoraMergedColumnParallelLinearWithLoRA(MoraLayerMixin, MergedColumnParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[ShardLayout]:
        base = self.base_layer
        return [
            ShardLayout(base.input_size, full, out_start=sid * local, out_end=(sid + 1) * local)
            for full, local, sid in zip(base.output_sizes, self.output_slices, self.output_ids, strict=True)
        ]


class MoraMergedQKVParallelLinearWithLoRA(MoraLayerMixin, MergedQKVParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[ShardLayout]:
        base = self.base_layer
        q_full = base.total_num_heads * base.head_size
        kv_full = base.total_num_kv_heads * base.head_size
        return [
            ShardLayout(base.input_size, full, out_start=sid * local, out_end=(sid + 1) * local)
            for full, local, sid in zip((q_full, kv_full, kv_full), self.output_slices, self.output_ids, strict=True)
        ]


class MoraQKVParallelLinearWithLoRA(MoraLayerMixin, QKVParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[ShardLayout]:
        if _tp(self)[1] > 1:
            raise NotImplementedError("MoRA on a single-LoRA qkv_proj needs tp_size == 1")
        base = self.base_layer
        return [ShardLayout(base.input_size, base.output_size)]


class MoraRowParallelLinearWithLoRA(MoraLayerMixin, RowParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[ShardLayout]:
        rank, _ = _tp(self)
        base = self.base_layer
        local = base.input_size_per_partition
        return [ShardLayout(base.input_size, base.output_size, in_start=rank * local, in_end=(rank + 1) * local)]


class MoraReplicatedLinearWithLoRA(MoraLayerMixin, ReplicatedLinearWithLoRA):
    def _mora_layouts(self) -> list[ShardLayout]:
        base = self.base_layer
        return [ShardLayout(base.input_size, base.output_size)]


# Same relative order as vLLM's `_all_lora_classes` (more specific first).
MORA_LAYER_CLASSES = (
    MoraColumnParallelLinearWithLoRA,
    MoraMergedColumnParallelLinearWithLoRA,
    MoraQKVParallelLinearWithLoRA,
    MoraMergedQKVParallelLinearWithLoRA,
    MoraRowParallelLinearWithLoRA,
    MoraReplicatedLinearWithLoRA,
)
