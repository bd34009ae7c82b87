"""The fused multi-adapter MoRA operator against a per-adapter loop and its roofline.

Llama-2-7B-shaped modules with type-6 adapters at r=8: `q_proj` (4096 -> 4096, n=256) and
`gate_proj` (4096 -> 11008, n=348). `T` tokens are spread round-robin (shuffled) over `A`
adapters, and for every (module, T, A) four things are timed side by side:

* fused  - `mora_apply` with the device's backend (torch on the CPU, triton on CUDA);
* loop   - what a peft-style multi-adapter forward does: for each adapter present in the
           batch, its update on all rows (`mora_forward`), masked to its rows, added to `y`;
* bound  - the same-FLOP lower bound: one dense matmul of all tokens' rotated chunks with a
           single `M` (inputs prepared outside the timing);
* base   - the base layer's matmul `x @ W.T` for the same T (the fused overhead is fused/base);
* copy   - a `copy_` of a buffer larger than the caches: the memory bandwidth of this run;
* bound32 - (bf16/fp16 on the CPU only) the `bound` GEMM in float32: the same FLOPs at the
           CPU's vector-FMA rate.

The roofline of a case is the larger of two lower bounds: compute (the `bound` GEMM's time,
the same FLOPs at the speed this machine runs them) and memory (the op's compulsory traffic,
`x` read, every *distinct* `M` the batch uses read once, `y` read and written, at the copy
bandwidth measured in the same round). `vs_roofline` = fused / roofline. The same-FLOP
bound alone reuses one cache-resident `M` and ignores that a batch of A adapters must read A
different `M`s, which at small T is what the operator's time is made of.

In bf16 on the CPU a second roofline takes `bound32` for compute (`vs_roofline_fma`): where
oneDNN's bf16 GEMM runs on AMX tiles, `bound` is out of reach for products that must sum over k
in order, one rounding per term (AMX's `tdpbf16ps` does not: `python -m bench.dot_sums`), and
the bound such a kernel can meet is the vector FMA rate, with bf16's bytes.

Rounds interleave the candidates (fused next to both loop and bound, the order reversed every
round), so a noisy neighbour hits them alike; times are medians over rounds, ratios medians of
the per-round ratios. On the CPU the thread count is set explicitly
(default 1: on a small shared machine a second thread collides with other work, and the
OpenMP barriers turn that into multi-millisecond stalls). On CUDA the triton backend is
timed with events, and achieved TFLOP/s and GB/s are printed against the GPU's peak.

    python -m bench.kernel                  # ends with: speedup_vs_loop_a16=X vs_bound=Y vs_roofline=Z vs_roofline_t16=...
    python -m bench.kernel --device cuda    # X: smallest loop/fused at A >= 16; Y: largest fused/bound;
                                            # Z: largest fused/roofline (per T: vs_roofline_tT)
    python -m bench.kernel --isa avx2       # the native kernel's AVX2 path, against AVX2 GEMMs
    python -m bench.kernel --dtype bfloat16 # adds vs_roofline_fma=W (against the float32 GEMM's rate)
    MORA_CPU_KERNEL=blas python -m bench.kernel   # CPU products by torch's BLAS, not the native kernel

On the CPU the summary line ends with the native kernel's ISA path (`isa=avx512`), or with
`products=blas`. `--isa` forces a path (`MORA_CPU_ISA`); avx2 and portable also hold torch's
GEMMs (MKL, oneDNN, ATen's kernels) to that instruction set, so that `bound` and `base` are what
that CPU would run (`bench.isa`: the process restarts itself so held).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.isa import add_isa_argument, emulated, isa_held, run_on
from mora.kernels import ShardLayout, SlotTable, mora_apply, prepare_batch, select_backend
from mora.kernels.native import native_isa, native_status
from mora.ops import mora_forward, rope_chunks
from mora.spec import MoraSpec

SHAPES = {"q_proj": (4096, 4096), "gate_proj": (11008, 4096)}  # name: (out_features, in_features)
TOKENS = (16, 128, 512)
ADAPTERS = (1, 4, 16, 64)
CANDIDATES = ("fused", "loop", "bound", "base")
COPY_MIB = 256  # the bandwidth probe: larger than any last-level cache
# Dense bf16 tensor-core TFLOP/s and memory TB/s by device-name fragment (first match wins).
GPU_PEAKS = [
    ("GH200", 989.0, 4.0), ("H200", 989.0, 4.8), ("H100 PCIe", 756.0, 2.0), ("H100", 989.0, 3.35),
    ("A100", 312.0, 2.0), ("L40S", 362.0, 0.864), ("L4", 121.0, 0.3), ("A10G", 70.0, 0.6), ("A10", 125.0, 0.6),
]


@dataclass
class Case:
    module: str
    T: int
    A: int
    present: int
    run: dict[str, Callable[[], object]]
    flops: int  # of the fused update (multiply-adds count 2)
    bytes: int  # the fused op's compulsory traffic: x, the distinct M's used, y read and written


def build_case(module: str, T: int, A: int, W: torch.Tensor, dtype: torch.dtype, device: str, backend: str,
               copy: Callable[[], object]) -> Case:
    out_f, in_f = SHAPES[module]
    spec = MoraSpec.from_rank(in_f, out_f, 8, 6)
    g = torch.Generator().manual_seed(T * 1000 + A)
    table = SlotTable(ShardLayout(in_f, out_f), A, n_max=spec.n, dtype=dtype, device=device)
    Ms = [(torch.randn(spec.n, spec.n, generator=g) * 0.02).to(device, dtype) for _ in range(A)]
    for s, M in enumerate(Ms):
        table.set_slot(s, M, spec)
    slot = (torch.arange(T) % A)[torch.randperm(T, generator=g)].to(device)
    meta = prepare_batch(slot, A)
    x = torch.randn(T, in_f, generator=g).to(device, dtype)
    y = torch.zeros(T, out_f, dtype=dtype, device=device)
    present = sorted(set(slot.tolist()))
    masks = {a: (slot == a).to(dtype).unsqueeze(1) for a in present}
    chunks = min(spec.num_chunks, -(-out_f // spec.n))
    U = rope_chunks(x, spec)[:, :chunks].reshape(-1, spec.n).contiguous()
    bound_out = torch.empty_like(U)

    def loop() -> None:
        for a in present:
            y.add_(mora_forward(x, Ms[a], spec) * masks[a])

    run = {
        "fused": lambda: mora_apply(y, x, table, meta, backend=backend),
        "loop": loop,
        "bound": lambda: torch.mm(U, Ms[0].t(), out=bound_out),
        "base": lambda: x @ W.t(),
    }
    if has_fma_bound(device, dtype):
        U32, M32 = U.float(), Ms[0].float()
        bound32_out = torch.empty_like(U32)
        run["bound32"] = lambda: torch.mm(U32, M32.t(), out=bound32_out)
    if device == "cuda":  # time kernels, not Python launch overhead (and show fused is capturable)
        run.update({name: cuda_graphed(run[name]) for name in ("fused", "bound", "base")})
    run["copy"] = copy
    el = x.element_size()
    flops = 2 * T * chunks * spec.n * spec.n
    traffic = el * (T * in_f + len(present) * spec.n * spec.n + 2 * T * out_f)
    return Case(module, T, A, len(present), run, flops, traffic)


def has_fma_bound(device: str, dtype: torch.dtype) -> bool:
    """Whether a case also times `bound32`, the vector-FMA rate (see the module docstring)."""
    return device == "cpu" and dtype != torch.float32


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured in a CUDA graph (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sample_seconds(fn: Callable[[], object], reps: int, device: str) -> float:
    """Seconds per call over `reps` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(case: Case, rounds: int, device: str, budget_s: float) -> dict[str, list[float | None]]:
    """Seconds per call of each candidate in each of `rounds` interleaved rounds.

    A sample repeats a fast call until it lasts about 2 ms (timer resolution, call jitter); a
    candidate whose call is so slow that `rounds` samples would exceed `budget_s` is sampled in
    fewer rounds (at least 3; `None` in the others).
    """
    reps, want = {}, {}
    for name, fn in case.run.items():
        fn()  # warm-up: caches, allocator, lazy kernel compilation
        _sync(device)
        t = sample_seconds(fn, 1, device)
        reps[name] = max(1, min(200, int(2e-3 / max(t, 1e-7))))
        want[name] = max(3, min(rounds, int(budget_s / max(t, 1e-9))))
    samples: dict[str, list[float | None]] = {name: [None] * rounds for name in case.run}
    # fused sits between loop and bound, so each ratio compares neighbouring samples; the order
    # reverses every round so that neither side of a pair is systematically first.
    order = [name for name in ("loop", "fused", "bound", "bound32", "copy", "base") if name in case.run]
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            if r < want[name]:
                samples[name][r] = sample_seconds(case.run[name], reps[name], device)
    return samples


def median_of(samples: list[float | None]) -> float:
    return statistics.median(v for v in samples if v is not None)


def median_ratio(num: list[float | None], den: list[float | None]) -> float:
    """Median over the rounds that measured both: a slow phase of the machine cancels out."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True) if a is not None and b is not None)


def roofline_ratios(samples: dict[str, list[float | None]], case: Case, copy_bytes: int,
                    compute: str = "bound") -> list[float]:
    """Per round: fused / max(compute bound, compulsory bytes at the round's copy bandwidth)."""
    out = []
    for f, b, c in zip(samples["fused"], samples[compute], samples["copy"], strict=True):
        if f is not None and b is not None and c is not None:
            out.append(f / max(b, case.bytes * c / copy_bytes))
    return out


def make_copy(device: str, dtype: torch.dtype, mib: int) -> tuple[Callable[[], object], int]:
    """A `dst.copy_(src)` of `mib` MiB and the bytes it moves (read + write)."""
    numel = mib * 2**20 // torch.empty((), dtype=dtype).element_size()
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    fn = functools.partial(dst.copy_, src)
    return (cuda_graphed(fn) if device == "cuda" else fn), 2 * numel * src.element_size()


def gpu_peak(name: str) -> tuple[float, float] | None:
    for fragment, tflops, tbs in GPU_PEAKS:
        if fragment.lower() in name.lower():
            return tflops, tbs
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see above)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per slow candidate per case")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--adapters", type=int, nargs="+", default=list(ADAPTERS))
    parser.add_argument("--modules", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--copy-mib", type=int, default=COPY_MIB, help="size of the bandwidth probe")
    add_isa_argument(parser)
    args = parser.parse_args(argv)
    if args.isa:
        run_on(args.isa, "bench.kernel", sys.argv[1:] if argv is None else argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    torch.set_num_threads(args.threads)
    backend = select_backend(device)
    started = time.perf_counter()
    peak = None
    where = f"{torch.get_num_threads()} torch threads"
    if device == "cpu":  # which product the torch backend runs (MORA_CPU_KERNEL=blas: torch's BLAS)
        isa = native_isa()
        where += ", products: " + (f"native grouped_mm, isa={isa}" if isa else f"torch BLAS ({native_status()[1]})")
        where += f"; torch's GEMMs: capability {torch.backends.cpu.get_cpu_capability()}"
        where += f"; {isa_held()}" if isa_held() else ""
    if device == "cuda":
        gpu = torch.cuda.get_device_name()
        peak = gpu_peak(gpu)
        where = gpu + (f" (peak {peak[0]:.0f} TFLOP/s bf16 dense, {peak[1]:.2f} TB/s)" if peak else " (peak unknown)")
    print(f"MoRA fused operator, backend={backend}, device={device}, dtype={str(dtype).removeprefix('torch.')}, {where}")
    print(f"rounds={args.rounds} interleaved, medians; type 6, r=8; T tokens round-robin over A adapters")
    if device == "cuda":
        print("fused, bound and base are CUDA-graph replays (no launch overhead); loop runs eagerly")
    head = f"{'module':<10}{'T':>5}{'A':>4}{'used':>5}{'fused ms':>10}{'loop ms':>10}{'bound ms':>10}{'base ms':>10}"
    head += f"{'vs loop':>9}{'vs bound':>9}{'vs roof':>9}{'GB/s cp':>8}{'ovh/base':>9}"
    fma = has_fma_bound(device, dtype)
    if fma:
        head += f"{'b32 ms':>9}{'vs fma':>8}"
    if device == "cuda":
        head += f"{'TFLOP/s':>9}{'GB/s':>8}" + (f"{'%FLOP':>7}{'%BW':>6}" if peak else "")
    print(head)
    speedups, ratios = [], []
    roof: dict[int, list[float]] = {}
    roof_fma: list[float] = []
    copy, copy_bytes = make_copy(device, dtype, args.copy_mib)
    for module in args.modules:
        out_f, in_f = SHAPES[module]
        W = (torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.02).to(device, dtype)
        for T in args.tokens:
            for A in args.adapters:
                case = build_case(module, T, A, W, dtype, device, backend, copy)
                samples = measure(case, args.rounds, device, args.budget)
                med = {c: median_of(v) for c, v in samples.items()}
                speedup = median_ratio(samples["loop"], samples["fused"])
                ratio = median_ratio(samples["fused"], samples["bound"])
                overhead = median_ratio(samples["fused"], samples["base"])
                vs_roof = statistics.median(roofline_ratios(samples, case, copy_bytes))
                roof.setdefault(T, []).append(vs_roof)
                ratios.append(ratio)
                if A >= 16:
                    speedups.append(speedup)
                line = f"{module:<10}{T:>5}{A:>4}{case.present:>5}"
                line += "".join(f"{med[c] * 1e3:>10.3f}" for c in CANDIDATES)
                line += f"{speedup:>8.1f}x{ratio:>8.2f}x{vs_roof:>8.2f}x{copy_bytes / med['copy'] / 1e9:>8.1f}{overhead:>8.1%} "
                if fma:
                    vs_fma = statistics.median(roofline_ratios(samples, case, copy_bytes, "bound32"))
                    roof_fma.append(vs_fma)
                    line += f"{med['bound32'] * 1e3:>9.3f}{vs_fma:>7.2f}x"
                if device == "cuda":
                    tflops, gbs = case.flops / med["fused"] / 1e12, case.bytes / med["fused"] / 1e9
                    line += f"{tflops:>9.2f}{gbs:>8.0f}"
                    if peak:
                        line += f"{tflops / peak[0]:>7.1%}{gbs / 1e3 / peak[1]:>6.1%}"
                print(line, flush=True)
                del case
    print(f"wall time {time.perf_counter() - started:.0f} s")
    x = min(speedups) if speedups else float("nan")
    per_t = " ".join(f"vs_roofline_t{T}={max(v):.2f}" for T, v in sorted(roof.items()))
    worst = max(max(v) for v in roof.values())
    where = "" if device == "cuda" else (f" isa={native_isa()}" if native_isa() else " products=blas") + emulated()
    fma_key = f" vs_roofline_fma={max(roof_fma):.2f}" if roof_fma else ""
    print(f"speedup_vs_loop_a16={x:.2f} vs_bound={max(ratios):.2f} vs_roofline={worst:.2f} {per_t}{fma_key}{where}")



if __name__ == "__main__":
    main()
