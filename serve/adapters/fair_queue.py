"""Blocking jobs run one at a time off the event loop, with callers (tenants) taking turns.

Adapter validation reads and checks files and tensors for a while (a 15 MB safetensors header
takes a tenth of a second or more to parse), holding the GIL most of that time. Run side by side,
150 invalid loads from one tenant stalled an admin's load for 14 s. Here each key (a tenant) has
its own queue and the one worker takes a job from each queue in turn, so another tenant's job
starts after at most the one already running, however many one tenant has queued (and the
registry bounds how many a tenant may queue at all: `management_calls_per_tenant`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T")


class FairQueue:
    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[tuple[Callable[[], Any], asyncio.Future]]] = OrderedDict()
        self._worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def run(self, key: str, job: Callable[[], T]) -> T:
        """`job()` in a worker thread, after at most one job of every other key queued before it."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append((job, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return await future

    def _next(self) -> tuple[str, Callable[[], Any], asyncio.Future, deque] | None:
        while self._queues:
            key, queue = self._queues.popitem(last=False)  # the key whose turn it is
            while queue:
                job, future = queue.popleft()
                if not future.cancelled():  # its caller went away: skip it
                    return key, job, future, queue
        return None

    async def _work(self) -> None:
        while (item := self._next()) is not None:
            key, job, future, rest = item
            try:
                result = await asyncio.to_thread(job)
            except BaseException as e:
                if not future.done():
                    future.set_exception(e)
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
            else:
                if not future.done():
                    future.set_result(result)
            finally:
                # Back of the line only now: a key that queued while this job ran goes first.
                queued = self._queues.pop(key, None)  # jobs this key queued while its job ran
                if queued:
                    rest.extend(queued)
                if rest:
                    self._queues[key] = rest
