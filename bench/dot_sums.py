"""How this CPU's bfloat16 dot-product instructions sum: which of them the native kernel may use.

The native kernel's outputs are sums over k in order, one rounding per term, from +0, on every
ISA path (batch-invariant, bit-identical across paths). A bf16 dot-product instruction can take
part only if its hardware sums exactly so. This program compares each instruction's results with
models of the sum, over random bf16 operands of several magnitude spreads (cancellation and
rounding both arise), and prints the share of outputs each model reproduces bit for bit:

* `vdpbf16ps` (AVX512_BF16): a pair's two products added one after the other into the float32
  lane, the pair's high half first (`high_first`), or the low half first (`low_first`);
* `tdpbf16ps` (AMX-BF16, a 16 x 16 tile times 32 terms): in order, even term of a pair first
  (`amx_even_first`); odd first; each pair summed exactly and added with one rounding
  (`amx_pair_fused`); all 32 products summed exactly, added once (`amx_exact_once`).

Every model flushes subnormals as the instructions do. A share of 1.000 means that model is the
hardware's sum on every output tried.

    python -m bench.dot_sums    # ends with: vdpbf16ps_high_first=.. vdpbf16ps_low_first=.. amx_even_first=.. ... cpu=..

An instruction the CPU lacks prints `absent`. Needs gcc (12+: the AMX intrinsics).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".c")
KEYS = ("vdpbf16ps_high_first", "vdpbf16ps_low_first", "amx_even_first", "amx_odd_first", "amx_pair_fused",
        "amx_exact_once")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip().replace(" ", "_")
    except OSError:
        pass
    return platform.processor() or "unknown"


def build(workdir: Path) -> Path:
    exe = workdir / "dot_sums"
    flags = ["-O2", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]
    subprocess.run(["gcc", *flags, str(SOURCE), "-o", str(exe), "-lm"], check=True)
    return exe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=1000, help="AMX tiles (16 x 16 outputs each) per spread")
    parser.add_argument("--sums", type=int, default=10000, help="vdpbf16ps sums (16 lanes of 256 terms) per spread")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        out = subprocess.run([str(exe), str(args.tiles), str(args.sums)], check=True, capture_output=True, text=True).stdout
    print(out, end="")
    found = dict(part.split("=", 1) for part in out.split() if "=" in part)
    print(" ".join(f"{k}={found.get(k, 'absent')}" for k in KEYS) + f" cpu={cpu_name()}")


if __name__ == "__main__":
    main()
