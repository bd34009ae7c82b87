"""serve.engine.read_ins: page-in reads asked for at the same time share one engine call."""

from __future__ import annotations

import asyncio

import pytest

from mora.vllm_plugin.worker_api import PageIn, PageInState, Residence
from serve.engine import EngineError
from serve.engine.read_ins import ReadIns


class Worker:
    """The engine's `mora_prefetch` as the worker answers it: each adapter LOADING for
    `loading[id]` calls, then STAGED (or an error for every call once `fail` is set)."""

    def __init__(self, loading: dict[int, int] | None = None) -> None:
        self.loading = dict(loading or {})
        self.calls: list[list[int]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None  # set: the call waits for it (a call in flight)

    async def prefetch(self, items: list[PageIn]) -> dict[int, PageInState]:
        self.calls.append([i.lora_id for i in items])
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        out = {}
        for i in items:
            left = self.loading.get(i.lora_id, 0)
            self.loading[i.lora_id] = max(0, left - 1)
            out[i.lora_id] = PageInState(Residence.LOADING if left else Residence.STAGED)
        return out


def item(lora_id: int) -> PageIn:
    return PageIn(lora_id, f"a{lora_id}", f"/snapshots/a{lora_id}")


def test_reads_asked_together_share_one_call():
    async def go():
        worker = Worker()
        reads = ReadIns(worker.prefetch)
        states = await asyncio.gather(*(reads.read_in(item(i)) for i in (1, 2, 3)))
        return worker.calls, states

    calls, states = asyncio.run(go())
    assert calls == [[1, 2, 3]]
    assert [s.residence for s in states] == [Residence.STAGED] * 3


def test_a_read_still_loading_is_asked_again_and_the_others_answered_at_once():
    async def go():
        worker = Worker(loading={2: 2})
        reads = ReadIns(worker.prefetch)
        fast = asyncio.ensure_future(reads.read_in(item(1)))
        slow = asyncio.ensure_future(reads.read_in(item(2)))
        first = await fast
        assert not slow.done(), "adapter 1's answer waited for adapter 2's read"
        return worker.calls, first, await slow

    calls, first, second = asyncio.run(go())
    assert calls == [[1, 2], [2], [2]]
    assert first.residence is second.residence is Residence.STAGED


def test_reads_asked_during_a_call_go_into_the_next():
    async def go():
        worker = Worker()
        worker.gate = asyncio.Event()
        reads = ReadIns(worker.prefetch)
        first = asyncio.ensure_future(reads.read_in(item(1)))
        await asyncio.sleep(0.01)  # the first call is in flight, held at the gate
        later = [asyncio.ensure_future(reads.read_in(item(i))) for i in (2, 3, 1)]
        await asyncio.sleep(0.01)
        worker.gate.set()
        await asyncio.gather(first, *later)
        return worker.calls

    assert asyncio.run(go()) == [[1], [2, 3]]  # adapter 1's second caller shares its first read


def test_an_engine_error_reaches_every_caller_of_that_call():
    async def go():
        worker = Worker()
        worker.fail = EngineError("the engine stopped")
        reads = ReadIns(worker.prefetch)
        return await asyncio.gather(*(reads.read_in(item(i)) for i in (1, 2)), return_exceptions=True)

    results = asyncio.run(go())
    assert all(isinstance(r, EngineError) for r in results)


def test_a_caller_that_gave_up_is_not_asked_for_again():
    async def go():
        worker = Worker(loading={1: 1000})
        reads = ReadIns(worker.prefetch)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reads.read_in(item(1)), 0.03)
        calls = len(worker.calls)
        await asyncio.sleep(0.2)
        return calls, len(worker.calls)

    before, after = asyncio.run(go())
    assert after <= before + 1  # at most the call in flight when it gave up
