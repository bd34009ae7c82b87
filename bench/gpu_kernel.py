"""The fused MoRA operator per MoRA type and step size against its roofline (the GPU side of
`bench/gpu_check.sh`; `bench/kernel.py` measures type 6 in depth).

Llama-2-7B modules (`q_proj` 4096 -> 4096, `gate_proj` 4096 -> 11008) with r=8 adapters of
each type (1, 2, 3, 4, 6), at decode (`T = 16`) and prefill (`T = 512, 2048`) sizes; `T`
tokens spread round-robin (shuffled) over `min(T, A)` adapters. The roofline of a case is the
larger of two lower bounds measured in the same run: compute (the update's FLOPs at the speed
of a dense matmul of the same size) and memory (its compulsory traffic: `x` read, every
distinct `M` read once, `y` read and written, at the bandwidth of a large copy). On CUDA the
fused op (the Triton backend, both launches) is timed from a CUDA graph, as vLLM replays it.

    python -m bench.gpu_kernel --device cuda    # ends with: vs_roofline_t1=.. ... vs_roofline_t6=.. vs_roofline=<worst>
    python -m bench.gpu_kernel --device cpu --small   # the same code at toy sizes (the test suite)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.kernel import cuda_graphed, sample_seconds
from mora.kernels import ShardLayout, SlotTable, mora_apply, prepare_batch, select_backend
from mora.spec import MoraSpec, MoraType

SHAPES = {"q_proj": (4096, 4096), "gate_proj": (11008, 4096)}  # (out_features, in_features)
SMALL = {"q_proj": (72, 64), "gate_proj": (112, 64)}
TYPES = (1, 2, 3, 4, 6)


def update_flops(spec: MoraSpec, T: int) -> int:
    """Multiply-adds x 2 of the update of `T` tokens (the products with `M`)."""
    if spec.mora_type is MoraType.ROPE:
        chunks = min(spec.num_chunks, -(-spec.out_features // spec.n))
        return 2 * T * chunks * spec.n * spec.n
    return 2 * T * spec.n * spec.n


def case(module: str, shape: tuple[int, int], mora_type: int, T: int, A: int, dtype: torch.dtype, device: str,
         backend: str, reps: int, rate: float, bandwidth: float) -> dict:
    out_f, in_f = shape
    spec = MoraSpec.from_rank(in_f, out_f, 8, mora_type)
    g = torch.Generator().manual_seed(T * 100 + mora_type)
    table = SlotTable(ShardLayout(in_f, out_f), A, n_max=spec.n, dtype=dtype, device=device)
    for s in range(A):
        table.set_slot(s, (torch.randn(spec.n, spec.n, generator=g) * 0.02).to(device, dtype), spec)
    slot = (torch.arange(T) % A)[torch.randperm(T, generator=g)].to(device)
    meta = prepare_batch(slot, A, host_segments=device == "cpu")
    x = torch.randn(T, in_f, generator=g).to(device, dtype)
    y = torch.zeros(T, out_f, dtype=dtype, device=device)

    def fused() -> None:
        mora_apply(y, x, table, meta, backend=backend)

    fn = cuda_graphed(fused) if device == "cuda" else fused
    fn()
    seconds = statistics.median(sample_seconds(fn, reps, device) for _ in range(3))
    el = x.element_size()
    traffic = el * (T * in_f + min(T, A) * spec.n * spec.n + 2 * T * out_f)
    roofline = max(update_flops(spec, T) / rate, traffic / bandwidth)
    return {"module": module, "type": mora_type, "T": T, "A": A, "n": spec.n, "ms": seconds * 1e3,
            "roofline_ms": roofline * 1e3, "vs_roofline": seconds / roofline}


def measure_machine(dtype: torch.dtype, device: str, reps: int, small: bool) -> tuple[float, float]:
    """(dense matmul FLOP/s, copy bytes/s) of this device, in this dtype."""
    n = 256 if small else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = sample_seconds(lambda: a @ b, reps, device)
    src = torch.empty((8 if small else 512) << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = sample_seconds(lambda: dst.copy_(src), reps, device)
    return 2 * n**3 / mm, 2 * src.numel() / copy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--tokens", default="16,512,2048", help="step sizes T (comma-separated)")
    parser.add_argument("--adapters", type=int, default=16, help="distinct adapters in a step (at most T)")
    parser.add_argument("--rounds", type=int, default=20, help="calls per timing sample")
    parser.add_argument("--small", action="store_true", help="toy module shapes (runs anywhere in seconds)")
    args = parser.parse_args(argv)
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    backend = select_backend(device)
    shapes = SMALL if args.small else SHAPES
    rate, bandwidth = measure_machine(dtype, device, max(2, args.rounds // 4), args.small)
    print(f"{device} {dtype}, backend {backend}: matmul {rate / 1e12:.2f} TFLOP/s, copy {bandwidth / 1e9:.1f} GB/s")
    worst: dict[int, float] = {}
    for mora_type in TYPES:
        for T in (int(t) for t in args.tokens.split(",")):
            for module, shape in shapes.items():
                r = case(module, shape, mora_type, T, min(T, args.adapters), dtype, device, backend, args.rounds, rate, bandwidth)
                worst[mora_type] = max(worst.get(mora_type, 0.0), r["vs_roofline"])
                print(f"  type={r['type']} T={r['T']:>5} A={r['A']:>3} {r['module']:<9} n={r['n']:>4} "
                      f"fused={r['ms']:.4f} ms roofline={r['roofline_ms']:.4f} ms vs_roofline={r['vs_roofline']:.2f}")
    print(" ".join(f"vs_roofline_t{t}={v:.2f}" for t, v in worst.items()) + f" vs_roofline={max(worst.values()):.2f}")


if __name__ == "__main__":
    main()
