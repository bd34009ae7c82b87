"""Per-engine MoRA state shared by every wrapped layer: the step's batch metadata, the merged slot.

The worker LoRA manager calls `prepare` once per engine step, after vLLM has written the
step's token -> slot mapping; every layer's forward then reuses the same `BatchMeta`.

CUDA-graph safety (GPU): the slot mapping is read from vLLM's persistent
`_token_lora_indices` buffer, and the merged slot lives in a device tensor (`merged`) that
merge/unmerge update in place between steps, so the kernels read both from device memory and
a captured graph needs no host branch per token. On the CPU nothing is captured and the torch
backend reads the host copies.
"""

from __future__ import annotations

import torch

from mora.kernels import BatchMeta, prepare_batch

__all__ = ["MoraRuntime"]


class MoraRuntime:
    """The state of MoRA serving in one model: slots, the merged adapter and this step's batch.

    Rows `0..S-1` of the slot tables mirror vLLM's `S` adapter slots; row `S` is reserved for
    the merged adapter. While an adapter is merged, `prepare` relabels its tokens (in whichever
    vLLM slot it sits this step, if any) to row `S`, so the fused operator's merged-slot remap
    skips them and subtracts row `S`'s update from every other token, independently of vLLM's
    slot assignment (the merged adapter need not hold a slot).
    """

    def __init__(self, max_slots: int, device: torch.device | str) -> None:
        self.max_slots = max_slots + 1  # + the reserved merged row
        self.merged_row = max_slots
        self.device = torch.device(device)
        self.merged_slot = -1
        self.merged = torch.full((1,), -1, dtype=torch.int32, device=self.device)
        self.meta: BatchMeta | None = None
        self._empty: dict[int, BatchMeta] = {}

    def set_merged(self, slot: int) -> None:
        self.merged_slot = slot
        # Buffers made during a forward are inference tensors; only inference mode may update them.
        with torch.inference_mode():
            self.merged.fill_(slot)
        self._empty.clear()
        self.meta = None  # the next step prepares its batch with the new merged slot

    def prepare(self, token_slots: torch.Tensor, merged_alias: int = -1) -> BatchMeta:
        """Sort this step's tokens by slot (once per step, shared by all layers).

        `merged_alias`: the vLLM slot the merged adapter occupies this step (-1: none).
        """
        if self.merged_slot >= 0 and merged_alias >= 0:
            token_slots = torch.where(token_slots == merged_alias, self.merged_row, token_slots)
        prev = self.meta
        if self.device.type == "cpu":
            # Consecutive decode steps of the same requests map tokens to slots identically:
            # the CPU backend's plans and bound programs (kept on the metadata) then carry over
            # instead of being rebuilt every step. `token_slots` is vLLM's persistent buffer,
            # rewritten in place, so the metadata keeps its own copy.
            token_slots = token_slots.to(torch.int64)
            if prev is not None and prev.slot.shape == token_slots.shape and torch.equal(prev.slot, token_slots):
                return prev
            token_slots = token_slots.clone()
        meta = prepare_batch(token_slots, self.max_slots, merged_slot=self.merged_slot)
        meta.merged = self.merged  # one persistent device tensor, updated in place by merges
        self.meta = meta
        return meta

    def meta_for(self, num_tokens: int) -> BatchMeta:
        """The step's metadata, or an all-base one for a forward vLLM runs outside a step
        (profiling, warm-up) whose token count differs."""
        if self.meta is not None and self.meta.num_tokens == num_tokens:
            return self.meta
        meta = self._empty.get(num_tokens)
        if meta is None:
            slots = torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device)
            meta = self._empty[num_tokens] = prepare_batch(slots, self.max_slots, merged_slot=self.merged_slot)
            meta.merged = self.merged
        return meta
