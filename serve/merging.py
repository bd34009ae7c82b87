"""Merge bookkeeping of the registry: which adapter is merged into the base weights, whether it
may be, and the merge/unmerge transitions (one at a time, under the registry's lock).

A merged adapter serves only its own requests (serve/merge_gate.py): a merge is swapped in only
when no other adapter's request is in the engine, and another adapter's request arriving while
it is merged unmerges it first. The engine does the merging (mora/vllm_plugin); this holds no
tensor math.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from serve.config import ServerSettings
from serve.engine import Engine, EngineError
from serve.errors import FailedPrecondition, short
from serve.merge_gate import MergeGate
from serve.tenants import Tenant

if TYPE_CHECKING:
    from serve.registry import Entry

__all__ = ["AdapterMerging"]

log = logging.getLogger("serve.registry")  # part of the registry (a mixin): its log, as before the split


class AdapterMerging:
    """The merge half of `AdapterRegistry` (a mixin: `_managed` and the lock are the registry's)."""

    settings: ServerSettings
    engine: Engine
    merged: tuple[str, int] | None  # (adapter id, engine id)
    merge_backup_bytes: int
    gate: MergeGate
    last_transition: float  # time.monotonic() of the last merge or unmerge
    _transitions: asyncio.Lock
    _on_event: Callable[..., None]


    def merge_refusal(self, entry: Entry) -> str | None:
        """Why `entry` may not be merged (other tenants' results would leave the tolerance), or None."""
        refusal = entry.version.kind.merge_refusal(entry.version.adapter)
        if refusal is not None:
            return refusal
        if self.engine.quantization:  # integer codes cannot take a float update (and be restored exactly)
            return f"the base model is quantized ({self.engine.quantization}); adapters on it are served unmerged only"
        report = entry.version.report
        return None if report is None else report.merge_refusal(self.engine.dtype)

    async def merge(self, adapter_id: str, *, manual: bool, trigger: str, caller: Tenant | None = None) -> dict[str, Any]:
        with self.management_slot(caller):  # type: ignore[attr-defined]  # the registry's
            return await self._merge(adapter_id, manual=manual, trigger=trigger, caller=caller)

    async def _merge(self, adapter_id: str, *, manual: bool, trigger: str, caller: Tenant | None) -> dict[str, Any]:
        started = time.perf_counter()
        async with self._transitions:
            entry = self._managed(adapter_id, caller)
            if entry.unloading:
                raise FailedPrecondition(f"adapter {short(adapter_id)} is being unloaded")
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
            version = entry.version
            engine_id = version.engine_id
            committed: dict[str, Any] = {}

            async def swap_in() -> None:
                committed.update(await self.engine.commit_merge(engine_id))

            try:
                await self.page_in(version, entry.tenant or "")  # a cold adapter is read off the step loop
                await self.engine.add_lora(version.lora_request)  # make sure the engine holds it
                prepared = await self.engine.prepare_merge(engine_id)
                swapped = await self.gate.commit(engine_id, swap_in, self.settings.merge_wait_s)
                if not swapped:
                    await self.engine.cancel_merge(engine_id)
            except EngineError as e:
                with contextlib.suppress(Exception):
                    await self.engine.cancel_merge(engine_id)
                self._on_event("merge", "error", time.perf_counter() - started, trigger=trigger)
                raise FailedPrecondition(f"cannot merge {adapter_id!r}: {e}") from None
            if not swapped:
                self._on_event("merge", "busy", time.perf_counter() - started, trigger=trigger)
                raise FailedPrecondition(
                    f"adapter {short(adapter_id)} was not merged: requests of other adapters stayed in flight for "
                    f"{self.settings.merge_wait_s:g}s (a merged adapter serves only its own requests); retry")
            self.merged = (adapter_id, engine_id)
            self.last_transition = time.monotonic()
            self.merge_backup_bytes = int(committed.get("backup_bytes", 0))
        seconds = time.perf_counter() - started
        status = {**committed, "stall_seconds": prepared.get("stall_seconds", 0.0)}
        self._on_event("merge", "ok", seconds, trigger=trigger, adapter=adapter_id, owner=entry.tenant,
                       stall=float(status["stall_seconds"]))
        log.info("merged adapter %s (%s) in %.3fs", adapter_id, trigger, seconds)
        return {"seconds": seconds, **status}

    async def unmerge(self, adapter_id: str | None, *, manual: bool, trigger: str, automatic: bool = False,
                      caller: Tenant | None = None) -> dict[str, Any]:
        with self.management_slot(caller):  # type: ignore[attr-defined]  # the registry's
            return await self._unmerge(adapter_id, manual=manual, trigger=trigger, automatic=automatic, caller=caller)

    async def _unmerge(self, adapter_id: str | None, *, manual: bool, trigger: str, automatic: bool,
                       caller: Tenant | None) -> dict[str, Any]:
        started = time.perf_counter()
        async with self._transitions:
            if adapter_id is not None:
                entry = self._managed(adapter_id, caller)
                if manual:
                    entry.manual_merge = not automatic
            if self.merged is None or (adapter_id is not None and self.merged[0] != adapter_id):
                return {"seconds": 0.0}
            await self._unmerge_locked(trigger)
        return {"seconds": time.perf_counter() - started}

    async def unmerge_for_others(self) -> None:
        """The gate's unmerge: another adapter's request arrived while one is merged."""
        await self.unmerge(None, manual=False, trigger="isolation")

    async def _unmerge_locked(self, trigger: str) -> None:
        assert self.merged is not None
        adapter_id = self.merged[0]
        owner = getattr(self.entries.get(adapter_id), "tenant", None)  # type: ignore[attr-defined]
        started = time.perf_counter()
        try:
            await self.engine.unmerge()
        except EngineError as e:
            self._on_event("unmerge", "error", time.perf_counter() - started, trigger=trigger)
            raise FailedPrecondition(f"cannot unmerge {adapter_id!r}: {e}") from None
        self.merged = None
        self.last_transition = time.monotonic()
        self.merge_backup_bytes = 0
        await self.gate.unmerged()
        unmerge_seconds = time.perf_counter() - started  # the unmerge swaps the original kernels back in one call
        self._on_event("unmerge", "ok", unmerge_seconds, trigger=trigger, adapter=adapter_id, owner=owner, stall=unmerge_seconds)
        log.info("unmerged adapter %s (%s)", adapter_id, trigger)
