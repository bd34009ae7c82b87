"""The worker's adapter stager (mora/vllm_plugin/tiers.py), without an engine: a snapshot
already in the page cache is staged in the call that asks for it; one on disk is read on the
stager's thread, and a step's thread never waits for the disk."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mora.vllm_plugin.tiers import Stager, TierStats, read_snapshot, snapshot_in_page_cache
from mora.vllm_plugin.worker_api import Residence


def _snapshot(folder: Path, size: int = 300_000) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(size))
    return folder


def _file_system(path: Path) -> str:
    """The type of the file system `path` is on (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fs = line.split()[:3]
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fs
    return kind


def _evict(folder: Path, attempts: int = 50) -> None:
    """Drop the folder's files from the page cache (a disk-backed file system honours it).

    DONTNEED is advice: a page whose buffers the ext4 journal still holds just after the write
    stays cached (seen once in CI), so the advice is repeated until nothing is left, a bounded
    number of times; the caller then asserts the files are gone."""
    for _ in range(attempts):
        for f in folder.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if not snapshot_in_page_cache(folder):
            return
        time.sleep(0.1)


def test_a_cached_snapshot_is_found_without_reading_the_disk(tmp_path):
    folder = _snapshot(tmp_path / "a")
    read_snapshot(folder)
    assert snapshot_in_page_cache(folder)
    assert not snapshot_in_page_cache(folder, limit=1000)  # too large to read on a step's thread
    fs = _file_system(folder)
    if fs not in ("ext4", "xfs", "btrfs"):
        pytest.skip(f"the test's folder is on {fs or 'an unknown file system'}, which may keep files in memory "
                    "(posix_fadvise DONTNEED): the eviction needs ext4, xfs or btrfs")
    _evict(folder)
    assert not snapshot_in_page_cache(folder), "files just dropped from the page cache must be read from the disk"
    read_snapshot(folder)
    assert snapshot_in_page_cache(folder)


def test_stager_stages_a_cached_snapshot_at_once_and_reads_others_in_the_background(tmp_path):
    release = threading.Event()

    def slow_read(request) -> int:  # the stager's thread: held until the test releases it
        release.wait(30)
        return read_snapshot(request.lora_path)

    cached = {1}
    stats = TierStats()
    stager = Stager(slow_read, stats, capacity=4, cached=lambda r: r.lora_int_id in cached)
    hot = SimpleNamespace(lora_int_id=1, lora_path=str(_snapshot(tmp_path / "hot")))
    cold = SimpleNamespace(lora_int_id=2, lora_path=str(_snapshot(tmp_path / "cold")))
    assert stager.start(hot).residence is Residence.STAGED  # in the same call: one round trip
    assert stager.start(cold).residence is Residence.LOADING
    assert stager.state(2).residence is Residence.LOADING
    release.set()
    deadline = time.monotonic() + 30
    while stager.state(2).residence is not Residence.STAGED:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert stager.take(1) is not None and stager.take(2) is not None
    assert stager.state(1) is None and stager.state(2) is None
    assert [tier for tier, _ in stats.drain().loads] == ["disk", "disk"]


def test_stager_remembers_at_most_its_capacity(tmp_path):
    stager = Stager(lambda r: 0, TierStats(), capacity=2, cached=lambda r: True)
    for i in range(3):
        stager.start(SimpleNamespace(lora_int_id=i, lora_path=str(tmp_path)))
    assert stager.state(0) is None  # the oldest is forgotten (read again if a step needs it)
    assert stager.state(1).residence is stager.state(2).residence is Residence.STAGED


def test_worker_api_values_decode_from_plain_data():
    """What crosses vLLM's process boundary (dicts, enums as values, tuples as lists) decodes
    back to equal dataclasses, nested ones included, call after call (hints resolved once)."""
    import dataclasses
    import json

    from mora.vllm_plugin.worker_api import (
        EngineStatus,
        MergeState,
        PageIn,
        PageInState,
        Residence,
        SlotInfo,
        TierReport,
    )

    values = [
        PageIn(7, "acme/a", "/snap/a"),
        PageInState(Residence.ERROR, "unreadable"),
        EngineStatus(state=MergeState.PREPARING, merged_id=None, slots=(SlotInfo(0, 7, "mora"), SlotInfo(3, 9, "lora")),
                     registered=(7, 9), pinned=(9,), seconds=1.5, graph_safe=True),
        TierReport({"host_hits": 3}, (("disk", 0.25), ("host", 0.0))),
    ]
    for value in values:
        plain = json.loads(json.dumps(dataclasses.asdict(value)))  # lists for tuples, enum values as strings
        for _ in range(2):
            decoded = type(value).decode(plain)
            assert decoded == value and type(decoded) is type(value)
        assert type(value).decode(value) is value
