"""Persistent step metadata for the fused MoRA operator: vLLM's LoRA-kernel pattern for MoRA.

A captured CUDA graph replays its kernels with the tensors it saw at capture time, and a
`torch.compile`d model reads the tensors it traced. So, as vLLM's `LoRAKernelMeta` does for LoRA,
the batch description lives in device buffers allocated once for `max_tokens` rows and
`max_slots` slots; `prepare` rewrites them in place between steps, and every forward (eager,
compiled or replayed) reads the same tensor objects. A forward may run on more rows than the
step has tokens (vLLM pads to a captured batch size): the segments describe only the step's
own tokens, so no kernel ever visits a padded row.

`prepare` neither synchronizes with the host nor allocates on the device: every op writes a
buffer allocated here, in place (`out=`, `scatter_`, `copy_`), and nothing is read back. vLLM's
asynchronous scheduling overlaps the next step's preparation with this step's forward, which
one host read per step would undo. The sort by slot is a counting sort (a one-hot cumulative
sum gives each token its rank among the tokens of its slot): `torch.sort` and `bincount` would
allocate, and `bincount` reads its maximum back to the host.

Which kernels a step launches (`kind`) is host state too, set between steps: a step whose kind
lacks `StepKind.MORA` launches no MoRA kernel at all. On a GPU the kind is the CUDA-graph key
the step replays (see `mora/vllm_plugin/graphs.py`), so a graph captured for a kind records
exactly the launches that kind needs, whatever the slot tables held at capture.
"""

from __future__ import annotations

import enum
import itertools
import weakref
from collections.abc import Sequence

import torch

from mora.kernels.table import BatchMeta

__all__ = ["StepKind", "StepMeta", "step_by_handle"]


class StepKind(enum.Flag):
    """What a step launches: `MORA` the fused MoRA operator, `LORA` vLLM's stock LoRA kernels.

    A step of base-model tokens only, or of a merged adapter's tokens only, is `NONE`: it runs
    the base GEMMs and nothing else.
    """

    NONE = 0
    MORA = enum.auto()
    LORA = enum.auto()


_STEPS: weakref.WeakValueDictionary[int, StepMeta] = weakref.WeakValueDictionary()
_next_handle = itertools.count(1)


def step_by_handle(handle: int) -> StepMeta:
    step = _STEPS.get(handle)
    if step is None:
        raise RuntimeError(f"MoRA step metadata {handle} is gone (its runtime was freed)")
    return step


class StepMeta:
    """Device buffers describing one engine step, allocated once and updated in place.

    Semantics of the buffers after `prepare(token_slots)` with `n` tokens::

        slot[:n] = token_slots;  slot[n:] = -1                  # padded rows: in no segment
        order[:n] = argsort(token_slots, stable=True);  order[n:] = arange(n, max_tokens)
        seg_start, seg_slot, num_segments                       # segments of the n tokens only

    `max_slots` counts the slot tables' rows (vLLM's slots and the reserved merged row).
    Registered under `handle` (the custom op's step argument) for as long as it lives.
    """

    def __init__(self, max_tokens: int, max_slots: int, device: torch.device | str) -> None:
        if max_tokens < 1 or max_slots < 1:
            raise ValueError(f"need max_tokens >= 1 and max_slots >= 1, got {max_tokens} and {max_slots}")
        device = torch.device(device)
        self.max_tokens = max_tokens
        self.max_slots = max_slots
        self.device = device
        B = max_slots + 1  # buckets: slot -1 (no adapter), then 0..max_slots-1
        i64, i32 = torch.int64, torch.int32

        def buf(*shape: int, dtype: torch.dtype = i32, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.slot = buf(max_tokens, dtype=i64, fill=-1)
        self._iota = torch.arange(max_tokens, dtype=i64, device=device)
        self.order = self._iota.clone()
        # seg_start and seg_slot have one spare entry past their view: absent buckets scatter there
        self._seg_start = buf(B + 2)
        self._seg_slot = buf(B + 1, fill=-1)
        self.seg_start = self._seg_start[: B + 1]
        self.seg_slot = self._seg_slot[:B]
        self.num_segments = buf(1)
        # working memory of the counting sort
        self._bucket = buf(max_tokens, dtype=i64)  # slot + 1
        self._onehot = buf(max_tokens, B)
        self._ranks = buf(max_tokens, B)  # cumulative one-hot: tokens so far per bucket
        self._rank = buf(max_tokens, 1)
        self._pos = buf(max_tokens, dtype=i64)
        # row 0: tokens per bucket, row 1: bucket present; cumulated along the row. Two rows make
        # the sum a row-wise scan (a one-dimensional one takes a scratch buffer on CUDA).
        self._stats = buf(2, B)
        self._cum = buf(2, B)
        self._present = buf(B, dtype=torch.bool)
        self._absent = buf(B, dtype=torch.bool)
        self._first = buf(B, dtype=i64)  # where each bucket's tokens start in `order`
        self._seg_of = buf(B, dtype=i64)  # each bucket's segment (B + spare: absent)
        self._seg_of1 = buf(B, dtype=i64)
        self._bucket_slot = torch.arange(-1, max_slots, dtype=i32, device=device)
        # host slots reach the device through pinned memory, asynchronously (see `prepare`)
        self._staging = torch.empty(max_tokens, dtype=i64, pin_memory=device.type == "cuda")
        self.num_tokens = 0  # host: the last prepared step's real token count
        self.kind = StepKind.MORA | StepKind.LORA  # before the first step: launch everything
        self._last: torch.Tensor | None = None  # the last step's slots when they came from the host
        self._views: dict[tuple[int, int], BatchMeta] = {}
        self.handle = next(_next_handle)
        _STEPS[self.handle] = self

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the fused op reads, in its argument order (`fused_op.mora_fused_apply`)."""
        return self.slot, self.order, self.seg_start, self.seg_slot, self.num_segments

    def prepare(self, token_slots: torch.Tensor | Sequence[int], kind: StepKind = StepKind.MORA) -> None:
        """Describe a step whose `n = len(token_slots)` tokens use these slots (-1: none) and
        which launches `kind`.

        `token_slots` on this device is copied from; on the host (a CPU tensor or a sequence)
        it goes through pinned memory with an asynchronous copy. vLLM prepares a step's inputs
        after the previous step's host-to-device copies completed (its input-preparation
        event), so the pinned buffer is never rewritten under a copy in flight.
        """
        n = len(token_slots)
        if n > self.max_tokens:
            raise ValueError(f"step has {n} tokens, the metadata was sized for {self.max_tokens}")
        host = None
        if not (isinstance(token_slots, torch.Tensor) and token_slots.device == self.device) or self.device.type == "cpu":
            host = torch.as_tensor(token_slots, dtype=torch.int64, device="cpu")
            if self._last is not None and torch.equal(host, self._last):
                self.kind = kind  # the same mapping as the last step (decode): buffers and plans hold
                return
        # Buffers created under inference mode (vLLM builds models in it) may only be written there.
        with torch.inference_mode(self.slot.is_inference()), torch.no_grad():
            slot = self.slot[:n]
            if host is None:
                slot.copy_(token_slots)
            elif self.device.type == "cpu":
                slot.copy_(host)
            else:
                self._staging[:n].copy_(host)
                slot.copy_(self._staging[:n], non_blocking=True)
            self.slot[n:].fill_(-1)
            self.order[n:].copy_(self._iota[n:])
            self._sort(n)
        self.num_tokens = n
        self.kind = kind
        self._last = None if host is None else host.clone()
        self._views.clear()  # the torch backend caches per-step plans on the views

    def _sort(self, n: int) -> None:
        """order, seg_start, seg_slot, num_segments of `slot[:n]`, in place (see the class)."""
        B = self.max_slots + 1
        stats, cum = self._stats, self._cum
        if n == 0:
            stats[0].zero_()
        else:
            bucket = self._bucket[:n]
            torch.add(self.slot[:n], 1, out=bucket)
            onehot, ranks = self._onehot[:n], self._ranks[:n]
            onehot.zero_()
            onehot.scatter_(1, bucket.unsqueeze(1), 1)
            torch.cumsum(onehot, 0, out=ranks)  # ranks[t, b]: tokens 0..t in bucket b
            stats[0].copy_(ranks[n - 1])
        torch.gt(stats[0], 0, out=self._present)
        stats[1].copy_(self._present)
        torch.cumsum(stats, 1, out=cum)
        torch.sub(cum[0], stats[0], out=self._first)
        if n:
            # token t goes to first[bucket] + (its rank among its bucket's tokens) - 1
            rank, pos = self._rank[:n], self._pos[:n]
            torch.gather(ranks, 1, bucket.unsqueeze(1), out=rank)
            torch.index_select(self._first, 0, bucket, out=pos)
            pos.add_(rank.squeeze(1)).sub_(1)
            self.order[:n].scatter_(0, pos, self._iota[:n])
        # segments: the present buckets, compacted in slot order; absent ones land on the spare
        torch.logical_not(self._present, out=self._absent)
        torch.sub(cum[1], 1, out=self._seg_of).masked_fill_(self._absent, B)
        self._seg_slot.fill_(-1).scatter_(0, self._seg_of, self._bucket_slot)
        torch.add(self._seg_of, 1, out=self._seg_of1)
        self._seg_start.fill_(n)
        self._seg_start[:1].zero_()
        self._seg_start.scatter_(0, self._seg_of1, cum[0])
        self.num_segments.copy_(cum[1, B - 1 :])

    def view(self, num_rows: int, merged: torch.Tensor) -> BatchMeta:
        """The metadata of a forward over `num_rows >= n` rows for a layer whose merged slot is
        `merged` ([1] int32, -1: none): views of the buffers (no copy), kept for the step."""
        key = (num_rows, merged.data_ptr())
        meta = self._views.get(key)
        if meta is None:
            if num_rows > self.max_tokens:
                raise ValueError(f"forward has {num_rows} rows, the metadata was sized for {self.max_tokens}")
            meta = BatchMeta(self.slot[:num_rows], self.order[:num_rows], self.seg_start, self.seg_slot,
                             self.num_segments, None, merged)
            self._views[key] = meta
        return meta
