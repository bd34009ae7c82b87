"""The slot table and per-batch metadata shared by every backend of the fused MoRA operator.

A `SlotTable` belongs to one module slice (e.g. the `k` part of a packed `qkv_proj`) and holds,
for each of `S` resident adapters, its `M` (zero-padded to `n_max`), its MoRA type and its `n`,
in preallocated device buffers that are only ever updated in place, so that a captured CUDA
graph keeps seeing them. Slot contents differ in rank and type; an empty slot has type 0 and
contributes nothing (that is how a slot holding a plain LoRA adapter looks to this operator).

`BatchMeta` describes one batch: which slot each token uses and the tokens sorted by slot in
segments. It is prepared once per engine step and shared by all layers.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

from mora.spec import MoraSpec, MoraType, mora_size

__all__ = ["BatchMeta", "ShardLayout", "SlotTable", "TableSignature", "prepare_batch", "slot_bytes"]

EMPTY = 0  # type code of an empty slot


@dataclass(frozen=True)
class ShardLayout:
    """Which part of a module this rank computes (tensor parallelism).

    `in_start:in_end` - the input features this rank holds (row-parallel: each rank sees a
    slice of the input and produces a partial sum of the full update).
    `out_start:out_end` - the output columns this rank produces (column-parallel).
    The defaults describe an unsharded module.
    """

    in_features: int
    out_features: int
    in_start: int = 0
    in_end: int | None = None
    out_start: int = 0
    out_end: int | None = None

    def __post_init__(self) -> None:
        if self.in_end is None:
            object.__setattr__(self, "in_end", self.in_features)
        if self.out_end is None:
            object.__setattr__(self, "out_end", self.out_features)
        if not (0 <= self.in_start < self.in_end <= self.in_features):
            raise ValueError(f"bad input shard [{self.in_start}, {self.in_end}) of {self.in_features}")
        if not (0 <= self.out_start < self.out_end <= self.out_features):
            raise ValueError(f"bad output shard [{self.out_start}, {self.out_end}) of {self.out_features}")

    @property
    def local_in(self) -> int:
        return self.in_end - self.in_start

    @property
    def local_out(self) -> int:
        return self.out_end - self.out_start

    @property
    def is_sharded(self) -> bool:
        return self.local_in != self.in_features or self.local_out != self.out_features


class TableSignature:
    """What a table holds (layout and each slot's spec), interned: tables with equal contents
    share one object, so per-batch work plans keyed by it are shared by every layer with
    the same adapters and are found by identity, without hashing specs."""

    __slots__ = ("__weakref__", "key")

    def __init__(self, key: tuple) -> None:
        self.key = key


_SIGNATURES: weakref.WeakValueDictionary[tuple, TableSignature] = weakref.WeakValueDictionary()


_SPEC_IDS: dict[MoraSpec, int] = {}


def _spec_id(spec: MoraSpec | None) -> int:
    """A small int per distinct spec (0: an empty slot): a table's key is a tuple of these,
    which hashes in C, where a tuple of dataclasses rehashes every field of every slot on each
    slot write (measured: half of a write with 79 slots)."""
    if spec is None:
        return 0
    sid = _SPEC_IDS.get(spec)
    if sid is None:
        sid = _SPEC_IDS[spec] = len(_SPEC_IDS) + 1
    return sid


def _signature(layout: ShardLayout, spec_ids: list[int]) -> TableSignature:
    key = (layout, tuple(spec_ids))
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = TableSignature(key)
    return sig


class SlotTable:
    """`S` adapter slots for one module slice; buffers are allocated once and updated in place.

    `n_max` defaults to the size a type-1 adapter of LoRA rank `max_rank` gets on this module
    (type 6 rounds down, so it always fits).
    """

    def __init__(
        self,
        layout: ShardLayout,
        max_slots: int,
        *,
        max_rank: int | None = None,
        n_max: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if n_max is None:
            if max_rank is None:
                raise ValueError("give max_rank or n_max")
            n_max = mora_size(layout.in_features, layout.out_features, max_rank, MoraType.SHARING)
        self.layout = layout
        self.max_slots = max_slots
        self.n_max = n_max
        # Stored as `Mt[s] = M[s].T` on every device: a GPU tile and the native CPU kernel
        # (`mora.kernels.native`) read consecutive output columns of `Mt[s]` from consecutive
        # addresses; BLAS (the CPU fallback) reads either orientation without a copy. On the
        # CPU each row is padded to whole 64-byte lines, so that a 16-column panel is one line.
        row = -(-n_max // 16) * 16 if torch.device(device).type == "cpu" else n_max
        self._lines = torch.zeros(max_slots, n_max, row, dtype=dtype, device=device)  # the pad columns stay 0
        self._storage = self._lines[:, :, :n_max]
        self._views: dict[object, torch.Tensor] = {}  # views of the storage, which is only updated in place
        self.types = torch.zeros(max_slots, dtype=torch.int32, device=device)
        self.sizes = torch.zeros(max_slots, dtype=torch.int32, device=device)
        self._host_meta = (self.types.numpy(), self.sizes.numpy()) if self.types.device.type == "cpu" else None
        # Host mirrors: the CPU backend groups work by them without a device round trip.
        self.specs: list[MoraSpec | None] = [None] * max_slots
        self._spec_ids = [0] * max_slots
        self._signature: TableSignature | None = None

    @property
    def signature(self) -> TableSignature:
        """What the table holds, interned (`TableSignature`). Computed when read: a page-in
        writes every table of a slot twice (vLLM clears a slot before an adapter takes it),
        and only the torch backend's plans read it, once per step."""
        if self._signature is None:
            self._signature = _signature(self.layout, self._spec_ids)
        return self._signature

    @property
    def device(self) -> torch.device:
        return self._storage.device

    @property
    def M(self) -> torch.Tensor:
        """`[S, n_max, n_max]`, slot `s`'s `M` zero-padded (a transposed view of the storage)."""
        return self._storage.transpose(1, 2)

    @property
    def Mt(self) -> torch.Tensor:
        """`[S, n_max, n_max]`, `M[s].T` (rows contiguous; on the CPU padded to 64-byte lines)."""
        return self._storage

    def weights(self, n: int) -> torch.Tensor:
        """`M[:, :n, :n]`, the view every slot of size `n` is read through (kept: the storage
        is only ever updated in place)."""
        view = self._views.get(n)
        if view is None:
            view = self._views[n] = self.M[:, :n, :n]
        return view

    def batch_view(self, n: int, start: int, stop: int, step: int, *, transposed: bool = False) -> torch.Tensor:
        """`M[start:stop:step, :n, :n]` (`.transpose(1, 2)` if `transposed`): the `M`s of slots
        in arithmetic progression (kept)."""
        key = (n, start, stop, step, transposed)
        view = self._views.get(key)
        if view is None:
            view = self.weights(n)[start:stop:step]
            view = self._views[key] = view.transpose(1, 2) if transposed else view
        return view

    def _slot_view(self, slot: int, n: int) -> torch.Tensor:
        """`M[slot, :n, :n]` (kept: a page-in writes a slot of every table; indexing costs more
        than the copy of a small `M`)."""
        key = ("slot", slot, n)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.M[slot, :n, :n]
        return view

    def stored_rows(self, n: int, start: int, stop: int) -> torch.Tensor | None:
        """`Mt[start:stop]` with its rows as stored, padded to whole panels: `[k, n_max, row]`,
        contiguous, the columns past `n_max` zero; None unless every slot's `M` fills the table
        (`n == n_max`). Where `row > n`, a GEMM over `Mt[:, :n, :n]` must copy the `M`s into a
        dense buffer first (oneDNN takes no other strides); over these it copies nothing and
        writes `row - n` columns more. (Kept, as batch_view's views: read on every call.)"""
        if n != self.n_max:
            return None
        key = ("lines", start, stop)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._lines[start:stop]
        return view

    def slot_t(self, slot: int, n: int) -> torch.Tensor:
        """`M[slot, :n, :n].T` (kept)."""
        key = (n, slot)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.weights(n)[slot].t()
        return view

    @property
    def dtype(self) -> torch.dtype:
        return self._storage.dtype

    def set_slot(self, slot: int, M: torch.Tensor, spec: MoraSpec) -> None:
        """Put an adapter's `M [n, n]` into `slot` (in place)."""
        lay = self.layout
        if (spec.in_features, spec.out_features) != (lay.in_features, lay.out_features):
            raise ValueError(
                f"spec is for a {spec.out_features}x{spec.in_features} module, the table for "
                f"{lay.out_features}x{lay.in_features}"
            )
        if spec.n > self.n_max:
            raise ValueError(f"n={spec.n} exceeds this table's n_max={self.n_max} (raise max_rank)")
        if tuple(M.shape) != (spec.n, spec.n):
            raise ValueError(f"M has shape {tuple(M.shape)}, expected ({spec.n}, {spec.n})")
        held = self.specs[slot]
        with torch.no_grad():
            if held is not None and held.n > spec.n:  # the M before reaches past this one: zeros there
                self._storage[slot].zero_()
            self._slot_view(slot, spec.n).copy_(M)
        self._set_meta(slot, int(spec.mora_type), spec.n)
        self.specs[slot] = spec
        self._spec_ids[slot] = _spec_id(spec)
        self._signature = None

    def clear_slot(self, slot: int) -> None:
        # Outside its adapter's `[n, n]` a slot's storage is all zeros, and an empty slot's is
        # (allocated so; set_slot writes past the new `M` only zeros): vLLM clears every slice of
        # a slot before an adapter takes it, and a page-in clears the slices it does not target.
        if self.specs[slot] is not None:
            with torch.no_grad():
                self._storage[slot].zero_()
        self._set_meta(slot, EMPTY, 0)
        self.specs[slot] = None
        self._spec_ids[slot] = 0
        self._signature = None

    def _set_meta(self, slot: int, mora_type: int, size: int) -> None:
        if self._host_meta is not None:  # CPU: through numpy views (a tensor item write costs ~5 us)
            self._host_meta[0][slot], self._host_meta[1][slot] = mora_type, size
        else:
            self.types[slot], self.sizes[slot] = mora_type, size

    def weight(self, slot: int) -> torch.Tensor:
        """The `[n, n]` view of the adapter in `slot`."""
        spec = self.specs[slot]
        if spec is None:
            raise ValueError(f"slot {slot} is empty")
        return self.M[slot, : spec.n, : spec.n]


@dataclass
class BatchMeta:
    """One batch's token -> slot mapping, sorted into segments (shared by all layers).

    Device tensors have fixed sizes (`max_slots + 1` segments) so that a GPU kernel launch
    needs no host synchronization; `segments` is the host copy the CPU backend iterates.
    """

    slot: torch.Tensor  # [T] int64, -1: no adapter
    order: torch.Tensor  # [T] int64, rows sorted by slot (stable)
    seg_start: torch.Tensor  # [max_slots + 2] int32, segment k = order[seg_start[k]:seg_start[k+1]]
    seg_slot: torch.Tensor  # [max_slots + 1] int32, slot of segment k (-1 possible)
    num_segments: torch.Tensor  # [1] int32
    segments: list[tuple[int, int, int]] | None  # host: (slot, start, end), or None on GPU
    merged: torch.Tensor  # [1] int32, the slot merged into the base weights (-1: none)
    # Host-side working memory of the CPU backend, reused by every layer of the batch (see
    # `torch_cpu._scratch`); not part of the batch's description.
    scratch: dict[tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    # The CPU backend's work plans for this batch, by (table signature, token count).
    plans: dict[tuple[TableSignature, int], object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def merged_slot(self) -> int:
        """Host copy of `merged` (a device sync on GPU; the CPU backend uses it)."""
        return int(self.merged.item())

    def host_segments(self) -> list[tuple[int, int, int]]:
        """`segments`, copied from the device tensors when the batch was prepared without them."""
        if self.segments is None:
            return _read_segments(self.num_segments, self.seg_start, self.seg_slot)
        return self.segments

    @functools.cached_property
    def present_slots(self) -> frozenset[int]:
        """Host set of the slots this batch's tokens use (-1 included)."""
        return frozenset(s for s, _, _ in self.host_segments())

    @property
    def num_tokens(self) -> int:
        return int(self.slot.shape[0])


def slot_bytes(shapes: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype, device: str | torch.device) -> int:
    """Memory one adapter slot takes on `device` across a model's adapted modules (`shapes`:
    `{module: (out_features, in_features)}`, vLLM's LoRA-wrapped linears): vLLM's stacked LoRA
    buffers for rank `max_rank` (`lora_A [r, in]`, `lora_B [out, r]`) plus one row of the MoRA
    slot table (`M [n_max, n_max]`, rows padded to 64-byte lines on the CPU, as `SlotTable`).

    Semantics::

        size = torch.tensor([], dtype=dtype).element_size()
        total = 0
        for out_f, in_f in shapes.values():
            n = mora_size(in_f, out_f, max_rank, MoraType.SHARING)
            row = ceil(n / 16) * 16 if device is the CPU else n
            total += (max_rank * (in_f + out_f) + n * row) * size + 8   # + the slot's type and size
        return total
    """
    size = torch.tensor([], dtype=dtype).element_size()
    cpu = torch.device(device).type == "cpu"
    total = 0
    for out_f, in_f in shapes.values():
        n = mora_size(in_f, out_f, max_rank, MoraType.SHARING)
        row = -(-n // 16) * 16 if cpu else n
        total += (max_rank * (in_f + out_f) + n * row) * size + 8
    return total


def _read_segments(num: torch.Tensor, seg_start: torch.Tensor, seg_slot: torch.Tensor) -> list[tuple[int, int, int]]:
    n = int(num.item())
    starts = seg_start[: n + 1].tolist()
    return [(int(s), starts[k], starts[k + 1]) for k, s in enumerate(seg_slot[:n].tolist())]


def prepare_batch(slot: torch.Tensor, max_slots: int, *, merged_slot: int = -1, host_segments: bool | None = None) -> BatchMeta:
    """Sort tokens by slot and describe the segments.

    Semantics::

        order = torch.argsort(slot, stable=True)
        segments = [(s, first index of s in slot[order], last + 1) for each distinct s]

    `host_segments` (default: on CPU only) also returns the segments as a Python list, which
    costs a device-to-host copy on a GPU.
    """
    slot = slot.to(torch.int64)
    device = slot.device
    if host_segments is None:
        host_segments = device.type == "cpu"
    order = torch.argsort(slot, stable=True)
    # Segment boundaries: bucket counts over -1..max_slots-1 (fixed size, no host sync).
    counts = torch.bincount(slot + 1, minlength=max_slots + 1)[: max_slots + 1]
    present = counts > 0
    seg_slot_all = torch.arange(-1, max_slots, device=device, dtype=torch.int32)
    num = present.sum().to(torch.int32).reshape(1)
    # Stable-compact the present buckets to the front without a host sync.
    rank = torch.cumsum(present.to(torch.int64), 0) - 1
    idx = torch.where(present, rank, torch.full_like(rank, max_slots + 1))
    seg_slot = torch.full((max_slots + 2,), -1, dtype=torch.int32, device=device)
    seg_len = torch.zeros(max_slots + 2, dtype=torch.int64, device=device)
    seg_slot.scatter_(0, idx, seg_slot_all)
    seg_len.scatter_(0, idx, counts)
    seg_start = torch.zeros(max_slots + 2, dtype=torch.int32, device=device)
    seg_start[1:] = torch.cumsum(seg_len[:-1], 0).to(torch.int32)
    segments = _read_segments(num, seg_start, seg_slot) if host_segments else None
    merged = torch.tensor([merged_slot], dtype=torch.int32, device=device)
    return BatchMeta(slot, order, seg_start, seg_slot[: max_slots + 1], num, segments, merged)
