"""The engine monitor: once a second, whether the engine is alive, and what the metrics show of
its adapters (residency, page-ins, slots, tier counters)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from serve.adapters import AdapterRegistry
from serve.engine import Engine
from serve.metrics import ServerMetrics

__all__ = ["monitor_engine"]

log = logging.getLogger("mora.serve")


async def monitor_engine(engine: Engine, registry: AdapterRegistry, metrics: ServerMetrics,
                         stopping: asyncio.Event, died: Callable[[], Awaitable[None]]) -> None:
    """Until `stopping`: call `died()` and return when the engine dies; otherwise refresh the
    adapter metrics and the registry's view of vLLM's host cache."""
    while not stopping.is_set():
        if engine.dead or not await engine.check_health():
            await died()
            return
        with contextlib.suppress(Exception):
            status = await engine.status()
            merges = registry.merges
            states = {a: ("merged" if merges.is_merged(a) else status.location(e.version.engine_id), e.tenant)
                      for a, e in registry.entries.items()}
            metrics.set_residency(states)
            metrics.set_page_ins(registry.tiers.page_in_counts)
            metrics.slots_in_use.set(len(status.slots))
            registry.tiers.set_host_view(status.registered)
            metrics.record_tiers(await engine.tier_stats())
        await asyncio.sleep(1.0)
