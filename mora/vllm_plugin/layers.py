"""MoRA-capable versions of vLLM's LoRA linear wrappers.

Each class subclasses the stock wrapper (so `can_replace_layer`, tensor-parallel slicing and
plain LoRA keep working) and adds, per output slice, a `SlotTable` of MoRA adapters indexed by
the same slot numbers as vLLM's LoRA buffers (`MoraSlots`, slots.py). A slot holds either a
LoRA adapter (stock buffers) or a MoRA adapter (our tables). The forward adds the stock LoRA
update for LoRA slots and then the fused MoRA operator, driven by the step's token -> row map.

Two fixes over the stock CPU path, both needed for correct multi-tenant results:
* vLLM's torch LoRA ops index the stacked weights with the token's slot, and `-1` (no
  adapter) silently picks the last slot; the stacked buffers get one extra, always-zero slot
  at the end so that `-1` reads zeros.
* slot types are tracked, and on the CPU a step whose tokens use no LoRA slot skips the stock
  LoRA math (which otherwise runs over every token of every step while any LoRA adapter is
  resident, halving decode throughput), and one with no unmerged MoRA work skips the MoRA op.

Graph-safe (a GPU, or a compiled CPU model; see `runtime.py`) the forward branches on nothing
the batch holds: two custom ops, `torch.ops.mora.stock_lora` (vLLM's own LoRA update, run
inside an op: vLLM's CPU LoRA ops branch on the host, which a trace would bake in) and
`torch.ops.mora.fused_apply`. Their bodies launch what the step's kind asks for, so a step of
MoRA, merged or base tokens only launches no stock LoRA kernel, and a merged adapter's own
steps launch no adapter kernel at all (on a GPU: the CUDA graph of that kind, graphs.py).

vLLM's dual-stream path (`_apply_async_impl`, `VLLM_LORA_ENABLE_DUAL_STREAM`) would bypass
`_apply_lora_to_output`: the wrappers turn it off and route it to the synchronous path.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
    VocabParallelEmbeddingWithLoRA,
)
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

from mora.kernels import ShardLayout, StepKind, mora_apply_slices
from mora.kernels.custom_op import direct_op
from mora.kernels.step import step_by_handle
from mora.vllm_plugin.runtime import MoraRuntime
from mora.vllm_plugin.slots import Entry, MoraSlots

__all__ = ["MORA_LAYER_CLASSES", "MoraLayerMixin", "MoraVocabParallelEmbeddingWithLoRA"]


class MoraLayerMixin(MoraSlots):
    """Adds MoRA slot tables and the fused MoRA update to a stock LoRA linear wrapper."""

    def _mora_layouts(self) -> list[tuple[int, ShardLayout]]:  # overridden per wrapper kind
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
        self.init_mora(self._mora_layouts(), max_loras, lora_config.max_lora_rank, lora_config.lora_dtype, self.device)
        self._lora_slots: set[int] = set()
        self.mora_handle = next(_next_handle)
        _LAYERS[self.mora_handle] = self

    # -- slots ----------------------------------------------------------------------------

    def reset_lora(self, index: int) -> None:
        # Only what the slot holds: vLLM resets every module of a slot each time an adapter
        # takes it, and for a MoRA adapter the stock buffers are zeros already (they are only
        # written by `set_lora`, tracked in `_lora_slots`).
        if index in self._lora_slots:
            super().reset_lora(index)
            self._lora_slots.discard(index)
        if index in self._mora_slots:  # the other rows' tables are clear
            self.clear_mora(index)

    def set_lora(self, index: int, lora_a, lora_b) -> None:  # noqa: ANN001
        super().set_lora(index, lora_a, lora_b)
        self.clear_mora(index)
        self._lora_slots.add(index)

    def set_mora(self, index: int, entries: list[Entry]) -> None:
        """Put a MoRA adapter into slot `index`: one entry per slice (`mora_entries`)."""
        if index != self.merged_row and index in self._lora_slots:
            super().reset_lora(index)
            self._lora_slots.discard(index)
        MoraSlots.set_mora(self, index, entries)

    # -- forward --------------------------------------------------------------------------

    def _apply_async_impl(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # vLLM's dual-stream path calls this instead of `_apply_sync` (through its
        # `lora_linear_async` op): keep the MoRA update on it too.
        return self._apply_sync(x, bias)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        rt = self.mora_runtime
        if rt is None:  # not attached (a model manager of another kind): stock LoRA only
            return super()._apply_lora_to_output(x, output) if self._lora_slots else output
        if rt.graph_safe:
            # No host branch on the batch's contents (a trace or a capture would bake it in).
            x2 = x.flatten(0, -2) if x.ndim == 3 else x
            out2 = output.flatten(0, -2) if output.ndim == 3 else output
            torch.ops.mora.stock_lora(out2, x2, self.mora_handle, rt.step.handle)
            self.mora_update(x2, out2)
            return output
        # CPU: the host knows the step's kind and which table rows its tokens use, so each layer
        # runs only the work they need. A resident LoRA adapter costs nothing in steps without
        # its tokens, and a merged adapter's own steps take the plain base path.
        if StepKind.LORA in rt.kind and self._lora_slots:
            output = super()._apply_lora_to_output(x, output)
        merged = self.mora_group.merged_row
        meta = rt.meta_for(self._num_rows(x), merged)
        present = meta.present_slots
        if (present & self._mora_slots) - {merged} or (merged >= 0 and not present <= {merged}):
            x2 = x.flatten(0, -2) if x.ndim == 3 else x
            out2 = output.flatten(0, -2) if output.ndim == 3 else output
            mora_apply_slices(out2, x2, self.mora_tables, meta, self._mora_offsets, backend=rt.backend)
        return output

    @staticmethod
    def _num_rows(x: torch.Tensor) -> int:
        return x.shape[0] * x.shape[1] if x.ndim == 3 else x.shape[0]


_LAYERS: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()
_next_handle = itertools.count(1)


@direct_op("mora::stock_lora", mutates_args=("y",))
def stock_lora(y: torch.Tensor, x: torch.Tensor, layer: int, step: int) -> None:
    """vLLM's own LoRA update of layer `layer` (`BaseLinearLayerWithLoRA._apply_lora_to_output`),
    if the step's kind has `StepKind.LORA`; else nothing is launched.

    Shapes: `x [T, in]`, `y [T, out]` (the layer's local shard). Semantics::

        if StepKind.LORA in step.kind:
            y[:] = BaseLinearLayerWithLoRA._apply_lora_to_output(layer, x, y)
    """
    if StepKind.LORA not in step_by_handle(step).kind:
        return
    module = _LAYERS.get(layer)
    if module is None:
        raise RuntimeError(f"MoRA layer {layer} is gone")
    out = BaseLinearLayerWithLoRA._apply_lora_to_output(module, x, y)
    if out is not y:  # a platform that cannot update in place
        y.copy_(out)


@stock_lora.register_fake
def _stock_lora_fake(y: torch.Tensor, x: torch.Tensor, layer: int, step: int) -> None:
    return None


def _tp(layer: object) -> tuple[int, int]:
    return getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)


class MoraColumnParallelLinearWithLoRA(MoraLayerMixin, ColumnParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[tuple[int, ShardLayout]]:
        rank, size = _tp(self)
        base = self.base_layer
        local = base.output_size_per_partition
        if self.is_merged_col_linear and size > 1:
            # One checkpoint module packing two equal outputs (Phi-3's gate_up_proj): this rank
            # holds its shard of each half, side by side (vLLM's `slice_lora_b`).
            half, part = base.output_size // 2, local // 2
            return [(0, ShardLayout(base.input_size, base.output_size, out_start=o + rank * part, out_end=o + (rank + 1) * part))
                    for o in (0, half)]
        return [(0, ShardLayout(base.input_size, base.output_size, out_start=rank * local, out_end=(rank + 1) * local))]


class MoraMergedColumnParallelLinearWithLoRA(MoraLayerMixin, MergedColumnParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[tuple[int, ShardLayout]]:
        base = self.base_layer
        return [
            (i, ShardLayout(base.input_size, full, out_start=sid * local, out_end=(sid + 1) * local))
            for i, (full, local, sid) in enumerate(zip(base.output_sizes, self.output_slices, self.output_ids, strict=True))
        ]


class MoraMergedQKVParallelLinearWithLoRA(MoraLayerMixin, MergedQKVParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[tuple[int, ShardLayout]]:
        base = self.base_layer
        q_full = base.total_num_heads * base.head_size
        kv_full = base.total_num_kv_heads * base.head_size
        return [
            (i, ShardLayout(base.input_size, full, out_start=sid * local, out_end=(sid + 1) * local))
            for i, (full, local, sid) in enumerate(zip((q_full, kv_full, kv_full), self.output_slices, self.output_ids, strict=True))
        ]


class MoraQKVParallelLinearWithLoRA(MoraLayerMixin, QKVParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[tuple[int, ShardLayout]]:
        rank, size = _tp(self)
        base = self.base_layer
        if size == 1:
            return [(0, ShardLayout(base.input_size, base.output_size))]
        # One checkpoint module for q, k and v (ChatGLM, Phi-3): this rank holds its q heads and
        # its (possibly replicated) k/v heads, side by side (vLLM's `slice_lora_b`).
        q_total, kv_total = self.q_proj_total_size, self.kv_proj_total_size
        q_part, kv_part = self.q_proj_shard_size, self.kv_proj_shard_size
        kv_id = rank // base.num_kv_head_replicas
        full = q_total + 2 * kv_total
        starts = (rank * q_part, q_total + kv_id * kv_part, q_total + kv_total + kv_id * kv_part)
        return [(0, ShardLayout(base.input_size, full, out_start=a, out_end=a + w))
                for a, w in zip(starts, (q_part, kv_part, kv_part), strict=True)]


class MoraRowParallelLinearWithLoRA(MoraLayerMixin, RowParallelLinearWithLoRA):
    def _mora_layouts(self) -> list[tuple[int, ShardLayout]]:
        rank, _ = _tp(self)
        base = self.base_layer
        local = base.input_size_per_partition
        return [(0, ShardLayout(base.input_size, base.output_size, in_start=rank * local, in_end=(rank + 1) * local))]


class MoraReplicatedLinearWithLoRA(MoraLayerMixin, ReplicatedLinearWithLoRA):
    def _mora_layouts(self) -> list[tuple[int, ShardLayout]]:
        base = self.base_layer
        return [(0, ShardLayout(base.input_size, base.output_size))]


class MoraVocabParallelEmbeddingWithLoRA(VocabParallelEmbeddingWithLoRA):
    """vLLM's LoRA embedding, its LoRA part inside an op in a compiled CPU model: vLLM's CPU
    LoRA ops branch on the host (`no_lora`, the batch's sizes), which a trace would bake in.
    Elsewhere (eager, or a GPU, whose LoRA kernels are graph-safe) it is vLLM's own."""

    mora_step = None  # the step metadata's handle when the LoRA part runs inside the op

    def attach(self, runtime: MoraRuntime) -> None:
        if runtime.graph_safe and runtime.device.type == "cpu":
            self.mora_handle = next(_next_handle)
            _LAYERS[self.mora_handle] = self
            self.mora_step = runtime.step.handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mora_step is None:
            return super().forward(x)
        return torch.ops.mora.stock_embedding(x, self.mora_handle, self.mora_step)


@direct_op("mora::stock_embedding", mutates_args=())
def stock_embedding(x: torch.Tensor, layer: int, step: int) -> torch.Tensor:
    """The embedding of `x`, with vLLM's LoRA embedding update if the step's kind has
    `StepKind.LORA`. Semantics::

        base = layer.base_layer.forward(x)
        return VocabParallelEmbeddingWithLoRA.forward(layer, x) if StepKind.LORA in step.kind else base
    """
    module = _LAYERS[layer]
    if StepKind.LORA in step_by_handle(step).kind:
        return VocabParallelEmbeddingWithLoRA.forward(module, x)
    return module.base_layer.forward(x)


@stock_embedding.register_fake
def _stock_embedding_fake(x: torch.Tensor, layer: int, step: int) -> torch.Tensor:
    weight = _LAYERS[layer].base_layer.weight
    return x.new_empty((*x.shape, weight.shape[1]), dtype=weight.dtype)


# Same relative order as vLLM's `_all_lora_classes` (more specific first).
MORA_LAYER_CLASSES = (
    MoraColumnParallelLinearWithLoRA,
    MoraMergedColumnParallelLinearWithLoRA,
    MoraQKVParallelLinearWithLoRA,
    MoraMergedQKVParallelLinearWithLoRA,
    MoraRowParallelLinearWithLoRA,
    MoraReplicatedLinearWithLoRA,
    MoraVocabParallelEmbeddingWithLoRA,
)
