"""The adapter service: what callers may do with adapters, and what they are told about them.

Transport-free: the gRPC Adapters servicer and the HTTP adapter routes authenticate the caller
and translate their messages into these calls, and `AdapterInfo` back into their own shapes.
Authorization beyond "who is calling" (may this caller manage adapters, load for another
tenant, see this id) is decided here and in the registry, once for both transports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from serve.errors import InvalidRequest
from serve.registry import AdapterRegistry, Entry
from serve.tenants import Tenant, TenantDirectory

__all__ = ["AdapterInfo", "AdapterService", "LoadRequest", "Location", "location_of"]


class Location(enum.Enum):
    """Where an adapter's weights are (the proto's AdapterLocation)."""

    UNSPECIFIED = "unspecified"  # unloaded
    DEVICE_SLOT = "device_slot"  # in one of the engine's adapter slots, ready for the next step
    HOST_CACHE = "host_cache"  # in the engine's host cache; moved into a slot when a request needs it
    DISK_ONLY = "disk_only"  # only the validated snapshot on disk


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    tenant: str
    kind: str  # "mora" or "lora"
    mora_type: int  # 0 for LoRA
    rank: int
    parameters: int
    location: Location
    merged: bool
    in_flight: int
    manual_merge: bool
    version: int
    source: str
    requests_total: int
    merge_backup_bytes: int
    pinned: bool


@dataclass(frozen=True)
class LoadRequest:
    adapter_id: str
    path: str | None = None  # relative to the caller's adapter folder
    source: str | None = None  # a source registered in the server config (admins)
    replace: bool = False
    tenant: str = ""  # the owner (admins only; defaults to the caller)
    pinned: bool = False


def location_of(entry: Entry, status: dict[str, Any]) -> Location:
    engine_id = entry.version.engine_id
    if any(s.get("lora_id") == engine_id for s in status.get("slots", {}).values()):
        return Location.DEVICE_SLOT
    if engine_id in status.get("registered", []):
        return Location.HOST_CACHE
    return Location.DISK_ONLY


class AdapterService:
    def __init__(self, registry: AdapterRegistry, tenants: TenantDirectory) -> None:
        self.registry = registry
        self.tenants = tenants

    def info(self, entry: Entry, status: dict[str, Any]) -> AdapterInfo:
        a, kind = entry.version.adapter, entry.version.kind
        merged = self.registry.merged is not None and self.registry.merged[0] == entry.adapter_id
        return AdapterInfo(
            adapter_id=entry.adapter_id, tenant=entry.tenant or "", kind=kind.name,
            mora_type=kind.type_number(a), rank=a.config.r, parameters=a.num_parameters,
            location=location_of(entry, status), merged=merged,
            in_flight=entry.version.in_flight + sum(v.in_flight for v in entry.retiring),
            manual_merge=entry.manual_merge, version=entry.version.number, source=entry.version.source,
            requests_total=entry.requests_total, merge_backup_bytes=self.registry.merge_backup_bytes if merged else 0,
            pinned=entry.version.pinned,
        )

    async def _info(self, entry: Entry) -> AdapterInfo:
        return self.info(entry, await self.registry.engine.status())

    async def load(self, caller: Tenant, request: LoadRequest) -> AdapterInfo:
        if request.tenant and not caller.is_admin and request.tenant != caller.name:
            raise InvalidRequest("only admins load adapters for another tenant")
        # Who owns the id is decided and checked by the registry under its lock (no race).
        entry = await self.registry.load(request.adapter_id, path=request.path, source_name=request.source, caller=caller,
                                         owner=request.tenant or None, replace=request.replace, pin=request.pinned,
                                         strict_pin=True)
        return await self._info(entry)

    async def unload(self, caller: Tenant, adapter_id: str) -> AdapterInfo:
        self.tenants.check_manage(caller)
        entry = self.registry.get(adapter_id, caller)
        info = await self._info(entry)
        await self.registry.unload(adapter_id, caller)
        return replace(info, location=Location.UNSPECIFIED, in_flight=0)

    async def list(self, caller: Tenant) -> list[AdapterInfo]:
        status = await self.registry.engine.status()
        return [self.info(e, status) for e in sorted(self.registry.visible(caller), key=lambda e: e.adapter_id)]

    async def get(self, caller: Tenant, adapter_id: str) -> AdapterInfo:
        return await self._info(self.registry.get(adapter_id, caller))

    async def merge(self, caller: Tenant, adapter_id: str) -> tuple[AdapterInfo, float]:
        result = await self.registry.merge(adapter_id, manual=True, trigger="manual", caller=caller)
        return await self._info(self.registry.get(adapter_id, caller)), float(result["seconds"])

    async def unmerge(self, caller: Tenant, adapter_id: str, automatic: bool = False) -> tuple[AdapterInfo, float]:
        result = await self.registry.unmerge(adapter_id, manual=True, trigger="manual", automatic=automatic, caller=caller)
        return await self._info(self.registry.get(adapter_id, caller)), float(result["seconds"])

