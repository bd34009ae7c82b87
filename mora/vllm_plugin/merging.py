"""Merging a resident MoRA adapter into a wrapped layer's base weights, and unmerging it.

Two weight layouts occur:

* dense (GPU, and CPU layers vLLM leaves on `F.linear`): the weight is a plain tensor that
  captured graphs and kernels point at, so it is modified in place (its address never
  changes) and the original values of exactly the changed elements are kept in host memory;
  unmerge copies them back, bit for bit.
* packed (vLLM's CPU build prepacks linear weights for oneDNN and frees the dense tensor): the
  dense original is recovered exactly with an identity GEMM through the packed kernel, the
  update is added to that copy, vLLM's own dispatch packs it into a new kernel, and the old one
  is kept aside. Unmerge puts the old kernel back: the original packed weights were never
  touched, so nothing needs to be kept for exactness.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mora.delta import delta_weight
from mora.errors import MergeError
from mora.merge import MergeRecord, merge_, unmerge_
from mora.vllm_plugin.layers import MoraLayerMixin
from mora.vllm_plugin.quantized import refuse_merge

__all__ = ["LayerMerge", "install_prepared", "merge_layer", "prepare_packed_layer", "unmerge_layer"]


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


def _slices(layer: MoraLayerMixin) -> list[slice]:
    offs = layer._mora_offsets
    return [slice(offs[i], offs[i + 1]) for i in range(len(offs) - 1)]


def _add_slice(W: torch.Tensor, rows: slice, table, slot: int, merge: LayerMerge, *, exact: bool) -> None:  # noqa: ANN001
    """Add slot `slot`'s update of one slice into `W[rows]`."""
    spec = table.specs[slot]
    M = table.weight(slot)
    lay = table.layout
    if not lay.is_sharded:
        rec = merge_(W[rows], M, spec, exact=exact, safe=True, keep_storage=True, backup_device="cpu")
        merge.records.append((rows, rec))
        merge.backup_bytes += rec.backup_bytes
        merge.changed_elements += rec.changed_elements
        return
    # A tensor-parallel shard: this rank's block of the dense update.
    delta = delta_weight(M, spec, torch.float32)[lay.out_start : lay.out_end, lay.in_start : lay.in_end]
    target = W[rows]
    if exact:
        backup = target.to("cpu", copy=True)
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
        W[rows].copy_(backup.to(W.device))
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
    packed = W.numel() == 0 and hasattr(base, "cpu_linear")
    merge = LayerMerge(slot, packed)
    with torch.no_grad():
        if not packed:
            try:
                for rows, table in tables:
                    _add_slice(W.data, rows, table, slot, merge, exact=True)
            except Exception:
                _undo_dense(W.data, merge)
                raise
        else:
            _install_packed(base, merge, _packed_kernel(layer, tables, slot, merge))
    merge.seconds = time.perf_counter() - start
    layer.mora_merge_state = merge
    return merge


def _merge_tables(layer: MoraLayerMixin, slot: int) -> list:
    return [(rows, t) for rows, t in zip(_slices(layer), layer.mora_tables, strict=True) if t.specs[slot] is not None]


def _packed_kernel(layer: MoraLayerMixin, tables: list, slot: int, merge: LayerMerge) -> torch.nn.Module:
    """A stand-in module holding the merged weights packed by vLLM's own dispatch; `layer` is
    only read (so this may run beside engine steps)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    base = layer.base_layer
    W = base.weight
    with torch.no_grad():
        # x @ W.T with x = I gives W.T exactly: every output is one weight times 1.0.
        dense = base.cpu_linear(torch.eye(layer.input_size, dtype=W.dtype), W, None).t().contiguous()
        for rows, table in tables:
            _add_slice(dense, rows, table, slot, merge, exact=False)
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
    if not tables or not (base.weight.numel() == 0 and hasattr(base, "cpu_linear")):
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
    return merge
