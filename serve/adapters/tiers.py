"""Adapter tiers as the registry sees them: which adapters vLLM's host cache holds, reading cold
ones in before their requests are queued, and pins.

The number of registered adapters is bounded by `max_adapters` and the snapshots'
`adapter_disk_bytes`, not by memory. Each version keeps only its metadata in this process (the
tensors live in its snapshot); vLLM keeps an LRU host cache of `max_cpu_loras` and `max_loras`
device slots above the snapshots. A request for an adapter that is not in the host cache asks
the engine to read it in the background (`page_in`) and waits for it before it is queued, so
the read never runs inside another tenant's step; a snapshot already in the page cache (found
by reads that never wait for the disk) needs no read, and its request is queued at once (the
worker knows every registered adapter's request from its registration, `add_lora`). Pinned
adapters (preloaded) never leave the host cache; an adapter with leases in flight never loses
its snapshot.

Fairness: each tenant has at most `page_ins_per_tenant` adapters being read at once (the
engine reads one at a time, in order; adapters downloaded from a source on first use take the
same turns), so a tenant that floods the server with cold adapters
queues behind itself, and another tenant's cold adapter waits for at most that many reads per
tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from mora.vllm_plugin.tiers import snapshot_in_page_cache
from mora.vllm_plugin.worker_api import PageIn, Residence
from serve.adapters.single_flight import SingleFlight
from serve.config import ServerSettings
from serve.engine import Engine, EngineError
from serve.errors import ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from serve.adapters.entries import Version

__all__ = ["Tiers"]

# The most snapshot bytes this process reads to learn that a snapshot is in the page cache (on
# the event loop; it never waits for the disk): larger ones ask the engine.
IN_MEMORY_CHECK_BYTES = 1 << 20

log = logging.getLogger(__name__)


class Tiers:
    """Where registered adapters are (as far as this process knows), page-ins and pins."""

    def __init__(self, settings: ServerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.host_view: set[int] = set()  # engine ids in vLLM's host cache (last status, plus page-ins since)
        self._page_ins: SingleFlight[int, None] = SingleFlight()
        self._turns: dict[str, asyncio.Semaphore] = {}  # tenant -> its page_ins_per_tenant turns
        self.page_in_counts: dict[str, list[int]] = {}  # tenant -> [being read, waiting for a turn]
        self.pinned_count = 0
        self.max_pinned = 0  # the engine's (`EngineStatus.max_pinned`), read when it starts

    async def engine_started(self) -> None:
        """Learn the pin limit from the engine (the one place it is computed: the worker)."""
        self.max_pinned = (await self.engine.status()).max_pinned

    async def page_in(self, version: Version, tenant: str = "") -> None:
        """Have the engine read `version` (owned by `tenant`) into its host cache off the step
        loop, if it is not there; waits (bounded by `adapter_load_timeout_s`). Concurrent
        requests share one read."""
        if not version.kind.pages_in or version.engine_id in self.host_view:
            return  # LoRA adapters: vLLM reads them in the step, as stock vLLM does
        if snapshot_in_page_cache(version.snapshot, IN_MEMORY_CHECK_BYTES):
            # Its read cannot wait for the disk, and the worker has known its request since the
            # engine registered it: queued at once, without the engine's round trip (served
            # between two steps; bench.scale's evicted adapters asked ~40 a second, ~8% of the
            # engine core's time).
            self.host_view.add(version.engine_id)
            return
        name = version.adapter.name
        await self._page_ins.run(
            version.engine_id, lambda: self._page_in(version, tenant), self.settings.adapter_load_timeout_s,
            lambda: Unavailable(f"adapter {name!r} is still being read from disk after "
                                f"{self.settings.adapter_load_timeout_s:g}s; retry"))

    async def _page_in(self, version: Version, tenant: str) -> None:
        async with self.turn(tenant):
            await self._read_in(version)

    @contextlib.asynccontextmanager
    async def turn(self, tenant: str) -> AsyncIterator[None]:
        """One of `tenant`'s `page_ins_per_tenant` turns: a read from disk, or an adapter resolved
        from its source on first use (serve/adapters/resolver.py); the tenant's others wait."""
        turns = self._turns.get(tenant)
        if turns is None:
            turns = self._turns[tenant] = asyncio.Semaphore(self.settings.page_ins_per_tenant)
        counts = self.page_in_counts.setdefault(tenant, [0, 0])
        counts[1] += 1
        try:
            await turns.acquire()
        finally:
            counts[1] -= 1
        counts[0] += 1
        try:
            yield
        finally:
            counts[0] -= 1
            turns.release()

    async def _read_in(self, version: Version) -> None:
        name = version.adapter.name
        try:
            state = await self.engine.read_in(PageIn(version.engine_id, name, str(version.snapshot)))
        except EngineError as e:
            raise Unavailable(f"adapter {name!r} cannot be read from disk: {e}") from None
        if state.residence is Residence.ERROR:
            raise Unavailable(f"adapter {name!r} cannot be read from its snapshot: {state.error}")
        self.host_view.add(version.engine_id)  # device, host, staged or step

    def set_host_view(self, registered: tuple[int, ...]) -> None:
        """vLLM's host cache as the engine's status reports it (ids paged in since are kept)."""
        self.host_view = set(registered) | {i for i in self.host_view if i in self._page_ins}

    def pin_room(self) -> str | None:
        """Why no adapter can be pinned now, or None."""
        if self.pinned_count >= self.max_pinned:
            return (f"{self.pinned_count} adapters are pinned, the most the host cache allows "
                    f"(max_cpu_loras - max_loras = {self.max_pinned}); unload one, or load this one unpinned")
        return None

    async def pin(self, version: Version, strict: bool = False) -> None:
        """Keep `version` in vLLM's host cache for good; beyond the pins it allows, a warning
        (`strict`: ResourceExhausted, as the engine's refusal says)."""
        full = self.pin_room()
        if full is not None:
            if strict:
                raise ResourceExhausted(full)
            log.warning("adapter %s is not pinned: %s", version.adapter.name, full)
            return
        try:
            await self.engine.pin(version.engine_id)
        except EngineError as e:
            if strict:
                raise ResourceExhausted(f"adapter {version.adapter.name!r} cannot be pinned: {e}") from None
            log.warning("adapter %s is not pinned: %s", version.adapter.name, e)
            return
        version.pinned = True
        self.pinned_count += 1

    def registered(self, version: Version) -> None:
        """`version` was just added to the engine (so it is in the host cache)."""
        self.host_view.add(version.engine_id)

    def forget(self, version: Version) -> None:
        """Drop what the tiers know of `version` (it left the engine)."""
        self.host_view.discard(version.engine_id)
        if version.pinned:
            version.pinned = False
            self.pinned_count -= 1
