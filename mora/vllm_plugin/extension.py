"""Worker extension (`worker_extension_cls`): the worker side of the typed worker API
(mora/vllm_plugin/worker_api.py): tiers, pins, merge and unmerge of MoRA adapters on demand.

    llm = LLM(..., enable_lora=True, worker_extension_cls="mora.vllm_plugin.extension.MoraWorkerExtension")
    llm.collective_rpc("mora_merge", args=(lora_int_id,))      # -> [EngineStatus per worker]
    llm.collective_rpc("mora_unmerge")

`collective_rpc` calls reach every worker between engine steps (the engine core is one
thread: it runs utility calls between `step()`s), so a merge never overlaps a forward, and
with tensor parallelism each rank merges its own shard. Method names carry a `mora_` prefix
because vLLM refuses extensions whose attributes clash with the worker's.
"""

from __future__ import annotations

import hashlib

import torch

from mora.errors import MergeError
from mora.vllm_plugin.manager import MoraLoRAModelManager
from mora.vllm_plugin.merging import dense_weight
from mora.vllm_plugin.worker_api import EngineStatus, PageIn, PageInState, TierReport
from mora.vllm_plugin.worker_manager import MoraWorkerLoRAManager

__all__ = ["MoraWorkerExtension"]


class MoraWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker. Implements `WorkerApi`."""

    def _mora_worker_manager(self) -> MoraWorkerLoRAManager:
        lora_manager = getattr(getattr(self, "model_runner", None), "lora_manager", None)
        if not isinstance(lora_manager, MoraWorkerLoRAManager) or not isinstance(
                getattr(lora_manager, "_adapter_manager", None), MoraLoRAModelManager):
            raise MergeError("MoRA is not active in this engine (enable_lora=True and the mora plugin are required)")
        return lora_manager

    def _mora_manager(self) -> MoraLoRAModelManager:
        return self._mora_worker_manager()._adapter_manager

    def mora_prefetch(self, items: list[PageIn]) -> dict[int, PageInState]:
        """Where each adapter is; a cold MoRA adapter starts reading off the step loop."""
        return self._mora_worker_manager().mora_prefetch([PageIn.decode(i) for i in items])

    def mora_pin(self, lora_int_id: int) -> EngineStatus:
        """Keep an adapter in the host cache for good (preloaded or hot adapters)."""
        return self._mora_manager().mora_pin(int(lora_int_id))

    def mora_tier_stats(self) -> TierReport:
        """Cumulative cache hits/misses/evictions and the load durations since the last call."""
        return self._mora_manager().mora_tiers.drain()

    def mora_merge(self, lora_int_id: int, background: bool = False, max_bytes: int | None = None,
                   commit: bool = True) -> EngineStatus:
        """Merge resident MoRA adapter `lora_int_id` into the base weights; `background`: prepare
        the merged weights beside the steps (state PREPARING until swapped in, or with
        `commit=False` until PREPARED, which `mora_merge_commit` swaps in)."""
        return self._mora_manager().mora_merge(int(lora_int_id), bool(background), None if max_bytes is None else int(max_bytes),
                                               bool(commit))

    def mora_merge_commit(self, lora_int_id: int) -> EngineStatus:
        """Swap a prepared merge in (between two steps)."""
        return self._mora_manager().mora_merge_commit(int(lora_int_id))

    def mora_merge_cancel(self, lora_int_id: int) -> EngineStatus:
        """Drop a merge being prepared; nothing was swapped in."""
        return self._mora_manager().mora_merge_cancel(int(lora_int_id))

    def mora_unmerge(self, lora_int_id: int | None = None) -> EngineStatus:
        """Restore the base weights bit for bit."""
        return self._mora_manager().mora_unmerge(None if lora_int_id is None else int(lora_int_id))

    def mora_status(self) -> EngineStatus:
        """Slots, host cache, pins, the merged adapter and the host memory kept for an exact unmerge."""
        return self._mora_manager().mora_status()

    def mora_weight_digest(self) -> dict[str, str]:
        """A SHA-256 of every wrapped layer's base weights (dense, or recovered from packed
        kernels), to check that an unmerge restored them bit for bit."""
        out: dict[str, str] = {}
        for name, module in self._mora_manager().mora_layers():
            w = dense_weight(module)
            out[name] = hashlib.sha256(w.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        return out
