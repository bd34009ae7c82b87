"""Benchmarks run as a CPU of a lesser ISA path would run them (`--isa avx2`).

No AVX2-only machine is at hand here, so a benchmark emulates one on an AVX-512 CPU: the native
kernel takes the path (`MORA_CPU_ISA`), and everything else the run does is held to the same
instruction set, so that a ratio compares what that CPU would run on both sides. For avx2 that
is the suite's emulation, `tests/emulate_cpu/sitecustomize.py`, in every Python process of the
run (the benchmark's own and the servers it starts): torch's, oneDNN's and MKL's kernels capped
at AVX2, vLLM's AVX2 kernel library and non-AMX paths, compiled code cached apart. The portable
path (bench.kernel only: no vLLM) caps torch's GEMMs below AVX (`PORTABLE_LIMITS`).

`run_on(isa, module, argv)` sets the variables and restarts the benchmark under them (torch
reads them when it loads, the emulation when Python starts); with them set it returns at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mora.kernels.native import ENV_ISA, ISAS

__all__ = ["add_isa_argument", "emulated", "isa_held", "run_on"]

REPO = Path(__file__).resolve().parent.parent
EMULATE_DIR = REPO / "tests" / "emulate_cpu"
ENV_EMULATE = "MORA_EMULATE_CPU"
PORTABLE_LIMITS = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"}
SHOWN = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def add_isa_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--isa", choices=["auto", *ISAS], default=None,
                        help=f"the native kernel's ISA path ({ENV_ISA}); avx2 runs everything as a CPU "
                             "without AVX-512 does (tests/emulate_cpu), portable caps torch's GEMMs too")


def _wanted(isa: str) -> dict[str, str]:
    env = {ENV_ISA: isa}
    if isa == "portable":
        env |= PORTABLE_LIMITS
    elif isa == "avx2":
        parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(EMULATE_DIR)]
        env |= {ENV_EMULATE: "avx2", "PYTHONPATH": os.pathsep.join([str(EMULATE_DIR), *parts])}
    return env


def run_on(isa: str, module: str, argv: list[str]) -> None:
    """Restart `python -m module argv` held to path `isa`, unless it is held so already."""
    want = _wanted(isa)
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    os.environ.update(want)
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def isa_held() -> str:
    """What this process's kernels are held to, for a benchmark's header ('' when nothing is)."""
    limits = ", ".join(f"{k}={os.environ[k]}" for k in SHOWN if k in os.environ)
    if not limits:
        return ""
    import torch

    text = f"torch's kernels at {torch.backends.cpu.get_cpu_capability()} ({limits})"
    if os.environ.get(ENV_EMULATE):
        text += (f"; emulated {os.environ[ENV_EMULATE]} CPU (tests/emulate_cpu): torch.cpu reports AVX-512 "
                 f"{torch.cpu._is_avx512_supported()}, AMX {torch.cpu._is_amx_tile_supported()}, so vLLM loads its "
                 "AVX2 kernel library")
    return text


def emulated() -> str:
    """` emulated=avx2` for a summary line when the run emulates a CPU, else ''."""
    cpu = os.environ.get(ENV_EMULATE, "").strip().lower()
    return f" emulated={cpu}" if cpu else ""
