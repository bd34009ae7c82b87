"""Adapter lifecycle: validate, snapshot, register, lease to requests, replace, unload, merge.

Nothing unvalidated reaches the engine: an adapter is read into memory and checked by the mora
library against the base model first; the engine then gets a private snapshot written from
exactly those tensors (read-only, in a directory only this process knows), so files changing
on disk afterwards cannot change what is served.

Each load of an id is a *version* with its own engine adapter id. Requests lease the current
version when they are admitted; replacing an adapter switches the current version atomically
(requests admitted afterwards use the new weights, leases in flight finish on the old ones,
which are unregistered when their last lease ends). Unloading waits for leases (bounded).

Tiers: the number of registered adapters is bounded by `max_adapters` and the snapshots'
`adapter_disk_bytes`, not by memory. Each version keeps only its metadata in this process (the
tensors live in its snapshot); vLLM keeps an LRU host cache of `max_cpu_loras` and `max_loras`
device slots above the snapshots. A request for an adapter that is not in the host cache asks
the engine to read it in the background (`page_in`) and waits for it before it is queued, so
the read never runs inside another tenant's step. Pinned adapters (preloaded) never leave the
host cache; an adapter with leases in flight never loses its snapshot.

Lazy registration: a tenant with `lazy_adapters` may use any adapter folder directly under its
own folder by id; the first request validates and registers it (and waits, bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mora.checkpoint import LoraAdapter, MoraAdapter, load_adapter, save_lora_adapter, save_mora_adapter
from mora.containment import UpdateReport, base_weight_norms, check_update
from mora.errors import AdapterError, ShapeMismatchError
from mora.hf import module_shapes_from_config
from mora.validate import BoundMora, bind_adapter
from serve.config import ServerSettings
from serve.engine import Engine, EngineError
from serve.errors import (
    AdapterExists,
    AdapterNotFound,
    FailedPrecondition,
    InvalidRequest,
    PathNotAllowed,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    short,
)
from serve.tenants import Tenant, TenantDirectory

__all__ = ["AdapterRegistry", "Entry", "Version"]


def _tensor_bytes(adapter: MoraAdapter | LoraAdapter) -> int:
    tensors = adapter.weights.values() if isinstance(adapter, MoraAdapter) else [*adapter.lora_a.values(), *adapter.lora_b.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _hollow(adapter: MoraAdapter | LoraAdapter) -> MoraAdapter | LoraAdapter:
    """`adapter` with its tensors on the meta device: shapes and counts, no memory."""
    if isinstance(adapter, MoraAdapter):
        return replace(adapter, weights={k: v.to("meta") for k, v in adapter.weights.items()})
    return replace(adapter, lora_a={k: v.to("meta") for k, v in adapter.lora_a.items()},
                   lora_b={k: v.to("meta") for k, v in adapter.lora_b.items()})

log = logging.getLogger(__name__)
ADAPTER_ID_MAX = 128  # bytes (UTF-8): ids name snapshot folders, and file names have a byte limit
PATH_MAX_BYTES = 1024
SNAPSHOTS_PREFIX = "mora-snapshots-"
LOCK_FILE = ".lock"


def check_adapter_id(adapter_id: str) -> str:
    if not adapter_id:
        raise InvalidRequest("adapter_id is empty")
    if len(adapter_id.encode("utf-8", "surrogatepass")) > ADAPTER_ID_MAX:
        raise InvalidRequest(f"adapter_id is longer than {ADAPTER_ID_MAX} bytes")
    if not all(c.isascii() and (c.isalnum() or c in "._-") for c in adapter_id) or adapter_id in (".", ".."):
        raise InvalidRequest("adapter_id may only contain ASCII letters, digits, '.', '_' and '-'")
    return adapter_id


def resolve_under_root(root: Path, relative: str, where: str = "the adapter root") -> Path:
    """`root/relative` with symlinks resolved; refused if it leaves `root` or is not a directory.

    `root` is the folder the caller may read: `<adapter-root>/<tenant>` for a tenant,
    the adapter root for admins and `--preload`.
    """
    if not relative or "\x00" in relative:
        raise InvalidRequest("adapter path is empty or contains a NUL byte")
    if len(relative.encode("utf-8", "surrogatepass")) > PATH_MAX_BYTES:
        raise InvalidRequest(f"adapter path is longer than {PATH_MAX_BYTES} bytes")
    if os.path.isabs(relative):
        raise PathNotAllowed(f"adapter paths are relative to {where}")
    if os.path.normpath(relative).split(os.sep)[0] == "..":
        raise PathNotAllowed(f"adapter path {short(relative)} leaves {where}")
    base = root.resolve()
    try:
        target = (base / relative).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidRequest(f"adapter path {short(relative)} does not exist in {where}") from None
    except (OSError, RuntimeError) as e:
        raise InvalidRequest(f"adapter path {short(relative)} cannot be resolved: {e.__class__.__name__}") from None
    if not target.is_relative_to(base):
        raise PathNotAllowed(f"adapter path {short(relative)} resolves outside {where}")
    if not target.is_dir():
        raise InvalidRequest(f"adapter path {short(relative)} is not a directory")
    return target


def _lock_snapshot_dir(directory: Path) -> int:
    """Hold an exclusive lock on `directory` for this process's lifetime (released by the kernel
    when it dies, however it dies), so the next start can tell live snapshot folders from stale ones."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def clean_stale_snapshots(parent: Path) -> list[Path]:
    """Remove snapshot folders left by servers that died without cleaning up (SIGKILL, OOM)."""
    removed = []
    for d in parent.glob(SNAPSHOTS_PREFIX + "*"):
        lock = d / LOCK_FILE
        if not d.is_dir() or d.is_symlink() or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live server holds it
        finally:
            os.close(fd)
        for p in [d, *d.rglob("*")]:
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    os.chmod(p, stat.S_IRWXU)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


@dataclass
class Version:
    number: int
    engine_id: int
    snapshot: Path
    adapter: MoraAdapter | LoraAdapter
    source: str
    lora_request: Any
    report: UpdateReport | None = None  # update/base ratios: decides whether it may be merged
    nbytes: int = 0  # the snapshot's tensor bytes (the disk budget counts them)
    pinned: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def kind(self) -> str:
        return "mora" if isinstance(self.adapter, MoraAdapter) else "lora"


@dataclass
class Entry:
    adapter_id: str
    tenant: str | None
    version: Version
    retiring: list[Version] = field(default_factory=list)
    unloading: bool = False
    manual_merge: bool = False
    requests_total: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AdapterRegistry:
    """All adapters the server serves, keyed by adapter id."""

    def __init__(self, settings: ServerSettings, engine: Engine, tenants: TenantDirectory, on_event: Callable[..., None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.tenants = tenants
        self.entries: dict[str, Entry] = {}
        self._ids = itertools.count(1)
        self._versions: dict[str, int] = {}  # the last version number of each adapter id (kept after unload)
        self._manage = asyncio.Lock()  # one load/unload/merge transition at a time
        self.merged: tuple[str, int] | None = None  # (adapter id, engine id)
        self.merge_backup_bytes = 0
        self._base_shapes: dict[str, tuple[int, int]] | None = None
        self._base_norms: dict[str, float] = {}
        self._norms_read: set[str] = set()
        parent = settings.snapshot_dir
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        parent = Path(parent or tempfile.gettempdir())
        for stale in clean_stale_snapshots(parent):
            log.warning("removed the stale snapshot folder %s of a server that died", stale)
        self._snapshots = Path(tempfile.mkdtemp(prefix=SNAPSHOTS_PREFIX, dir=parent))
        os.chmod(self._snapshots, 0o700)
        self._lock_fd = _lock_snapshot_dir(self._snapshots)
        self._on_event = on_event or (lambda *a, **k: None)
        self._background: set[asyncio.Task] = set()
        self.host_view: set[int] = set()  # engine ids in vLLM's host cache (last status, plus page-ins since)
        self._paging: dict[int, asyncio.Task] = {}
        self._lazy: dict[tuple[str, str], asyncio.Task] = {}
        self.pinned_count = 0
        self.max_pinned = max(0, settings.max_cpu_loras - settings.max_loras)

    # -- helpers --------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Registered adapters at most (vLLM's host cache pages them from their snapshots)."""
        return self.settings.max_adapters

    @property
    def disk_bytes(self) -> int:
        """Bytes of every snapshot kept (current and retiring versions)."""
        return sum(v.nbytes for e in self.entries.values() for v in (e.version, *e.retiring))

    def base_shapes(self) -> dict[str, tuple[int, int]]:
        if self._base_shapes is None:
            self._base_shapes = module_shapes_from_config(self.settings.model)
        return self._base_shapes

    def base_norms(self, modules: list[str]) -> dict[str, float]:
        """||W||_F of base modules, read once each (absent: no dense weight, e.g. quantized)."""
        missing = [m for m in modules if m not in self._norms_read]
        if missing:
            self._base_norms.update(base_weight_norms(self.settings.model, missing))
            self._norms_read.update(missing)
        return self._base_norms

    def get(self, adapter_id: str, caller: Tenant | None = None) -> Entry:
        """The entry of `adapter_id`; one `caller` may not see is NOT_FOUND exactly like an absent one."""
        entry = self.entries.get(adapter_id)
        if entry is None or (caller is not None and not self.tenants.may_see(caller, entry.tenant)):
            raise AdapterNotFound(f"adapter {short(adapter_id)} is not loaded")
        return entry

    def visible(self, tenant: Tenant) -> list[Entry]:
        return [e for e in self.entries.values() if self.tenants.may_see(tenant, e.tenant)]

    def merge_refusal(self, entry: Entry) -> str | None:
        """Why `entry` may not be merged (other tenants' results would leave the tolerance), or None."""
        if entry.version.kind != "mora":
            return "it is a LoRA adapter; only MoRA adapters are merged"
        if self.engine.quantization:  # integer codes cannot take a float update (and be restored exactly)
            return f"the base model is quantized ({self.engine.quantization}); adapters on it are served unmerged only"
        report = entry.version.report
        return None if report is None else report.merge_refusal(self.engine.dtype)

    def _validate(self, adapter_id: str, directory: Path, allowed: Path, *,
                  in_dtype: bool = True) -> tuple[MoraAdapter | LoraAdapter, UpdateReport | None]:
        adapter = load_adapter(directory, adapter_id, allowed=allowed, base_shapes=self.base_shapes())
        bound = bind_adapter(adapter, self.base_shapes())
        max_rank = self.settings.max_lora_rank
        for module in (bound.specs if isinstance(adapter, MoraAdapter) else bound.shapes):
            r = adapter.config.rank_for(module)
            if r > max_rank:
                raise ShapeMismatchError("rank exceeds the server's max_lora_rank", adapter=adapter_id, module=module,
                                         expected=f"r <= {max_rank}", found=r)
        if isinstance(adapter, LoraAdapter) and "lora_alpha" not in adapter.config.model_fields_set:
            raise InvalidRequest(f"adapter {adapter_id!r}: a LoRA adapter_config.json needs lora_alpha")
        if not in_dtype:  # before the engine starts: its dtype is not known yet
            return adapter, None
        modules = list(adapter.weights if isinstance(adapter, MoraAdapter) else adapter.lora_a)
        specs = bound.specs if isinstance(bound, BoundMora) else None
        report = check_update(adapter, specs, self.base_norms(modules), self.engine.dtype, self.settings.max_update_ratio)
        return adapter, report

    def _snapshot(self, adapter: MoraAdapter | LoraAdapter, number: int) -> Path:
        path = self._snapshots / f"{adapter.name}.v{number}"
        if isinstance(adapter, MoraAdapter):
            save_mora_adapter(adapter, path)
        else:
            save_lora_adapter(adapter, path)
        for f in path.iterdir():
            os.chmod(f, stat.S_IRUSR)
        os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
        return path

    @staticmethod
    def _remove_snapshot(path: Path) -> None:
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(path, ignore_errors=True)

    def prevalidate(self, adapter_id: str, path: str) -> None:
        """Check a preload entry (id, path under the root, config, shapes against the model's
        config.json, rank) without the engine: bad preloads fail before the engine starts."""
        check_adapter_id(adapter_id)
        root = self.settings.adapter_root
        directory = resolve_under_root(root, path)
        try:
            self._validate(adapter_id, directory, root, in_dtype=False)  # the dtype bound is checked at load
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
                   lazy: bool = False, pin: bool = False, strict_pin: bool = False) -> Entry:
        """Validate, snapshot and register an adapter (or new weights for an existing id).

        `caller`: the authenticated tenant (None: the server itself, for --preload). Who owns the
        adapter is decided, and checked, inside the registry lock, so a racing load cannot take
        over another tenant's id. A tenant's paths resolve under `<root>/<tenant>/`.
        `pin`: keep it in the host cache for good; `strict_pin` (a caller asked): refuse the load
        when no pin is left, instead of loading it unpinned with a warning (--preload).
        """
        check_adapter_id(adapter_id)
        if caller is not None and not lazy:  # lazy: the tenant's own folder, allowed by its lazy_adapters
            self.tenants.check_manage(caller)
        if pin and strict_pin:
            # Pins are host memory taken from everyone's cache: an operator's decision.
            if caller is not None and not caller.is_admin:
                raise PermissionDenied("only admins pin (mark hot) adapters")
            if self.pinned_count >= self.max_pinned and not replace:
                raise ResourceExhausted(f"{self.pinned_count} adapters are pinned, the most the host cache allows "
                                        f"(max_cpu_loras - max_loras = {self.max_pinned}); unload or load one unpinned")
        if source_name is not None:
            if source_name not in self.settings.sources:
                raise InvalidRequest(f"no registered source named {short(source_name)}")
            if caller is not None and not caller.is_admin:
                raise PermissionDenied("registered sources are for admins")
            path, source = self.settings.sources[source_name], f"source:{source_name}"
        elif path:
            source = path
        else:
            raise InvalidRequest("give a path (relative to your adapter folder) or a registered source")
        if self.engine.dtype is None:
            raise Unavailable("the engine is starting; adapters are validated in its dtype")
        allowed = self.adapter_folder(caller)
        if not allowed.is_dir():
            raise InvalidRequest("your adapter folder does not exist on the server")
        directory = resolve_under_root(allowed, path, "the adapter root" if allowed == self.settings.adapter_root else "your adapter folder")
        started = time.perf_counter()
        async with self._manage:
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
            if existing is not None and existing.manual_merge and self.merged is not None and self.merged[0] == adapter_id:
                # Replacing would have to unmerge behind the back of whoever merged it by hand.
                raise FailedPrecondition(f"adapter {short(adapter_id)} is merged under manual control; unmerge it before replacing it")
            if existing is None:
                if len(self.entries) >= self.capacity:
                    raise ResourceExhausted(f"the server holds its maximum of {self.capacity} adapters")
                tenant = self.tenants.get(owner) if owner else None
                if tenant is not None and sum(e.tenant == owner for e in self.entries.values()) >= tenant.max_resident_adapters:
                    raise ResourceExhausted(f"the tenant already has {tenant.max_resident_adapters} adapters loaded (its limit)")
            else:
                owner = existing.tenant
            try:
                adapter, report = await asyncio.to_thread(self._validate, adapter_id, directory, allowed)
            except AdapterError as e:
                self._on_event("load", "invalid", time.perf_counter() - started)
                raise InvalidRequest(str(e)) from None
            except OSError as e:
                self._on_event("load", "io_error", time.perf_counter() - started)
                raise InvalidRequest(f"adapter {short(adapter_id)}: cannot read its files ({e.strerror})") from None
            nbytes = _tensor_bytes(adapter)
            budget = self.settings.adapter_disk_bytes
            held = self.disk_bytes
            if budget is not None and held + nbytes > budget:
                self._on_event("load", "rejected", time.perf_counter() - started)
                raise ResourceExhausted(f"adapter {short(adapter_id)} needs {nbytes} bytes of snapshot; the server's adapter "
                                        f"disk budget has {max(0, budget - held)} of {budget} left")
            number = self._versions.get(adapter_id, 0) + 1  # `version` counts per adapter id (protos)
            self._versions[adapter_id] = number
            try:
                snapshot = await asyncio.to_thread(self._snapshot, adapter, number)
            except OSError as e:
                self._remove_snapshot(self._snapshots / f"{adapter.name}.v{number}")
                self._on_event("load", "io_error", time.perf_counter() - started)
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise ResourceExhausted(f"cannot write the snapshot of adapter {adapter_id!r}: {e.strerror}") from None
                raise Unavailable(f"cannot write the snapshot of adapter {adapter_id!r}: {e.strerror}") from None
            except Exception as e:
                # safetensors reports a full disk as its own error type: look for the errno text.
                self._remove_snapshot(self._snapshots / f"{adapter.name}.v{number}")
                self._on_event("load", "io_error", time.perf_counter() - started)
                text = str(e)
                for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    if os.strerror(code) in text:
                        raise ResourceExhausted(f"cannot write the snapshot of adapter {adapter_id!r}: {os.strerror(code)}") from None
                raise
            from vllm.lora.request import LoRARequest

            engine_id = next(self._ids)
            request = LoRARequest(adapter_id, engine_id, str(snapshot))
            try:
                await self.engine.add_lora(request)
            except EngineError as e:
                self._remove_snapshot(snapshot)
                self._on_event("load", "rejected", time.perf_counter() - started)
                raise InvalidRequest(f"adapter {adapter_id!r}: {e}") from None
            # Only the metadata stays in this process: the weights are in the snapshot (and in
            # vLLM's host cache while it holds the adapter), so registered adapters cost no host memory.
            version = Version(number, engine_id, snapshot, _hollow(adapter), source, request, report, nbytes)
            self.host_view.add(engine_id)
            if pin or (existing is not None and existing.version.pinned):
                try:
                    await self._pin(version, strict=strict_pin and pin)
                except ResourceExhausted:
                    await self.engine.remove_lora(engine_id)
                    self._forget(version)
                    self._remove_snapshot(snapshot)
                    self._on_event("load", "rejected", time.perf_counter() - started)
                    raise
            if existing is None:
                entry = Entry(adapter_id, owner, version)
                self.entries[adapter_id] = entry
            else:
                entry = existing
                old = entry.version
                if self.merged is not None and self.merged[1] == old.engine_id:
                    await self._unmerge_locked("replaced")
                entry.version = version  # new requests get the new weights from here on
                entry.retiring.append(old)
                self._retire(entry, old)
        self._on_event("load", "ok", time.perf_counter() - started)
        log.info("adapter %s loaded (v%d, %s, engine id %d) from %s", adapter_id, number, version.kind, engine_id, source)
        return entry

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
        self.host_view.discard(version.engine_id)
        if version.pinned:
            version.pinned = False
            self.pinned_count -= 1

    def _retire(self, entry: Entry, version: Version) -> None:
        async def drain() -> None:
            await version.idle.wait()
            await self.engine.remove_lora(version.engine_id)
            self._forget(version)
            self._remove_snapshot(version.snapshot)
            if version in entry.retiring:
                entry.retiring.remove(version)

        task = asyncio.get_running_loop().create_task(drain())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _managed(self, adapter_id: str, caller: Tenant | None) -> Entry:
        """The entry `caller` may manage (checked under the registry lock, like the change itself)."""
        if caller is not None:
            self.tenants.check_manage(caller)
        return self.get(adapter_id, caller)

    async def unload(self, adapter_id: str, caller: Tenant | None = None) -> Entry:
        """Stop serving `adapter_id` once its requests are done (bounded wait)."""
        started = time.perf_counter()
        async with self._manage:
            entry = self._managed(adapter_id, caller)
            entry.unloading = True  # no new leases from here on
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
            if self.merged is not None and self.merged[0] == adapter_id:
                await self._unmerge_locked("unloaded")
            for v in versions:
                await self.engine.remove_lora(v.engine_id)
                self._forget(v)
                self._remove_snapshot(v.snapshot)
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
            await self.page_in(version)
            yield version
        finally:
            version.in_flight -= 1
            if version.in_flight == 0:
                version.idle.set()

    # -- tiers ----------------------------------------------------------------------------

    async def page_in(self, version: Version) -> None:
        """Have the engine read `version` into its host cache off the step loop, if it is not
        there; waits (bounded by `adapter_load_timeout_s`). Concurrent requests share one read."""
        if version.kind != "mora" or version.engine_id in self.host_view:
            return  # LoRA adapters: vLLM reads them in the step, as stock vLLM does
        task = self._paging.get(version.engine_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._page_in(version))
            self._paging[version.engine_id] = task
            task.add_done_callback(lambda _t, i=version.engine_id: self._paging.pop(i, None))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.settings.adapter_load_timeout_s)
        except TimeoutError:
            raise Unavailable(f"adapter {version.lora_request.lora_name!r} is still being read from disk after "
                              f"{self.settings.adapter_load_timeout_s:g}s; retry") from None

    async def _page_in(self, version: Version) -> None:
        r = version.lora_request
        delay = 0.005
        while True:
            try:
                states = await self.engine.rpc("mora_prefetch", [(r.lora_int_id, r.lora_name, r.lora_path)])
            except EngineError as e:
                raise Unavailable(f"adapter {r.lora_name!r} cannot be read from disk: {e}") from None
            state = str(states.get(r.lora_int_id, states.get(str(r.lora_int_id), "")))
            if state in ("device", "host", "staged", "step"):
                self.host_view.add(version.engine_id)
                return
            if state.startswith("error"):
                raise Unavailable(f"adapter {r.lora_name!r} cannot be read from its snapshot: {state[7:]}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def set_host_view(self, registered: list[int]) -> None:
        """vLLM's host cache as the engine's status reports it (ids paged in since are kept)."""
        self.host_view = set(registered) | {i for i in self.host_view if i in self._paging}

    # -- lazy registration ----------------------------------------------------------------

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

    # -- merging --------------------------------------------------------------------------

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

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        with contextlib.suppress(OSError):
            for p in self._snapshots.iterdir():
                self._remove_snapshot(p)
        shutil.rmtree(self._snapshots, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
