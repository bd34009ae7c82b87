"""The adapter service: what callers may do with adapters, and what they are told about them.

Transport-free: the gRPC Adapters servicer and the HTTP adapter routes authenticate the caller
and translate their messages into these calls, and `AdapterInfo` back into their own shapes.
Authorization beyond "who is calling" (may this caller manage adapters, load for another
tenant, see this id) is decided here and in the registry, once for both transports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from mora.vllm_plugin.worker_api import EngineStatus
from serve.adapters import AdapterRegistry, Entry
from serve.errors import InvalidRequest
from serve.tenants import Tenant, TenantDirectory

__all__ = ["AdapterInfo", "AdapterService", "LoadRequest", "Location"]


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
    path: str | None = None  # relative to the caller's adapter folder, or a source URI (s3://, hf://)
    source: str | None = None  # a source registered in the server config (admins)
    replace: bool = False
    tenant: str = ""  # the owner (admins only; defaults to the caller)
    pinned: bool = False
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> the digest it must have (source URIs)


class AdapterService:
    def __init__(self, registry: AdapterRegistry, tenants: TenantDirectory) -> None:
        self.registry = registry
        self.tenants = tenants

    def info(self, entry: Entry, status: EngineStatus) -> AdapterInfo:
        a, kind = entry.version.adapter, entry.version.kind
        merges = self.registry.merges
        merged = merges.is_merged(entry.adapter_id)
        return AdapterInfo(
            adapter_id=entry.adapter_id, tenant=entry.tenant or "", kind=kind.name,
            mora_type=kind.type_number(a), rank=a.config.r, parameters=a.num_parameters,
            location=Location(status.location(entry.version.engine_id)), merged=merged,
            in_flight=entry.version.in_flight + sum(v.in_flight for v in entry.retiring),
            manual_merge=entry.manual_merge, version=entry.version.number, source=entry.version.source,
            requests_total=entry.requests_total, merge_backup_bytes=merges.backup_bytes if merged else 0,
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
                                         strict_pin=True, sha256=request.sha256)
        return await self._info(entry)

    async def unload(self, caller: Tenant, adapter_id: str) -> AdapterInfo:
        entry = self.registry.managed(adapter_id, caller)
        info = await self._info(entry)
        await self.registry.unload(adapter_id, caller)
        return replace(info, location=Location.UNSPECIFIED, in_flight=0)

    async def list(self, caller: Tenant) -> list[AdapterInfo]:
        status = await self.registry.engine.status()
        return [self.info(e, status) for e in sorted(self.registry.visible(caller), key=lambda e: e.adapter_id)]

    async def get(self, caller: Tenant, adapter_id: str) -> AdapterInfo:
        return await self._info(self.registry.get(adapter_id, caller))

    async def merge(self, caller: Tenant, adapter_id: str) -> tuple[AdapterInfo, float]:
        with self.registry.management_slot(caller):
            entry = self.registry.managed(adapter_id, caller)
            result = await self.registry.merges.merge(entry, manual=True, trigger="manual")
        return await self._info(self.registry.get(adapter_id, caller)), float(result["seconds"])

    async def unmerge(self, caller: Tenant, adapter_id: str, automatic: bool = False) -> tuple[AdapterInfo, float]:
        with self.registry.management_slot(caller):
            entry = self.registry.managed(adapter_id, caller)
            result = await self.registry.merges.unmerge(entry, manual=True, trigger="manual", automatic=automatic)
        return await self._info(self.registry.get(adapter_id, caller)), float(result["seconds"])
