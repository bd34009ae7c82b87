"""Numeric containment of one tenant's adapter: what it may do to the shared model and batch.

Two criteria, both on the ratio of a module's update to its base layer (Frobenius norms,
computed in float64 so that the check itself cannot overflow):

    ratio(module) = ||scale * delta_W(module)||_F / ||W(module)||_F

* **Loading** (`mora.kinds.check_update`): every weight and the effective LoRA scale, *converted to the
  serving dtype*, is finite, and `ratio <= max_ratio` for every module (default
  `MAX_UPDATE_RATIO` = 1024: an adapter may scale a layer's output by three orders of
  magnitude, far beyond any trained adapter, whose updates are a few percent of the base).
* **Merging** (`merge_ratio_limit`): merging stores `W + dW` rounded to the serving dtype. Rows
  served from those weights with `dW` subtracted again (the merged-slot remap) see a rounding
  error of at most `u * |W + dW|` (u: the dtype's unit roundoff), a relative error bounded by
  `u * (1 + ratio)`; so does the merged adapter's own output against its unmerged one. A merge
  is allowed only if that bound stays within the dtype's serving tolerance:
  `ratio <= SERVING_TOLERANCE[dtype] / u - 1` (float32: 166, float16: 7.2, bfloat16: 4.1).
  The server never serves other tenants that way (serve/adapters/merge_gate.py: a merged adapter runs
  alone), so their answers are exact; plain vLLM users of the plugin who merge with mixed
  traffic get this bound.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mora.checkpoint import LoraAdapter, MoraAdapter
from mora.delta import delta_weight
from mora.errors import NonFiniteWeightsError, UpdateTooLargeError
from mora.spec import MoraSpec

__all__ = [
    "MAX_UPDATE_RATIO",
    "SERVING_TOLERANCE",
    "UpdateReport",
    "base_weight_norms",
    "bounded_report",
    "lora_scale",
    "lora_update_ratios",
    "merge_ratio_limit",
    "mora_update_ratios",
    "update_norm",
]

MAX_UPDATE_RATIO = 1024.0
# Relative error a tenant's result may pick up from someone else's merge (the merge tests' tolerances).
SERVING_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-12}


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def merge_ratio_limit(dtype: torch.dtype) -> float:
    """The largest update/base ratio whose merge keeps other tenants within `SERVING_TOLERANCE[dtype]`."""
    return SERVING_TOLERANCE[dtype] / unit_roundoff(dtype) - 1


@dataclass(frozen=True)
class UpdateReport:
    """Per-module update/base ratios of one adapter; `worst` is the largest."""

    ratios: Mapping[str, float]

    @property
    def worst(self) -> tuple[str, float]:
        module = max(self.ratios, key=lambda m: self.ratios[m])
        return module, self.ratios[module]

    def merge_refusal(self, dtype: torch.dtype) -> str | None:
        """Why merging this adapter would break the other tenants' results, or None if it would not."""
        module, ratio = self.worst
        limit = merge_ratio_limit(dtype)
        if ratio <= limit:
            return None
        return (f"its update of module {module!r} is {ratio:.3g} times the base layer's norm; merged, the other tenants' "
                f"results would err by up to {unit_roundoff(dtype) * (1 + ratio):.2g} (> the {str(dtype).removeprefix('torch.')} "
                f"tolerance {SERVING_TOLERANCE[dtype]:g}; limit {limit:.3g} times)")


def base_weight_norms(model_dir: str | Path, modules: Iterable[str]) -> dict[str, float]:
    """`||W||_F` (float64) of the base model's `<module>.weight` tensors, read from its safetensors files.

    Only the requested tensors are read, one at a time (memory-mapped), so memory stays bounded
    by the largest layer. Modules stored without a dense weight (quantized) are absent.
    """
    from safetensors import safe_open

    wanted = {f"{m}.weight": m for m in modules}
    directory = Path(model_dir)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    norms: dict[str, float] = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    norms[wanted[key]] = float(torch.linalg.vector_norm(f.get_tensor(key).double()))
    # Modules without a dense `.weight` (a quantized base) are left out: `check_update` then
    # cannot bound their update, and such an adapter is never merged.
    return norms


def lora_scale(adapter: LoraAdapter, module: str) -> float:
    """peft's scaling of a LoRA module: alpha / r (alpha / sqrt(r) with rsLoRA), alpha_pattern applied."""
    config = adapter.config
    r = config.rank_for(module)
    alpha = config.alpha_for(module)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def update_norm(M: torch.Tensor, spec: MoraSpec) -> float:
    """`||delta_weight(M, spec)||_F` without overflow: the update is linear in M, so M is scaled
    to unit max-abs first (the dense update is then computed in float32)."""
    peak = float(M.double().abs().max()) if M.numel() else 0.0
    if peak == 0.0:
        return 0.0
    dense = delta_weight((M.double() / peak).float(), spec, torch.float32)
    return float(torch.linalg.vector_norm(dense.double())) * peak


def _finite_in(name: str, module: str, what: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if not bool(torch.isfinite(t.to(dtype)).all()):
        raise NonFiniteWeightsError(f"{what} is not finite in the serving dtype {str(dtype).removeprefix('torch.')}",
                                    adapter=name, module=module)


def mora_update_ratios(adapter: MoraAdapter, specs: Mapping[str, MoraSpec], dtype: torch.dtype) -> dict[str, float]:
    """||delta_W||_F of each module of a MoRA adapter (its `M`s finite in `dtype`; scale 1)."""
    norms = {}
    for module, M in adapter.weights.items():
        _finite_in(adapter.name, module, "M", M, dtype)
        norms[module] = update_norm(M, specs[module])
    return norms


def lora_update_ratios(adapter: LoraAdapter, dtype: torch.dtype) -> dict[str, float]:
    """||scale * B A||_F of each module of a LoRA adapter (weights and the scale finite in `dtype`)."""
    name, norms = adapter.name, {}
    for module, a in adapter.lora_a.items():
        b = adapter.lora_b[module]
        scale = lora_scale(adapter, module)
        if not math.isfinite(scale) or not math.isfinite(float(torch.tensor(scale, dtype=torch.float64).to(dtype))):
            raise NonFiniteWeightsError(f"the effective scale lora_alpha/r = {scale:.3g} is not finite in "
                                        f"{str(dtype).removeprefix('torch.')}", adapter=name, module=module)
        _finite_in(name, module, "lora_A", a, dtype)
        # vLLM folds the scale into lora_B in the serving dtype.
        _finite_in(name, module, "lora_B * scale", b.double() * scale, dtype)
        a64, b64 = a.double(), b.double()
        # ||B A||_F^2 = trace((B^T B)(A A^T)): r x r products, no dense update needed.
        gram = (b64.T @ b64) * (a64 @ a64.T)
        norms[module] = abs(scale) * math.sqrt(max(0.0, float(gram.sum())))
    return norms


def bounded_report(name: str, update_norms: Mapping[str, float], base_norms: Mapping[str, float],
                   max_ratio: float = MAX_UPDATE_RATIO) -> UpdateReport:
    """The update/base ratio of each module, refused (`UpdateTooLargeError`) above `max_ratio`.
    Modules without a dense base weight (a quantized base) get an unknown (infinite) ratio,
    which is never merged."""
    ratios = {module: _ratio(norm, base_norms.get(module, 0.0)) for module, norm in update_norms.items()}
    for module, ratio in ratios.items():
        if module not in base_norms:
            continue
        if not ratio <= max_ratio:
            raise UpdateTooLargeError("the update is too large relative to the base layer (Frobenius norms)",
                                      adapter=name, module=module, expected=f"<= {max_ratio:g} x", found=f"{ratio:.4g} x")
    return UpdateReport(ratios)


def _ratio(update: float, base: float) -> float:
    if update == 0.0:
        return 0.0
    return update / base if base > 0 else math.inf
