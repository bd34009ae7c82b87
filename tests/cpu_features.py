"""What this machine's CPU (and the software built for it) can run, for tests that need a feature.

A test that needs a CPU feature asks for it here, explicitly, and skips naming the feature where
it is missing; nothing else in the suite may depend on the CPU's instruction set. To run the
suite as an AVX2-only machine does, see `tests/emulate_cpu/sitecustomize.py` (README, "Testing").
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

EMULATE_DIR = Path(__file__).resolve().parent / "emulate_cpu"


@functools.cache
def vllm_cpu_has_op(op: str) -> bool:
    """Whether vLLM's CPU kernel library for this CPU (`vllm._C`, `_C_AVX512` or `_C_AVX2`) has `op`."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, op)


def requires_vllm_cpu_op(op: str, what: str) -> pytest.MarkDecorator:
    """Skip unless vLLM's CPU kernels for this CPU have `torch.ops._C.<op>` (`what` needs it)."""
    from mora.vllm_plugin.quantized import cpu_kernel_build

    def missing() -> bool:
        try:
            return not vllm_cpu_has_op(op)
        except Exception:  # noqa: BLE001 - no vLLM CPU build at all: the op is missing too
            return True

    build, lacks = cpu_kernel_build()
    reason = f"{what} needs torch.ops._C.{op}, which vLLM's CPU kernels for this CPU ({build}) lack"
    if lacks:
        reason += f" (the CPU has no {lacks})"
    return pytest.mark.skipif(missing(), reason=reason)


def emulated_avx2_env() -> dict[str, str]:
    """Environment for a subprocess that must see an AVX2-only CPU (see tests/emulate_cpu)."""
    path = os.pathsep.join(p for p in (str(EMULATE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "MORA_EMULATE_CPU": "avx2"}
