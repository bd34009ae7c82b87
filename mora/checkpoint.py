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

import io
import json
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
)
from mora.spec import MoraType

__all__ = [
    "ADAPTER_CONFIG",
    "BIN_WEIGHTS",
    "SAFETENSORS_WEIGHTS",
    "AdapterConfig",
    "LoraAdapter",
    "MoraAdapter",
    "load_adapter",
    "load_mora_adapter",
    "read_config",
    "save_lora_adapter",
    "save_mora_adapter",
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
MAX_FILE_BYTES = 8 << 30


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

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: r for k, r in v.items() if r < 1}
        if bad:
            raise ValueError(f"ranks must be >= 1: {bad}")
        return v

    def rank_for(self, module: str) -> int:
        """The LoRA rank of `module`, resolved through `rank_pattern` exactly as peft 0.9 does."""
        keys = list(self.rank_pattern) + list(self.alpha_pattern)
        key = next((k for k in keys if re.match(rf".*\.{k}$", module)), module)
        return self.rank_pattern.get(key, self.r)

    def targets(self, module: str) -> bool:
        """Whether `module` (a path like `model.layers.0.self_attn.q_proj`) is targeted."""
        t = self.target_modules
        if isinstance(t, str):
            found = re.fullmatch(t, module) is not None
        else:
            found = module in t or any(module.endswith(f".{name}") for name in t)
        if not found or self.layers_to_transform is None:
            return found
        patterns = self.layers_pattern
        if not patterns:
            m = re.match(r".*\.[^.]*\.(\d+)\.", module)
        else:
            m = None
            for p in [patterns] if isinstance(patterns, str) else patterns:
                m = re.match(rf".*\.{p}\.(\d+)\.", module)
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
        raise AdapterNotFoundError(f"adapter directory {str(p)!r} does not exist", adapter=name)
    return p


def read_config(path: str | Path, name: str | None = None) -> AdapterConfig:
    """Parse and type-check `adapter_config.json` in `path`."""
    name = name or Path(path).name
    file = _directory(path, name) / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterNotFoundError(f"{ADAPTER_CONFIG} is missing", adapter=name)
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterConfigError(f"{ADAPTER_CONFIG} is larger than {MAX_CONFIG_BYTES} bytes", adapter=name)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterConfigError(f"{ADAPTER_CONFIG} is not valid JSON: {e}", adapter=name) from None
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{ADAPTER_CONFIG} must hold a JSON object", adapter=name)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterConfigError(
            "only LoRA-type peft adapters are supported", adapter=name, expected="LORA", found=raw.get("peft_type")
        )
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
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


def _read_file(path: Path, name: str) -> bytes:
    """The whole file, read (never memory-mapped: a file truncated under a mapping kills the
    process with SIGBUS; a short read here is just a parse error)."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise AdapterWeightsError(f"{path.name} is larger than {MAX_FILE_BYTES} bytes", adapter=name)
    return path.read_bytes()


def _safetensors_header(data: bytes, name: str) -> dict[str, Any]:
    # Format: 8-byte little-endian header length, then a JSON header of dtype/shape/offsets.
    # Checked before deserializing so that a hostile header cannot request huge allocations.
    if len(data) < 8:
        raise AdapterWeightsError(f"{SAFETENSORS_WEIGHTS} is unreadable: shorter than its header", adapter=name)
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise AdapterWeightsError(f"{SAFETENSORS_WEIGHTS} is unreadable: header claims {n} bytes, file has {len(data) - 8}", adapter=name)
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterWeightsError(f"{SAFETENSORS_WEIGHTS} is unreadable: bad header ({e})", adapter=name) from None
    if not isinstance(header, dict):
        raise AdapterWeightsError(f"{SAFETENSORS_WEIGHTS} is unreadable: bad header", adapter=name)
    return header


def _read_tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    st, bn = directory / SAFETENSORS_WEIGHTS, directory / BIN_WEIGHTS
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        data = _read_file(st, name)
        for key, meta in _safetensors_header(data, name).items():
            if key != "__metadata__":
                shape = meta.get("shape") if isinstance(meta, dict) else None
                if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise AdapterWeightsError(f"{SAFETENSORS_WEIGHTS} is unreadable: bad shape for {key!r}", adapter=name)
                _check_size(name, key, shape)
        try:
            return dict(load_safetensors(data))
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise AdapterWeightsError(f"{SAFETENSORS_WEIGHTS} is unreadable: {e}", adapter=name) from None
    if bn.is_file():
        data = _read_file(bn, name)
        try:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise AdapterWeightsError(
                f"{BIN_WEIGHTS} is not a plain tensor dictionary ({type(e).__name__}: {e})", adapter=name
            ) from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
            raise AdapterWeightsError(f"{BIN_WEIGHTS} must hold a dict of tensors", adapter=name)
        for k, v in loaded.items():
            _check_size(name, k, list(v.shape))
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
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterWeightsError(
                "unexpected tensor key", adapter=name, expected=f"{KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight", found=key
            )
        module = m.group("module")
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterWeightsError("tensor is not floating point", adapter=name, module=module, expected="float16/bfloat16/float32/float64", found=str(t.dtype))
        if t.dim() != 2:
            raise AdapterWeightsError("tensor is not a matrix", adapter=name, module=module, expected="2 dimensions", found=tuple(t.shape))
        (raw.a if m.group("which") == "lora_A" else raw.b)[module] = t
    return raw


def _check_finite(name: str, module: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteWeightsError(f"{bad} non-finite values (NaN or inf)", adapter=name, module=module)


def load_adapter(path: str | Path, name: str | None = None) -> MoraAdapter | LoraAdapter:
    """Read a MoRA or LoRA adapter directory into memory, checking everything that can be
    checked without the base model: config types, tensor keys, dtypes, ranks of 2, square
    MoRA matrices, identical `lora_B` copies, finite values.

    Semantics::

        config = json.load(open(path / "adapter_config.json"))
        tensors = safetensors.torch.load_file(path / "adapter_model.safetensors")
        return MoraAdapter(...) if config.get("use_mora") else LoraAdapter(...)
    """
    directory = Path(path)
    name = name or directory.name
    config = read_config(directory, name)
    raw = _split(_read_tensors(directory, name), name)
    if not raw.a and not raw.b:
        raise AdapterWeightsError("the weights file holds no adapter tensors", adapter=name)
    if config.use_mora:
        for module, b in raw.b.items():
            a = raw.a.get(module)
            if a is None:
                raise AdapterWeightsError("lora_B without lora_A", adapter=name, module=module)
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                raise TiedWeightMismatchError(
                    "the lora_B copy differs from lora_A (MoRA stores one matrix twice)", adapter=name, module=module
                )
        for module, m in raw.a.items():
            if m.shape[0] != m.shape[1]:
                raise AdapterWeightsError("MoRA matrix is not square", adapter=name, module=module, expected="[n, n]", found=list(m.shape))
            _check_finite(name, module, m)
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
    if not isinstance(adapter, MoraAdapter):
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
