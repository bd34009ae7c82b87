"""Worker extension (`worker_extension_cls`): merge and unmerge MoRA adapters on demand.

    llm = LLM(..., enable_lora=True, worker_extension_cls="mora.vllm_plugin.extension.MoraWorkerExtension")
    llm.collective_rpc("mora_merge", args=(lora_int_id,))      # -> [status dict per worker]
    llm.collective_rpc("mora_unmerge")

`collective_rpc` calls reach every worker between engine steps (the engine core is one
thread: it runs utility calls between `step()`s), so a merge never overlaps a forward, and
with tensor parallelism each rank merges its own shard. Method names carry a `mora_` prefix
because vLLM refuses extensions whose attributes clash with the worker's.
"""

from __future__ import annotations

from mora.errors import MergeError

__all__ = ["MoraWorkerExtension"]


class MoraWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def _mora_manager(self):
        from mora.vllm_plugin.manager import MoraLoRAModelManager

        runner = getattr(self, "model_runner", None)
        lora_manager = getattr(runner, "lora_manager", None)
        manager = getattr(lora_manager, "_adapter_manager", None)
        if not isinstance(manager, MoraLoRAModelManager):
            raise MergeError("MoRA is not active in this engine (enable_lora=True and the mora plugin are required)")
        return manager

    def _mora_worker_manager(self):
        self._mora_manager()  # raises unless MoRA is active
        return self.model_runner.lora_manager

    def mora_prefetch(self, items: list) -> dict[int, str]:
        """Start reading cold MoRA adapters `[(lora_int_id, name, path)]` off the step loop;
        answers where each one is (see `MoraWorkerLoRAManager.mora_prefetch`)."""
        return self._mora_worker_manager().mora_prefetch([tuple(i) for i in items])

    def mora_pin(self, lora_int_id: int) -> dict[str, object]:
        """Keep an adapter in the host cache for good (preloaded or hot adapters)."""
        return self._mora_manager().mora_pin(int(lora_int_id))

    def mora_tier_stats(self) -> dict[str, object]:
        """Cumulative cache hits/misses/evictions and the load durations since the last call."""
        return self._mora_manager().mora_tiers.drain()

    def mora_merge(self, lora_int_id: int, background: bool = False, max_bytes: int | None = None,
                   commit: bool = True) -> dict[str, object]:
        """Merge resident MoRA adapter `lora_int_id` into the base weights; `background`: prepare
        the merged weights beside the steps (answers {"state": "preparing"} until swapped in, or
        with `commit=False` until {"state": "prepared"}, which `mora_merge_commit` swaps in)."""
        return self._mora_manager().mora_merge(int(lora_int_id), bool(background), None if max_bytes is None else int(max_bytes),
                                               bool(commit))

    def mora_merge_commit(self, lora_int_id: int) -> dict[str, object]:
        """Swap a prepared merge in (between two steps)."""
        return self._mora_manager().mora_merge_commit(int(lora_int_id))

    def mora_merge_cancel(self, lora_int_id: int) -> dict[str, object]:
        """Drop a merge being prepared; nothing was swapped in."""
        return self._mora_manager().mora_merge_cancel(int(lora_int_id))

    def mora_unmerge(self, lora_int_id: int | None = None) -> dict[str, object]:
        """Restore the base weights bit for bit."""
        return self._mora_manager().mora_unmerge(None if lora_int_id is None else int(lora_int_id))

    def mora_status(self) -> dict[str, object]:
        """Slots, the merged adapter and the host memory kept for an exact unmerge."""
        return self._mora_manager().mora_status()

    def mora_weight_digest(self) -> dict[str, str]:
        """A SHA-256 of every wrapped layer's base weights (dense, or recovered from packed
        kernels), to check that an unmerge restored them bit for bit."""
        import hashlib

        import torch

        from mora.vllm_plugin.layers import MoraLayerMixin

        out: dict[str, str] = {}
        for name, module in self._mora_manager().modules.items():
            if not isinstance(module, MoraLayerMixin):
                continue
            base = module.base_layer
            w = base.weight
            if w.numel() == 0 and hasattr(base, "cpu_linear"):
                with torch.no_grad():
                    w = base.cpu_linear(torch.eye(module.input_size, dtype=w.dtype), w, None).t().contiguous()
            out[name] = hashlib.sha256(w.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        return out
