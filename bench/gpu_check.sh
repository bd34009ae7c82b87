#!/usr/bin/env bash
# What a GPU serving MoRA under vLLM relies on, on a real CUDA GPU, without vLLM: needs python3
# with torch (2.11+) and triton (3.6+) and a CUDA device; no vLLM, no network, no install.
# About 10-15 minutes.
#
#   bash bench/gpu_check.sh            # PYTHON=... to pick another interpreter
#
# 1. kernel correctness: tests/test_kernels.py under pytest when pytest is importable (every
#    backend and dtype on CUDA tensors, a CUDA-graph replay included), else a self-contained
#    check of the Triton backend against the reference;
# 2. bench.gpu_contract, in bfloat16 and in float16, each with adapters of all five types at
#    Llama-7B shapes: MoRA-wrapped decoder layers (the project's runtime, layer state, custom ops,
#    merge controller and Triton kernel) captured in real torch.cuda.CUDAGraphs as vLLM captures
#    them (every LoRA case and padded size 1-32, stock-LoRA dummies, empty MoRA tables), replayed
#    by step kind across steps with changing mappings, LoRA beside MoRA, a merge and merged-only
#    steps, against the torch reference; the longest step while a merge proceeds a slice per
#    step against a normal step; prepare + forward under torch.cuda.set_sync_debug_mode("error");
#    then the same stack under torch.compile (inductor, fullgraph, dynamic), traced with empty tables;
# 3. bench.gpu_kernel --device cuda: per type, decode (T=16) and prefill (T=512, 2048) at
#    Llama-7B shapes, the fused op against its roofline (compute at the speed of a same-size
#    matmul vs its compulsory bytes at the copy bandwidth, both measured in the same run).
#
# Ends with one line:
#   graphs_ok=<bool> compile_ok=<bool> sync_free=<bool> merge_stall=<longest merge step / normal step>
#   vs_roofline_t1=.. vs_roofline_t2=.. vs_roofline_t3=.. vs_roofline_t4=.. vs_roofline_t6=.. vs_roofline=<worst>
# Exit status: non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET MORA_KERNEL_BACKEND

"$PY" - <<'PYEOF' || { echo "gpu_check: no usable torch + triton + CUDA"; exit 2; }
import torch, triton
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
      f"capability {torch.cuda.get_device_capability()}")
PYEOF

status=0
echo "== 1. kernel correctness =="
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py || status=1
else
    echo "(pytest not installed: self-contained check of the triton backend)"
    timeout 240 "$PY" - <<'PYEOF' || status=1
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
PYEOF
fi

echo "== 2. CUDA graphs and torch.compile over MoRA-wrapped decoder layers (Llama-7B shapes) =="
graphs_ok=True; compile_ok=True; sync_free=True; stall=0
for dtype in bfloat16 float16; do
    contract=$(timeout 900 "$PY" -m bench.gpu_contract --device cuda --dtype "$dtype" --types 1,2,3,4,6 \
               --hidden 4096 --inter 11008 --layers 1 2>&1) || status=1
    echo "$contract"
    line=$(grep '^GPU_CONTRACT' <<<"$contract")
    [[ "$line" == *"graphs_ok=True"* ]] || graphs_ok=False
    [[ "$line" == *"compile_ok=True"* ]] || compile_ok=False
    [[ "$line" == *"sync_free=True"* ]] || sync_free=False
    ratio=$(sed -n 's/.*merge_step_ms=\([0-9.]*\) normal_step_ms=\([0-9.]*\).*/\1 \2/p' <<<"$line" \
            | awk '{ if ($2 > 0) printf "%.2f", $1 / $2 }')
    stall=$(awk -v a="${ratio:-0}" -v b="$stall" 'BEGIN { print (a > b) ? a : b }')
done

echo "== 3. kernel benchmark per MoRA type (triton backend, bf16) =="
bench=$(timeout 600 "$PY" -m bench.gpu_kernel --device cuda 2>&1) || status=1
echo "$bench"
rooflines=$(grep '^vs_roofline_t1=' <<<"$bench" | tail -1)

[ "$graphs_ok" = True ] || status=1
[ "$compile_ok" = True ] || status=1
[ "$sync_free" = True ] || status=1
[ -n "$rooflines" ] || status=1
echo "graphs_ok=$graphs_ok compile_ok=$compile_ok sync_free=$sync_free merge_stall=$stall ${rooflines:-vs_roofline=nan}"
exit $status
