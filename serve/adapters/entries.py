"""What the registry holds per adapter id: an `Entry`, whose current `Version` requests lease."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from mora.containment import UpdateReport
from mora.kinds import Adapter, AdapterKind, kind_of
from serve.engine import AdapterHandle

__all__ = ["Entry", "Version"]


@dataclass
class Version:
    number: int
    engine_id: int
    snapshot: Path
    adapter: Adapter
    source: str
    handle: AdapterHandle  # how the engine names this version
    report: UpdateReport | None = None  # update/base ratios: decides whether it may be merged
    nbytes: int = 0  # the snapshot's tensor bytes (the disk budget counts them)
    pinned: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def kind(self) -> AdapterKind:
        return kind_of(self.adapter)


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


