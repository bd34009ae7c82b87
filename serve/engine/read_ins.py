"""Page-in reads coalesced into one engine call per round trip.

Each call into the engine runs between two of its steps, and the engine core waits for the
worker's answer before it steps again. With one call per cold adapter, 1,000-adapter traffic
(`bench.scale`) kept the engine core in these round trips for ~12% of its time (py-spy: 146 of
1,254 samples). Here every read asked for while a call is in flight goes into the next call, and
adapters still loading are asked again together (5 ms apart at first, 50 ms at most, as one
adapter's reads were).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from mora.vllm_plugin.worker_api import PageIn, PageInState

__all__ = ["ReadIns"]

FIRST_DELAY_S = 0.005
MAX_DELAY_S = 0.05


class ReadIns:
    """`read_in(item)`: the settled state of `item`'s page-in, through `prefetch(items)` (the
    engine's `mora_prefetch`: where each adapter is, starting the cold ones' reads), shared by
    every caller waiting at the same time."""

    def __init__(self, prefetch: Callable[[list[PageIn]], Awaitable[dict[int, PageInState]]]) -> None:
        self._prefetch = prefetch
        self._waiting: dict[int, tuple[PageIn, list[asyncio.Future[PageInState]]]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def read_in(self, item: PageIn) -> PageInState:
        future: asyncio.Future[PageInState] = asyncio.get_running_loop().create_future()
        entry = self._waiting.get(item.lora_id)
        if entry is None:
            self._waiting[item.lora_id] = (item, [future])
        else:
            entry[1].append(future)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        delay = FIRST_DELAY_S
        while True:
            for lora_id in [k for k, (_, futures) in self._waiting.items() if all(f.done() for f in futures)]:
                del self._waiting[lora_id]  # every caller gave up (timed out): stop asking
            if not self._waiting:
                return
            batch = dict(self._waiting)
            try:
                states = await self._prefetch([item for item, _ in batch.values()])
            except Exception as e:  # noqa: BLE001 - every caller of this call gets the engine's error
                for lora_id, (_, futures) in batch.items():
                    self._waiting.pop(lora_id, None)
                    _settle(futures, error=e)
                continue
            for lora_id in batch:
                state = states.get(lora_id)
                if state is not None and state.settled:
                    _settle(self._waiting.pop(lora_id)[1], state=state)
            if self._waiting.keys() <= batch.keys():  # only reads still loading: ask again later
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)
            else:  # reads asked for during the call: at once
                delay = FIRST_DELAY_S


def _settle(futures: list[asyncio.Future[PageInState]], *, state: PageInState | None = None,
            error: BaseException | None = None) -> None:
    for future in futures:
        if not future.done():
            with contextlib.suppress(asyncio.InvalidStateError):
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(state)
