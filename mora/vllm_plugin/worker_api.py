"""The calls between a server and the MoRA worker extension inside vLLM's workers, typed.

`MoraWorkerExtension` (extension.py) implements `WorkerApi`; a server calls it through vLLM's
`collective_rpc`, every worker (tensor-parallel rank) doing the same, with these dataclasses and
enums as arguments and answers (pickled by vLLM between processes). This module imports no
vLLM: the server's engine face (`serve.engine`) and the worker side share it.

Plain vLLM users call the same methods (`llm.collective_rpc("mora_merge", args=(lora_id,))`);
the answers also read as mappings (`status["merged_id"]`), as they always have.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["EngineStatus", "MergeState", "PageIn", "PageInState", "Residence", "SlotInfo", "TierReport", "WorkerApi",
           "decode_page_ins"]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, resolved once per class (it evaluates every annotation
    string; the engine decodes a page-in request per cold adapter)."""
    return typing.get_type_hints(cls)


class _Mapping:
    """Read access by field name (`status["merged_id"]`, `status.get("state")`), and decoding
    from what vLLM's process boundary makes of a dataclass (a dict, enums as their values,
    tuples as lists)."""

    @classmethod
    def decode(cls, obj: Any) -> Any:
        if isinstance(obj, cls):
            return obj
        hints = _hints(cls)
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in obj:
                values[f.name] = _decode_value(hints[f.name], obj[f.name])
        return cls(**values)

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:  # type: ignore[attr-defined]
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.__dataclass_fields__ else default  # type: ignore[attr-defined]

    def keys(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)  # type: ignore[attr-defined]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


class Residence(enum.StrEnum):
    """Where an adapter is in the worker's tiers, as `mora_prefetch` answers."""

    DEVICE = "device"  # in a device slot
    HOST = "host"  # in vLLM's host cache
    STAGED = "staged"  # read from disk by the stager; the step that needs it parses it from memory
    LOADING = "loading"  # being read from disk off the step loop
    STEP = "step"  # a LoRA adapter: vLLM reads it in the step, as stock vLLM does
    ERROR = "error"  # its snapshot could not be read (`PageInState.error` says why)


@dataclass(frozen=True)
class PageIn(_Mapping):
    """An adapter to read into the host cache off the step loop."""

    lora_id: int
    name: str
    path: str


@dataclass(frozen=True)
class PageInState(_Mapping):
    residence: Residence
    error: str = ""

    @property
    def settled(self) -> bool:
        """Read (or never to be read off the step loop), or failed: no need to ask again."""
        return self.residence is not Residence.LOADING


class MergeState(enum.StrEnum):
    PREPARING = "preparing"  # merged weights being prepared, a slice per call, between steps
    PREPARED = "prepared"  # ready to be swapped in (`mora_merge_commit`)
    MERGED = "merged"  # swapped in: steps use the merged weights
    NONE = "none"  # nothing merged or being merged


@dataclass(frozen=True)
class SlotInfo(_Mapping):
    index: int
    lora_id: int
    kind: str  # "mora" or "lora"


@dataclass(frozen=True)
class EngineStatus(_Mapping):
    """The worker's adapter state: slots, host cache, pins, and the merge (done or under way)."""

    state: MergeState = MergeState.NONE
    merged_id: int | None = None
    merged_slot: int = -1
    layers: int = 0  # layers merged; while preparing, layers to prepare
    layers_prepared: int = 0
    backup_bytes: int = 0  # host memory kept for the exact unmerge
    merged_copy_bytes: int = 0  # packed layers: the merged kernel's weights, beside the original
    changed_elements: int = 0
    seconds: float = 0.0
    packed: bool = False
    slots: tuple[SlotInfo, ...] = ()
    registered: tuple[int, ...] = ()  # adapter ids in the host cache
    pinned: tuple[int, ...] = ()
    capacity: int = 0  # max_cpu_loras
    lora_slots: int = 0  # max_loras
    max_pinned: int = 0
    mora_layers: int = 0  # layers wrapped for MoRA (0: the plugin's wrappers are not installed)
    graph_safe: bool = False  # the MoRA forward runs as custom ops (a GPU, or a compiled CPU model)

    def location(self, lora_id: int) -> str:
        """"device_slot", "host_cache" or "disk_only"."""
        if any(s.lora_id == lora_id for s in self.slots):
            return "device_slot"
        return "host_cache" if lora_id in self.registered else "disk_only"


@dataclass(frozen=True)
class TierReport(_Mapping):
    """Cumulative cache counters, and the load durations since the last report."""

    counts: dict[str, int] = field(default_factory=dict)
    loads: tuple[tuple[str, float], ...] = ()  # (tier the adapter came from, seconds)


class WorkerApi(Protocol):
    """What the worker extension answers (names carry the `mora_` prefix vLLM requires of
    extension methods). Dataclass arguments and answers cross vLLM's process boundary as plain
    data: each side decodes what it receives (`decode`)."""

    def mora_prefetch(self, items: list[PageIn]) -> dict[int, PageInState]:
        """Where each adapter is; a cold MoRA adapter starts loading off the step loop."""

    def mora_pin(self, lora_id: int) -> EngineStatus:
        """Keep an adapter in the host cache for good (it must be there)."""

    def mora_tier_stats(self) -> TierReport: ...

    def mora_merge(self, lora_id: int, background: bool = False, max_bytes: int | None = None,
                   commit: bool = True) -> EngineStatus:
        """Merge a resident MoRA adapter; `background`: prepare a slice per call between steps
        (state PREPARING until done, then MERGED, or PREPARED with `commit=False`)."""

    def mora_merge_commit(self, lora_id: int) -> EngineStatus:
        """Swap a PREPARED merge in."""

    def mora_merge_cancel(self, lora_id: int) -> EngineStatus:
        """Drop a merge being prepared; nothing was swapped in."""

    def mora_unmerge(self, lora_id: int | None = None) -> EngineStatus:
        """Restore the base weights bit for bit."""

    def mora_status(self) -> EngineStatus: ...

    def mora_weight_digest(self) -> dict[str, str]:
        """A SHA-256 of every wrapped layer's base weights (to check that an unmerge restored them)."""


def _decode_value(hint: Any, value: Any) -> Any:
    """`value` (as vLLM's serialization delivers it) as the type `hint` names."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        kinds = [a for a in args if a is not type(None)]
        return _decode_value(kinds[0], value) if len(kinds) == 1 else value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode_value(args[0], v) for v in value)
        return tuple(_decode_value(a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        return {_decode_value(args[0], k): _decode_value(args[1], v) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if isinstance(hint, type) and issubclass(hint, _Mapping):
        return hint.decode(value)
    if hint in (int, float, str, bool):
        return hint(value)
    return value


def decode_page_ins(obj: Any) -> dict[int, PageInState]:
    """`mora_prefetch`'s answer as delivered across vLLM's process boundary."""
    return {int(k): PageInState.decode(v) for k, v in obj.items()}
