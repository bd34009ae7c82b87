"""MoRA on Hugging Face transformers models: inference, training, mixed batches, merging.

This is the plain, readable CPU reference that the serving engine is tested against:

    mm = MoraModel(AutoModelForCausalLM.from_pretrained(base_dir))
    mm.add_adapter(load_mora_adapter(adapter_dir))
    mm.set_adapter("my-adapter")                      # every row uses it
    with mm.adapter_rows(["a", None, "b"]):           # or one adapter per batch row
        model(input_ids)
    mm.merge("a"); ...; mm.unmerge()                  # exact: weights restored bit for bit
    plain = mm.merge_and_unload("a")                  # an ordinary model with the update folded in
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from mora.checkpoint import AdapterConfig, MoraAdapter
from mora.errors import AdapterError, MergeError
from mora.merge import MergeRecord, merge_, remapped_update, unmerge_
from mora.ops import mora_forward
from mora.spec import MoraSpec, MoraType
from mora.validate import BoundMora, bind_mora

__all__ = ["MoraLinear", "MoraModel", "linear_module_shapes", "module_shapes_from_config"]


def linear_module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """`{module path: (out_features, in_features)}` for every `nn.Linear` (also wrapped ones)."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        base = module.base if isinstance(module, MoraLinear) else module
        if isinstance(base, nn.Linear) and not name.endswith(".base"):
            shapes[name] = (base.out_features, base.in_features)
    return shapes


def module_shapes_from_config(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """Linear module shapes of the model in `model_dir`, from its `config.json` alone.

    The model is built on the meta device: no weights are read or allocated.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_module_shapes(model)


class _Selection:
    """Which adapter each batch row uses; shared by all `MoraLinear` of one model."""

    def __init__(self) -> None:
        self.single: str | None = None
        self.rows: list[str | None] | None = None


class MoraLinear(nn.Module):
    """`nn.Linear` plus named MoRA adapters; at most one of them merged into the weight."""

    def __init__(self, base: nn.Linear, selection: _Selection) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ParameterDict()
        self.specs: dict[str, MoraSpec] = {}
        self._selection = selection
        self.merged: tuple[str, MergeRecord] | None = None
        self._spare: torch.Tensor | None = None

    def add(self, name: str, M: torch.Tensor, spec: MoraSpec, *, trainable: bool) -> None:
        w = self.base.weight
        param = nn.Parameter(M.detach().to(device=w.device).clone(), requires_grad=trainable)
        self.adapters[name] = param
        self.specs[name] = spec

    def remove(self, name: str) -> None:
        if self.merged and self.merged[0] == name:
            raise MergeError(f"adapter {name!r} is merged; unmerge it first")
        del self.adapters[name]
        del self.specs[name]

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        M = self.adapters[name]
        return mora_forward(x.to(M.dtype), M, self.specs[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        sel = self._selection
        merged = self.merged[0] if self.merged else None
        if sel.rows is None:
            upd = remapped_update(sel.single, merged, lambda a: self.delta(a, x) if a in self.adapters else None)
            return y if upd is None else y + upd.to(y.dtype)
        if len(sel.rows) != x.shape[0]:
            raise ValueError(f"adapter_rows has {len(sel.rows)} entries for a batch of {x.shape[0]}")
        y = y.clone()
        for name in dict.fromkeys(sel.rows):
            rows = torch.tensor([i for i, r in enumerate(sel.rows) if r == name], device=x.device)
            upd = remapped_update(name, merged, lambda a, rows=rows: self.delta(a, x[rows]) if a in self.adapters else None)
            if upd is not None:
                y.index_add_(0, rows, upd.to(y.dtype))
        return y

    def merge(self, name: str, *, exact: bool = True, safe: bool = True) -> MergeRecord:
        if self.merged is not None:
            raise MergeError(f"adapter {self.merged[0]!r} is already merged into this layer")
        record = merge_(self.base.weight, self.adapters[name].detach(), self.specs[name], exact=exact, safe=safe, spare=self._spare)
        self.merged = (name, record)
        return record

    def unmerge(self) -> None:
        if self.merged is None:
            return
        self._spare = unmerge_(self.base.weight, self.merged[1])
        self.merged = None


class MoraModel:
    """MoRA adapters attached to a transformers model, in place (the model is not copied)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._selection = _Selection()
        self.adapters: dict[str, BoundMora] = {}
        self._merged: str | None = None
        self.base_shapes = linear_module_shapes(model)

    # -- adapters -------------------------------------------------------------------------

    def _layer(self, module: str) -> MoraLinear:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = getattr(parent, child)
        if isinstance(layer, MoraLinear):
            return layer
        if not isinstance(layer, nn.Linear):
            raise AdapterError(f"not an nn.Linear but {type(layer).__name__}", module=module)
        wrapped = MoraLinear(layer, self._selection)
        setattr(parent, child, wrapped)
        return wrapped

    def add_adapter(self, adapter: MoraAdapter | BoundMora, *, name: str | None = None, trainable: bool = False) -> BoundMora:
        """Validate `adapter` against this model and attach it under `name` (default: its own)."""
        bound = adapter if isinstance(adapter, BoundMora) else bind_mora(adapter, self.base_shapes)
        name = name or bound.name
        if name in self.adapters:
            raise AdapterError("an adapter of this name is already attached", adapter=name)
        for module, M in bound.adapter.weights.items():
            self._layer(module).add(name, M, bound.specs[module], trainable=trainable)
        self.adapters[name] = bound
        return bound

    def new_adapter(
        self,
        name: str,
        *,
        r: int,
        mora_type: int = MoraType.SHARING,
        target_modules: Sequence[str],
        rank_pattern: Mapping[str, int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> BoundMora:
        """A trainable adapter initialised like the reference (`M = 0`, so the model is unchanged)."""
        config = AdapterConfig(
            r=r, target_modules=list(target_modules), rank_pattern=dict(rank_pattern or {}),
            use_mora=True, mora_type=int(mora_type), base_model_name_or_path=getattr(getattr(self.model, "config", None), "_name_or_path", None),
        )
        weights = {}
        for module, (out_f, in_f) in self.base_shapes.items():
            if config.targets(module):
                spec = MoraSpec.from_rank(in_f, out_f, config.rank_for(module), mora_type)
                weights[module] = torch.zeros(spec.n, spec.n, dtype=dtype)
        if not weights:
            raise AdapterError(f"target_modules {list(target_modules)} selects no linear module", adapter=name)
        return self.add_adapter(MoraAdapter(name, config, weights), trainable=True)

    def remove_adapter(self, name: str) -> None:
        bound = self._bound(name)
        for module in bound.specs:
            self._layer(module).remove(name)
        del self.adapters[name]

    def _bound(self, name: str) -> BoundMora:
        try:
            return self.adapters[name]
        except KeyError:
            raise AdapterError("no adapter of this name is attached", adapter=name) from None

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable `M` matrices of adapter `name`."""
        return [self._layer(m).adapters[name] for m in self._bound(name).specs]

    def export_adapter(self, name: str) -> MoraAdapter:
        """The adapter's current weights as a `MoraAdapter` (e.g. after training), ready to save."""
        bound = self._bound(name)
        weights = {m: self._layer(m).adapters[name].detach().cpu().clone() for m in bound.specs}
        return MoraAdapter(name, bound.adapter.config, weights)

    # -- selection ------------------------------------------------------------------------

    def set_adapter(self, name: str | None) -> None:
        """Every row of every batch uses adapter `name` (`None`: the base model)."""
        if name is not None:
            self._bound(name)
        self._selection.single = name

    @contextlib.contextmanager
    def adapter_rows(self, names: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row `i` uses adapter `names[i]` (`None`: the base model)."""
        for n in names:
            if n is not None:
                self._bound(n)
        previous = self._selection.rows
        self._selection.rows = list(names)
        try:
            yield
        finally:
            self._selection.rows = previous

    # -- merging --------------------------------------------------------------------------

    @property
    def merged(self) -> str | None:
        return self._merged

    def merge(self, name: str, *, exact: bool = True, safe: bool = True) -> list[MergeRecord]:
        """Fold adapter `name` into the base weights. Other adapters and the base model keep
        giving their own outputs (their rows subtract the merged update)."""
        bound = self._bound(name)
        if self._merged is not None:
            raise MergeError(f"adapter {self._merged!r} is already merged; unmerge it first")
        records: list[MergeRecord] = []
        try:
            for module in bound.specs:
                records.append(self._layer(module).merge(name, exact=exact, safe=safe))
        except Exception:
            for module in bound.specs:
                self._layer(module).unmerge()
            raise
        self._merged = name
        return records

    def unmerge(self) -> None:
        """Undo `merge` (bit-exact when merged with `exact=True`)."""
        if self._merged is None:
            return
        for module in self._bound(self._merged).specs:
            self._layer(module).unmerge()
        self._merged = None

    def merge_and_unload(self, name: str) -> nn.Module:
        """Fold `name` into the weights for good and put plain `nn.Linear` layers back."""
        self.merge(name, exact=False)
        for module in list(self.base_shapes):
            parent_name, _, child = module.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            layer = getattr(parent, child)
            if isinstance(layer, MoraLinear):
                setattr(parent, child, layer.base)
        self.adapters.clear()
        self._merged = None
        return self.model
