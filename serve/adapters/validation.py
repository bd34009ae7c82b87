"""Checks before anything is registered: adapter ids, paths under the adapter root, and the
adapter's files against the base model (by the mora library), in the engine's dtype.

Nothing unvalidated reaches the engine: an adapter is read into memory and checked here first;
the registry then snapshots exactly those tensors (serve/adapters/snapshots.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from mora.checkpoint import ReadScope, load_adapter
from mora.containment import UpdateReport, base_weight_norms, bounded_report
from mora.errors import ShapeMismatchError
from mora.hf import module_shapes_from_config
from mora.kinds import Adapter, kind_of
from serve.config import ServerSettings
from serve.engine import Engine
from serve.errors import InvalidRequest, PathNotAllowed, short
from serve.metrics import RESERVED_ADAPTER_LABELS

__all__ = ["ADAPTER_ID_MAX", "PATH_MAX_BYTES", "AdapterValidator", "check_adapter_id", "resolve_under_root"]

ADAPTER_ID_MAX = 128  # bytes (UTF-8): ids name snapshot folders, and file names have a byte limit
PATH_MAX_BYTES = 1024


def check_adapter_id(adapter_id: str) -> str:
    if not adapter_id:
        raise InvalidRequest("adapter_id is empty")
    if len(adapter_id.encode("utf-8", "surrogatepass")) > ADAPTER_ID_MAX:
        raise InvalidRequest(f"adapter_id is longer than {ADAPTER_ID_MAX} bytes")
    if not all(c.isascii() and (c.isalnum() or c in "._-") for c in adapter_id) or adapter_id in (".", ".."):
        raise InvalidRequest("adapter_id may only contain ASCII letters, digits, '.', '_' and '-'")
    if adapter_id in RESERVED_ADAPTER_LABELS:
        raise InvalidRequest(f"adapter_id {adapter_id!r} is reserved (it names a metrics series: "
                             f"{', '.join(sorted(RESERVED_ADAPTER_LABELS))})")
    return adapter_id


def resolve_under_root(root: Path, relative: str, where: str = "the adapter root") -> Path:
    """`root/relative` with symlinks resolved; refused if it leaves `root` or is not a directory.

    `root` is the folder the caller may read: `<adapter-root>/<tenant>` for a tenant,
    the adapter root for admins and `--preload`.
    """
    if not relative or "\x00" in relative:
        raise InvalidRequest("adapter path is empty or contains a NUL byte")
    if len(relative.encode("utf-8", "surrogatepass")) > PATH_MAX_BYTES:
        raise InvalidRequest(f"adapter path is longer than {PATH_MAX_BYTES} bytes")
    if os.path.isabs(relative):
        raise PathNotAllowed(f"adapter paths are relative to {where}")
    if os.path.normpath(relative).split(os.sep)[0] == "..":
        raise PathNotAllowed(f"adapter path {short(relative)} leaves {where}")
    base = root.resolve()
    try:
        target = (base / relative).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidRequest(f"adapter path {short(relative)} does not exist in {where}") from None
    except (OSError, RuntimeError) as e:
        raise InvalidRequest(f"adapter path {short(relative)} cannot be resolved: {e.__class__.__name__}") from None
    if not target.is_relative_to(base):
        raise PathNotAllowed(f"adapter path {short(relative)} resolves outside {where}")
    if not target.is_dir():
        raise InvalidRequest(f"adapter path {short(relative)} is not a directory")
    return target


class AdapterValidator:
    """Reads adapters and checks them against the base model (its shapes and weight norms are
    read from the model's files once, on first use)."""

    def __init__(self, settings: ServerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._base_shapes: dict[str, tuple[int, int]] | None = None
        self._base_norms: dict[str, float] = {}
        self._norms_read: set[str] = set()

    def base_shapes(self) -> dict[str, tuple[int, int]]:
        if self._base_shapes is None:
            self._base_shapes = module_shapes_from_config(self.settings.model)
        return self._base_shapes

    def base_norms(self, modules: list[str]) -> dict[str, float]:
        """||W||_F of base modules, read once each (absent: no dense weight, e.g. quantized)."""
        missing = [m for m in modules if m not in self._norms_read]
        if missing:
            self._base_norms.update(base_weight_norms(self.settings.model, missing))
            self._norms_read.update(missing)
        return self._base_norms

    def validate(self, adapter_id: str, directory: Path, allowed: Path, *, exclusive: bool = False,
                 in_dtype: bool = True) -> tuple[Adapter, UpdateReport | None]:
        """The adapter in `directory` (files only under `allowed`; `exclusive`, for a tenant's own
        folder: each file the folder's own, see `ReadScope`), checked against the base model;
        with `in_dtype`, also its update/base ratios in the engine's dtype (mora.errors on failure)."""
        scope = ReadScope(allowed, exclusive=exclusive)
        adapter = load_adapter(directory, adapter_id, allowed=scope, base_shapes=self.base_shapes())
        kind = kind_of(adapter)
        bound = kind.bind(adapter, self.base_shapes())
        max_rank = self.settings.max_lora_rank
        for module, r in kind.ranks(adapter, bound).items():
            if r > max_rank:
                raise ShapeMismatchError("rank exceeds the server's max_lora_rank", adapter=adapter_id, module=module,
                                         expected=f"r <= {max_rank}", found=r)
        problem = kind.config_problem(adapter)
        if problem is not None:
            raise InvalidRequest(f"adapter {adapter_id!r}: {problem}")
        if not in_dtype:  # before the engine starts: its dtype is not known yet
            return adapter, None
        norms = kind.update_ratios(adapter, bound, self.engine.dtype)
        report = bounded_report(adapter.name, norms, self.base_norms(list(kind.modules(adapter))), self.settings.max_update_ratio)
        return adapter, report
