"""Adapters as vLLM's worker holds them: stock LoRA models and MoRA models, told apart here.

vLLM's LoRA manager keeps a `LoRAModel` per adapter in its host cache and copies it into a
device slot when a step needs it. A MoRA adapter is a `MoraLoRAModel`: no LoRA weights, one
`(M, spec)` per module, written into the MoRA wrappers' slot tables instead of vLLM's stacked
buffers. `mora_model` is the one place that tells the two apart on the worker side (the
library's side is `mora/kinds.py`); the manager asks it how to fill a slot, how slots may move,
and whether an adapter can be merged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Sequence

import torch
from vllm.lora.lora_model import LoRAModel

from mora.checkpoint import MoraAdapter
from mora.spec import MoraSpec

__all__ = ["FIXED", "MoraLoRAModel", "compact_slots", "mora_model", "slot_kind", "stage_local"]


class MoraLoRAModel(LoRAModel):
    """A MoRA adapter as vLLM's manager sees it: no LoRA weights, one `(M, spec)` per module."""

    def __init__(self, lora_model_id: int, rank: int, loras: dict | None = None, *, mora: dict[str, tuple[torch.Tensor, MoraSpec]] | None = None, name: str = "", **kwargs: object) -> None:
        super().__init__(lora_model_id, rank, loras or {}, **kwargs)
        self.mora = mora or {}
        self.name = name

    def clone(self, lora_model_id: int) -> MoraLoRAModel:
        return MoraLoRAModel(lora_model_id, self.rank, mora=dict(self.mora), name=self.name)

    @property
    def num_parameters(self) -> int:
        return sum(m.numel() for m, _ in self.mora.values())

    @functools.cached_property
    def kind(self) -> frozenset[tuple[str, MoraSpec]]:
        """What the fused operator groups work by: the adapter's spec on every module (read
        every step by `mora_compact`, hence cached; `mora` never changes after loading)."""
        return frozenset((module, spec) for module, (_, spec) in self.mora.items())


def mora_model(model: object) -> MoraLoRAModel | None:
    """`model` if it is a MoRA adapter, None for a stock LoRA adapter (or nothing)."""
    return model if isinstance(model, MoraLoRAModel) else None


def slot_kind(model: object) -> str:
    """"mora" or "lora": what a slot holding `model` holds."""
    return "mora" if mora_model(model) is not None else "lora"


FIXED = object()  # a slot `compact_slots` must not touch (a plain LoRA adapter)


def compaction_key(model: object) -> Hashable:
    """What `compact_slots` groups a resident adapter by: its MoRA kind, or FIXED (a LoRA
    adapter lives in vLLM's stacked buffers, indexed by its slot: it never moves)."""
    mora = mora_model(model)
    return FIXED if mora is None else mora.kind


def compact_slots(kinds: Sequence[Hashable | None]) -> dict[int, int]:
    """Moves (`old slot -> new slot`) that leave each kind in consecutive slots.

    `kinds[i]`: the kind of the MoRA adapter in slot `i`, None when free, `FIXED` when it must
    stay. Adapters fill the movable slots from the lowest, kind after kind (kinds in order of
    their lowest slot, adapters of a kind in slot order); an already compact layout needs no
    move, so a steady workload pays nothing.
    """
    movable = [i for i, k in enumerate(kinds) if k is not FIXED]
    held = [i for i in movable if kinds[i] is not None]
    rank: dict[Hashable, int] = {}
    for i in held:
        rank.setdefault(kinds[i], len(rank))
    wanted = sorted(held, key=lambda i: (rank[kinds[i]], i))
    return {old: new for old, new in zip(wanted, movable, strict=False) if old != new}


def stage_local(adapter: MoraAdapter, other_stages: tuple[str, ...]) -> MoraAdapter:
    """`adapter` without the modules under `other_stages` (module-path prefixes ending in `.`,
    the decoder layers other pipeline stages hold)."""
    if not other_stages:
        return adapter
    local = {m: w for m, w in adapter.weights.items() if not m.startswith(other_stages)}
    return dataclasses.replace(adapter, weights=local)
