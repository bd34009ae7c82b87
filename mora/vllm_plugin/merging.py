"""Merging a resident MoRA adapter into a wrapped layer's base weights, and unmerging it.

Two weight layouts occur:

* dense (GPU, and CPU layers vLLM leaves on `F.linear`): the weight is a plain tensor that
  captured graphs and kernels point at, so it is modified in place (its address never
  changes) and the original values of exactly the changed elements are kept: on the device
  when it has room for them, else in pinned host memory, copied asynchronously (the in-place
  addition that follows on the same stream waits for the copy, the host does not); unmerge
  copies them back, bit for bit.
* packed (vLLM's CPU build prepacks linear weights for oneDNN and frees the dense tensor): the
  dense original is recovered exactly with an identity GEMM through the packed kernel, the
  update is added to that copy, vLLM's own dispatch packs it into a new kernel, and the old one
  is kept aside. Unmerge puts the old kernel back: the original packed weights were never
  touched, so nothing needs to be kept for exactness.

Each layer says whether its weights hold the merged adapter (`MoraSlots.set_weights_merged`,
read by the fused operator per layer), so a merge proceeds a slice of layers per call between
steps and every step in between is exact: from the first slice on, the adapter's tokens are
relabeled to the reserved row, which the layers not merged yet add and the merged ones skip
(subtracting it from every other token). Dense layers are merged in place by those slices;
packed (CPU) layers are prepared aside by them and swapped in together at the commit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mora.delta import delta_weight
from mora.errors import MergeError
from mora.merge import MergeRecord, backup_copy, merge_, unmerge_
from mora.vllm_plugin.quantized import refuse_merge
from mora.vllm_plugin.worker_api import MergeState

if TYPE_CHECKING:
    from mora.vllm_plugin.models import MoraLoRAModel
    from mora.vllm_plugin.runtime import MoraRuntime
    from mora.vllm_plugin.slots import MoraSlots as MoraLayerMixin  # what a merge reads and writes

__all__ = ["MERGE_SLICE_BYTES", "MERGE_SLICE_S", "LayerMerge", "MergeController", "dense_weight", "install_prepared", "is_packed", "merge_layer",
           "prepare_bytes_for", "prepare_packed_layer", "unmerge_layer"]

log = logging.getLogger(__name__)


@dataclass
class LayerMerge:
    """How one layer was merged, and what undoing it needs."""

    slot: int
    packed: bool
    records: list[tuple[slice, MergeRecord]] = field(default_factory=list)  # dense, unsharded slices
    shard_backups: list[tuple[slice, torch.Tensor]] = field(default_factory=list)  # dense, sharded slices
    saved_kernel: object = None  # packed: the original cpu_linear
    backup_bytes: int = 0  # host memory kept for the exact unmerge
    merged_copy_bytes: int = 0  # packed: the merged kernel's weights, alongside the original
    changed_elements: int = 0
    seconds: float = 0.0


def is_packed(base: torch.nn.Module) -> bool:
    """Whether vLLM's CPU build prepacked the layer's weight for oneDNN (and freed the dense one)."""
    return base.weight.numel() == 0 and hasattr(base, "cpu_linear")


def dense_weight(layer: MoraLayerMixin) -> torch.Tensor:
    """The layer's base weight `[out, in]`; a packed one recovered exactly from its kernel
    (x @ W.T with x = I gives W.T: every output is one weight times 1.0)."""
    base = layer.base_layer
    W = base.weight
    if not is_packed(base):
        return W
    with torch.no_grad():
        return base.cpu_linear(torch.eye(layer.input_size, dtype=W.dtype), W, None).t().contiguous()


def _slices(layer: MoraLayerMixin) -> list[slice]:
    offs = layer._mora_offsets
    return [slice(offs[i], offs[i + 1]) for i in range(len(offs) - 1)]


def backup_device(W: torch.Tensor, nbytes: int) -> torch.device:
    """Where a dense layer's merge backup goes: `W`'s GPU when it has room for it twice over
    (the copy is then device to device), else the host (pinned, asynchronous)."""
    if W.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(W.device)
        if free >= 2 * nbytes:
            return W.device
    return torch.device("cpu")


def _add_slice(W: torch.Tensor, rows: slice, table, slot: int, merge: LayerMerge, *, exact: bool,  # noqa: ANN001
               keep: torch.device) -> None:
    """Add slot `slot`'s update of one slice into `W[rows]`; the originals kept on `keep`."""
    spec = table.specs[slot]
    M = table.weight(slot)
    lay = table.layout
    if not lay.is_sharded:
        rec = merge_(W[rows], M, spec, exact=exact, safe=True, keep_storage=True, backup_device=keep)
        merge.records.append((rows, rec))
        merge.backup_bytes += rec.backup_bytes
        merge.changed_elements += rec.changed_elements
        return
    # A tensor-parallel shard: this rank's block of the dense update.
    delta = delta_weight(M, spec, torch.float32)[lay.out_start : lay.out_end, lay.in_start : lay.in_end]
    target = W[rows]
    if exact:
        backup = backup_copy(target, keep)
        merge.shard_backups.append((rows, backup))
        merge.backup_bytes += backup.numel() * backup.element_size()
    new = (target.float() + delta.to(target.device)).to(W.dtype)
    if not bool(torch.isfinite(new).all()):
        raise MergeError(f"merging would make weights non-finite ({spec})")
    target.copy_(new)
    merge.changed_elements += target.numel()


def _undo_dense(W: torch.Tensor, merge: LayerMerge) -> None:
    for rows, rec in reversed(merge.records):
        unmerge_(W[rows], rec)
    for rows, backup in reversed(merge.shard_backups):
        W[rows].copy_(backup, non_blocking=True)  # from pinned memory: ordered on the stream
    merge.records.clear()
    merge.shard_backups.clear()


def merge_layer(layer: MoraLayerMixin, slot: int) -> LayerMerge | None:
    """Fold slot `slot`'s MoRA update into `layer`'s base weights; `None` if it holds none."""
    tables = _merge_tables(layer, slot)
    if not tables:
        return None
    if layer.mora_merge_state is not None:
        raise MergeError(f"layer already has slot {layer.mora_merge_state.slot} merged")
    start = time.perf_counter()
    base = layer.base_layer
    refuse_merge(base)
    W = base.weight
    packed = is_packed(base)
    merge = LayerMerge(slot, packed)
    with torch.no_grad():
        if not packed:
            keep = backup_device(W, sum(rows.stop - rows.start for rows, _ in tables) * W.shape[1] * W.element_size())
            try:
                for rows, table in tables:
                    _add_slice(W.data, rows, table, slot, merge, exact=True, keep=keep)
            except Exception:
                _undo_dense(W.data, merge)
                raise
        else:
            _install_packed(base, merge, _packed_kernel(layer, tables, slot, merge))
    merge.seconds = time.perf_counter() - start
    layer.mora_merge_state = merge
    layer.set_weights_merged(True)
    return merge


def _merge_tables(layer: MoraLayerMixin, slot: int) -> list:
    return [(rows, t) for rows, t in zip(_slices(layer), layer.mora_tables, strict=True) if t.specs[slot] is not None]


def _packed_kernel(layer: MoraLayerMixin, tables: list, slot: int, merge: LayerMerge) -> torch.nn.Module:
    """A stand-in module holding the merged weights packed by vLLM's own dispatch; `layer` is
    only read (so this may run beside engine steps)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    base = layer.base_layer
    with torch.no_grad():
        dense = dense_weight(layer)
        for rows, table in tables:
            _add_slice(dense, rows, table, slot, merge, exact=False, keep=dense.device)
    merge.records.clear()
    stub = torch.nn.Module()
    stub.weight = torch.nn.Parameter(dense, requires_grad=False)
    stub.bias = getattr(base, "bias", None)
    dispatch_cpu_unquantized_gemm(stub, remove_weight=True)
    merge.merged_copy_bytes = dense.numel() * dense.element_size()
    return stub


def _install_packed(base: torch.nn.Module, merge: LayerMerge, stub: torch.nn.Module) -> None:
    merge.saved_kernel = base.cpu_linear
    base.weight = stub.weight
    base.cpu_linear = stub.cpu_linear


def prepare_packed_layer(layer: MoraLayerMixin, slot: int) -> tuple[LayerMerge, torch.nn.Module] | None:
    """The merged kernel of a packed (CPU) layer, computed without touching `layer` (off the
    step loop); None when the layer is dense or holds no update. `install_prepared` swaps it in."""
    tables = _merge_tables(layer, slot)
    base = layer.base_layer
    if not tables or not is_packed(base):
        return None
    refuse_merge(base)
    start = time.perf_counter()
    merge = LayerMerge(slot, True)
    stub = _packed_kernel(layer, tables, slot, merge)
    merge.seconds = time.perf_counter() - start
    return merge, stub


def install_prepared(layer: MoraLayerMixin, prepared: tuple[LayerMerge, torch.nn.Module]) -> LayerMerge:
    """Swap a prepared merged kernel in (between two steps: a few attribute writes)."""
    if layer.mora_merge_state is not None:
        raise MergeError(f"layer already has slot {layer.mora_merge_state.slot} merged")
    merge, stub = prepared
    _install_packed(layer.base_layer, merge, stub)
    layer.mora_merge_state = merge
    layer.set_weights_merged(True)
    return merge


def unmerge_layer(layer: MoraLayerMixin) -> LayerMerge | None:
    """Restore `layer`'s original base weights bit for bit."""
    merge = layer.mora_merge_state
    if merge is None:
        return None
    with torch.no_grad():
        if merge.packed:
            layer.base_layer.cpu_linear = merge.saved_kernel
        else:
            _undo_dense(layer.base_layer.weight.data, merge)
    layer.mora_merge_state = None
    layer.set_weights_merged(False)
    return merge


# Work per call between two steps (at least one layer): host time, and on a GPU, where the
# host only queues the work, the bytes of weights touched (a few milliseconds of bandwidth).
MERGE_SLICE_S = 0.02
MERGE_SLICE_BYTES = 1 << 30


@dataclass
class _Preparation:
    """A merge proceeding a slice per call: packed layers prepared aside, dense ones merged."""

    lora_id: int
    todo: list  # [(name, layer)] still to prepare
    prepared: dict = field(default_factory=dict)  # name: a packed layer's merged kernel, or None (dense: merged)
    merged: list = field(default_factory=list)  # dense layers merged in place so far
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.total = len(self.todo)


def prepare_bytes_for(module: MoraLayerMixin, entries: list) -> int:
    """Memory a merge of an adapter (`entries`: its `(M, spec)` per slice of `module`, or None)
    needs in `module` beside the serving weights (an upper bound).

    Packed (CPU) layers: the dense weights recovered from the kernel plus the new packed kernel,
    whole. Dense (GPU) layers are merged in place, keeping what exact unmerge needs: a copy of
    every row slice the adapter touches (the backup, or the spare of a storage swap).
    """
    touched = [i for i, entry in enumerate(entries) if entry is not None]
    if not touched:
        return 0
    base = module.base_layer
    size, offs = base.weight.element_size(), module._mora_offsets
    if is_packed(base):
        return 2 * module.input_size * offs[-1] * size
    return sum(offs[i + 1] - offs[i] for i in touched) * module.input_size * size


class MergeController:
    """Merging on demand in one model: one adapter at a time, its `M`s in the slot tables'
    reserved row so that its update stays subtractable whichever vLLM slot it holds (or none).

    `layers()`: the model's MoRA layers `[(name, layer)]`; `cache`: vLLM's host cache of
    adapters, where a merged adapter stays pinned (it need not hold a slot). `target`: the
    adapter being merged or merged, whose tokens steps relabel to the reserved row.

    A merge proceeds in slices between steps (`MERGE_SLICE_S`, `MERGE_SLICE_BYTES` per call)
    rather than on a thread: vLLM's CPU kernels (oneDNN) share process-wide state, and running
    them on a second thread while the engine steps corrupted the heap (measured: glibc aborts
    in the worker); on a GPU a merge of every layer in one call would stall a step for the time
    of all of it (gigabytes of weights and backups).
    """

    def __init__(self, runtime: MoraRuntime, layers: Callable[[], list[tuple[str, MoraLayerMixin]]], cache: object) -> None:
        self.runtime = runtime
        self._layers = layers
        self._cache = cache
        self.merged_id: int | None = None
        self.target: int | None = None
        self._pinned_by_merge = False
        self._preparing: _Preparation | None = None

    @property
    def preparing(self) -> int | None:
        """The adapter whose merge is being prepared, if any."""
        return None if self._preparing is None else self._preparing.lora_id

    def merge(self, lora_id: int, model: MoraLoRAModel, *, background: bool, max_bytes: int | None,
              commit: bool) -> EngineProgress:
        """Merge `model` (adapter `lora_id`, resident). `background`: the first call sets it up,
        each later call merges or prepares a slice of layers, the last swaps the prepared ones in
        (with `commit=False` it stops at PREPARED; `commit` swaps, `cancel` undoes). `max_bytes`:
        refuse a merge whose preparation needs more memory beside the serving weights."""
        if self._preparing is not None:
            if not background:
                raise MergeError(f"adapter {self._preparing.lora_id} is being prepared for a merge; wait for it")
            return self._poll(lora_id, commit)
        if self.merged_id is not None:
            if self.merged_id == lora_id:
                return EngineProgress(MergeState.MERGED)
            raise MergeError(f"adapter {self.merged_id} is already merged; unmerge it first")
        layers = self._layers()
        if max_bytes is not None:
            # Sized from the adapter's specs before anything is written (CPU and GPU layers alike).
            need = sum(prepare_bytes_for(layer, layer.mora_entries(model.mora)) for _, layer in layers)
            if need > max_bytes:
                raise MergeError(f"merging adapter {lora_id} needs {need} bytes beside the serving weights (packed "
                                 f"layers: a dense copy and a new kernel; dense layers: the rows kept for exact "
                                 f"unmerge); merge_memory_bytes allows {max_bytes}")
        # Keep it registered while merged (it need not hold a slot: its M goes to the reserved row).
        self._pinned_by_merge = lora_id not in self._cache.pinned_items
        self._cache.pin(lora_id)
        for _, layer in layers:
            layer.set_merged_row(layer.mora_entries(model.mora))
        # From the next step on its tokens read the reserved row; no layer holds it merged yet.
        self.target = lora_id
        self.runtime.set_merged(self.runtime.merged_row)
        job = _Preparation(lora_id, list(layers))
        if background:
            self._preparing = job
            return EngineProgress(MergeState.PREPARING, 0, job.total)  # the work starts next call
        try:
            self._advance(job, None)
            self._install(job)
        except Exception:
            self._failed(lora_id, job.merged)
            raise
        self.merged_id = lora_id
        return EngineProgress(MergeState.MERGED)

    def _advance(self, job: _Preparation, deadline: float | None) -> None:
        """Merge (dense) or prepare (packed) layers of `job` until its budget is spent."""
        row, touched = self.runtime.merged_row, 0
        while job.todo:
            name, layer = job.todo.pop(0)
            started = time.perf_counter()
            prepared = prepare_packed_layer(layer, row)
            job.prepared[name] = prepared
            if prepared is None and merge_layer(layer, row) is not None:  # dense: in place, now
                job.merged.append(layer)
                touched += layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
            job.seconds += time.perf_counter() - started
            if deadline is not None and (time.perf_counter() >= deadline or touched >= MERGE_SLICE_BYTES):
                break

    def _install(self, job: _Preparation) -> None:
        """Swap the prepared packed layers in (between two steps: attribute writes)."""
        for name, layer in self._layers():
            if job.prepared.get(name) is not None:
                install_prepared(layer, job.prepared[name])
                job.merged.append(layer)

    def _poll(self, lora_id: int, commit: bool) -> EngineProgress:
        job = self._preparing
        if job.lora_id != lora_id:
            raise MergeError(f"adapter {job.lora_id} is being prepared for a merge; wait for it")
        try:
            self._advance(job, time.perf_counter() + MERGE_SLICE_S)
        except Exception:
            self.cancel(lora_id)
            raise
        if job.todo:
            return EngineProgress(MergeState.PREPARING, len(job.prepared), job.total)
        if not commit:
            return EngineProgress(MergeState.PREPARED, len(job.prepared), job.total)
        self.commit(lora_id)
        return EngineProgress(MergeState.MERGED)

    def commit(self, lora_id: int) -> None:
        """Swap a prepared merge in (between two steps: attribute writes for packed layers; the
        dense ones were merged by the slices)."""
        job = self._preparing
        if job is None or job.lora_id != lora_id or job.todo:
            raise MergeError(f"adapter {lora_id} has no prepared merge to commit")
        self._preparing = None
        try:
            self._install(job)
        except Exception:
            self._failed(lora_id, job.merged)
            raise
        self.merged_id = lora_id
        log.info("merged MoRA adapter %d into %d layers (a slice per call between steps, %.3fs in all)",
                 lora_id, len(job.merged), job.seconds)

    def cancel(self, lora_id: int) -> None:
        """Drop a merge being prepared (or prepared) for `lora_id`: the dense layers it merged
        are restored, the packed ones it prepared dropped."""
        job = self._preparing
        if job is not None and job.lora_id == lora_id:
            self._preparing = None
            self._failed(lora_id, job.merged)

    def unmerge(self, lora_id: int | None = None) -> None:
        """Restore the base weights bit for bit; `lora_id`, if given, must be the merged one."""
        if self.merged_id is None:
            return
        if lora_id is not None and lora_id != self.merged_id:
            raise MergeError(f"adapter {lora_id} is not merged (adapter {self.merged_id} is)")
        merged_id = self.merged_id
        self.merged_id = None
        self._failed(merged_id, [layer for _, layer in self._layers()])
        log.info("unmerged MoRA adapter %d", merged_id)

    def _failed(self, lora_id: int, done: list[MoraLayerMixin]) -> None:
        """Undo a merge (or its part so far): the layers merged, the relabeling, the merged
        row, the pin."""
        for layer in done:
            unmerge_layer(layer)
        self.target = None
        self.runtime.set_merged(-1)
        for _, layer in self._layers():
            layer.set_merged_row(None)
        self._release_pin(lora_id)

    def _release_pin(self, lora_id: int) -> None:
        if self._pinned_by_merge and lora_id in self._cache.pinned_items:
            self._cache._unpin(lora_id)
        self._pinned_by_merge = False

    def summary(self) -> dict[str, object]:
        """What the merge changed and keeps, summed over the layers (EngineStatus' fields)."""
        states = [layer.mora_merge_state for _, layer in self._layers() if layer.mora_merge_state is not None]
        return {"layers": len(states), "backup_bytes": sum(s.backup_bytes for s in states),
                "merged_copy_bytes": sum(s.merged_copy_bytes for s in states),
                "changed_elements": sum(s.changed_elements for s in states),
                "seconds": sum(s.seconds for s in states), "packed": any(s.packed for s in states)}


@dataclass(frozen=True)
class EngineProgress:
    """Where a merge call left the merge (the manager turns it into an `EngineStatus`)."""

    state: MergeState
    layers_prepared: int = 0
    layers: int = 0
