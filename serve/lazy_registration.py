"""Lazy registration: a tenant with `lazy_adapters` may use any adapter folder directly under its
own folder by id; the first request validates and registers it (and waits, bounded).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from serve.config import ServerSettings
from serve.errors import (
    AdapterExists,
    AdapterNotFound,
    InvalidRequest,
    PathNotAllowed,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    short,
)
from serve.tenants import Tenant

if TYPE_CHECKING:
    from serve.registry import Entry

__all__ = ["LazyRegistration"]

log = logging.getLogger("serve.registry")  # part of the registry (a mixin): its log, as before the split


class LazyRegistration:
    """The lazy half of `AdapterRegistry` (a mixin: `get`, `load` and `adapter_folder` are the registry's)."""

    settings: ServerSettings
    _lazy: dict[tuple[str, str], asyncio.Task]
    _on_event: Callable[..., None]

    async def resolve(self, adapter_id: str, caller: Tenant) -> Entry:
        """The entry `caller` may use, registering it on first use if `caller` has lazy_adapters
        and `<adapter-root>/<tenant>/<adapter_id>` exists (the first request waits, bounded)."""
        try:
            return self.get(adapter_id, caller)
        except AdapterNotFound:
            if caller.is_admin or not getattr(caller, "lazy_adapters", False):
                raise
            folder = self.adapter_folder(caller)
            if not (folder / adapter_id).is_dir() and not (folder / adapter_id).is_symlink():
                raise
        key = (caller.name, adapter_id)
        task = self._lazy.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lazy_load(adapter_id, caller))
            self._lazy[key] = task
            task.add_done_callback(lambda _t, k=key: self._lazy.pop(k, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.settings.adapter_load_timeout_s)
        except TimeoutError:
            raise Unavailable(f"adapter {short(adapter_id)} is still being validated after "
                              f"{self.settings.adapter_load_timeout_s:g}s; retry") from None

    async def _lazy_load(self, adapter_id: str, caller: Tenant) -> Entry:
        started = time.perf_counter()
        try:
            entry = await self.load(adapter_id, path=adapter_id, caller=caller, lazy=True)
        except AdapterExists:
            return self.get(adapter_id, caller)  # registered meanwhile (by this tenant, or hidden: NOT_FOUND)
        except PermissionDenied:
            # Another tenant's id: answered like an absent one, so nobody learns which ids others hold.
            raise AdapterNotFound(f"adapter {short(adapter_id)} is not loaded") from None
        except (InvalidRequest, PathNotAllowed, ResourceExhausted) as e:
            raise type(e)(f"lazy registration of adapter {short(adapter_id)} refused: {e}") from None
        self._on_event("lazy_load", "ok", time.perf_counter() - started)
        log.info("adapter %s registered on first use by tenant %s", adapter_id, caller.name)
        return entry
