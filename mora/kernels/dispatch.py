"""The fused operator's dispatcher: one face, `mora_apply`, over the backends (see the package
docstring). It sits below the custom op (`fused_op.py` calls it), which the package re-exports.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

from mora.kernels.reference import mora_apply_reference
from mora.kernels.table import BatchMeta, SlotTable
from mora.kernels.torch_cpu import mora_apply_torch, mora_apply_torch_slices

__all__ = ["BACKENDS", "ENV_BACKEND", "mora_apply", "mora_apply_slices", "select_backend"]

log = logging.getLogger(__name__)
ENV_BACKEND = "MORA_KERNEL_BACKEND"

Backend = Callable[[torch.Tensor, torch.Tensor, SlotTable, BatchMeta], None]


def _triton() -> Backend:
    from mora.kernels.triton_gpu import mora_apply_triton

    return mora_apply_triton


BACKENDS: dict[str, Callable[[], Backend]] = {
    "reference": lambda: mora_apply_reference,
    "torch": lambda: mora_apply_torch,
    "triton": _triton,
}
_logged: set[tuple[str, str]] = set()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(device: torch.device | str) -> str:
    """The backend for tensors on `device`: the env override, else triton on CUDA, else torch."""
    device = torch.device(device)
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={forced!r}: expected one of {sorted(BACKENDS)}")
        name, why = forced, f"forced by {ENV_BACKEND}"
    elif device.type == "cuda" and _triton_available():
        name, why = "triton", "CUDA device with Triton"
    else:
        name, why = "torch", f"{device.type} device"
    if (name, device.type) not in _logged:
        _logged.add((name, device.type))
        log.info("MoRA fused operator: %s backend (%s)", name, why)
    return name


def mora_apply(
    y: torch.Tensor, x: torch.Tensor, table: SlotTable, meta: BatchMeta, *, backend: str | None = None
) -> None:
    """Add every token's adapter update to `y`, in place.

    Shapes: `x [T, local_in]` (the input features `table.layout.in_start:in_end` of the module),
    `y [T, local_out]` (its output columns `out_start:out_end`), `meta` from `prepare_batch`.

    Semantics::

        xf = zeros(T, in_f); xf[:, in_start:in_end] = x            # row-parallel shard
        m = meta.merged_slot                                         # -1: nothing merged
        for t in rows of meta's segments:       # all T rows for `prepare_batch`; a step's tokens
            s = meta.slot[t]                    # for a padded forward (`StepMeta.view`)
            if s == m != -1:
                continue                                             # merged: the base path
            upd = mora_forward(xf[t], M[s], spec[s]) if s >= 0 and slot s holds MoRA else 0
            if m >= 0:
                upd -= mora_forward(xf[t], M[m], spec[m])            # undo what the weights hold
            y[t] += upd[out_start:out_end]                           # column-parallel shard

    Rows with slot -1 (and no merged adapter), and rows in no segment, are left bit-identical.
    """
    name = backend or select_backend(x.device)
    BACKENDS[name]()(y, x, table, meta)


def mora_apply_slices(
    y: torch.Tensor,
    x: torch.Tensor,
    tables: Sequence[SlotTable | None],
    meta: BatchMeta,
    offsets: Sequence[int],
    *,
    backend: str | None = None,
) -> None:
    """Packed projections (q/k/v, gate/up): slice `i` writes `y[:, offsets[i]:offsets[i+1]]`.

    Semantics::

        for i, table in enumerate(tables):
            mora_apply(y[:, offsets[i]:offsets[i + 1]], x, table, meta)
    """
    name = backend or select_backend(x.device)
    if name == "torch":  # one gather of x and one scatter into y for all slices
        mora_apply_torch_slices(y, x, tables, meta, offsets)
        return
    for i, table in enumerate(tables):
        if table is not None:
            mora_apply(y[:, offsets[i] : offsets[i + 1]], x, table, meta, backend=name)
