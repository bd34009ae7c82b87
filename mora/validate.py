"""Checking an adapter against the base model it is meant for.

`base_shapes` maps every linear module of the base model (paths as in the HF model, e.g.
`model.layers.0.self_attn.q_proj`) to its `(out_features, in_features)`. Validation applies
peft 0.9's rules for `target_modules`, `layers_to_transform` and `rank_pattern`, then checks
each tensor against MoRA's formula for its module; every failure names the adapter, the
module and the expected vs found values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mora.checkpoint import AdapterConfig, LoraAdapter, MoraAdapter
from mora.errors import AdapterError, MissingModuleError, ShapeMismatchError, UnexpectedModuleError
from mora.spec import MoraSpec

__all__ = ["BoundLora", "BoundMora", "Shapes", "bind_lora", "bind_mora"]

Shapes = Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class BoundMora:
    """A MoRA adapter checked against a base model: one spec per module, same keys as weights."""

    adapter: MoraAdapter
    specs: Mapping[str, MoraSpec]

    @property
    def name(self) -> str:
        return self.adapter.name


@dataclass(frozen=True)
class BoundLora:
    """A LoRA adapter checked against a base model."""

    adapter: LoraAdapter
    shapes: Mapping[str, tuple[int, int]]

    @property
    def name(self) -> str:
        return self.adapter.name


_TARGETED: dict[tuple, frozenset[str]] = {}


def _targeted(config: AdapterConfig, base_shapes: Shapes) -> frozenset[str]:
    """The base modules `config` targets, once per distinct selection and base model (a
    page-in binds every adapter it reads; a server's adapters share a few selections)."""
    selection = tuple(tuple(v) if isinstance(v, list) else v
                      for v in (config.target_modules, config.layers_to_transform, config.layers_pattern))
    if len(repr(selection)) > 4096:  # bounded: a hostile config's selection is not kept
        return frozenset(m for m in base_shapes if config.targets(m))
    key = (selection, tuple(base_shapes))
    found = _TARGETED.get(key)
    if found is None:
        if len(_TARGETED) >= 256:
            _TARGETED.clear()
        found = _TARGETED[key] = frozenset(m for m in base_shapes if config.targets(m))
    return found


def _check_modules(name: str, present: set[str], config_targets: frozenset[str], base_shapes: Shapes) -> None:
    for module in sorted(present):
        if module not in base_shapes:
            raise UnexpectedModuleError("the base model has no linear module of this name", adapter=name, module=module)
        if module not in config_targets:
            raise UnexpectedModuleError("weights for a module that target_modules does not select", adapter=name, module=module)
    missing = sorted(config_targets - present)
    if missing:
        raise MissingModuleError(
            f"target_modules selects this module but the checkpoint has no weights for it"
            f"{f' ({len(missing)} modules missing)' if len(missing) > 1 else ''}",
            adapter=name,
            module=missing[0],
        )


def bind_mora(adapter: MoraAdapter, base_shapes: Shapes) -> BoundMora:
    """Validate `adapter` against the base model and return its per-module specs.

    Raises `UnexpectedModuleError`, `MissingModuleError`, `ShapeMismatchError` (the size `n`
    from the formula for that module's features and rank vs the stored one) or
    `UntrainableShapeError`.
    """
    name, config = adapter.name, adapter.config
    targets = _targeted(config, base_shapes)
    _check_modules(name, set(adapter.weights), targets, base_shapes)
    specs: dict[str, MoraSpec] = {}
    for module, M in adapter.weights.items():
        out_f, in_f = base_shapes[module]
        r = config.rank_for(module)
        try:
            spec = MoraSpec.from_rank(in_f, out_f, r, adapter.mora_type)
            spec.check()
        except AdapterError as e:
            raise e.with_context(adapter=name, module=module) from None
        if tuple(M.shape) != (spec.n, spec.n):
            raise ShapeMismatchError(
                f"M does not fit this module (in={in_f}, out={out_f}, r={r}, type {int(spec.mora_type)})",
                adapter=name,
                module=module,
                expected=[spec.n, spec.n],
                found=list(M.shape),
            )
        specs[module] = spec
    return BoundMora(adapter, specs)


def bind_lora(adapter: LoraAdapter, base_shapes: Shapes) -> BoundLora:
    """Validate a plain LoRA adapter: `lora_A [r, in_f]`, `lora_B [out_f, r]` per targeted module."""
    name, config = adapter.name, adapter.config
    targets = _targeted(config, base_shapes)
    _check_modules(name, set(adapter.lora_a), targets, base_shapes)
    for module, a in adapter.lora_a.items():
        out_f, in_f = base_shapes[module]
        r = config.rank_for(module)
        b = adapter.lora_b[module]
        if tuple(a.shape) != (r, in_f):
            raise ShapeMismatchError("lora_A does not fit this module", adapter=name, module=module, expected=[r, in_f], found=list(a.shape))
        if tuple(b.shape) != (out_f, r):
            raise ShapeMismatchError("lora_B does not fit this module", adapter=name, module=module, expected=[out_f, r], found=list(b.shape))
    return BoundLora(adapter, {m: base_shapes[m] for m in adapter.lora_a})
