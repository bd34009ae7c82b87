"""Merges: which adapter is merged into the base weights, whether one may be, the transitions
(one at a time), and the automatic policy's loop, in one place.

A merged adapter serves only its own requests (`serve/adapters/merge_gate.py`): a merge is
swapped in only when no other adapter's request is in the engine, and another adapter's request
arriving while it is merged unmerges it first. The engine does the merging (mora/vllm_plugin);
this holds no tensor math.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from serve.adapters.merge_gate import MergeGate
from serve.adapters.policy import MergePolicy
from serve.adapters.tiers import Tiers
from serve.config import ServerSettings
from serve.engine import Engine, EngineError
from serve.errors import FailedPrecondition, ServeError, short

if TYPE_CHECKING:
    from serve.adapters.entries import Entry

__all__ = ["Merges"]

log = logging.getLogger(__name__)


class Merges:
    """The merge state of one engine."""

    def __init__(self, settings: ServerSettings, engine: Engine, tiers: Tiers, on_event: Callable[..., None]) -> None:
        self.settings = settings
        self.engine = engine
        self.tiers = tiers
        self._on_event = on_event
        self.merged: tuple[str, int, str | None] | None = None  # (adapter id, engine id, owner)
        self.backup_bytes = 0  # host memory kept for the exact unmerge
        self.gate = MergeGate(self._unmerge_for_others)  # requests and merges: a merged adapter runs alone
        self.policy = MergePolicy(window_s=settings.merge_window_s, merge_share=settings.merge_share,
                                  unmerge_share=settings.unmerge_share, min_requests=settings.merge_min_requests,
                                  min_dwell_s=settings.merge_min_dwell_s)
        self.last_transition = float("-inf")  # time.monotonic() of the last merge or unmerge
        self._transitions = asyncio.Lock()  # merges and unmerges, one at a time (taken after the registry's lock)

    def is_merged(self, adapter_id: str) -> bool:
        return self.merged is not None and self.merged[0] == adapter_id

    def observe(self, adapter_id: str | None) -> None:
        """A request arrived (for the automatic policy; nothing is kept when it is off)."""
        if self.settings.auto_merge:
            self.policy.observe(adapter_id, time.monotonic())

    def refusal(self, entry: Entry) -> str | None:
        """Why `entry` may not be merged, or None: its kind, a quantized base, or an update too
        large for the serving dtype (docs/security.md, section 2). The one eligibility rule, for
        requests and for the policy."""
        refusal = entry.version.kind.merge_refusal(entry.version.adapter)
        if refusal is not None:
            return refusal
        if self.engine.quantization:  # integer codes cannot take a float update (and be restored exactly)
            return f"the base model is quantized ({self.engine.quantization}); adapters on it are served unmerged only"
        report = entry.version.report
        return None if report is None else report.merge_refusal(self.engine.dtype)

    async def merge(self, entry: Entry, *, manual: bool, trigger: str) -> dict[str, Any]:
        started = time.perf_counter()
        adapter_id = entry.adapter_id
        async with self._transitions:
            if entry.unloading:
                raise FailedPrecondition(f"adapter {short(adapter_id)} is being unloaded")
            refusal = self.refusal(entry)
            if refusal is not None:
                self._on_event("merge", "refused", time.perf_counter() - started, trigger=trigger)
                raise FailedPrecondition(f"adapter {short(adapter_id)} cannot be merged: {refusal}")
            if manual:
                entry.manual_merge = True
            if self.merged is not None:
                if self.merged[0] == adapter_id:
                    return {"seconds": 0.0}
                await self._unmerge_locked(f"making room for {adapter_id}")
            version = entry.version
            engine_id = version.engine_id
            committed: dict[str, Any] = {}

            async def swap_in() -> None:
                committed["status"] = await self.engine.commit_merge(engine_id)

            try:
                await self.tiers.page_in(version, entry.tenant or "")  # a cold adapter is read off the step loop
                await self.engine.add_adapter(version.handle)  # make sure the engine holds it
                _, stall = await self.engine.prepare_merge(engine_id)
                swapped = await self.gate.commit(engine_id, swap_in, self.settings.merge_wait_s)
                if not swapped:
                    await self.engine.cancel_merge(engine_id)
            except EngineError as e:
                with contextlib.suppress(Exception):
                    await self.engine.cancel_merge(engine_id)
                self._on_event("merge", "error", time.perf_counter() - started, trigger=trigger)
                raise FailedPrecondition(f"cannot merge {adapter_id!r}: {e}") from None
            if not swapped:
                self._on_event("merge", "busy", time.perf_counter() - started, trigger=trigger)
                raise FailedPrecondition(
                    f"adapter {short(adapter_id)} was not merged: requests of other adapters stayed in flight for "
                    f"{self.settings.merge_wait_s:g}s (a merged adapter serves only its own requests); retry")
            status = committed["status"]
            self.merged = (adapter_id, engine_id, entry.tenant)
            self.last_transition = time.monotonic()
            self.backup_bytes = status.backup_bytes
        seconds = time.perf_counter() - started
        self._on_event("merge", "ok", seconds, trigger=trigger, adapter=adapter_id, owner=entry.tenant, stall=stall)
        log.info("merged adapter %s (%s) in %.3fs", adapter_id, trigger, seconds)
        return {"seconds": seconds, "stall_seconds": stall, "backup_bytes": status.backup_bytes}

    async def unmerge(self, entry: Entry | None, *, manual: bool, trigger: str, automatic: bool = False) -> dict[str, Any]:
        """Unmerge `entry` if it is the merged adapter (None: whatever is merged). `manual`: the
        caller takes it out of automatic merging, unless `automatic` hands it back."""
        started = time.perf_counter()
        async with self._transitions:
            if entry is not None and manual:
                entry.manual_merge = not automatic
            if self.merged is None or (entry is not None and self.merged[0] != entry.adapter_id):
                return {"seconds": 0.0}
            await self._unmerge_locked(trigger)
        return {"seconds": time.perf_counter() - started}

    async def unmerge_engine_id(self, engine_id: int, trigger: str) -> None:
        """Unmerge the version `engine_id` if it is the merged one (it is being replaced or unloaded)."""
        async with self._transitions:
            if self.merged is not None and self.merged[1] == engine_id:
                await self._unmerge_locked(trigger)

    async def _unmerge_for_others(self) -> None:
        """The gate's unmerge: another adapter's request arrived while one is merged."""
        await self.unmerge(None, manual=False, trigger="isolation")

    async def _unmerge_locked(self, trigger: str) -> None:
        assert self.merged is not None
        adapter_id, _, owner = self.merged
        started = time.perf_counter()
        try:
            await self.engine.unmerge()
        except EngineError as e:
            self._on_event("unmerge", "error", time.perf_counter() - started, trigger=trigger)
            raise FailedPrecondition(f"cannot unmerge {adapter_id!r}: {e}") from None
        self.merged = None
        self.last_transition = time.monotonic()
        self.backup_bytes = 0
        await self.gate.unmerged()
        seconds = time.perf_counter() - started  # the unmerge swaps the original kernels back in one call
        self._on_event("unmerge", "ok", seconds, trigger=trigger, adapter=adapter_id, owner=owner, stall=seconds)
        log.info("unmerged adapter %s (%s)", adapter_id, trigger)

    async def run_policy(self, entries: Callable[[], Iterable[Entry]], serving: Callable[[], bool],
                         stopping: asyncio.Event) -> None:
        """The automatic merge policy's loop: every `policy_interval_s`, merge the adapter that
        had all the traffic, unmerge one whose share fell (another adapter's request unmerges it
        sooner, through the gate)."""
        while not stopping.is_set():
            await asyncio.sleep(self.settings.policy_interval_s)
            if not self.settings.auto_merge or not serving() or self.engine.quantization:
                continue
            self.policy.transitioned(self.last_transition)  # unmerges for other adapters' requests count too
            by_id = {e.adapter_id: e for e in entries()}
            manual = [a for a, e in by_id.items() if e.manual_merge]

            def eligible(a: str, by_id: dict[str, Entry] = by_id) -> bool:
                e = by_id.get(a)
                return e is not None and not e.manual_merge and not e.unloading and self.refusal(e) is None

            decision = self.policy.decide(time.monotonic(), self.merged[0] if self.merged else None, eligible, manual)
            if decision is None:
                continue
            log.info("merge policy: %s %s (%s)", decision.action, decision.adapter_id, decision.reason)
            entry = by_id.get(decision.adapter_id)
            try:
                if entry is None:
                    continue
                if decision.action == "merge":
                    await self.merge(entry, manual=False, trigger="auto")
                else:
                    await self.unmerge(entry, manual=False, trigger="auto")
            except ServeError as e:
                log.warning("merge policy: %s %s failed: %s", decision.action, decision.adapter_id, e)
            self.policy.transitioned(time.monotonic())
