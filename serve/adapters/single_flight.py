"""One task per key: concurrent callers asking for the same thing share one run of it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """Runs `make()` once per key while it is in flight; every caller of that key awaits it,
    each for at most its own `timeout` (the run goes on for the others: a caller that gives up
    does not cancel it)."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[T]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._tasks

    async def run(self, key: K, make: Callable[[], Awaitable[T]], timeout: float, on_timeout: Callable[[], Exception]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(make())
            self._tasks[key] = task
            task.add_done_callback(lambda _t, k=key: self._tasks.pop(k, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise on_timeout() from None
