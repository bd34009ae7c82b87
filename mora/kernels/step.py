"""Persistent step metadata for the fused MoRA operator: vLLM's LoRA-kernel pattern for MoRA.

A captured CUDA graph replays its kernels with the tensors it saw at capture time, and a
`torch.compile`d model reads the tensors it traced. So, as vLLM's `LoRAKernelMeta` does for LoRA,
the batch description lives in device buffers allocated once for `max_tokens` rows and
`max_slots` slots; `prepare` rewrites them in place between steps, and every forward (eager,
compiled or replayed) reads the same tensor objects. A forward may run on more rows than the
step has tokens (vLLM pads to a captured batch size): rows past the step's tokens hold the
merged slot (-1 when none), which the operator leaves bit-identical, and the segments describe
only the step's own tokens, so no kernel ever visits a padded row.

`prepare` runs on the host between steps (it may allocate, like vLLM's `prepare_tensors`);
the forward's reads (`view`) allocate nothing on the device and never synchronize.
"""

from __future__ import annotations

import torch

from mora.kernels.table import BatchMeta, prepare_batch

__all__ = ["StepMeta"]


class StepMeta:
    """Device buffers describing one engine step, allocated once and updated in place.

    Semantics of the buffers after `prepare(token_slots, merged_slot)` with `n` tokens::

        slot[:n] = token_slots;  slot[n:] = merged_slot         # padded rows: left untouched
        order[:n] = argsort(token_slots, stable=True);  order[n:] = arange(n, max_tokens)
        seg_start, seg_slot, num_segments                       # segments of the n tokens only
        merged[0] = merged_slot
    """

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device | str, *, merged: torch.Tensor | None = None) -> None:
        if max_tokens < 1 or max_slots < 1:
            raise ValueError(f"need max_tokens >= 1 and max_slots >= 1, got {max_tokens} and {max_slots}")
        device = torch.device(device)
        self.max_tokens = max_tokens
        self.max_slots = max_slots
        self.device = device
        self.slot = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self._iota = torch.arange(max_tokens, dtype=torch.int64, device=device)
        self.order = self._iota.clone()
        self.seg_start = torch.zeros(max_slots + 2, dtype=torch.int32, device=device)
        self.seg_slot = torch.full((max_slots + 1,), -1, dtype=torch.int32, device=device)
        self.num_segments = torch.zeros(1, dtype=torch.int32, device=device)
        self.merged = torch.full((1,), -1, dtype=torch.int32, device=device) if merged is None else merged
        self.num_tokens = 0  # host: the last prepared step's real token count
        self._views: dict[int, BatchMeta] = {}

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the fused op reads, in its argument order (`fused_op.mora_fused_apply`)."""
        return self.slot, self.order, self.seg_start, self.seg_slot, self.num_segments, self.merged

    def prepare(self, token_slots: torch.Tensor, merged_slot: int = -1) -> None:
        """Describe a step whose `n = len(token_slots)` tokens use these slots (-1: none)."""
        n = int(token_slots.shape[0])
        if n > self.max_tokens:
            raise ValueError(f"step has {n} tokens, the metadata was sized for {self.max_tokens}")
        if not -1 <= merged_slot < self.max_slots:
            raise ValueError(f"merged slot {merged_slot} outside -1..{self.max_slots - 1}")
        fresh = prepare_batch(token_slots.to(self.device), self.max_slots, merged_slot=merged_slot, host_segments=False)
        # Buffers created under inference mode (vLLM builds models in it) may only be written there.
        with torch.inference_mode(self.slot.is_inference()), torch.no_grad():
            self.slot[:n].copy_(fresh.slot)
            self.slot[n:].fill_(merged_slot)
            self.order[:n].copy_(fresh.order)
            self.order[n:].copy_(self._iota[n:])
            self.seg_start.copy_(fresh.seg_start)
            self.seg_slot.copy_(fresh.seg_slot)
            self.num_segments.copy_(fresh.num_segments)
            self.merged.fill_(merged_slot)
        self.num_tokens = n
        self._views.clear()  # the torch backend caches per-step plans on the views

    def set_merged(self, merged_slot: int) -> None:
        """A merge or unmerge between steps: the padded rows follow the new merged slot."""
        with torch.inference_mode(self.slot.is_inference()), torch.no_grad():
            self.slot[self.num_tokens :].fill_(merged_slot)
            self.merged.fill_(merged_slot)
        self._views.clear()

    def view(self, num_rows: int) -> BatchMeta:
        """The metadata of a forward over `num_rows >= n` rows: views of the buffers (no copy)."""
        meta = self._views.get(num_rows)
        if meta is None:
            if num_rows > self.max_tokens:
                raise ValueError(f"forward has {num_rows} rows, the metadata was sized for {self.max_tokens}")
            meta = BatchMeta(self.slot[:num_rows], self.order[:num_rows], self.seg_start, self.seg_slot,
                             self.num_segments, None, self.merged)
            self._views[num_rows] = meta
        return meta
