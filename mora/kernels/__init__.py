"""The fused multi-adapter MoRA operator: one call applies many tenants' adapters to a batch.

One documented face, `mora_apply`, several backends with the same signature:

* `reference` - plain torch, a loop over slots (`reference.py`); the definition;
* `torch`     - vectorized torch, the CPU path (`torch_cpu.py`), its float32/bfloat16 products
                in a C++ kernel (`native/`, `torch_native.py`);
* `triton`    - Punica/SGMV-style Triton kernels, the GPU path (`triton_gpu.py`).

Compiled and CUDA-graph-captured forwards call it as the custom op `torch.ops.mora.fused_apply`
(`fused_op.py`) over persistent step metadata (`step.py`, `StepMeta`), vLLM's LoRA-kernel pattern.

`select_backend` (`dispatch.py`) picks one by device (Triton on CUDA when importable, torch
otherwise), logs the choice once, and honours `MORA_KERNEL_BACKEND=reference|torch|triton`;
the vLLM integration calls it once per engine (`MoraRuntime.backend`).
"""

from __future__ import annotations

from mora.kernels.dispatch import BACKENDS, mora_apply, mora_apply_slices, select_backend
from mora.kernels.fused_op import TableGroup
from mora.kernels.step import StepKind, StepMeta
from mora.kernels.table import BatchMeta, ShardLayout, SlotTable, prepare_batch
from mora.kernels.torch_native import slot_order_is_free

__all__ = [
    "BACKENDS",
    "BatchMeta",
    "ShardLayout",
    "SlotTable",
    "StepKind",
    "StepMeta",
    "TableGroup",
    "mora_apply",
    "mora_apply_slices",
    "prepare_batch",
    "select_backend",
    "slot_order_is_free",
]

