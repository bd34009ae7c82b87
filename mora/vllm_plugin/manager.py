"""MoRA adapters through vLLM's LoRA slot management (the model-side manager).

* `MoraLoRAModelManager.load_mora`: a MoRA checkpoint the worker-side manager read
  (`MoraWorkerLoRAManager`, mora/vllm_plugin/worker_manager.py) is validated against the
  running model and becomes a `MoraLoRAModel` (mora/vllm_plugin/models.py).
* `activate_adapter`: after vLLM picks the slot, a MoRA adapter's `M`s go into the wrappers'
  slot tables (a LoRA adapter's A/B into the stock buffers).
* `set_adapter_mapping`, the step's adapter-mapping step: on the CPU, MoRA adapters first move
  between slots so that each kind (same spec on every module) holds consecutive slots (the
  torch backend then reads a kind's `M`s through one view of the table instead of gathering
  them every layer of every step; vLLM's LRU eviction frees whichever slot it frees, so
  activations alone cannot keep kinds together). Then, on the host, the step's tokens are
  split (`split_mapping`): vLLM gets a mapping where MoRA tokens have no adapter (its LoRA
  kernels then skip them, and skip themselves in a step without a stock LoRA token), and the
  MoRA runtime gets each token's table row and the step's kind (what it launches), prepared
  once for every layer (`MoraRuntime`).
* Merge on demand (`mora_merge` ...): `MergeController` (mora/vllm_plugin/merging.py).
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import torch
from vllm.lora.layers import LoRAMapping, LoRAMappingType
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.model_executor.models.utils import PPMissingLayer

from mora.checkpoint import MoraAdapter
from mora.errors import MergeError, ShapeMismatchError
from mora.kernels import StepKind, slot_order_is_free
from mora.validate import bind_mora
from mora.vllm_plugin.coupling import VllmCouplingError
from mora.vllm_plugin.graphs import set_current_runtime
from mora.vllm_plugin.layers import MoraLayerMixin, MoraVocabParallelEmbeddingWithLoRA
from mora.vllm_plugin.logits import MoraLogitsProcessorWithLoRA
from mora.vllm_plugin.merging import MergeController
from mora.vllm_plugin.models import (
    MoraLoRAModel,
    compact_slots,
    compaction_key,
    mora_model,
    slot_kind,
    stage_local,
)
from mora.vllm_plugin.quantized import check_quantized_layers
from mora.vllm_plugin.runtime import MoraRuntime, plan_step
from mora.vllm_plugin.tiers import TierStats
from mora.vllm_plugin.worker_api import EngineStatus, MergeState, SlotInfo

__all__ = ["MoraLoRAModelManager"]

log = logging.getLogger(__name__)


class MoraLoRAModelManager(LRUCacheLoRAModelManager):
    """vLLM's LRU LoRA manager, aware of MoRA slots and of merged adapters."""

    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_num_batched_tokens: int, vocab_size: int,
                 lora_config: object, device: torch.device, vllm_config: object) -> None:
        refuse_configuration(vllm_config, torch.device(device))
        super().__init__(model, max_num_seqs, max_num_batched_tokens, vocab_size, lora_config, device, vllm_config)
        # Before the engine reports ready: a quantized base whose kernels this machine lacks must
        # refuse to start, not serve until its first step dies (mora/vllm_plugin/quantized.py).
        check_quantized_layers(self.modules.items(), vllm_config.model_config.dtype, torch.device(self.device))
        # slots + a reserved merged row; graph-safe (a GPU, a compiled CPU model): step buffers
        # for vLLM's largest batch
        self.mora_runtime = MoraRuntime(self.lora_slots, self.device, max_tokens=self.max_num_batched_tokens,
                                        graphs=compiled_or_captured(vllm_config))
        set_current_runtime(self.mora_runtime)
        self.mora_tiers = TierStats()
        for name, module in self.mora_layers():
            module.attach(self.mora_runtime, self.packed_modules.get(name, [name]))
        for module in self.modules.values():
            if isinstance(module, (MoraVocabParallelEmbeddingWithLoRA, MoraLogitsProcessorWithLoRA)):
                module.attach(self.mora_runtime)
        tables = [t for _, m in self.mora_layers() for _, t in m.mora_slices()]
        self.mora_table_dtype = tables[0].dtype if tables else torch.float32
        self.mora_merges = MergeController(self.mora_runtime, self.mora_layers, self._registered_adapters)
        # Pipeline parallelism: the decoder layers other stages hold are placeholders here.
        self._mora_other_stages = tuple(
            f"{name}." for name, module in self.model.named_modules() if isinstance(module, PPMissingLayer)
        )

    def mora_layers(self) -> list[tuple[str, MoraLayerMixin]]:
        return [(n, m) for n, m in self.modules.items() if isinstance(m, MoraLayerMixin)]

    @functools.cached_property
    def _mora_module_facts(self) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
        """Each MoRA-capable module's `(out_features, in_features)` and its tables' `n_max`: fixed
        once the model's layers exist, asked at every page-in (a walk over every layer each time)."""
        shapes: dict[str, tuple[int, int]] = {}
        limits: dict[str, int] = {}
        for _, module in self.mora_layers():
            for child, table in module.mora_slices():
                shapes[child] = (table.layout.out_features, table.layout.in_features)
                limits[child] = table.n_max
        return shapes, limits

    def load_mora(self, adapter: MoraAdapter, lora_int_id: int) -> MoraLoRAModel:
        """Validate `adapter` against this model and wrap it for the manager.

        Under pipeline parallelism each stage validates and holds only the modules of its own
        layers; the others are checked by the stages that hold them.
        """
        shapes, limits = self._mora_module_facts
        bound = bind_mora(stage_local(adapter, self._mora_other_stages), shapes)
        max_rank = self.lora_config.max_lora_rank
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
        # In pinned memory for a GPU: taking a slot then copies asynchronously (from pageable
        # memory the copy would hold the host).
        pin = torch.device(self.device).type == "cuda"
        mora = {m: (_host_copy(adapter.weights[m].to(dtype=dtype or adapter.weights[m].dtype), pin), spec)
                for m, spec in bound.specs.items()}
        return MoraLoRAModel(lora_int_id, adapter.config.r, mora=mora, name=adapter.name)

    # -- vLLM manager hooks ---------------------------------------------------------------

    def _add_adapter(self, lora: LoRAModel) -> None:
        if mora_model(lora) is not None:
            self._registered_adapters[lora.id] = lora  # nothing to pack: one M per module
            return
        super()._add_adapter(lora)

    def _write_slot(self, index: int, model: MoraLoRAModel) -> None:
        for _, module in self.mora_layers():
            module.set_mora(index, module.mora_entries(model.mora))

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
        model = mora_model(self._registered_adapters.get(lora_id))
        if activated and model is not None:
            self._write_slot(self.lora_index_to_id.index(lora_id), model)
        if activated and not resident:
            self.mora_tiers.loaded("host", time.perf_counter() - started)
        return activated

    def set_adapter_mapping(self, mapping: LoRAMapping) -> None:
        """The step's adapter-mapping step: compact slots (CPU), give vLLM its mapping without
        the MoRA tokens, and prepare the step's MoRA metadata once for every layer."""
        if torch.device(self.device).type == "cpu" and not slot_order_is_free(self.mora_table_dtype):
            # The GPU kernel and the native CPU kernel read any slot order at no cost; with
            # spread traffic compaction would move many adapters per step (bench.scale).
            self.mora_compact()
        if mapping.type is not LoRAMappingType.LANGUAGE:  # MoRA serves the language model
            super().set_adapter_mapping(mapping)
            return
        stock, rows, kind = self.split_mapping(mapping)
        super().set_adapter_mapping(stock)
        self.mora_runtime.prepare(torch.from_numpy(rows), kind)

    def split_mapping(self, mapping: LoRAMapping) -> tuple[LoRAMapping, np.ndarray, StepKind]:
        """On the host: vLLM's mapping with MoRA adapters replaced by "no adapter", each token's
        table row and what the step launches (`plan_step`)."""
        ids = np.asarray(mapping.index_mapping, dtype=np.int64)
        merges, cache = self.mora_merges, self._registered_adapters.cache
        slot_of = {lora_id: i for i, lora_id in enumerate(self.lora_index_to_id) if lora_id is not None}
        rows, moras, kind = plan_step(ids, slot_of, lambda i: mora_model(cache.get(i)) is not None, merges.target,
                                      merges.merged_id is not None, self.mora_runtime.merged_row)
        if not moras:
            return mapping, rows, kind
        hide = np.asarray(moras, dtype=np.int64)
        prompt = np.asarray(mapping.prompt_mapping, dtype=np.int64)
        stock = LoRAMapping(tuple(np.where(np.isin(ids, hide), 0, ids).tolist()),
                            tuple(np.where(np.isin(prompt, hide), 0, prompt).tolist()),
                            is_prefill=mapping.is_prefill, type=mapping.type)
        return stock, rows, kind

    def remove_oldest_adapter(self) -> bool:
        # vLLM's host-cache eviction (LRU, pinned adapters skipped): the adapter stays on disk.
        removed = super().remove_oldest_adapter()
        if removed:
            self.mora_tiers.count("host_evictions")
        return removed

    def remove_adapter(self, adapter_id: int) -> bool:
        if adapter_id == self.mora_merges.merged_id:
            raise MergeError(f"adapter {adapter_id} is merged into the base weights; unmerge it first")
        if adapter_id == self.mora_merges.preparing:
            raise MergeError(f"adapter {adapter_id} is being prepared for a merge; wait for it")
        return super().remove_adapter(adapter_id)

    # -- pins -----------------------------------------------------------------------------

    @property
    def mora_max_pinned(self) -> int:
        """Pins leave room for one step's adapters, which vLLM must be able to load (the one
        statement of the pin limit: the server reads it from `mora_status`)."""
        return max(0, self.capacity - self.lora_slots)

    def mora_pin(self, lora_id: int) -> EngineStatus:
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
        return self.mora_status()

    # -- slots ----------------------------------------------------------------------------

    def mora_compact(self) -> int:
        """Apply `compact_slots` to the resident adapters; returns how many moved.

        Between steps: the next mapping is computed from the new `lora_index_to_id`, and a
        moved adapter's `M`s are copied from its registered model into its new slot.
        """
        ids = self.lora_index_to_id
        kinds = [None if lora_id is None else compaction_key(self._registered_adapters.get(lora_id)) for lora_id in ids]
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
            self._write_slot(new, self._registered_adapters[lora_id])
        return len(moves)

    # -- merging --------------------------------------------------------------------------

    def mora_merge(self, lora_id: int, background: bool = False, max_bytes: int | None = None,
                   commit: bool = True) -> EngineStatus:
        """Merge resident MoRA adapter `lora_id` into the base weights (see `MergeController`)."""
        if self.mora_merges.preparing is None and self.mora_merges.merged_id is None:
            model = self._registered_adapters.get(lora_id)
            if model is None:
                raise MergeError(f"adapter {lora_id} is not loaded")
            if mora_model(model) is None:
                raise MergeError(f"adapter {lora_id} is a LoRA adapter; only MoRA adapters are merged on demand")
        progress = self.mora_merges.merge(lora_id, mora_model(self._registered_adapters.get(lora_id)),
                                          background=background, max_bytes=max_bytes, commit=commit)
        if progress.state is not MergeState.MERGED:
            return EngineStatus(progress.state, layers=progress.layers, layers_prepared=progress.layers_prepared)
        status = self.mora_status()
        log.info("merged MoRA adapter %d into %d layers (%.3fs, %d bytes kept for exact unmerge)",
                 lora_id, status.layers, status.seconds, status.backup_bytes)
        return status

    def mora_merge_commit(self, lora_id: int) -> EngineStatus:
        self.mora_merges.commit(lora_id)
        return self.mora_status()

    def mora_merge_cancel(self, lora_id: int) -> EngineStatus:
        self.mora_merges.cancel(lora_id)
        return self.mora_status()

    def mora_unmerge(self, lora_id: int | None = None) -> EngineStatus:
        self.mora_merges.unmerge(lora_id)
        return self.mora_status()

    def mora_status(self) -> EngineStatus:
        """Slots, host cache, pins, the merged adapter and the memory kept for its unmerge."""
        slots = tuple(SlotInfo(index, lora_id, slot_kind(self._registered_adapters.get(lora_id)))
                      for index, lora_id in enumerate(self.lora_index_to_id) if lora_id is not None)
        merges = self.mora_merges
        return EngineStatus(
            state=MergeState.MERGED if merges.merged_id is not None else MergeState.NONE,
            merged_id=merges.merged_id, merged_slot=self.mora_runtime.merged_slot, **merges.summary(),
            slots=slots, registered=tuple(sorted(self._registered_adapters.cache)),
            pinned=tuple(sorted(self._registered_adapters.pinned_items)), capacity=self.capacity,
            lora_slots=self.lora_slots, max_pinned=self.mora_max_pinned, mora_layers=len(self.mora_layers()),
            graph_safe=self.mora_runtime.graph_safe,
        )


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.contiguous()
    return t.pin_memory() if pin else t


def compiled_or_captured(vllm_config: object) -> bool:
    """Whether vLLM compiles the model or captures CUDA graphs of it (the MoRA forward must
    then be graph-safe)."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    return cc.mode != CompilationMode.NONE or cc.cudagraph_mode != CUDAGraphMode.NONE


def refuse_configuration(vllm_config: object, device: torch.device) -> None:
    """Configurations the MoRA wrappers cannot serve, refused before the model is wrapped
    (the engine does not start) rather than when the first MoRA adapter loads."""
    lora = vllm_config.lora_config
    if getattr(lora, "fully_sharded_loras", False):
        raise VllmCouplingError(
            "fully_sharded_loras=True is not supported with MoRA: vLLM then wraps layers in its fully sharded LoRA "
            "classes, which the MoRA wrappers do not extend, so no MoRA adapter could load. Start without it (a "
            "MoRA adapter's M is small and is kept whole on every rank anyway)")
    if device.type != "cpu" and compiled_or_captured(vllm_config) and vllm_config.use_v2_model_runner:
        raise VllmCouplingError(
            "vLLM's V2 model runner is selected (VLLM_USE_V2_MODEL_RUNNER=1): the MoRA plugin's CUDA-graph cases "
            "(mora/vllm_plugin/graphs.py) are built on the V1 runner; unset it or set VLLM_USE_V2_MODEL_RUNNER=0")
