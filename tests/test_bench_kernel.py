"""bench.kernel's bf16 summary: the roofline against the vector-FMA rate (`vs_roofline_fma`) next
to the one against torch's own bf16 GEMM (AMX where the CPU has it), from one run's samples."""

from __future__ import annotations

import re

import pytest

import bench.kernel as kernel

SMALL = ["--rounds", "2", "--tokens", "16", "--adapters", "4", "--modules", "q_proj", "--copy-mib", "8",
         "--budget", "0.2"]


def summary(out: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in out.strip().splitlines()[-1].split())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fma_roofline_is_printed_for_bf16_only(capsys, dtype):
    kernel.main(["--dtype", dtype, *SMALL])
    out = capsys.readouterr().out
    keys = summary(out)
    if dtype == "float32":
        assert "vs_roofline_fma" not in keys and "vs fma" not in out
        return
    # the case's row ends with the float32 GEMM's ms and its ratio; the summary takes the largest
    row = next(line for line in out.splitlines() if line.startswith("q_proj"))
    b32_ms, vs_fma = re.findall(r"([\d.]+)\s+([\d.]+)x\s*$", row)[0]
    assert float(b32_ms) > 0
    assert keys["vs_roofline_fma"] == vs_fma
    assert float(keys["vs_roofline_fma"]) > 0 and float(keys["vs_roofline"]) > 0
