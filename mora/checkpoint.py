"""Reading and writing adapter checkpoints in the peft 0.9 layout of the MoRA reference.

A directory holds `adapter_config.json` and `adapter_model.safetensors` (older runs:
`adapter_model.bin`, read with `torch.load(weights_only=True)`, so no pickled objects are ever
executed). Tensors are keyed `base_model.model.<module>.lora_A.weight`; a MoRA module stores
its square `M` there and usually an identical copy under `lora_B` (peft clones tied tensors on
save). A config without `"use_mora": true` is an ordinary LoRA adapter, also read here so that
the server can validate both kinds before anything reaches the engine.

Everything is read into memory: an adapter, once loaded, cannot change when its files do.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from mora.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    AdapterWeightsError,
    NonFiniteWeightsError,
    NotMoraAdapterError,
    TiedWeightMismatchError,
    UnexpectedModuleError,
)
from mora.files import (
    MAX_FILE_BYTES,
    ReadScope,
    loads_bounded,
    read_inside,
    read_safetensors,
)
from mora.spec import MoraType

__all__ = [
    "ADAPTER_CONFIG",
    "MAX_CONFIG_BYTES",
    "BIN_WEIGHTS",
    "SAFETENSORS_WEIGHTS",
    "AdapterConfig",
    "LoraAdapter",
    "MoraAdapter",
    "ReadScope",
    "load_adapter",
    "load_mora_adapter",
    "read_config",
    "save_lora_adapter",
    "save_mora_adapter",
    "weights_limit",
]

ADAPTER_CONFIG = "adapter_config.json"
SAFETENSORS_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_CONFIG_BYTES = 1 << 20
# No real adapter tensor comes near this (a 70B MoRA M is ~2.4M elements, a rank-256 LoRA A of
# a 28672-wide layer ~7M); the cap stops a hostile header from allocating gigabytes.
MAX_TENSOR_ELEMENTS = 1 << 28
MAX_KEY_CHARS = 1024
MAX_PATTERN_CHARS = 4096


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> Any:
    import re2  # google-re2: matching in time linear in the input, whatever the pattern

    return re2.compile(pattern)


def _compile(pattern: str, what: str = "pattern") -> Any:
    """A user-supplied regex compiled with RE2 (linear time: no catastrophic backtracking).
    Patterns RE2 cannot run (backreferences, lookaround) are refused, never run by `re`."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} is longer than {MAX_PATTERN_CHARS} characters")
    try:
        return _compiled(pattern)
    except Exception as e:  # noqa: BLE001 - re2.error
        raise ValueError(f"{what} {pattern[:40]!r} is not a linear-time (RE2) regular expression: {e}") from None


class AdapterConfig(BaseModel):
    """The fields of peft's `LoraConfig` that matter here, plus MoRA's two keys.

    Unknown peft fields are kept (and written back on save) so configs round-trip.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    peft_type: Literal["LORA"] = "LORA"
    r: StrictInt = Field(ge=1)
    target_modules: list[str] | str
    rank_pattern: dict[str, StrictInt] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    lora_alpha: float = 8
    use_rslora: StrictBool = False
    base_model_name_or_path: str | None = None
    use_mora: StrictBool = False
    mora_type: StrictInt = 1
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: StrictInt | list[StrictInt] | None = None
    layers_pattern: str | list[str] | None = None
    use_dora: StrictBool = False
    fan_in_fan_out: StrictBool = False

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | str) -> list[str] | str:
        if not v:
            raise ValueError("target_modules is empty")
        return v

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _null_is_empty(cls, v: object) -> object:
        return {} if v is None else v

    @field_validator("lora_alpha")
    @classmethod
    def _finite_alpha(cls, v: float) -> float:
        # MoRA ignores lora_alpha (its scale is 1), LoRA multiplies by it: a non-finite value is
        # refused for both kinds (a finite one too large for LoRA is the update bound's to refuse).
        if not math.isfinite(v):
            raise ValueError(f"lora_alpha is {v!r}, not finite; it must be a finite number")
        return v

    @field_validator("alpha_pattern")
    @classmethod
    def _finite_alphas(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: a for k, a in v.items() if not math.isfinite(a)}
        if bad:
            raise ValueError(f"alpha_pattern values must be finite numbers: {dict(list(bad.items())[:3])}")
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in v.items() if r < 1}
        if bad:
            raise ValueError(f"ranks must be >= 1: {bad}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _linear_time_target(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):  # a regex; a list holds plain module names
            _compile(v, "target_modules")
        return v

    @field_validator("layers_pattern")
    @classmethod
    def _linear_time_layers(cls, v: str | list[str] | None) -> str | list[str] | None:
        for p in [v] if isinstance(v, str) else (v or []):
            _compile(rf".*\.{p}\.(\d+)\.", "layers_pattern")
        return v

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _linear_time_keys(cls, v: dict[str, object]) -> dict[str, object]:
        for k in v:
            _compile(rf".*\.{k}$", "pattern key")
        return v

    def _pattern_key(self, module: str) -> str:
        keys = list(self.rank_pattern) + list(self.alpha_pattern)
        return next((k for k in keys if _compile(rf".*\.{k}$").match(module)), module)

    def rank_for(self, module: str) -> int:
        """The LoRA rank of `module`, resolved through `rank_pattern` exactly as peft 0.9 does."""
        return self.rank_pattern.get(self._pattern_key(module), self.r)

    def alpha_for(self, module: str) -> float:
        """The LoRA alpha of `module`, resolved through `alpha_pattern` exactly as peft 0.9 does."""
        return self.alpha_pattern.get(self._pattern_key(module), self.lora_alpha)

    def targets(self, module: str) -> bool:
        """Whether `module` (a path like `model.layers.0.self_attn.q_proj`) is targeted."""
        t = self.target_modules
        if isinstance(t, str):
            found = _compile(t).fullmatch(module) is not None
        else:
            found = module in t or any(module.endswith(f".{name}") for name in t)
        if not found or self.layers_to_transform is None:
            return found
        patterns = self.layers_pattern
        if not patterns:
            m = _compile(r".*\.[^.]*\.(\d+)\.").match(module)
        else:
            m = None
            for p in [patterns] if isinstance(patterns, str) else patterns:
                m = _compile(rf".*\.{p}\.(\d+)\.").match(module)
                if m is not None:
                    break
        if m is None:
            return False
        layers = self.layers_to_transform
        index = int(m.group(1))
        return index == layers if isinstance(layers, int) else index in layers

    def to_json_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["peft_type"] = "LORA"
        return data


@dataclass(frozen=True)
class MoraAdapter:
    """A MoRA adapter in memory: its config and one square `M [n, n]` per module."""

    name: str
    config: AdapterConfig
    weights: Mapping[str, torch.Tensor]
    source: Path | None = None

    @property
    def mora_type(self) -> MoraType:
        return MoraType.parse(self.config.mora_type)

    @property
    def num_parameters(self) -> int:
        return sum(m.numel() for m in self.weights.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values())).dtype


@dataclass(frozen=True)
class LoraAdapter:
    """An ordinary LoRA adapter: `lora_A [r, in_f]` and `lora_B [out_f, r]` per module."""

    name: str
    config: AdapterConfig
    lora_a: Mapping[str, torch.Tensor]
    lora_b: Mapping[str, torch.Tensor]
    source: Path | None = None

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.lora_a.values()) + sum(t.numel() for t in self.lora_b.values())


@dataclass
class _RawWeights:
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)


def _directory(path: str | Path, name: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise AdapterNotFoundError(f"adapter directory {p.name[:64]!r} does not exist", adapter=name)
    return p


def read_config(path: str | Path, name: str | None = None, *, allowed: Path | ReadScope | None = None) -> AdapterConfig:
    """Parse and type-check `adapter_config.json` in `path`."""
    name = name or Path(path).name
    file = _directory(path, name) / ADAPTER_CONFIG
    if not os.path.lexists(file):
        raise AdapterNotFoundError(f"{ADAPTER_CONFIG} is missing", adapter=name)
    data = read_inside(file, allowed, name, MAX_CONFIG_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterConfigError(f"{ADAPTER_CONFIG} is not UTF-8", adapter=name) from None
    raw = loads_bounded(text, ADAPTER_CONFIG, name, AdapterConfigError)
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{ADAPTER_CONFIG} must hold a JSON object", adapter=name)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterConfigError(
            "only LoRA-type peft adapters are supported", adapter=name, expected="LORA", found=str(raw.get("peft_type"))[:32]
        )
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))[:64] or 'config'}: {err['msg'][:160]}" for err in e.errors()[:4])
        raise AdapterConfigError(f"invalid {ADAPTER_CONFIG}: {problems}", adapter=name) from None
    if config.use_mora:
        try:
            MoraType.parse(config.mora_type)
        except AdapterConfigError as e:
            raise e.with_context(adapter=name) from None
        for option, bad in (
            ("use_dora", config.use_dora),
            ("bias", config.bias != "none"),
            ("modules_to_save", bool(config.modules_to_save)),
        ):
            if bad:
                raise AdapterConfigError(f"MoRA adapters do not support {option}", adapter=name)
    return config


Shapes = Mapping[str, tuple[int, int]]


def _tensor_limit(key: str, shape: list[int], base_shapes: Shapes | None, name: str) -> None:
    """Shapes a tensor of this key may have, from the base module alone (before any data is read).

    No adapter tensor of a module `(out, in)` has a side over `in + out` (a MoRA `n` is about
    `sqrt((in + out) * r)`, a LoRA rank at most `min(in, out)` to be useful)."""
    if len(key) > MAX_KEY_CHARS:
        raise AdapterWeightsError(f"tensor key longer than {MAX_KEY_CHARS} characters", adapter=name, found=key[:48] + "...")
    _check_size(name, key, shape)
    if base_shapes is None:
        return
    m = _KEY_RE.match(key)
    if m is None:
        raise AdapterWeightsError("unexpected tensor key", adapter=name, expected=f"{KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight",
                                  found=key[:96])
    module = m.group("module")
    if module not in base_shapes:
        raise UnexpectedModuleError("the base model has no linear module of this name", adapter=name, module=module[:96])
    out_f, in_f = base_shapes[module]
    if len(shape) != 2 or max(shape) > in_f + out_f:
        raise AdapterWeightsError("tensor cannot belong to this module", adapter=name, module=module,
                                  expected=f"2 dimensions of at most {in_f + out_f}", found=list(shape)[:4])


def weights_limit(base_shapes: Shapes | None) -> int:
    """The most bytes an adapter's weights file may have for a base model with `base_shapes`
    (every module at its largest MoRA or LoRA size, in 8-byte floats, twice; plus 1 MiB of
    header): what a file whose contents cannot be checked before it is read (a pickle, a
    download) is bounded by."""
    if not base_shapes:
        return MAX_FILE_BYTES
    return min(MAX_FILE_BYTES, (1 << 20) + sum(16 * (o + i) * max(o, i) for o, i in base_shapes.values()))


def _read_tensors(directory: Path, name: str, allowed: Path | ReadScope | None = None,
                  base_shapes: Shapes | None = None) -> dict[str, torch.Tensor]:
    st, bn = directory / SAFETENSORS_WEIGHTS, directory / BIN_WEIGHTS
    if os.path.lexists(st):
        return read_safetensors(st, name, allowed, lambda key, shape: _tensor_limit(key, shape, base_shapes, name))
    if os.path.lexists(bn):
        # A pickle's shapes cannot be read before its data: bound the file by what the base model allows.
        data = read_inside(bn, allowed, name, weights_limit(base_shapes))
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise AdapterWeightsError(f"{BIN_WEIGHTS} is not a plain tensor dictionary ({type(e).__name__})", adapter=name) from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
            raise AdapterWeightsError(f"{BIN_WEIGHTS} must hold a dict of tensors", adapter=name)
        for k, v in loaded.items():
            _tensor_limit(k, list(v.shape), base_shapes, name)
        return dict(loaded)
    raise AdapterNotFoundError(f"no {SAFETENSORS_WEIGHTS} or {BIN_WEIGHTS}", adapter=name)


def _check_size(name: str, key: str, shape: list[int]) -> None:
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_TENSOR_ELEMENTS:
        raise AdapterWeightsError(
            f"tensor {key!r} is implausibly large for an adapter", adapter=name, expected=f"<= {MAX_TENSOR_ELEMENTS} elements", found=numel
        )


def _split(tensors: Mapping[str, torch.Tensor], name: str) -> _RawWeights:
    raw = _RawWeights()
    for key, t in tensors.items():
        if len(key) > MAX_KEY_CHARS:
            raise AdapterWeightsError(f"tensor key longer than {MAX_KEY_CHARS} characters", adapter=name, found=key[:48] + "...")
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterWeightsError(
                "unexpected tensor key", adapter=name, expected=f"{KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight", found=key[:96]
            )
        module = m.group("module")
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterWeightsError("tensor is not floating point", adapter=name, module=module, expected="float16/bfloat16/float32/float64", found=str(t.dtype))
        if t.dim() != 2:
            raise AdapterWeightsError("tensor is not a matrix", adapter=name, module=module, expected="2 dimensions", found=tuple(t.shape))
        (raw.a if m.group("which") == "lora_A" else raw.b)[module] = t
    return raw


def _check_finite(name: str, module: str, t: torch.Tensor) -> None:
    # The least and the greatest value are both finite exactly when every value is (a NaN
    # propagates to both): one reduction and nothing allocated, 6x faster than
    # isfinite().all() on an adapter's small matrices, and page-ins read many
    if t.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(t)):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteWeightsError(f"{bad} non-finite values (NaN or inf)", adapter=name, module=module)


def load_adapter(path: str | Path, name: str | None = None, *, allowed: Path | ReadScope | None = None,
                 base_shapes: Shapes | None = None) -> MoraAdapter | LoraAdapter:
    """Read a MoRA or LoRA adapter directory into memory, checking everything that can be
    checked without the base model: config types, tensor keys, dtypes, ranks of 2, square
    MoRA matrices, identical `lora_B` copies, finite values.

    `allowed`: every file read must be a regular file whose real path lies inside this folder
    (a `ReadScope` that is `exclusive`: also the folder's own file, one link, same filesystem).
    `base_shapes`: the base model's `{module: (out, in)}`; tensor sizes are then checked against
    it from the safetensors header before any tensor data is read.

    Semantics::

        config = json.load(open(path / "adapter_config.json"))
        tensors = safetensors.torch.load_file(path / "adapter_model.safetensors")
        return MoraAdapter(...) if config.get("use_mora") else LoraAdapter(...)
    """
    directory = Path(path)
    name = name or directory.name
    config = read_config(directory, name, allowed=allowed)
    raw = _split(_read_tensors(directory, name, allowed, base_shapes), name)
    if not raw.a and not raw.b:
        raise AdapterWeightsError("the weights file holds no adapter tensors", adapter=name)
    if config.use_mora:
        for module, m in raw.a.items():  # first: NaN != NaN would read as copies that differ
            _check_finite(name, module, m)
        for module, b in raw.b.items():
            a = raw.a.get(module)
            if a is None:
                raise AdapterWeightsError("lora_B without lora_A", adapter=name, module=module)
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                _check_finite(name, module, b)  # a NaN in the copy is named as such (equal to a finite A, B is finite)
                raise TiedWeightMismatchError(
                    "the lora_B copy differs from lora_A (MoRA stores one matrix twice)", adapter=name, module=module
                )
        for module, m in raw.a.items():
            if m.shape[0] != m.shape[1]:
                raise AdapterWeightsError("MoRA matrix is not square", adapter=name, module=module, expected="[n, n]", found=list(m.shape))
        return MoraAdapter(name, config, dict(sorted(raw.a.items())), directory)
    if set(raw.a) != set(raw.b):
        module = sorted(set(raw.a) ^ set(raw.b))[0]
        raise AdapterWeightsError("LoRA module needs both lora_A and lora_B", adapter=name, module=module)
    for module in raw.a:
        a, b = raw.a[module], raw.b[module]
        if b.shape[1] != a.shape[0]:
            raise AdapterWeightsError(
                "lora_B's rank dimension does not match lora_A", adapter=name, module=module, expected=a.shape[0], found=b.shape[1]
            )
        _check_finite(name, module, a)
        _check_finite(name, module, b)
    return LoraAdapter(name, config, dict(sorted(raw.a.items())), dict(sorted(raw.b.items())), directory)


def load_mora_adapter(path: str | Path, name: str | None = None) -> MoraAdapter:
    """Like `load_adapter`, but a plain LoRA adapter is an error (`NotMoraAdapterError`)."""
    adapter = load_adapter(path, name)
    if not adapter.config.use_mora:
        raise NotMoraAdapterError("not a MoRA adapter (adapter_config.json lacks \"use_mora\": true)", adapter=adapter.name)
    return adapter


def _write(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], safe_serialization: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(tensors, str(directory / SAFETENSORS_WEIGHTS), metadata={"format": "pt"})
    else:
        torch.save(tensors, str(directory / BIN_WEIGHTS))


def save_mora_adapter(
    adapter: MoraAdapter, path: str | Path, *, safe_serialization: bool = True, tie_lora_b: bool = True
) -> Path:
    """Write `adapter` in the reference layout (both `lora_A` and the `lora_B` copy by default)."""
    tensors: dict[str, torch.Tensor] = {}
    for module, m in adapter.weights.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = m
        if tie_lora_b:
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = m.clone()
    config = adapter.config.to_json_dict() | {"use_mora": True, "mora_type": int(adapter.mora_type)}
    directory = Path(path)
    _write(directory, config, tensors, safe_serialization)
    return directory


def save_lora_adapter(adapter: LoraAdapter, path: str | Path, *, safe_serialization: bool = True) -> Path:
    """Write a plain LoRA adapter in the peft layout."""
    tensors = {f"{KEY_PREFIX}{m}.lora_A.weight": a for m, a in adapter.lora_a.items()}
    tensors |= {f"{KEY_PREFIX}{m}.lora_B.weight": b for m, b in adapter.lora_b.items()}
    config = adapter.config.to_json_dict() | {"use_mora": False}
    directory = Path(path)
    _write(directory, config, tensors, safe_serialization)
    return directory
