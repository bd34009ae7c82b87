"""Adapter lifecycle: validate, snapshot, register, lease to requests, replace, unload.

Nothing unvalidated reaches the engine: an adapter is read into memory and checked by the mora
library against the base model first (serve/adapters/validation.py); the engine then gets a private
snapshot written from exactly those tensors (serve/adapters/snapshots.py), so files changing on disk
afterwards cannot change what is served. Adapters from a source URI (s3://, hf://) are
downloaded into a staging folder first (serve/adapters/sources) and validated there the same way.

Each load of an id is a *version* with its own engine adapter id. Requests lease the current
version when they are admitted; replacing an adapter switches the current version atomically
(requests admitted afterwards use the new weights, leases in flight finish on the old ones,
which are unregistered when their last lease ends). Unloading waits for leases (bounded).

The registry is composed of parts with their own state: `tiers` (host cache view, page-ins,
pins; serve/adapters/tiers.py) and `merges` (what is merged, eligibility, transitions, the
policy; serve/adapters/merges.py). Lazy registration is a resolver in front of it
(serve/adapters/resolver.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

from mora.checkpoint import weights_limit
from mora.containment import UpdateReport
from mora.errors import AdapterError
from mora.kinds import Adapter
from serve.adapters.entries import Entry, Version
from serve.adapters.fair_queue import FairQueue
from serve.adapters.heap import trim_heap
from serve.adapters.merges import Merges
from serve.adapters.snapshots import SnapshotDir, hollow, tensor_bytes
from serve.adapters.sources import (
    AdapterSources,
    SourceUri,
    is_uri,
    parse_source,
    request_pins,
    source_config,
)
from serve.adapters.tiers import Tiers
from serve.adapters.validation import AdapterValidator, check_adapter_id, resolve_under_root
from serve.config import ServerSettings
from serve.engine import Engine, EngineError
from serve.errors import (
    AdapterExists,
    AdapterNotFound,
    FailedPrecondition,
    InvalidRequest,
    PermissionDenied,
    ResourceExhausted,
    ServeError,
    SourceDenied,
    SourceNotFound,
    SourceUnavailable,
    Unavailable,
    short,
)
from serve.tenants import Tenant, TenantDirectory

__all__ = ["AdapterRegistry", "Entry", "Version"]

log = logging.getLogger(__name__)


class AdapterRegistry:
    """All adapters the server serves, keyed by adapter id: versions, leases, loads and unloads."""

    def __init__(self, settings: ServerSettings, engine: Engine, tenants: TenantDirectory, on_event: Callable[..., None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.tenants = tenants
        self.entries: dict[str, Entry] = {}
        self._ids = itertools.count(1)
        self._versions: dict[str, int] = {}  # the last version number of each adapter id (kept after unload)
        self._manage = asyncio.Lock()  # registrations (short: validation and snapshots happen outside it)
        self._validations = FairQueue()  # adapter validation, one at a time, tenants taking turns
        self._managing: dict[str, int] = {}  # tenant -> management calls in flight
        self._reserved_bytes = 0  # snapshot bytes of loads between validation and registration
        self._validator = AdapterValidator(settings, engine)
        self._snapshots = SnapshotDir(settings.snapshot_dir)
        # downloads land in staging folders inside the snapshot folder (private, cleaned with it)
        self.sources = AdapterSources(source_config(settings), self._snapshots.path, settings.source_downloads)
        self._on_event = on_event or (lambda *a, **k: None)
        self._background: set[asyncio.Task] = set()
        self.tiers = Tiers(settings, engine)
        self.merges = Merges(settings, engine, self.tiers, self._on_event)

    # -- helpers --------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Registered adapters at most (vLLM's host cache pages them from their snapshots)."""
        return self.settings.max_adapters

    @property
    def disk_bytes(self) -> int:
        """Bytes of every snapshot kept (current and retiring versions)."""
        return sum(v.nbytes for e in self.entries.values() for v in (e.version, *e.retiring))

    def get(self, adapter_id: str, caller: Tenant | None = None) -> Entry:
        """The entry of `adapter_id`; one `caller` may not see is NOT_FOUND exactly like an absent one."""
        entry = self.entries.get(adapter_id)
        if entry is None or (caller is not None and not self.tenants.may_see(caller, entry.tenant)):
            raise AdapterNotFound(f"adapter {short(adapter_id)} is not loaded")
        return entry

    def visible(self, tenant: Tenant) -> list[Entry]:
        return [e for e in self.entries.values() if self.tenants.may_see(tenant, e.tenant)]

    def prevalidate(self, adapter_id: str, path: str) -> None:
        """Check a preload entry (id, path under the root, config, shapes against the model's
        config.json, rank) without the engine: bad preloads fail before the engine starts. A
        source URI is listed (it exists, the sizes are within the limits); it is downloaded and
        validated when it is loaded."""
        check_adapter_id(adapter_id)
        if is_uri(path):
            self.sources.fetcher.list(parse_source(path), weights_limit(self._validator.base_shapes()))
            return
        root = self.settings.adapter_root
        directory = resolve_under_root(root, path)
        try:
            self._validator.validate(adapter_id, directory, root, in_dtype=False)  # the dtype bound is checked at load
        except AdapterError as e:
            raise InvalidRequest(str(e)) from None
        except OSError as e:
            raise InvalidRequest(f"cannot read its files ({e.strerror})") from None

    # -- load / replace / unload ----------------------------------------------------------

    def adapter_folder(self, caller: Tenant | None) -> Path:
        """The folder `caller` loads from: `<root>/<tenant>` for tenants; the root for admins and preloads."""
        root = self.settings.adapter_root
        if caller is None or caller.is_admin:
            return root
        return root / caller.name

    async def load(self, adapter_id: str, *, path: str | None = None, source_name: str | None = None,
                   caller: Tenant | None = None, owner: str | None = None, replace: bool = False,
                   lazy: bool = False, pin: bool = False, strict_pin: bool = False,
                   sha256: Mapping[str, str] | None = None) -> Entry:
        """Validate, snapshot and register an adapter (or new weights for an existing id).

        `caller`: the authenticated tenant (None: the server itself, for --preload). Who owns the
        adapter is decided, and checked, inside the registry lock, so a racing load cannot take
        over another tenant's id. A tenant's paths resolve under `<root>/<tenant>/`; a source URI
        (s3://, hf://) must lie in one of its grants, and is downloaded into a staging folder that
        is validated exactly like a local adapter (`sha256`: digests its files must have).
        `pin`: keep it in the host cache for good; `strict_pin` (a caller asked): refuse the load
        when no pin is left, instead of loading it unpinned with a warning (--preload).

        Fair to everyone: a tenant has at most `management_calls_per_tenant` calls in flight
        (more: RESOURCE_EXHAUSTED at once), validation runs outside the registry lock in a queue
        that takes turns between tenants (`FairQueue`), and the lock is held only to register.
        """
        check_adapter_id(adapter_id)
        if caller is not None and not lazy:  # lazy: the tenant's own folder or grant, allowed by the tenants file
            self.tenants.check_manage(caller)
        if pin and strict_pin:
            # Pins are host memory taken from everyone's cache: an operator's decision.
            if caller is not None and not caller.is_admin:
                raise PermissionDenied("only admins pin (mark hot) adapters")
            full = self.tiers.pin_room()
            if full is not None and not replace:
                raise ResourceExhausted(full)
        if source_name is not None:
            if source_name not in self.settings.sources:
                raise InvalidRequest(f"no registered source named {short(source_name)}")
            if caller is not None and not caller.is_admin:
                raise PermissionDenied("registered sources are for admins")
            path, source = self.settings.sources[source_name], f"source:{source_name}"
        elif path:
            source = path
        else:
            raise InvalidRequest("give a path (relative to your adapter folder), a source URI or a registered source")
        if self.engine.dtype is None:
            raise Unavailable("the engine is starting; adapters are validated in its dtype")
        uri = parse_source(path) if is_uri(path) else None
        if uri is not None:
            if caller is not None:
                self.tenants.check_source(caller, uri)  # before the store is asked anything
            pins = {**(self.tenants.pins(caller, uri) if caller is not None else {}), **request_pins(uri, sha256 or {})}
            source = source if source_name is not None else str(uri)
        else:
            if sha256:
                raise InvalidRequest("sha256 digests are pinned for adapters loaded from a source URI (s3://, hf://)")
            allowed = self.adapter_folder(caller)
            if not allowed.is_dir():
                raise InvalidRequest("your adapter folder does not exist on the server")
            directory = resolve_under_root(allowed, path, "the adapter root" if allowed == self.settings.adapter_root else "your adapter folder")
        started = time.perf_counter()
        # A registration on first use (a request's, `lazy`) waits for the tenant's page-in turns
        # (a download) or its place in the validation queue (a local folder) instead of taking
        # one of its management calls: a burst of first requests queues, none is refused.
        with contextlib.nullcontext() if lazy else self.management_slot(caller):
            self._claim(adapter_id, caller, owner, replace)  # fail fast; checked again under the lock
            if uri is None:
                adapter, report = await self._validate(adapter_id, caller, directory, allowed, started)
            else:
                turn = self.tiers.turn(caller.name) if lazy and caller is not None else contextlib.nullcontext()
                async with turn:  # on first use: within the tenant's page-in turns
                    adapter, report = await self._download_and_validate(adapter_id, caller, uri, pins, started)
            nbytes = tensor_bytes(adapter)
            budget = self.settings.adapter_disk_bytes
            held = self.disk_bytes + self._reserved_bytes
            if budget is not None and held + nbytes > budget:
                self._on_event("load", "rejected", time.perf_counter() - started)
                raise ResourceExhausted(f"adapter {short(adapter_id)} needs {nbytes} bytes of snapshot; the server's adapter "
                                        f"disk budget has {max(0, budget - held)} of {budget} left")
            number = self._versions.get(adapter_id, 0) + 1  # `version` counts per adapter id (protos)
            self._versions[adapter_id] = number
            self._reserved_bytes += nbytes
            try:
                snapshot = await self._write_snapshot(adapter, number, started)
                meta = hollow(adapter)
                del adapter  # the weights live in the snapshot (and vLLM's cache) from here on
                async with self._manage:
                    entry, version = await self._register(adapter_id, caller, owner, replace, pin, strict_pin,
                                                          snapshot, number, source, meta, report, nbytes, started)
            finally:
                self._reserved_bytes -= nbytes
        await asyncio.to_thread(trim_heap)
        self._on_event("load", "ok", time.perf_counter() - started)
        log.info("adapter %s loaded (v%d, %s, engine id %d) from %s", adapter_id, number, version.kind.name, version.engine_id, source)
        return entry

    async def _validate(self, adapter_id: str, caller: Tenant | None, directory: Path, allowed: Path, started: float,
                        *, exclusive: bool | None = None) -> tuple[Adapter, UpdateReport | None]:
        """The adapter in `directory` read and checked (files only under `allowed`), in the fair queue."""
        if exclusive is None:
            exclusive = caller is not None and not caller.is_admin
        try:
            return await self._validations.run(
                caller.name if caller is not None else "",
                functools.partial(self._validator.validate, adapter_id, directory, allowed, exclusive=exclusive))
        except AdapterError as e:
            self._on_event("load", "invalid", time.perf_counter() - started)
            raise InvalidRequest(str(e)) from None
        except OSError as e:
            self._on_event("load", "io_error", time.perf_counter() - started)
            raise InvalidRequest(f"adapter {short(adapter_id)}: cannot read its files ({e.strerror})") from None

    async def _download_and_validate(self, adapter_id: str, caller: Tenant | None, uri: SourceUri, pins: dict[str, str],
                                     started: float) -> tuple[Adapter, UpdateReport | None]:
        """The adapter at `uri`: listed (limits checked before any byte is fetched; its bytes held
        against the disk budget), downloaded into a staging folder, validated there like a local
        adapter (each file the folder's own); the folder is gone when this returns."""
        try:
            listing = await self.sources.list(uri, weights_limit(self._validator.base_shapes()))
            budget, held = self.settings.adapter_disk_bytes, self.disk_bytes + self._reserved_bytes
            if budget is not None and held + listing.total_bytes > budget:
                raise ResourceExhausted(f"adapter {short(adapter_id)} is {listing.total_bytes} bytes at its source; the "
                                        f"server's adapter disk budget has {max(0, budget - held)} of {budget} left")
            self._reserved_bytes += listing.total_bytes
            try:
                async with self.sources.staged(listing, pins) as folder:
                    return await self._validate(adapter_id, caller, folder, folder, started, exclusive=True)
            finally:
                self._reserved_bytes -= listing.total_bytes
        except (SourceNotFound, SourceDenied, SourceUnavailable):
            self._on_event("load", "source_error", time.perf_counter() - started)
            raise

    @contextlib.contextmanager
    def management_slot(self, caller: Tenant | None) -> Iterator[None]:
        """One of the caller's management calls in flight (admins and the server: unbounded)."""
        if caller is None or caller.is_admin:
            yield
            return
        limit = self.settings.management_calls_per_tenant
        busy = self._managing.get(caller.name, 0)
        if busy >= limit:
            raise ResourceExhausted(f"tenant {caller.name!r} already has {busy} adapter management calls in flight "
                                    f"(limit {limit}); wait for them")
        self._managing[caller.name] = busy + 1
        try:
            yield
        finally:
            self._managing[caller.name] -= 1
            if not self._managing[caller.name]:
                del self._managing[caller.name]

    def _claim(self, adapter_id: str, caller: Tenant | None, owner: str | None, replace: bool) -> tuple[Entry | None, str | None]:
        """(the existing entry, the owner a load of `adapter_id` by `caller` gets), or the refusal."""
        existing = self.entries.get(adapter_id)
        configured = self.tenants.owner_of(adapter_id)
        if caller is not None and not caller.is_admin:
            # A tenant owns what it loads; an id another tenant holds (or is given in the
            # tenants file) is refused alike, without saying whose it is or whether it is loaded.
            taken = (existing is not None and existing.tenant != caller.name) or (configured not in (None, caller.name))
            if taken:
                raise PermissionDenied(f"adapter id {short(adapter_id)} is reserved; choose another id")
            owner = caller.name
        elif existing is None:
            owner = owner or configured or (None if (self.tenants.open or caller is None) else caller.name)
            if configured is not None and owner != configured:
                raise InvalidRequest(f"adapter {short(adapter_id)} belongs to another tenant in the tenants file")
        if existing is not None and not replace:
            raise AdapterExists(f"adapter {short(adapter_id)} is already loaded (set replace to load new weights)")
        if existing is not None and existing.unloading:
            raise FailedPrecondition(f"adapter {short(adapter_id)} is being unloaded")
        if existing is not None and existing.manual_merge and self.merges.is_merged(adapter_id):
            # Replacing would have to unmerge behind the back of whoever merged it by hand.
            raise FailedPrecondition(f"adapter {short(adapter_id)} is merged under manual control; unmerge it before replacing it")
        if existing is None:
            if len(self.entries) >= self.capacity:
                raise ResourceExhausted(f"the server holds its maximum of {self.capacity} adapters")
            tenant = self.tenants.get(owner) if owner else None
            if tenant is not None and sum(e.tenant == owner for e in self.entries.values()) >= tenant.max_resident_adapters:
                raise ResourceExhausted(f"the tenant already has {tenant.max_resident_adapters} adapters loaded (its limit)")
            return None, owner
        return existing, existing.tenant

    async def _write_snapshot(self, adapter: Adapter, number: int, started: float) -> Path:
        try:
            return await asyncio.to_thread(self._snapshots.write, adapter, number)
        except OSError as e:
            self._snapshots.remove(self._snapshots.path_for(adapter.name, number))
            self._on_event("load", "io_error", time.perf_counter() - started)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise ResourceExhausted(f"cannot write the snapshot of adapter {adapter.name!r}: {e.strerror}") from None
            raise Unavailable(f"cannot write the snapshot of adapter {adapter.name!r}: {e.strerror}") from None
        except Exception as e:
            # safetensors reports a full disk as its own error type: look for the errno text.
            self._snapshots.remove(self._snapshots.path_for(adapter.name, number))
            self._on_event("load", "io_error", time.perf_counter() - started)
            text = str(e)
            for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                if os.strerror(code) in text:
                    raise ResourceExhausted(f"cannot write the snapshot of adapter {adapter.name!r}: {os.strerror(code)}") from None
            raise

    async def _register(self, adapter_id: str, caller: Tenant | None, owner: str | None, replace: bool, pin: bool,
                        strict_pin: bool, snapshot: Path, number: int, source: str, adapter: Adapter,
                        report: UpdateReport | None, nbytes: int, started: float) -> tuple[Entry, Version]:
        """Register a validated snapshot (under the registry lock: ownership is decided here)."""
        try:
            existing, owner = self._claim(adapter_id, caller, owner, replace)
        except ServeError:
            self._snapshots.remove(snapshot)
            raise
        engine_id = next(self._ids)
        handle = self.engine.adapter_handle(adapter_id, engine_id, str(snapshot))
        try:
            await self.engine.add_adapter(handle)
        except EngineError as e:
            self._snapshots.remove(snapshot)
            self._on_event("load", "rejected", time.perf_counter() - started)
            raise InvalidRequest(f"adapter {adapter_id!r}: {e}") from None
        # Only the metadata stays in this process: the weights are in the snapshot (and in
        # vLLM's host cache while it holds the adapter), so registered adapters cost no host memory.
        version = Version(number, engine_id, snapshot, adapter, source, handle, report, nbytes)
        self.tiers.registered(version)
        if pin or (existing is not None and existing.version.pinned):
            try:
                await self.tiers.pin(version, strict=strict_pin and pin)
            except ResourceExhausted:
                await self.engine.remove_adapter(engine_id)
                self.tiers.forget(version)
                self._snapshots.remove(snapshot)
                self._on_event("load", "rejected", time.perf_counter() - started)
                raise
        if existing is None:
            entry = Entry(adapter_id, owner, version)
            self.entries[adapter_id] = entry
        else:
            entry = existing
            old = entry.version
            await self.merges.unmerge_engine_id(old.engine_id, "replaced")
            entry.version = version  # new requests get the new weights from here on
            entry.retiring.append(old)
            self._retire(entry, old)
        return entry, version

    def _retire(self, entry: Entry, version: Version) -> None:
        async def drain() -> None:
            await version.idle.wait()
            await self.engine.remove_adapter(version.engine_id)
            self.tiers.forget(version)
            self._snapshots.remove(version.snapshot)
            if version in entry.retiring:
                entry.retiring.remove(version)

        task = asyncio.get_running_loop().create_task(drain())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def managed(self, adapter_id: str, caller: Tenant | None) -> Entry:
        """The entry `caller` may manage (checked under the registry lock, like the change itself)."""
        if caller is not None:
            self.tenants.check_manage(caller)
        return self.get(adapter_id, caller)

    async def unload(self, adapter_id: str, caller: Tenant | None = None) -> Entry:
        """Stop serving `adapter_id` once its requests are done (bounded wait, outside the registry
        lock: other tenants' calls go on meanwhile)."""
        started = time.perf_counter()
        with self.management_slot(caller):
            async with self._manage:
                entry = self.managed(adapter_id, caller)
                if entry.unloading:
                    raise FailedPrecondition(f"adapter {short(adapter_id)} is being unloaded")
                entry.unloading = True  # no new leases (nor replaces, nor merges) from here on
                versions = [entry.version, *entry.retiring]
            try:
                await asyncio.wait_for(asyncio.gather(*(v.idle.wait() for v in versions)), self.settings.unload_timeout_s)
            except TimeoutError:
                entry.unloading = False
                busy = sum(v.in_flight for v in versions)
                self._on_event("unload", "busy", time.perf_counter() - started)
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} still has {busy} requests in flight after {self.settings.unload_timeout_s:g}s"
                ) from None
            async with self._manage:
                versions = [entry.version, *entry.retiring]
                for v in versions:
                    await self.merges.unmerge_engine_id(v.engine_id, "unloaded")
                for v in versions:
                    await self.engine.remove_adapter(v.engine_id)
                    self.tiers.forget(v)
                    self._snapshots.remove(v.snapshot)
                del self.entries[adapter_id]
        self._on_event("unload", "ok", time.perf_counter() - started)
        log.info("adapter %s unloaded", adapter_id)
        return entry

    # -- leases ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, adapter_id: str, caller: Tenant | None = None) -> AsyncIterator[Version]:
        """The current version of `adapter_id`, held for the duration of one request (checked
        again for `caller`: the id may have been unloaded and reloaded by someone else meanwhile)."""
        entry = self.get(adapter_id, caller)
        if entry.unloading:
            raise AdapterNotFound(f"adapter {adapter_id!r} is being unloaded")
        version = entry.version
        version.in_flight += 1
        version.idle.clear()
        entry.requests_total += 1
        try:
            await self.tiers.page_in(version, entry.tenant or "")
            yield version
        finally:
            version.in_flight -= 1
            if version.in_flight == 0:
                version.idle.set()

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self.sources.close()
        self._snapshots.close()
