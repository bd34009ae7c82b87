"""Finding the adapter a request names: the registry's entry, or, for a tenant with
`lazy_adapters`, an adapter folder directly under its own folder, or, for a tenant with an
`on_demand` source grant, `<prefix>/<id>` in that store (s3://, hf://), registered on first use
(downloaded and validated then, within the tenant's page-in turns; the first request waits,
bounded; concurrent requests share one load).

A resolver in front of the registry, like vLLM's LoRA resolvers (`vllm/lora/resolver.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from serve.adapters.registry import AdapterRegistry, Entry
from serve.adapters.single_flight import SingleFlight
from serve.errors import (
    AdapterExists,
    AdapterNotFound,
    InvalidRequest,
    PathNotAllowed,
    PermissionDenied,
    ResourceExhausted,
    SourceDenied,
    SourceNotFound,
    Unavailable,
    short,
)
from serve.tenants import Tenant

__all__ = ["LazyResolver"]

log = logging.getLogger(__name__)


class LazyResolver:
    def __init__(self, registry: AdapterRegistry, on_event: Callable[..., None]) -> None:
        self.registry = registry
        self._on_event = on_event
        self._loads: SingleFlight[tuple[str, str], Entry] = SingleFlight()

    async def resolve(self, adapter_id: str, caller: Tenant) -> Entry:
        """The entry `caller` may use, registering it on first use if `caller` has lazy_adapters
        and `<adapter-root>/<tenant>/<adapter_id>` exists, or an on-demand source grant (the first
        request waits, bounded)."""
        try:
            return self.registry.get(adapter_id, caller)
        except AdapterNotFound:
            path = None if caller.is_admin else self._where(adapter_id, caller)
            if path is None:
                raise
        timeout = self.registry.settings.adapter_load_timeout_s
        return await self._loads.run(
            (caller.name, adapter_id), lambda: self._load(adapter_id, caller, path), timeout,
            lambda: Unavailable(f"adapter {short(adapter_id)} is still being validated after {timeout:g}s; retry"))

    def _where(self, adapter_id: str, caller: Tenant) -> str | None:
        """Where `caller` keeps `adapter_id` if it is not registered: its own folder's
        `<id>` (lazy_adapters), else its on-demand grant's `<prefix>/<id>`, else nowhere."""
        if caller.lazy_adapters:
            folder = self.registry.adapter_folder(caller)
            if (folder / adapter_id).is_dir() or (folder / adapter_id).is_symlink():
                return adapter_id
        prefix = self.registry.tenants.on_demand(caller)
        return str(prefix.child(adapter_id)) if prefix is not None else None

    async def _load(self, adapter_id: str, caller: Tenant, path: str) -> Entry:
        started = time.perf_counter()
        try:
            entry = await self.registry.load(adapter_id, path=path, caller=caller, lazy=True)
        except AdapterExists:
            return self.registry.get(adapter_id, caller)  # registered meanwhile (by this tenant, or hidden: NOT_FOUND)
        except SourceDenied as e:  # the store refused the server's credentials: the operator's to fix, named
            raise SourceDenied(f"lazy registration of adapter {short(adapter_id)} refused: {e}") from None
        except (PermissionDenied, SourceNotFound):
            # Another tenant's id, or nothing at the tenant's prefix: answered like an absent id,
            # so nobody learns which ids others hold.
            raise AdapterNotFound(f"adapter {short(adapter_id)} is not loaded") from None
        except (InvalidRequest, PathNotAllowed, ResourceExhausted) as e:
            raise type(e)(f"lazy registration of adapter {short(adapter_id)} refused: {e}") from None
        self._on_event("lazy_load", "ok", time.perf_counter() - started)
        log.info("adapter %s registered on first use by tenant %s", adapter_id, caller.name)
        return entry
