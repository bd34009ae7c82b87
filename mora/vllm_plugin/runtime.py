"""Per-engine MoRA state shared by every wrapped layer: the step's batch metadata, the merged row.

The model manager calls `prepare` once per engine step with the step's token -> table-row
mapping (computed on the host from vLLM's mapping, a merged adapter's tokens relabeled to the
reserved row) and the step's kind (which kernels it launches); every layer's forward then reads
the same metadata. The mapping is the *unpadded* one, while the forward may run on more rows
(a CUDA-graph batch size): rows past the step's tokens are left bit-identical.

Two modes (`graph_safe`: on any device but the CPU, and on the CPU when the model is compiled):

* graph-safe: vLLM compiles the model and, on a GPU, replays captured CUDA graphs. The metadata
  lives in persistent device buffers (`StepMeta`, sized for `max_num_batched_tokens` rows)
  that `prepare` rewrites in place without a host synchronization or a device allocation, and
  the forward calls the custom op `torch.ops.mora.fused_apply` on them (`apply`): no host
  branch on the batch's contents in the forward, nothing a trace or a capture could bake in.
  The op's body launches what the step's kind asks for.
* eager (CPU, not compiled): each step gets a host-planned `BatchMeta` (`meta_for`) and layers
  skip the work their tokens do not need.

Merged rows are per layer (`TableGroup.merged`): a merge folds layer after layer between steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from mora.kernels import BatchMeta, StepKind, StepMeta, TableGroup, prepare_batch, select_backend

__all__ = ["MoraRuntime", "plan_step"]


class MoraRuntime:
    """The state of MoRA serving in one model: slots, the merged adapter's row and this step.

    Rows `0..S-1` of the slot tables mirror vLLM's `S` adapter slots; row `S` is reserved for
    the adapter being merged or merged. From the moment a merge starts, the manager relabels
    that adapter's tokens (in whichever vLLM slot it sits, if any) to row `S`; a layer that
    does not hold it merged yet adds row `S`'s update to them, one that does skips them and
    subtracts it from every other token, independently of vLLM's slot assignment.

    `graphs`: the forward may be compiled or captured (graph-safe mode); default: on any device
    but the CPU. On CUDA, graph-safe needs the Triton backend: the torch backend plans on the
    host (device reads), which a capture would fail on or bake in.
    """

    def __init__(self, max_slots: int, device: torch.device | str, *, max_tokens: int | None = None,
                 graphs: bool | None = None) -> None:
        self.max_slots = max_slots + 1  # + the reserved merged row
        self.merged_row = max_slots
        self.device = torch.device(device)
        self.backend = select_backend(self.device)  # once per engine, not per layer call
        self.graph_safe = self.device.type != "cpu" if graphs is None else graphs
        if self.graph_safe and self.device.type == "cuda" and self.backend != "triton":
            raise ValueError(f"the {self.backend!r} MoRA backend plans on the host and cannot run in a compiled or "
                             "CUDA-graph forward; use the triton backend (unset MORA_KERNEL_BACKEND) or enforce_eager=True")
        self.merged_slot = -1  # the row whose adapter is being merged or is merged (-1: none)
        self.step: StepMeta | None = None
        if self.graph_safe:
            if max_tokens is None:
                raise ValueError("a graph-safe runtime needs max_tokens (vLLM's max_num_batched_tokens)")
            self.step = StepMeta(max_tokens, self.max_slots, self.device)
        self.kind = StepKind.MORA | StepKind.LORA  # what the last prepared step launches
        self.forced: StepKind | None = None  # a dummy run's kind (graphs.py), over the mapping's
        self.meta: BatchMeta | None = None
        self._empty: dict[int, BatchMeta] = {}
        self._padded: tuple[BatchMeta, int, BatchMeta] | None = None
        self._rows = {row: torch.full((1,), row, dtype=torch.int32, device=self.device) for row in (-1, self.merged_row)}
        self._variants: dict[tuple[int, int], tuple[BatchMeta, BatchMeta]] = {}

    def set_merged(self, row: int) -> None:
        """Row `row` now holds the adapter being merged (-1: none); its tokens are relabeled to it
        from the next step on (the manager reads `merged_slot`)."""
        self.merged_slot = row
        self.meta = None
        self._empty.clear()
        self._variants.clear()

    def set_kind(self, kind: StepKind) -> None:
        """What the prepared step launches (a CUDA-graph key being captured may ask for more
        than the warm-up mapping holds: see `graphs.py`)."""
        self.kind = kind
        if self.step is not None:
            self.step.kind = kind

    @contextlib.contextmanager
    def forcing(self, kind: StepKind) -> Iterator[None]:
        """Steps prepared meanwhile launch `kind`, whatever their mapping holds: a CUDA-graph
        case being warmed up or captured with vLLM's dummy adapters (see graphs.py)."""
        self.forced = kind
        self.set_kind(kind)
        try:
            yield
        finally:
            self.forced = None

    def prepare(self, token_slots: torch.Tensor, kind: StepKind = StepKind.MORA | StepKind.LORA) -> BatchMeta | None:
        """Describe this step's tokens (once per step, shared by all layers).

        `token_slots`: the step's `n` real tokens' table rows (-1: none), on the host or the
        device; `kind`: what the step launches (overridden while `forcing`). Returns the eager
        metadata (None when graph-safe).
        """
        if self.forced is not None:
            kind = self.forced
        self.kind = kind
        if self.step is not None:
            self.step.prepare(token_slots, kind)
            return None
        prev = self.meta
        # Consecutive decode steps of the same requests map tokens to slots identically: the
        # CPU backend's plans and bound programs (kept on the metadata) then carry over instead
        # of being rebuilt every step.
        token_slots = torch.as_tensor(token_slots, dtype=torch.int64, device=self.device)
        if prev is not None and prev.slot.shape == token_slots.shape and torch.equal(prev.slot, token_slots):
            return prev
        meta = prepare_batch(token_slots.clone(), self.max_slots, host_segments=self.device.type == "cpu")
        meta.merged = self._rows[-1]
        self.meta = meta
        self._variants.clear()
        return meta

    def apply(self, y: torch.Tensor, x: torch.Tensor, group: TableGroup) -> None:
        """Graph-safe forward: `y += ` the step's MoRA updates of `group`'s slices, in place,
        through the custom op over the persistent buffers (rows past the step's tokens untouched)."""
        group.apply(y, x, self.step)

    def meta_for(self, num_rows: int, merged_row: int = -1) -> BatchMeta:
        """Eager forward: the step's metadata for a forward over `num_rows` rows of a layer whose
        weights hold row `merged_row` merged (-1: none).

        More rows than the step's tokens (a padded forward): the step's tokens keep their slots
        and the padding rows, in no segment, are left bit-identical. Fewer, or no step prepared:
        a forward vLLM runs outside a step (profiling, warm-up), which gets the base model.
        """
        meta = self._base_meta(num_rows)
        if merged_row < 0:
            return meta
        key = (id(meta), merged_row)
        hit = self._variants.get(key)
        if hit is None:
            # Its own plans: the CPU backend plans the merged pass from the merged row.
            variant = BatchMeta(meta.slot, meta.order, meta.seg_start, meta.seg_slot, meta.num_segments,
                                meta.segments, self._rows[merged_row], scratch=meta.scratch)
            hit = self._variants[key] = (meta, variant)
        return hit[1]

    def _base_meta(self, num_rows: int) -> BatchMeta:
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
            meta = self._empty[num_rows] = prepare_batch(slots, self.max_slots)
            meta.merged = self._rows[-1]
        return meta

    def _pad(self, meta: BatchMeta, num_rows: int) -> BatchMeta:
        """`meta` extended to `num_rows` rows; its segments still cover only the step's tokens."""
        if self._padded is not None and self._padded[0] is meta and self._padded[1] == num_rows:
            return self._padded[2]
        n, device = meta.num_tokens, meta.slot.device
        pad = torch.full((num_rows - n,), -1, dtype=meta.slot.dtype, device=device)
        padded = BatchMeta(
            torch.cat([meta.slot, pad]), torch.cat([meta.order, torch.arange(n, num_rows, device=device)]),
            meta.seg_start, meta.seg_slot, meta.num_segments, meta.segments, meta.merged,
        )
        self._padded = (meta, num_rows, padded)
        return padded


def plan_step(ids: np.ndarray, slot_of: Mapping[int, int], is_mora: Callable[[int], bool], target: int | None,
              merged: bool, merged_row: int) -> tuple[np.ndarray, list[int], StepKind]:
    """A step's MoRA side, from its adapter id per token (0: none), on the host.

    Returns each token's table row (-1: none; `target`, the adapter being merged or merged:
    `merged_row`), the MoRA adapter ids present (vLLM's mapping must not see them: its LoRA
    kernels then skip their tokens) and what the step launches:

    * `MORA` for tokens of an unmerged MoRA adapter, of `target` while not `merged` in every
      layer yet, and of anything else while `target` is set (the merged layers subtract it);
    * `LORA` for tokens of a stock LoRA adapter;
    * nothing else: base tokens, or `target`'s own tokens once merged, run the base GEMMs only.
    """
    uniq, inverse = np.unique(ids, return_inverse=True)
    rows = np.full(len(uniq), -1, dtype=np.int64)
    moras, kind = [], StepKind.NONE
    for k, lora_id in enumerate(uniq.tolist()):
        if target is not None and lora_id != target:
            kind |= StepKind.MORA
        if lora_id <= 0:
            continue
        if not is_mora(lora_id):
            kind |= StepKind.LORA
            continue
        moras.append(lora_id)
        if lora_id == target:
            rows[k] = merged_row
            if not merged:
                kind |= StepKind.MORA
        elif lora_id in slot_of:
            rows[k] = slot_of[lora_id]
            kind |= StepKind.MORA
        else:
            raise RuntimeError(f"MoRA adapter {lora_id} is in the step's mapping but holds no slot")
    return rows[inverse], moras, kind
