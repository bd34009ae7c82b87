"""Adapter tiers inside a vLLM worker: disk snapshot -> host cache -> device slot.

vLLM 0.32 already pages LoRA adapters: `LRUCacheWorkerLoRAManager.add_adapter` loads an
adapter that is not in its host cache (`max_cpu_loras`, an LRU `_registered_adapters`) from
`lora_path` when a step needs it, evicting the least recently used unpinned one, and
`LRUCacheLoRAModelManager.activate_adapter` moves it into one of `max_loras` device slots
(another LRU, `_active_adapters`). That disk read happens *inside* the engine step, so every
other tenant's step waits for it.

`Stager` moves that read off the step loop: the server asks for a cold adapter when its
request arrives (`mora_prefetch`), a background thread reads the snapshot's files into the OS
page cache, and the step that first needs the adapter parses it from memory. The thread does
file I/O only, never torch: vLLM's CPU kernels (oneDNN) share process-wide state, and native
work on a second thread while the engine steps corrupted the worker's heap (measured). `TierStats` counts what
the caches did (hits, misses, evictions) and how long loads took, by the tier they came from.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mora.vllm_plugin.worker_api import PageInState, Residence, TierReport

__all__ = ["MAX_LOAD_EVENTS", "Stager", "TierStats", "read_snapshot", "snapshot_in_page_cache"]

MAX_LOAD_EVENTS = 4096  # load durations kept between two drains (the server drains every second)
_CHUNK = 1 << 20


def read_snapshot(path: str | os.PathLike) -> int:
    """Read every file of the adapter folder `path` once (into the OS page cache); returns the
    bytes read. Plain file I/O, safe beside engine steps; the parse happens in the step."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            with open(entry.path, "rb", buffering=0) as f:
                while chunk := f.read(_CHUNK):
                    total += len(chunk)
    return total


CACHED_CHECK_BYTES = 8 << 20  # larger snapshots are always read on the stager's thread


def snapshot_in_page_cache(path: str | os.PathLike, limit: int = CACHED_CHECK_BYTES) -> bool:
    """Whether every file of the adapter folder `path` (at most `limit` bytes in all) is in the
    OS page cache, found by reading it with `RWF_NOWAIT` (a read that would wait for the disk
    fails at once instead). Never waits for the disk, so a step's thread may ask: an adapter
    read recently (by its snapshot's validation, or evicted from the host cache since) is
    then staged without a round trip through the stager's thread."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return False
    try:
        files = [e for e in os.scandir(path) if e.is_file(follow_symlinks=False)]
        if sum(e.stat(follow_symlinks=False).st_size for e in files) > limit:
            return False
        buf = bytearray(_CHUNK)
        for entry in files:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                size, offset = os.fstat(fd).st_size, 0
                while offset < size:
                    got = os.preadv(fd, [buf], offset, flag)
                    if got <= 0:
                        return False  # a short read: not all of it is cached
                    offset += got
            finally:
                os.close(fd)
    except OSError:  # BlockingIOError (not cached), EOPNOTSUPP (this file system): the thread reads it
        return False
    return True


class TierStats:
    """Cumulative cache counters and recent load durations of one worker (thread-safe)."""

    COUNTERS = ("host_hits", "host_misses", "device_hits", "device_misses", "host_evictions", "device_evictions")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.COUNTERS, 0)
        self._loads: list[tuple[str, float]] = []

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def loaded(self, tier: str, seconds: float) -> None:
        """An adapter came from `tier` ("disk": snapshot -> host; "host": host -> device slot)."""
        with self._lock:
            if len(self._loads) < MAX_LOAD_EVENTS:
                self._loads.append((tier, seconds))

    def drain(self) -> TierReport:
        with self._lock:
            loads, self._loads = self._loads, []
            return TierReport(dict(self.counts), tuple(loads))


class Stager:
    """Adapters read from disk off the step loop, until a step takes them.

    `load(request)` runs in one background thread (reads are I/O bound; one at a time keeps
    the step loop's CPU share) and must do file I/O only (see the module docstring). At most
    `capacity` staged adapters are remembered; the oldest is forgotten (read again if needed).
    """

    def __init__(self, load: Callable[[Any], Any], stats: TierStats, capacity: int,
                 cached: Callable[[Any], bool] = lambda request: False) -> None:
        self._load = load
        self._cached = cached
        self._stats = stats
        self.capacity = max(1, capacity)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mora-stage")
        self._lock = threading.Lock()
        self._staged: OrderedDict[int, Any] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._errors: dict[int, str] = {}
        self._dropped: set[int] = set()  # removed while loading: discarded when the load ends

    def state(self, lora_id: int) -> PageInState | None:
        """STAGED, LOADING, ERROR (with why) or None (never asked)."""
        with self._lock:
            if lora_id in self._staged:
                return PageInState(Residence.STAGED)
            if lora_id in self._pending:
                return PageInState(Residence.LOADING)
            if lora_id in self._errors:
                return PageInState(Residence.ERROR, self._errors[lora_id])
        return None

    def start(self, request: Any) -> PageInState:
        lora_id = request.lora_int_id
        current = self.state(lora_id)
        if current is not None and current.residence in (Residence.STAGED, Residence.LOADING):
            return current
        if self._cached(request):  # nothing to wait for: staged now, in one round trip
            with self._lock:
                self._errors.pop(lora_id, None)
                self._stage(lora_id, 0)
            self._stats.loaded("disk", 0.0)
            return PageInState(Residence.STAGED)
        with self._lock:
            self._errors.pop(lora_id, None)
            self._pending[lora_id] = self._pool.submit(self._run, request)
        return PageInState(Residence.LOADING)

    def _stage(self, lora_id: int, model: Any) -> None:  # under the lock
        self._staged[lora_id] = model
        while len(self._staged) > self.capacity:
            self._staged.popitem(last=False)

    def _run(self, request: Any) -> None:
        lora_id = request.lora_int_id
        started = time.perf_counter()
        try:
            model = self._load(request)
        except Exception as e:  # noqa: BLE001 - reported to whoever asked, and read again by the step
            with self._lock:
                self._pending.pop(lora_id, None)
                self._errors[lora_id] = f"{e.__class__.__name__}: {e}"[:500]
            return
        self._stats.loaded("disk", time.perf_counter() - started)
        with self._lock:
            self._pending.pop(lora_id, None)
            if lora_id in self._dropped:
                self._dropped.discard(lora_id)
                return
            self._stage(lora_id, model)

    def take(self, lora_id: int) -> Any | None:
        with self._lock:
            return self._staged.pop(lora_id, None)

    def drop(self, lora_id: int) -> None:
        """The adapter was removed: forget it (a load still running is discarded when done)."""
        with self._lock:
            self._staged.pop(lora_id, None)
            self._errors.pop(lora_id, None)
            if lora_id in self._pending:
                self._dropped.add(lora_id)
