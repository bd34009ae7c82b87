"""`--isa avx2`: a benchmark runs as a CPU without AVX-512 runs it (bench/isa.py), every kernel of
the run held to AVX2 by the suite's own emulation (tests/emulate_cpu), not only the native one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mora.kernels import native

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def held_run() -> list[str]:
    """bench.kernel --isa avx2 on one small case, from an environment that sets nothing."""
    enabled, why = native.native_status()  # loads the library, which knows the CPU's features
    if not enabled:
        pytest.skip(f"no native kernel here: {why}")
    if native._missing("avx2"):
        pytest.skip(f"the CPU lacks {native._missing('avx2')}: no AVX2 path to hold a run to")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MORA_") and k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-m", "bench.kernel", "--isa", "avx2", "--rounds", "1", "--tokens", "16",
                          "--adapters", "1", "--modules", "q_proj", "--copy-mib", "8", "--budget", "0.2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


def test_summary_names_the_path_and_the_emulation(held_run: list[str]) -> None:
    assert held_run[-1].split()[-2:] == ["isa=avx2", "emulated=avx2"]


def test_torch_and_vllm_see_no_avx512(held_run: list[str]) -> None:
    """torch's kernels run at AVX2, and torch.cpu's probes (which vLLM asks to choose its kernel
    library and attention code) answer as on an AVX2 CPU, whatever this CPU has."""
    header = held_run[0]
    assert "products: native grouped_mm, isa=avx2" in header
    assert "torch's kernels at AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)" in header
    assert "torch.cpu reports AVX-512 False, AMX False" in header
