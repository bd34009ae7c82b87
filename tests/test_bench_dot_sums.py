"""bench.dot_sums: how the CPU's bf16 dot-product instructions sum, on this CPU.

The avx512_bf16 path rests on `vdpbf16ps` adding a pair's products one at a time, the high half
first (kernel_dp.h): where the CPU has AVX512_BF16 that model must reproduce every output.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_dot_sums_reports_each_instruction():
    flags = _cpu_flags()
    run = subprocess.run([sys.executable, "-m", "bench.dot_sums", "--tiles", "20", "--sums", "60"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = dict(part.split("=", 1) for part in run.stdout.strip().splitlines()[-1].split())
    keys = ("vdpbf16ps_high_first", "vdpbf16ps_low_first", "amx_even_first", "amx_odd_first", "amx_pair_fused",
            "amx_exact_once", "cpu")
    assert tuple(summary) == keys
    if "avx512_bf16" in flags:
        assert summary["vdpbf16ps_high_first"] == "1.000"  # the avx512_bf16 path's model
        assert float(summary["vdpbf16ps_low_first"]) < 1.0  # the operands do tell the orders apart
    else:
        assert summary["vdpbf16ps_high_first"] == "absent"
    if "amx_bf16" in flags:
        assert all(0.0 <= float(summary[k]) <= 1.0 for k in keys[2:6])
    else:
        assert summary["amx_even_first"] == "absent"
