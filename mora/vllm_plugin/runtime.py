"""Per-engine MoRA state shared by every wrapped layer: the step's batch metadata, the merged slot.

The worker LoRA manager calls `prepare` once per engine step, after vLLM has written the
step's token -> slot mapping; every layer's forward then reads the same metadata. vLLM hands
over the *unpadded* mapping (`num_scheduled_tokens`), while the forward may run on more rows
(a CUDA-graph batch size): rows past the step's tokens are left bit-identical.

Two modes (`graph_safe`, by default on any device but the CPU):

* graph-safe (GPU): vLLM compiles the model and replays captured CUDA graphs. The metadata
  lives in persistent device buffers (`StepMeta`, sized for `max_num_batched_tokens` rows)
  that `prepare` rewrites in place, and the forward calls the custom op
  `torch.ops.mora.fused_apply` on them (`apply`): no host sync, no allocation, no host branch
  on the batch's contents, nothing a trace or a capture could bake in.
* eager (CPU): vLLM's CPU build runs LoRA models eagerly, so each step gets a host-planned
  `BatchMeta` (`meta_for`) and layers skip the work their tokens do not need.
"""

from __future__ import annotations

import torch

from mora.kernels import BatchMeta, StepMeta, TableGroup, prepare_batch, select_backend

__all__ = ["MoraRuntime"]


class MoraRuntime:
    """The state of MoRA serving in one model: slots, the merged adapter and this step's batch.

    Rows `0..S-1` of the slot tables mirror vLLM's `S` adapter slots; row `S` is reserved for
    the merged adapter. While an adapter is merged, `prepare` relabels its tokens (in whichever
    vLLM slot it sits this step, if any) to row `S`, so the fused operator's merged-slot remap
    skips them and subtracts row `S`'s update from every other token, independently of vLLM's
    slot assignment (the merged adapter need not hold a slot).
    """

    def __init__(self, max_slots: int, device: torch.device | str, *, max_tokens: int | None = None,
                 graph_safe: bool | None = None) -> None:
        self.max_slots = max_slots + 1  # + the reserved merged row
        self.merged_row = max_slots
        self.device = torch.device(device)
        self.backend = select_backend(self.device)  # once per engine, not per layer call
        self.graph_safe = self.device.type != "cpu" if graph_safe is None else graph_safe
        self.merged_slot = -1
        self.merged = torch.full((1,), -1, dtype=torch.int32, device=self.device)
        self.step: StepMeta | None = None
        if self.graph_safe:
            if max_tokens is None:
                raise ValueError("a graph-safe runtime needs max_tokens (vLLM's max_num_batched_tokens)")
            self.step = StepMeta(max_tokens, self.max_slots, self.device, merged=self.merged)
        self.meta: BatchMeta | None = None
        self._empty: dict[int, BatchMeta] = {}
        self._padded: tuple[BatchMeta, int, BatchMeta] | None = None

    def set_merged(self, slot: int) -> None:
        self.merged_slot = slot
        if self.step is not None:
            self.step.set_merged(slot)
        else:
            # Buffers made during a forward are inference tensors; only inference mode may update them.
            with torch.inference_mode():
                self.merged.fill_(slot)
        self._empty.clear()
        self.meta = None  # the next step prepares its batch with the new merged slot

    def prepare(self, token_slots: torch.Tensor, merged_alias: int = -1) -> BatchMeta:
        """Describe this step's tokens (once per step, shared by all layers).

        `token_slots`: the step's `n` real tokens' vLLM slots (-1: none); `merged_alias`: the
        vLLM slot the merged adapter occupies this step (-1: none).
        """
        if self.merged_slot >= 0 and merged_alias >= 0:
            token_slots = torch.where(token_slots == merged_alias, self.merged_row, token_slots)
        if self.step is not None:
            self.step.prepare(token_slots, self.merged_slot)
            return self.step.view(int(token_slots.shape[0]))
        prev = self.meta
        # Consecutive decode steps of the same requests map tokens to slots identically: the
        # CPU backend's plans and bound programs (kept on the metadata) then carry over instead
        # of being rebuilt every step. `token_slots` is vLLM's persistent buffer, rewritten in
        # place, so the metadata keeps its own copy.
        token_slots = token_slots.to(torch.int64)
        if prev is not None and prev.slot.shape == token_slots.shape and torch.equal(prev.slot, token_slots):
            return prev
        meta = prepare_batch(token_slots.clone(), self.max_slots, merged_slot=self.merged_slot,
                             host_segments=self.device.type == "cpu")
        meta.merged = self.merged  # one persistent tensor, updated in place by merges
        self.meta = meta
        return meta

    def apply(self, y: torch.Tensor, x: torch.Tensor, group: TableGroup) -> None:
        """Graph-safe forward: `y += ` the step's MoRA updates of `group`'s slices, in place,
        through the custom op over the persistent buffers (rows past the step's tokens untouched)."""
        group.apply(y, x, self.step.tensors)

    def meta_for(self, num_rows: int) -> BatchMeta:
        """Eager forward: the step's metadata for a forward over `num_rows` rows.

        More rows than the step's tokens (a padded forward): the step's tokens keep their slots
        and the padding rows are left bit-identical. Fewer, or no step prepared: a forward vLLM
        runs outside a step (profiling, warm-up), which gets the base model.
        """
        meta = self.meta
        if meta is not None:
            n = meta.num_tokens
            if n == num_rows:
                return meta
            if n < num_rows:
                return self._pad(meta, num_rows)
        meta = self._empty.get(num_rows)
        if meta is None:
            slots = torch.full((num_rows,), -1, dtype=torch.int64, device=self.device)
            meta = self._empty[num_rows] = prepare_batch(slots, self.max_slots, merged_slot=self.merged_slot)
            meta.merged = self.merged
        return meta

    def _pad(self, meta: BatchMeta, num_rows: int) -> BatchMeta:
        """`meta` extended to `num_rows` rows that hold the merged slot (-1: none), which the
        operator leaves untouched; its segments still cover only the step's tokens."""
        if self._padded is not None and self._padded[0] is meta and self._padded[1] == num_rows:
            return self._padded[2]
        n, device = meta.num_tokens, meta.slot.device
        pad = torch.full((num_rows - n,), self.merged_slot, dtype=meta.slot.dtype, device=device)
        padded = BatchMeta(
            torch.cat([meta.slot, pad]), torch.cat([meta.order, torch.arange(n, num_rows, device=device)]),
            meta.seg_start, meta.seg_slot, meta.num_segments, meta.segments, meta.merged,
        )
        self._padded = (meta, num_rows, padded)
        return padded
