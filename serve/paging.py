"""Adapter tiers as the registry sees them: which adapters vLLM's host cache holds, reading cold
ones in before their requests are queued, and pins.

The number of registered adapters is bounded by `max_adapters` and the snapshots'
`adapter_disk_bytes`, not by memory. Each version keeps only its metadata in this process (the
tensors live in its snapshot); vLLM keeps an LRU host cache of `max_cpu_loras` and `max_loras`
device slots above the snapshots. A request for an adapter that is not in the host cache asks
the engine to read it in the background (`page_in`) and waits for it before it is queued, so
the read never runs inside another tenant's step. Pinned adapters (preloaded) never leave the
host cache; an adapter with leases in flight never loses its snapshot.

Fairness: each tenant has at most `page_ins_per_tenant` adapters being read at once (the
engine reads one at a time, in order), so a tenant that floods the server with cold adapters
queues behind itself, and another tenant's cold adapter waits for at most that many reads per
tenant.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from serve.config import ServerSettings
from serve.engine import Engine, EngineError
from serve.errors import ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from serve.registry import Version

__all__ = ["AdapterPaging"]

log = logging.getLogger("serve.registry")  # part of the registry (a mixin): its log, as before the split


class AdapterPaging:
    """The tier half of `AdapterRegistry` (a mixin: the registry sets these attributes up)."""

    settings: ServerSettings
    engine: Engine
    host_view: set[int]  # engine ids in vLLM's host cache (last status, plus page-ins since)
    _paging: dict[int, asyncio.Task]
    pinned_count: int
    max_pinned: int
    _page_slots: dict[str, asyncio.Semaphore]
    page_in_counts: dict[str, list[int]]  # tenant -> [being read, waiting for a turn]

    async def page_in(self, version: Version, tenant: str = "") -> None:
        """Have the engine read `version` (owned by `tenant`) into its host cache off the step
        loop, if it is not there; waits (bounded by `adapter_load_timeout_s`). Concurrent
        requests share one read."""
        if not version.kind.pages_in or version.engine_id in self.host_view:
            return  # LoRA adapters: vLLM reads them in the step, as stock vLLM does
        task = self._paging.get(version.engine_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._page_in(version, tenant))
            self._paging[version.engine_id] = task
            task.add_done_callback(lambda _t, i=version.engine_id: self._paging.pop(i, None))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.settings.adapter_load_timeout_s)
        except TimeoutError:
            raise Unavailable(f"adapter {version.lora_request.lora_name!r} is still being read from disk after "
                              f"{self.settings.adapter_load_timeout_s:g}s; retry") from None

    async def _page_in(self, version: Version, tenant: str) -> None:
        slots = self._page_slots.get(tenant)
        if slots is None:
            slots = self._page_slots[tenant] = asyncio.Semaphore(self.settings.page_ins_per_tenant)
        counts = self.page_in_counts.setdefault(tenant, [0, 0])
        counts[1] += 1
        try:
            await slots.acquire()
        finally:
            counts[1] -= 1
        counts[0] += 1
        try:
            await self._read_in(version)
        finally:
            counts[0] -= 1
            slots.release()

    async def _read_in(self, version: Version) -> None:
        r = version.lora_request

        def state(states: dict) -> str:
            return str(states.get(r.lora_int_id, states.get(str(r.lora_int_id), "")))

        try:
            states, _ = await self.engine.rpc_until(lambda s: state(s) not in ("loading", ""),
                                                    "mora_prefetch", [(r.lora_int_id, r.lora_name, r.lora_path)])
        except EngineError as e:
            raise Unavailable(f"adapter {r.lora_name!r} cannot be read from disk: {e}") from None
        if state(states).startswith("error"):
            raise Unavailable(f"adapter {r.lora_name!r} cannot be read from its snapshot: {state(states)[7:]}")
        self.host_view.add(version.engine_id)  # "device", "host", "staged" or "step"

    def set_host_view(self, registered: list[int]) -> None:
        """vLLM's host cache as the engine's status reports it (ids paged in since are kept)."""
        self.host_view = set(registered) | {i for i in self.host_view if i in self._paging}

    async def _pin(self, version: Version, strict: bool = False) -> None:
        """Keep `version` in vLLM's host cache for good; beyond the pins it allows, a warning
        (`strict`: ResourceExhausted, as the engine's refusal says)."""
        if self.pinned_count >= self.max_pinned:
            why = f"{self.pinned_count} adapters are pinned, the most max_cpu_loras - max_loras allows"
            if strict:
                raise ResourceExhausted(why)
            log.warning("adapter %s is not pinned: %s", version.lora_request.lora_name, why)
            return
        try:
            await self.engine.rpc("mora_pin", version.engine_id)
        except EngineError as e:
            if strict:
                raise ResourceExhausted(f"adapter {version.lora_request.lora_name!r} cannot be pinned: {e}") from None
            log.warning("adapter %s is not pinned: %s", version.lora_request.lora_name, e)
            return
        version.pinned = True
        self.pinned_count += 1

    def _forget(self, version: Version) -> None:
        """Drop what the tiers know of `version` (it left the engine)."""
        self.host_view.discard(version.engine_id)
        if version.pinned:
            version.pinned = False
            self.pinned_count -= 1
