"""Merge + unmerge of one Llama-2-7B-shaped layer (bf16, r=8), measured side by side.

For each MoRA type the layer's seven matrices (q/k/v/o 4096x4096, gate/up 4096->11008,
down 11008->4096) are merged and unmerged exactly, and compared in the same run with:

* the memory floor: one in-place add of a precomputed dense bf16 delta of the same shapes;
* the reference's per-column / per-block Python loop construction of the dense deltas
  (ported from the authors' `get_delta_weight`; construction alone, the add not counted).

Rounds interleave candidate and floor so that a noisy neighbour hits both alike; ratios are
medians over rounds. Modes:

* default   - what `merge_` picks: types 1-4 swap storage (the untouched original is the backup,
              the freed buffer is reused by the next merge); type 6 writes only its blocks
* in-place  - `keep_storage=True`: the weight keeps its address (what a captured CUDA graph
              needs); exact unmerge from a copy of the changed elements
* inexact   - no backup; unmerge subtracts again (not bit-exact)

Safe mode is on everywhere, with the base weights' max |w| computed once up front (it is a
property of the base model), as the serving engine does.

    python -m bench.merge            # ends with: type1_vs_floor=X type6_vs_floor=Y speedup_vs_loop=Z
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mora.merge import merge_, unmerge_
from mora.spec import MoraSpec

SHAPES = {  # name: (out_features, in_features)
    "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008),
}


def reference_loop_delta(M: torch.Tensor, in_f: int, out_f: int, mora_type: int) -> torch.Tensor:
    """The authors' loop construction of delta_W (types 1 and 6), kept only as the baseline."""
    r = M.shape[0]
    pad = r - in_f % r if in_f % r else 0
    if mora_type == 1:
        w = torch.zeros(r, in_f, dtype=M.dtype)
        for i in range(in_f + pad):
            w[:, i % in_f] += M[:, i % r]
        reps = -(-out_f // r)
        return torch.cat([w] * reps, dim=0)[:out_f]
    w = torch.zeros(in_f + pad, in_f, dtype=M.dtype)
    c = -(-in_f // r)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    emb = torch.outer(torch.arange(c), inv_freq)
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos().to(M.dtype), emb.sin().to(M.dtype)
    M2 = torch.cat((M[:, r // 2 :], -M[:, : r // 2]), dim=-1)
    for i in range(c - 1):
        w[i * r : (i + 1) * r, i * r : (i + 1) * r] = M2 * sin[i] + M * cos[i]
    i = c - 1
    block = M2 * sin[i] + M * cos[i]
    w[i * r :, i * r :] = block[:, : r - pad]
    if pad:
        w[i * r :, :pad] = block[:, r - pad :]
    reps = -(-out_f // r)
    return torch.cat([w] * reps, dim=0)[:out_f] if in_f < out_f else w[:out_f]


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    weights = {k: (torch.randn(o, i) * 0.02).to(torch.bfloat16) for k, (o, i) in SHAPES.items()}
    absmax = {k: float(w.abs().max()) for k, w in weights.items()}
    dense = {k: (torch.randn_like(w, dtype=torch.float32) * 1e-3).to(torch.bfloat16) for k, w in weights.items()}
    originals = {k: w.clone() for k, w in weights.items()}

    def floor() -> None:
        for k, w in weights.items():
            w.add_(dense[k])

    print(f"Llama-2-7B layer, bf16, r={args.r}, {sum(w.numel() for w in weights.values()) / 1e6:.0f}M weight elements, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    summary: dict[int, dict[str, float]] = {}
    for t in (1, 6):
        specs = {k: MoraSpec.from_rank(i, o, args.r, t) for k, (o, i) in SHAPES.items()}
        Ms = {k: torch.randn(s.n, s.n) * 0.01 for k, s in specs.items()}
        spares: dict[str, torch.Tensor | None] = {}

        def cycle(Ms=Ms, specs=specs, spares=spares, **kw: object) -> None:
            for k, w in weights.items():
                rec = merge_(w, Ms[k], specs[k], weight_absmax=absmax[k], spare=spares.get(k), **kw)
                spare = unmerge_(w, rec)
                if spare is not None:
                    spares[k] = spare

        modes = {
            "default": lambda: cycle(),
            "in-place": lambda: cycle(keep_storage=True),
            "inexact": lambda: cycle(exact=False),
        }
        for fn in modes.values():  # warm-up: allocations, caches
            fn()
        ratios: dict[str, list[float]] = {m: [] for m in modes}
        floors = []
        for _ in range(args.rounds):
            for m, fn in modes.items():
                f = _time(floor)
                ratios[m].append(_time(fn) / f)
                floors.append(f)
        # exactness of what was just timed
        for k, w in weights.items():
            w.copy_(originals[k])
            rec = merge_(w, Ms[k], specs[k])
            unmerge_(w, rec)
            assert torch.equal(w, originals[k]), f"type {t} {k}: unmerge not bit-exact"
        loop_start = time.perf_counter()
        for k, (o, i) in SHAPES.items():
            reference_loop_delta(Ms[k], i, o, t)  # M is float32 in the reference, whatever the model dtype
        loop = time.perf_counter() - loop_start
        default = statistics.median(ratios["default"]) * statistics.median(floors)
        summary[t] = {m: statistics.median(v) for m, v in ratios.items()} | {"loop_s": loop, "default_s": default}
        print(f"type {t}: floor {statistics.median(floors) * 1e3:7.1f} ms | merge+unmerge / floor: "
              + "  ".join(f"{m} {summary[t][m]:.2f}x" for m in modes)
              + f" | reference loop construction {loop:.2f} s = {loop / default:,.0f}x the default merge+unmerge")
    speedup = min(summary[t]["loop_s"] / summary[t]["default_s"] for t in summary)
    print(f"type1_vs_floor={summary[1]['default']:.2f} type6_vs_floor={summary[6]['default']:.2f} speedup_vs_loop={speedup:.0f}")


if __name__ == "__main__":
    main()
