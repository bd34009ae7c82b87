"""MoRA adapters through vLLM's LoRA slot management (the model-side manager).

* `MoraLoRAModelManager.load_mora`: a MoRA checkpoint the worker-side manager read
  (`MoraWorkerLoRAManager`, mora/vllm_plugin/worker_manager.py, re-exported here) is validated
  against the running model and becomes a `MoraLoRAModel`.
* `MoraLoRAModelManager.activate_adapter`: after vLLM picks the slot, a MoRA adapter's `M`s
  go into the wrappers' slot tables (a LoRA adapter's A/B into the stock buffers).
* On the CPU, `mora_compact` then moves MoRA adapters between slots so that each kind (same
  spec on every module) holds consecutive slots: the torch backend reads a kind's `M`s through
  one view of the table instead of gathering them every layer of every step. vLLM's LRU
  eviction frees whichever slot it frees, so activations alone cannot keep kinds together.
* Merge on demand: `mora_merge` folds a loaded MoRA adapter into the base weights and copies
  its `M`s to the tables' reserved row, so that its update stays subtractable for everyone
  else whichever vLLM slot it holds (or none: all `max_loras` slots stay available to the
  scheduler); it stays pinned in vLLM's adapter cache while merged. `mora_unmerge` undoes it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.model_executor.models.utils import PPMissingLayer

from mora.checkpoint import MoraAdapter
from mora.errors import MergeError, ShapeMismatchError
from mora.spec import MoraSpec
from mora.validate import bind_mora
from mora.vllm_plugin.layers import MoraLayerMixin
from mora.vllm_plugin.merging import install_prepared, merge_layer, prepare_packed_layer, unmerge_layer
from mora.vllm_plugin.quantized import check_quantized_layers
from mora.vllm_plugin.runtime import MoraRuntime
from mora.vllm_plugin.tiers import TierStats

if TYPE_CHECKING:
    from mora.vllm_plugin.worker_manager import MoraWorkerLoRAManager

__all__ = ["FIXED", "MoraLoRAModel", "MoraLoRAModelManager", "MoraWorkerLoRAManager", "compact_slots", "stage_local"]

log = logging.getLogger(__name__)


class MoraLoRAModel(LoRAModel):
    """A MoRA adapter as vLLM's manager sees it: no LoRA weights, one `(M, spec)` per module."""

    def __init__(self, lora_model_id: int, rank: int, loras: dict | None = None, *, mora: dict[str, tuple[torch.Tensor, MoraSpec]] | None = None, name: str = "", **kwargs: object) -> None:
        super().__init__(lora_model_id, rank, loras or {}, **kwargs)
        self.mora = mora or {}
        self.name = name

    def clone(self, lora_model_id: int) -> MoraLoRAModel:
        return MoraLoRAModel(lora_model_id, self.rank, mora=dict(self.mora), name=self.name)

    @property
    def num_parameters(self) -> int:
        return sum(m.numel() for m, _ in self.mora.values())

    @functools.cached_property
    def kind(self) -> frozenset[tuple[str, MoraSpec]]:
        """What the fused operator groups work by: the adapter's spec on every module (read
        every step by `mora_compact`, hence cached; `mora` never changes after loading)."""
        return frozenset((module, spec) for module, (_, spec) in self.mora.items())


FIXED = object()  # a slot `compact_slots` must not touch (a plain LoRA adapter)


def compact_slots(kinds: Sequence[Hashable | None]) -> dict[int, int]:
    """Moves (`old slot -> new slot`) that leave each kind in consecutive slots.

    `kinds[i]`: the kind of the MoRA adapter in slot `i`, None when free, `FIXED` when it must
    stay. Adapters fill the movable slots from the lowest, kind after kind (kinds in order of
    their lowest slot, adapters of a kind in slot order); an already compact layout needs no
    move, so a steady workload pays nothing.
    """
    movable = [i for i, k in enumerate(kinds) if k is not FIXED]
    held = [i for i in movable if kinds[i] is not None]
    rank: dict[Hashable, int] = {}
    for i in held:
        rank.setdefault(kinds[i], len(rank))
    wanted = sorted(held, key=lambda i: (rank[kinds[i]], i))
    return {old: new for old, new in zip(wanted, movable, strict=False) if old != new}


def stage_local(adapter: MoraAdapter, other_stages: tuple[str, ...]) -> MoraAdapter:
    """`adapter` without the modules under `other_stages` (module-path prefixes ending in `.`,
    the decoder layers other pipeline stages hold)."""
    if not other_stages:
        return adapter
    local = {m: w for m, w in adapter.weights.items() if not m.startswith(other_stages)}
    return dataclasses.replace(adapter, weights=local)


class MoraLoRAModelManager(LRUCacheLoRAModelManager):
    """vLLM's LRU LoRA manager, aware of MoRA slots and of merged adapters."""

    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_num_batched_tokens: int, vocab_size: int,
                 lora_config: object, device: torch.device, vllm_config: object) -> None:
        super().__init__(model, max_num_seqs, max_num_batched_tokens, vocab_size, lora_config, device, vllm_config)
        # Before the engine reports ready: a quantized base whose kernels this machine lacks must
        # refuse to start, not serve until its first step dies (mora/vllm_plugin/quantized.py).
        check_quantized_layers(self.modules.items(), vllm_config.model_config.dtype, torch.device(self.device))
        # slots + a reserved merged row; on a GPU, step buffers for vLLM's largest batch
        self.mora_runtime = MoraRuntime(self.lora_slots, self.device, max_tokens=self.max_num_batched_tokens)
        self.mora_merged_id: int | None = None
        self._mora_pinned_by_merge = False
        self.mora_tiers = TierStats()
        self._mora_preparing: _Preparation | None = None  # a merge being prepared in slices between steps
        for name, module in self.mora_layers():
            module.mora_runtime = self.mora_runtime
            module.mora_children = self.packed_modules.get(name, [name])
        # Pipeline parallelism: the decoder layers other stages hold are placeholders here.
        self._mora_other_stages = tuple(
            f"{name}." for name, module in self.model.named_modules() if isinstance(module, PPMissingLayer)
        )

    def mora_layers(self) -> list[tuple[str, MoraLayerMixin]]:
        return [(n, m) for n, m in self.modules.items() if isinstance(m, MoraLayerMixin)]

    def mora_module_shapes(self) -> dict[str, tuple[int, int]]:
        """`{HF module name: (out_features, in_features)}` of every MoRA-capable slice."""
        shapes: dict[str, tuple[int, int]] = {}
        for _, module in self.mora_layers():
            for child, table in zip(module.mora_children, module.mora_tables, strict=True):
                shapes[child] = (table.layout.out_features, table.layout.in_features)
        return shapes

    def load_mora(self, adapter: MoraAdapter, lora_int_id: int) -> MoraLoRAModel:
        """Validate `adapter` against this model and wrap it for the manager.

        Under pipeline parallelism each stage validates and holds only the modules of its own
        layers; the others are checked by the stages that hold them.
        """
        bound = bind_mora(stage_local(adapter, self._mora_other_stages), self.mora_module_shapes())
        max_rank = self.lora_config.max_lora_rank
        limits = {child: t.n_max for _, m in self.mora_layers() for child, t in zip(m.mora_children, m.mora_tables, strict=True)}
        for module, spec in bound.specs.items():
            r = adapter.config.rank_for(module)
            if r > max_rank or spec.n > limits[module]:
                raise ShapeMismatchError(
                    "rank exceeds the engine's max_lora_rank", adapter=adapter.name, module=module,
                    expected=f"r <= {max_rank} (n <= {limits[module]})", found=f"r={r} (n={spec.n})",
                )
        # Held in the host cache in the serving dtype (what the slot tables hold): half the host
        # memory in bf16, and no conversion each time the adapter takes a slot. The tables cast
        # to this dtype anyway, so what is served is unchanged bit for bit.
        dtype = self.lora_config.lora_dtype if isinstance(self.lora_config.lora_dtype, torch.dtype) else None
        mora = {m: (adapter.weights[m].to(dtype=dtype or adapter.weights[m].dtype).contiguous(), spec) for m, spec in bound.specs.items()}
        return MoraLoRAModel(lora_int_id, adapter.config.r, mora=mora, name=adapter.name)

    # -- vLLM manager hooks ---------------------------------------------------------------

    def _add_adapter(self, lora: LoRAModel) -> None:
        if isinstance(lora, MoraLoRAModel):
            self._registered_adapters[lora.id] = lora  # nothing to pack: one M per module
            return
        super()._add_adapter(lora)

    def activate_adapter(self, lora_id: int) -> bool:
        resident = lora_id in self.lora_index_to_id
        if not resident and lora_id in self._registered_adapters:
            self.mora_tiers.count("device_misses")
            if len(self._active_adapters) >= self.lora_slots:
                self.mora_tiers.count("device_evictions")
        elif resident:
            self.mora_tiers.count("device_hits")
        started = time.perf_counter()
        activated = super().activate_adapter(lora_id)
        model = self._registered_adapters.get(lora_id)
        if activated and isinstance(model, MoraLoRAModel):
            index = self.lora_index_to_id.index(lora_id)
            for _, module in self.mora_layers():
                module.set_mora(index, [model.mora.get(child) for child in module.mora_children])
        if activated and not resident:
            self.mora_tiers.loaded("host", time.perf_counter() - started)
        return activated

    def remove_oldest_adapter(self) -> bool:
        # vLLM's host-cache eviction (LRU, pinned adapters skipped): the adapter stays on disk.
        removed = super().remove_oldest_adapter()
        if removed:
            self.mora_tiers.count("host_evictions")
        return removed

    @property
    def mora_max_pinned(self) -> int:
        """Pins leave room for one step's adapters, which vLLM must be able to load."""
        return max(0, self.capacity - self.lora_slots)

    def mora_pin(self, lora_id: int) -> dict[str, object]:
        """Keep registered adapter `lora_id` in the host cache for good (never evicted).

        Only the host cache: vLLM's own `pin_adapter` would also take a device slot forever.
        """
        cache = self._registered_adapters
        if lora_id not in cache:
            raise MergeError(f"adapter {lora_id} is not in the host cache; add it before pinning")
        if lora_id not in cache.pinned_items and len(cache.pinned_items) >= self.mora_max_pinned:
            raise MergeError(f"{len(cache.pinned_items)} adapters are pinned already, the most the host cache "
                             f"allows (max_cpu_loras - max_loras = {self.mora_max_pinned})")
        cache.pin(lora_id)
        return {"pinned": sorted(cache.pinned_items)}

    def mora_compact(self) -> int:
        """Apply `compact_slots` to the resident adapters; returns how many moved.

        Between steps: the next mapping is computed from the new `lora_index_to_id`, and a
        moved adapter's `M`s are copied from its registered model into its new slot.
        """
        ids = self.lora_index_to_id
        kinds = []
        for lora_id in ids:
            model = self._registered_adapters.get(lora_id) if lora_id is not None else None
            kinds.append(None if lora_id is None else model.kind if isinstance(model, MoraLoRAModel) else FIXED)
        moves = compact_slots(kinds)
        if not moves:
            return 0
        moved = {new: ids[old] for old, new in moves.items()}
        for old in moves:
            ids[old] = None
        for new, lora_id in moved.items():
            ids[new] = lora_id
        for index in set(moves) - set(moved):  # vacated and not refilled
            for module in self.modules.values():
                module.reset_lora(index)
        # A refilled slot held nothing or another MoRA adapter, which writes only the MoRA
        # layers; `set_mora` resets those slots' stock buffers and rewrites their tables.
        for new, lora_id in moved.items():
            model = self._registered_adapters[lora_id]
            for _, module in self.mora_layers():
                module.set_mora(new, [model.mora.get(child) for child in module.mora_children])
        return len(moves)

    def remove_adapter(self, adapter_id: int) -> bool:
        if adapter_id == self.mora_merged_id:
            raise MergeError(f"adapter {adapter_id} is merged into the base weights; unmerge it first")
        if self._mora_preparing is not None and self._mora_preparing.lora_id == adapter_id:
            raise MergeError(f"adapter {adapter_id} is being prepared for a merge; wait for it")
        return super().remove_adapter(adapter_id)

    # -- merging --------------------------------------------------------------------------

    def mora_merge(self, lora_id: int, background: bool = False, max_bytes: int | None = None,
                   commit: bool = True) -> dict[str, object]:
        """Merge resident MoRA adapter `lora_id` into the base weights (one at a time).

        `background`: the first call sets the merge up; each later call prepares the merged
        weights of packed (CPU) layers for about `MERGE_SLICE_S` (at least one layer) and
        answers `{"state": "preparing", ...}`; the engine steps between two calls. The call that finishes swaps them all in and returns the status.
        Why slices and not a thread: vLLM's CPU kernels (oneDNN) share process-wide state, so
        running them on a second thread while the engine steps corrupts the heap (measured:
        glibc aborts in the worker). Engine RPCs run on the step thread, between two steps.
        `max_bytes`: refuse (MergeError, with the figures) a merge whose preparation needs more
        memory beside the serving weights. `commit=False` (background only): stop at
        `{"state": "prepared"}`; `mora_merge_commit` swaps the weights in (a server does that
        only when no other adapter's request is in flight), `mora_merge_cancel` drops them.
        """
        if self._mora_preparing is not None:
            if not background:
                raise MergeError(f"adapter {self._mora_preparing.lora_id} is being prepared for a merge; wait for it")
            return self._mora_merge_poll(lora_id, commit)
        if self.mora_merged_id is not None:
            if self.mora_merged_id == lora_id:
                return self.mora_status()
            raise MergeError(f"adapter {self.mora_merged_id} is already merged; unmerge it first")
        model = self._registered_adapters.get(lora_id)
        if model is None:
            raise MergeError(f"adapter {lora_id} is not loaded")
        if not isinstance(model, MoraLoRAModel):
            raise MergeError(f"adapter {lora_id} is a LoRA adapter; only MoRA adapters are merged on demand")
        if max_bytes is not None:
            # Sized from the adapter's specs before anything is written (CPU and GPU layers alike).
            need = sum(prepare_bytes_for(module, model) for _, module in self.mora_layers())
            if need > max_bytes:
                raise MergeError(f"merging adapter {lora_id} needs {need} bytes beside the serving weights (packed "
                                 f"layers: a dense copy and a new kernel; dense layers: the rows kept for exact "
                                 f"unmerge); merge_memory_bytes allows {max_bytes}")
        # Keep it registered while merged (it need not hold a slot: its M goes to the reserved row).
        self._mora_pinned_by_merge = lora_id not in self._registered_adapters.pinned_items
        self._registered_adapters.pin(lora_id)
        row = self.mora_runtime.merged_row
        if background:
            # The reserved row is read by steps only once `set_merged` says so: safe to fill now.
            for _, module in self.mora_layers():
                module.set_merged_row([model.mora.get(child) for child in module.mora_children])
            job = self._mora_preparing = _Preparation(lora_id, list(self.mora_layers()))
            return {"state": "preparing", "layers_prepared": 0, "layers": job.total}  # the work starts next call
        done = []
        try:
            for _, module in self.mora_layers():
                module.set_merged_row([model.mora.get(child) for child in module.mora_children])
                if merge_layer(module, row) is not None:
                    done.append(module)
        except Exception:
            self._merge_failed(lora_id, done)
            raise
        status = self._merge_done(lora_id, row)
        log.info("merged MoRA adapter %d into %d layers (%.3fs, %d bytes kept for exact unmerge)",
                 lora_id, status["layers"], status["seconds"], status["backup_bytes"])
        return status

    def _merge_failed(self, lora_id: int, done: list[MoraLayerMixin]) -> None:
        """Undo a merge that failed part way: the layers merged so far, the merged row, the pin."""
        for module in done:
            unmerge_layer(module)
        for _, module in self.mora_layers():
            module.set_merged_row(None)
        self._unpin_after_merge(lora_id)

    def _merge_done(self, lora_id: int, row: int) -> dict[str, object]:
        """Every layer is merged: steps read the merged row from now on."""
        self.mora_merged_id = lora_id
        self.mora_runtime.set_merged(row)
        return self.mora_status()

    def _mora_merge_poll(self, lora_id: int, commit: bool = True) -> dict[str, object]:
        job = self._mora_preparing
        if job.lora_id != lora_id:
            raise MergeError(f"adapter {job.lora_id} is being prepared for a merge; wait for it")
        try:
            deadline = time.perf_counter() + MERGE_SLICE_S
            while job.todo:
                name, module = job.todo.pop(0)
                started = time.perf_counter()
                job.prepared[name] = prepare_packed_layer(module, self.mora_runtime.merged_row)
                job.seconds += time.perf_counter() - started
                if time.perf_counter() >= deadline:
                    break
        except Exception:
            self.mora_merge_cancel(lora_id)
            raise
        if job.todo:
            return {"state": "preparing", "layers_prepared": len(job.prepared), "layers": job.total}
        if not commit:
            return {"state": "prepared", "layers_prepared": len(job.prepared), "layers": job.total}
        return self.mora_merge_commit(lora_id)

    def mora_merge_cancel(self, lora_id: int) -> dict[str, object]:
        """Drop a merge being prepared (or prepared) for `lora_id`; nothing was swapped in."""
        job = self._mora_preparing
        if job is not None and job.lora_id == lora_id:
            self._mora_preparing = None
            self._merge_failed(lora_id, [])
        return self.mora_status()

    def mora_merge_commit(self, lora_id: int) -> dict[str, object]:
        """Swap a prepared merge of `lora_id` in (between two steps: attribute writes for packed
        layers, in-place additions for dense ones)."""
        job = self._mora_preparing
        if job is None or job.lora_id != lora_id or job.todo:
            raise MergeError(f"adapter {lora_id} has no prepared merge to commit")
        row = self.mora_runtime.merged_row
        done = []
        try:
            self._mora_preparing = None
            prepared = job.prepared
            for name, module in self.mora_layers():
                if prepared.get(name) is not None:
                    install_prepared(module, prepared[name])
                    done.append(module)
                elif merge_layer(module, row) is not None:  # dense layers: in place, now
                    done.append(module)
        except Exception:
            self._mora_preparing = None
            self._merge_failed(lora_id, done)
            raise
        status = self._merge_done(lora_id, row)
        log.info("merged MoRA adapter %d into %d layers (prepared in slices between steps, %.3fs in all)",
                 lora_id, status["layers"], job.seconds)
        return status

    def mora_unmerge(self, lora_id: int | None = None) -> dict[str, object]:
        """Restore the base weights bit for bit; `lora_id`, if given, must be the merged one."""
        if self.mora_merged_id is None:
            return self.mora_status()
        if lora_id is not None and lora_id != self.mora_merged_id:
            raise MergeError(f"adapter {lora_id} is not merged (adapter {self.mora_merged_id} is)")
        merged_id = self.mora_merged_id
        seconds = 0.0
        for _, module in self.mora_layers():
            m = unmerge_layer(module)
            if m is not None:
                seconds += m.seconds
        self.mora_merged_id = None
        self.mora_runtime.set_merged(-1)
        for _, module in self.mora_layers():
            module.set_merged_row(None)
        self._unpin_after_merge(merged_id)
        log.info("unmerged MoRA adapter %d", merged_id)
        return self.mora_status()

    def _unpin_after_merge(self, lora_id: int) -> None:
        if self._mora_pinned_by_merge and lora_id in self._registered_adapters.pinned_items:
            self._registered_adapters._unpin(lora_id)
        self._mora_pinned_by_merge = False

    def merged_alias(self) -> int:
        """The vLLM slot the merged adapter holds now, or -1."""
        if self.mora_merged_id is None or self.mora_merged_id not in self.lora_index_to_id:
            return -1
        return self.lora_index_to_id.index(self.mora_merged_id)

    def mora_status(self) -> dict[str, object]:
        """Plain-typed state for RPC callers: slots, merged adapter, memory kept for unmerge."""
        states = [m.mora_merge_state for _, m in self.mora_layers() if m.mora_merge_state is not None]
        slots = {}
        for index, lora_id in enumerate(self.lora_index_to_id):
            if lora_id is None:
                continue
            model = self._registered_adapters.get(lora_id)
            slots[str(index)] = {"lora_id": lora_id, "kind": "mora" if isinstance(model, MoraLoRAModel) else "lora"}
        return {
            "merged_id": self.mora_merged_id,
            "merged_slot": self.mora_runtime.merged_slot,
            "layers": len(states),
            "backup_bytes": sum(s.backup_bytes for s in states),
            "merged_copy_bytes": sum(s.merged_copy_bytes for s in states),
            "changed_elements": sum(s.changed_elements for s in states),
            "seconds": sum(s.seconds for s in states),
            "packed": any(s.packed for s in states),
            "slots": slots,
            "registered": sorted(self._registered_adapters.cache),
            "pinned": sorted(self._registered_adapters.pinned_items),
            "capacity": self.capacity,
            "lora_slots": self.lora_slots,
            "max_pinned": self.mora_max_pinned,
        }


MERGE_SLICE_S = 0.02  # preparation time per call between two steps (at least one layer)


@dataclasses.dataclass
class _Preparation:
    """A merge whose packed layers are being prepared, a slice per call."""

    lora_id: int
    todo: list  # [(name, layer)] still to prepare
    prepared: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.total = len(self.todo)


def prepare_bytes_for(module: MoraLayerMixin, model: MoraLoRAModel) -> int:
    """Memory a merge of `model` needs in `module` beside the serving weights (an upper bound).

    Packed (CPU) layers: the dense weights recovered from the kernel plus the new packed kernel,
    whole. Dense (GPU) layers are merged in place, keeping what exact unmerge needs: a copy of
    every row slice the adapter touches (the backup, or the spare of a storage swap).
    """
    touched = [i for i, child in enumerate(module.mora_children) if model.mora.get(child) is not None]
    if not touched:
        return 0
    base = module.base_layer
    size, offs = base.weight.element_size(), module._mora_offsets
    if base.weight.numel() == 0 and hasattr(base, "cpu_linear"):
        return 2 * module.input_size * offs[-1] * size
    return sum(offs[i + 1] - offs[i] for i in touched) * module.input_size * size


def __getattr__(name: str) -> object:
    # `MoraWorkerLoRAManager` moved to worker_manager.py, which imports this module's classes;
    # resolving it on first access (PEP 562) keeps `manager.MoraWorkerLoRAManager` working
    # without an import cycle, whichever of the two modules is imported first.
    if name == "MoraWorkerLoRAManager":
        from mora.vllm_plugin.worker_manager import MoraWorkerLoRAManager

        return MoraWorkerLoRAManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
