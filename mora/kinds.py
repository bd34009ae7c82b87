"""Adapter kinds: what differs between a MoRA and a LoRA adapter, behind one interface.

Validation, snapshots, what a server says about an adapter, merge eligibility and page-in all
differ by kind. Everything else (the CLI, the server's registry, tiers, merges and snapshots)
asks `kind_of(adapter)` and calls the `AdapterKind` it gets; this module is the one that tells
the two classes apart (`mora/checkpoint.py` defines them and reads both from disk). The vLLM
worker's side of the same difference, a loaded adapter in vLLM's cache and how it fills a slot,
is `mora/vllm_plugin/models.py`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import torch

from mora.checkpoint import LoraAdapter, MoraAdapter, save_lora_adapter, save_mora_adapter
from mora.containment import (
    MAX_UPDATE_RATIO,
    UpdateReport,
    bounded_report,
    lora_update_ratios,
    mora_update_ratios,
)
from mora.validate import BoundLora, BoundMora, Shapes, bind_lora, bind_mora

__all__ = ["Adapter", "AdapterKind", "CostRow", "bind_adapter", "check_update", "kind_of"]

Adapter = MoraAdapter | LoraAdapter
Bound = BoundMora | BoundLora
CostRow = tuple[str, int, int, int]  # (shape "outxin", rank r, unmerged FLOPs per token, LoRA-at-r FLOPs per token)


class AdapterKind(abc.ABC):
    """What differs between adapter kinds; one instance per kind (`MORA`, `LORA`)."""

    name: ClassVar[str]  # "mora" or "lora" (the proto's ADAPTER_KIND_*)
    size_column: ClassVar[str]  # what an adapter's per-module size is called ("n", "rank")
    pages_in: ClassVar[bool]  # a server reads it into vLLM's host cache off the step loop

    @abc.abstractmethod
    def label(self, adapter: Adapter) -> str:
        """For people: "MoRA type 6", "LoRA"."""

    @abc.abstractmethod
    def type_number(self, adapter: Adapter) -> int:
        """The MoRA type (1, 2, 3, 4 or 6); 0 for LoRA."""

    @abc.abstractmethod
    def modules(self, adapter: Adapter) -> Mapping[str, torch.Tensor]:
        """The modules it updates, each with its first tensor (`M`, or `lora_A`)."""

    @abc.abstractmethod
    def parameters(self, adapter: Adapter, module: str) -> int: ...

    @abc.abstractmethod
    def tensors(self, adapter: Adapter) -> list[torch.Tensor]:
        """Every tensor it holds (what its snapshot stores)."""

    @abc.abstractmethod
    def hollow(self, adapter: Adapter) -> Adapter:
        """The adapter with its tensors on the meta device: shapes and counts, no memory."""

    @abc.abstractmethod
    def save(self, adapter: Adapter, path: str | Path) -> Path: ...

    @abc.abstractmethod
    def bind(self, adapter: Adapter, base_shapes: Shapes) -> Bound:
        """Validated against the base model's `{module: (out, in)}` (shape errors raise)."""

    @abc.abstractmethod
    def ranks(self, adapter: Adapter, bound: Bound) -> dict[str, int]:
        """The LoRA-equivalent rank of each bound module (what `max_lora_rank` bounds)."""

    @abc.abstractmethod
    def cost(self, adapter: Adapter, bound: Bound, module: str) -> CostRow: ...

    def config_problem(self, adapter: Adapter) -> str | None:
        """Why its config cannot be served as it is, or None."""
        return None

    @abc.abstractmethod
    def update_ratios(self, adapter: Adapter, bound: Bound | None, dtype: torch.dtype) -> dict[str, float]:
        """Per module, ||update||_F / 1 (the base norm is divided in by `check_update`), after
        checking that it is finite in the serving dtype."""

    def merge_refusal(self, adapter: Adapter) -> str | None:
        """Why this kind is never merged into the base weights, or None."""
        return None


class _Mora(AdapterKind):
    name, size_column, pages_in = "mora", "n", True

    def label(self, adapter: Adapter) -> str:
        return f"MoRA type {int(adapter.mora_type)}"

    def type_number(self, adapter: Adapter) -> int:
        return int(adapter.mora_type)

    def modules(self, adapter: Adapter) -> Mapping[str, torch.Tensor]:
        return adapter.weights

    def parameters(self, adapter: Adapter, module: str) -> int:
        return adapter.weights[module].numel()

    def tensors(self, adapter: Adapter) -> list[torch.Tensor]:
        return list(adapter.weights.values())

    def hollow(self, adapter: Adapter) -> Adapter:
        return replace(adapter, weights={k: v.to("meta") for k, v in adapter.weights.items()})

    def save(self, adapter: Adapter, path: str | Path) -> Path:
        return save_mora_adapter(adapter, path)

    def bind(self, adapter: Adapter, base_shapes: Shapes) -> Bound:
        return bind_mora(adapter, base_shapes)

    def ranks(self, adapter: Adapter, bound: Bound) -> dict[str, int]:
        return {m: adapter.config.rank_for(m) for m in bound.specs}

    def cost(self, adapter: Adapter, bound: Bound, module: str) -> CostRow:
        spec = bound.specs[module]
        r = adapter.config.rank_for(module)
        return (f"{spec.out_features}x{spec.in_features}", r, spec.unmerged_flops_per_token(),
                2 * r * (spec.in_features + spec.out_features))

    def update_ratios(self, adapter: Adapter, bound: Bound | None, dtype: torch.dtype) -> dict[str, float]:
        if bound is None:
            raise ValueError("a MoRA adapter's update needs its specs: bind it to the base model first")
        return mora_update_ratios(adapter, bound.specs, dtype)


class _Lora(AdapterKind):
    name, size_column, pages_in = "lora", "rank", False  # vLLM reads LoRA adapters in the step, as stock vLLM does

    def label(self, adapter: Adapter) -> str:
        return "LoRA"

    def type_number(self, adapter: Adapter) -> int:
        return 0

    def modules(self, adapter: Adapter) -> Mapping[str, torch.Tensor]:
        return adapter.lora_a

    def parameters(self, adapter: Adapter, module: str) -> int:
        return adapter.lora_a[module].numel() + adapter.lora_b[module].numel()

    def tensors(self, adapter: Adapter) -> list[torch.Tensor]:
        return [*adapter.lora_a.values(), *adapter.lora_b.values()]

    def hollow(self, adapter: Adapter) -> Adapter:
        return replace(adapter, lora_a={k: v.to("meta") for k, v in adapter.lora_a.items()},
                       lora_b={k: v.to("meta") for k, v in adapter.lora_b.items()})

    def save(self, adapter: Adapter, path: str | Path) -> Path:
        return save_lora_adapter(adapter, path)

    def bind(self, adapter: Adapter, base_shapes: Shapes) -> Bound:
        return bind_lora(adapter, base_shapes)

    def ranks(self, adapter: Adapter, bound: Bound) -> dict[str, int]:
        return {m: adapter.config.rank_for(m) for m in bound.shapes}

    def cost(self, adapter: Adapter, bound: Bound, module: str) -> CostRow:
        out_f, in_f = bound.shapes[module]
        r = adapter.lora_a[module].shape[0]
        flops = 2 * r * (in_f + out_f)
        return f"{out_f}x{in_f}", r, flops, flops

    def config_problem(self, adapter: Adapter) -> str | None:
        # peft's default alpha differs between versions; a LoRA update scales with it.
        return None if "lora_alpha" in adapter.config.model_fields_set else "a LoRA adapter_config.json needs lora_alpha"

    def update_ratios(self, adapter: Adapter, bound: Bound | None, dtype: torch.dtype) -> dict[str, float]:
        return lora_update_ratios(adapter, dtype)

    def merge_refusal(self, adapter: Adapter) -> str | None:
        return "it is a LoRA adapter; only MoRA adapters are merged"


MORA, LORA = _Mora(), _Lora()


def kind_of(adapter: Adapter) -> AdapterKind:
    """The kind of `adapter` (the one place that tells MoRA and LoRA adapters apart)."""
    return MORA if isinstance(adapter, MoraAdapter) else LORA


def bind_adapter(adapter: Adapter, base_shapes: Shapes) -> Bound:
    """`bind_mora` or `bind_lora`, by the adapter's kind."""
    return kind_of(adapter).bind(adapter, base_shapes)


def check_update(adapter: Adapter, specs: Mapping | None, base_norms: Mapping[str, float], dtype: torch.dtype,
                 max_ratio: float = MAX_UPDATE_RATIO) -> UpdateReport:
    """Check an adapter (already bound to the base model: `specs` for MoRA) for serving in `dtype`.

    Raises `NonFiniteWeightsError` if a weight or the effective LoRA scale, in `dtype`, is not
    finite, and `UpdateTooLargeError` if a module's update/base ratio exceeds `max_ratio`.

    Semantics (per module)::

        assert torch.isfinite(weights.to(dtype)).all() and torch.isfinite((scale * B).to(dtype)).all()
        ratio = (scale * delta_W).double().norm() / W.double().norm()
        assert ratio <= max_ratio
    """
    bound = BoundMora(adapter, dict(specs)) if specs is not None else None
    norms = kind_of(adapter).update_ratios(adapter, bound, dtype)
    return bounded_report(adapter.name, norms, base_norms, max_ratio)
