"""`mora-serve` with a test-only hold on the engine, so that tests keep requests in flight deterministically.

Tests that need requests in flight (drain on SIGTERM, unload while busy, per-tenant limits, deadlines,
engine death) must not race the engine's speed. This wrapper runs the real server (`serve.server.main`)
with one addition, driven by files in `$MORA_TEST_HOLD_DIR`:

* `armed`: the next request that produces output pauses the whole engine with vLLM's
  `pause_generation(mode="keep")` *before* that output is passed on, so when a client sees its first
  chunk every request in the engine is frozen, unfinished; `paused` is written then.
* `release`: the engine resumes (`resume_generation`), `paused` and `release` are removed.
* `aborts`: one line per engine request the server aborted (the server's abort path, observed).
* `hold-start` (present at launch): the engine's start waits until it is removed, so the server
  stays up and NOT_SERVING for as long as a test needs.
* `hold-tokenize`: while it exists, tokenizing a prompt blocks the thread that does it (`tokenizing`
  is written then). The server must tokenize off the event loop, so it keeps answering meanwhile.
* `hold-validate`: while it exists, validating an adapter blocks the thread that does it (each
  validation appends the adapter id to `validating` when it starts, and to `validated` when it
  ends), so adapter management calls stay in flight for as long as a test needs.
* `hold-pagein`: while it exists, no snapshot is in the page cache as the server sees it (every
  page-in asks the engine), and the engine answers every `mora_prefetch` with LOADING (a disk
  read that never ends; `paging` is written then, and `prefetched` gets the adapter's name), so
  a cold adapter's request stays waiting for its page-in for as long as a test needs.
* `asked`: the adapter names of every `mora_prefetch` (the engine's round trip for a page-in).

Nothing here is reachable in production: the product's entry point is `serve.server:main`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import serve.adapters.tiers
import serve.adapters.validation
import serve.engine
from mora.vllm_plugin.worker_api import PageInState, Residence, WorkerApi
from serve.server import main

HOLD_DIR = Path(os.environ["MORA_TEST_HOLD_DIR"])
_start = serve.engine.Engine.start
_generate = serve.engine.Engine.generate
_abort = serve.engine.Engine.abort
_tokenize = serve.engine.Engine.tokenize
_call = serve.engine.Engine._call
_validate = serve.adapters.validation.AdapterValidator.validate
_in_page_cache = serve.adapters.tiers.snapshot_in_page_cache
_poller: asyncio.Task | None = None


async def _release_when_asked(engine: serve.engine.Engine) -> None:
    while True:
        if (HOLD_DIR / "release").exists():
            if engine.llm is not None and not engine.llm.errored:
                await engine.llm.resume_generation()
            (HOLD_DIR / "paused").unlink(missing_ok=True)
            (HOLD_DIR / "release").unlink()
        await asyncio.sleep(0.05)


async def generate(self: serve.engine.Engine, *args, **kwargs):
    global _poller
    if _poller is None:
        _poller = asyncio.create_task(_release_when_asked(self))
    async for out in _generate(self, *args, **kwargs):
        armed = HOLD_DIR / "armed"
        if armed.exists():
            armed.unlink()
            await self.llm.pause_generation(mode="keep", clear_cache=False)
            (HOLD_DIR / "paused").touch()
        yield out


async def start(self: serve.engine.Engine) -> None:
    while (HOLD_DIR / "hold-start").exists():
        await asyncio.sleep(0.05)
    await _start(self)


async def abort(self: serve.engine.Engine, request_id: str) -> None:
    with open(HOLD_DIR / "aborts", "a") as f:
        f.write(request_id + "\n")
    await _abort(self, request_id)


def tokenize(self: serve.engine.Engine, text: str) -> list[int]:
    if (HOLD_DIR / "hold-tokenize").exists():
        (HOLD_DIR / "tokenizing").touch()
        while (HOLD_DIR / "hold-tokenize").exists():  # blocks this thread, as a huge prompt would
            time.sleep(0.05)
    return _tokenize(self, text)


async def call(self: serve.engine.Engine, method, *args):
    if method is WorkerApi.mora_prefetch:
        with open(HOLD_DIR / "asked", "a") as f:  # every read the engine was asked for
            f.writelines(f"{item.name}\n" for item in args[0])
    if method is WorkerApi.mora_prefetch and (HOLD_DIR / "hold-pagein").exists():
        with open(HOLD_DIR / "prefetched", "a") as f:  # which adapters the engine was asked to read
            f.writelines(f"{item.name}\n" for item in args[0])
        (HOLD_DIR / "paging").touch()
        return {item.lora_id: PageInState(Residence.LOADING) for item in args[0]}
    return await _call(self, method, *args)


def in_page_cache(path, *args, **kwargs) -> bool:
    return not (HOLD_DIR / "hold-pagein").exists() and _in_page_cache(path, *args, **kwargs)


def validate(self: serve.adapters.validation.AdapterValidator, adapter_id: str, *args, **kwargs):
    with open(HOLD_DIR / "validating", "a") as f:
        f.write(adapter_id + "\n")
    while (HOLD_DIR / "hold-validate").exists():  # blocks this thread, as a slow validation would
        time.sleep(0.05)
    try:
        return _validate(self, adapter_id, *args, **kwargs)
    finally:
        with open(HOLD_DIR / "validated", "a") as f:
            f.write(adapter_id + "\n")


serve.adapters.validation.AdapterValidator.validate = validate
serve.adapters.tiers.snapshot_in_page_cache = in_page_cache
serve.engine.Engine._call = call
serve.engine.Engine.start = start
serve.engine.Engine.tokenize = tokenize
serve.engine.Engine.generate = generate
serve.engine.Engine.abort = abort

if __name__ == "__main__":
    sys.exit(main())
