"""Merge bookkeeping of the registry: which adapter is merged into the base weights, whether it
may be, and the merge/unmerge transitions (one at a time, under the registry's lock).

The engine does the merging (mora/vllm_plugin); this holds no tensor math.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from serve.engine import Engine, EngineError
from serve.errors import FailedPrecondition, short
from serve.tenants import Tenant

if TYPE_CHECKING:
    from serve.registry import Entry

__all__ = ["AdapterMerging"]

log = logging.getLogger("serve.registry")  # part of the registry (a mixin): its log, as before the split


class AdapterMerging:
    """The merge half of `AdapterRegistry` (a mixin: `_managed` and the lock are the registry's)."""

    engine: Engine
    merged: tuple[str, int] | None  # (adapter id, engine id)
    merge_backup_bytes: int
    _manage: asyncio.Lock
    _on_event: Callable[..., None]

    def merge_refusal(self, entry: Entry) -> str | None:
        """Why `entry` may not be merged (other tenants' results would leave the tolerance), or None."""
        if entry.version.kind != "mora":
            return "it is a LoRA adapter; only MoRA adapters are merged"
        if self.engine.quantization:  # integer codes cannot take a float update (and be restored exactly)
            return f"the base model is quantized ({self.engine.quantization}); adapters on it are served unmerged only"
        report = entry.version.report
        return None if report is None else report.merge_refusal(self.engine.dtype)

    async def merge(self, adapter_id: str, *, manual: bool, trigger: str, caller: Tenant | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        async with self._manage:
            entry = self._managed(adapter_id, caller)
            refusal = self.merge_refusal(entry)
            if refusal is not None:
                self._on_event("merge", "refused", time.perf_counter() - started, trigger=trigger)
                raise FailedPrecondition(f"adapter {short(adapter_id)} cannot be merged: {refusal}")
            if manual:
                entry.manual_merge = True
            if self.merged is not None:
                if self.merged[0] == adapter_id:
                    return {"seconds": 0.0}
                await self._unmerge_locked(f"making room for {adapter_id}")
            try:
                await self.engine.add_lora(entry.version.lora_request)  # make sure the engine holds it
                status = await self.engine.merge(entry.version.engine_id)
            except EngineError as e:
                self._on_event("merge", "error", time.perf_counter() - started, trigger=trigger)
                raise FailedPrecondition(f"cannot merge {adapter_id!r}: {e}") from None
            self.merged = (adapter_id, entry.version.engine_id)
            self.merge_backup_bytes = int(status.get("backup_bytes", 0))
        seconds = time.perf_counter() - started
        self._on_event("merge", "ok", seconds, trigger=trigger, adapter=adapter_id, stall=float(status.get("stall_seconds", seconds)))
        log.info("merged adapter %s (%s) in %.3fs", adapter_id, trigger, seconds)
        return {"seconds": seconds, **status}

    async def unmerge(self, adapter_id: str | None, *, manual: bool, trigger: str, automatic: bool = False,
                      caller: Tenant | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        async with self._manage:
            if adapter_id is not None:
                entry = self._managed(adapter_id, caller)
                if manual:
                    entry.manual_merge = not automatic
            if self.merged is None or (adapter_id is not None and self.merged[0] != adapter_id):
                return {"seconds": 0.0}
            await self._unmerge_locked(trigger)
        return {"seconds": time.perf_counter() - started}

    async def _unmerge_locked(self, trigger: str) -> None:
        assert self.merged is not None
        adapter_id = self.merged[0]
        started = time.perf_counter()
        try:
            await self.engine.unmerge()
        except EngineError as e:
            self._on_event("unmerge", "error", time.perf_counter() - started, trigger=trigger)
            raise FailedPrecondition(f"cannot unmerge {adapter_id!r}: {e}") from None
        self.merged = None
        self.merge_backup_bytes = 0
        unmerge_seconds = time.perf_counter() - started  # the unmerge swaps the original kernels back in one call
        self._on_event("unmerge", "ok", unmerge_seconds, trigger=trigger, adapter=adapter_id, stall=unmerge_seconds)
        log.info("unmerged adapter %s (%s)", adapter_id, trigger)
