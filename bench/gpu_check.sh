#!/usr/bin/env bash
# The Triton MoRA kernel on a real CUDA GPU: correctness (compiled, no interpreter) and the
# kernel benchmark (TFLOP/s and GB/s against the GPU's peak). Needs python3 with torch and
# triton and a CUDA device; no vLLM, no network, no install. About 2-4 minutes.
#
#   bash bench/gpu_check.sh            # PYTHON=... to pick another interpreter
#
# Correctness runs tests/test_kernels.py under pytest when pytest is importable (every backend
# on CUDA tensors, CUDA-graph replay included), else a self-contained check of the Triton
# backend against the reference. Exit status: non-zero if either part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET MORA_KERNEL_BACKEND

"$PY" - <<'EOF' || { echo "gpu_check: no usable torch + triton + CUDA"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
      f"capability {torch.cuda.get_device_capability()}")
EOF

status=0
echo "== correctness =="
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py || status=1
else
    echo "(pytest not installed: self-contained check of the triton backend)"
    timeout 240 "$PY" - <<'EOF' || status=1
import torch
from mora.kernels import ShardLayout, SlotTable, mora_apply, prepare_batch
from mora.spec import MoraSpec, MoraType

torch.manual_seed(0)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
failures = 0
for dtype in TOL:
    for in_f, out_f, cuts in [(56, 72, [(0, 72), (5, 50)]), (96, 40, [(0, 40)]), (4096, 4096, [(0, 4096), (1024, 2048)])]:
        for out_start, out_end in cuts:
            lay = ShardLayout(in_f, out_f, out_start=out_start, out_end=out_end)
            entries = [(6, 16), (1, 12), (2, 10), (3, 14), (4, 9), (6, 8), None] if in_f < 1000 else [(6, 256), (1, 362), (6, 128)]
            table = SlotTable(lay, len(entries), n_max=max(e[1] for e in entries if e), dtype=dtype, device="cuda")
            for s, e in enumerate(entries):
                if e:
                    spec = MoraSpec(in_f, out_f, e[1], MoraType(e[0]))
                    table.set_slot(s, (torch.randn(e[1], e[1]) / e[1] ** 0.5).to("cuda", dtype), spec)
            for T in (1, 7, 133):
                for merged in (-1, 0):
                    slot = torch.randint(-1, len(entries), (T,), device="cuda")
                    meta = prepare_batch(slot, len(entries), merged_slot=merged)
                    x = torch.randn(T, in_f, device="cuda", dtype=dtype)
                    y0 = torch.randn(T, lay.local_out, device="cuda", dtype=dtype)
                    got, ref = y0.clone(), y0.clone()
                    mora_apply(got, x, table, meta, backend="triton")
                    mora_apply(ref, x, table, meta, backend="reference")
                    torch.cuda.synchronize()
                    err = (got.double() - ref.double()).abs().max().item()
                    scale = max(1.0, ref.double().abs().max().item())
                    untouched = slot == -1 if merged < 0 else slot == merged
                    ok = err <= TOL[dtype] * scale and torch.equal(got[untouched], y0[untouched])
                    if not ok:
                        failures += 1
                        print(f"FAIL {dtype} {in_f}->{out_f} [{out_start},{out_end}) T={T} merged={merged}: err {err:.3g}")
print("triton vs reference:", "all passed" if not failures else f"{failures} failures")
raise SystemExit(1 if failures else 0)
EOF
fi

echo "== benchmark (triton backend, bf16) =="
timeout 200 "$PY" -m bench.kernel --device cuda --rounds 5 || status=1
exit $status
