"""Merges never change another tenant's answer: while an adapter is merged, only its own requests
run.

A merged adapter's weights are `W + dW` rounded to the serving dtype. Other requests could be
served from them by subtracting `dW` again (the fused operator's merged-slot remap), but in a
16-bit dtype that rounding cannot be undone: their logits move by a little, and a greedy token
flips wherever its margin is smaller (measured: 2-4 of 9 greedy answers of other tenants changed
while ordinary bf16 adapters were merged). So the server never runs another request beside a
merged adapter:

* a request for any other adapter, or for the base model, arriving while an adapter is merged
  waits (`admit`) for an unmerge, which its arrival starts at once (an unmerge swaps the original
  weights back between two steps: milliseconds on the CPU);
* a merge is swapped in (`commit`) only when no request of another adapter is in the engine;
  requests arriving while it waits are admitted (they are served unmerged) and the merge waits
  for them too, giving up after `wait_s` (the policy tries again later).

Every request passes `admit` before it reaches the engine, so no step ever holds a merged adapter
and another request: their tokens are exactly those of unmerged serving, in every dtype, for any
adapter. What it costs is measured by `bench/merge.py` (`isolation_wait_ms`: a foreign request's
wait for the unmerge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = ["MergeGate"]

log = logging.getLogger(__name__)


class MergeGate:
    """Which engine adapter id is merged, and the requests in the engine, in one place.

    `unmerge`: a coroutine function that unmerges whatever is merged and then calls `unmerged()`;
    the gate starts it (once) when a request of another adapter arrives.
    """

    def __init__(self, unmerge: Callable[[], Awaitable[object]]) -> None:
        self._unmerge = unmerge
        self._cond = asyncio.Condition()
        self.merged: int | None = None  # the engine id of the merged adapter
        self._in_flight: Counter[int | None] = Counter()  # engine id (None: base model) -> requests in the engine
        self._unmerging: asyncio.Task | None = None
        self.waits = 0  # requests that have waited for an unmerge (for tests and benchmarks)

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    def foreign(self, engine_id: int) -> int:
        """Requests in the engine that are not `engine_id`'s."""
        return self.in_flight - self._in_flight[engine_id]

    @contextlib.asynccontextmanager
    async def admit(self, engine_id: int | None) -> AsyncIterator[None]:
        """Hold a place in the engine for one request of `engine_id` (None: the base model),
        after an unmerge if another adapter is merged."""
        async with self._cond:
            if self.merged is not None and self.merged != engine_id:
                self.waits += 1
                while self.merged is not None and self.merged != engine_id:
                    self._start_unmerge()
                    await self._cond.wait()
            self._in_flight[engine_id] += 1
        try:
            yield
        finally:
            self._in_flight[engine_id] -= 1
            if not self._in_flight[engine_id]:
                del self._in_flight[engine_id]
            await self._notify()

    def _start_unmerge(self) -> None:
        if self._unmerging is None or self._unmerging.done():
            self._unmerging = asyncio.get_running_loop().create_task(self._run_unmerge())

    async def _run_unmerge(self) -> None:
        try:
            await self._unmerge()
        except Exception:
            log.exception("the unmerge that other requests wait for failed")
            await asyncio.sleep(0.5)  # not a busy loop if the engine keeps refusing
        finally:
            await self._notify()

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def commit(self, engine_id: int, swap_in: Callable[[], Awaitable[object]], wait_s: float) -> bool:
        """Run `swap_in` (the merge's final step) once no request of another adapter is in the
        engine, within `wait_s`; new requests keep being admitted meanwhile. True if swapped in."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        async with self._cond:
            while self.foreign(engine_id):
                left = deadline - loop.time()
                if left <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait(), left)
            # Requests arriving now wait on the lock, then find the adapter merged: they unmerge it.
            await swap_in()
            self.merged = engine_id
            return True

    async def unmerged(self) -> None:
        """The engine has unmerged: waiting requests go."""
        async with self._cond:
            self.merged = None
            self._cond.notify_all()
