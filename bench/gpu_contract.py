"""MoRA-wrapped decoder layers as vLLM's GPU model runner drives them, without vLLM.

The contract vLLM's GPU model runner relies on, checked on the project's own runtime, layer
state and kernels (`MoraRuntime` in graph-safe mode, `MoraSlots`, `torch.ops.mora.fused_apply`,
`MergeController`, the slot tables):

* a forward captured once (a CUDA graph per capture size and LoRA case, captured with vLLM's
  stock-LoRA warm-up adapters while the MoRA tables are empty; or one `torch.compile` trace)
  serves later steps whose adapters, mappings, token counts and merged adapter changed, when
  the state was updated only in place (`prepare`, `set_slot`, merges a layer at a time);
* rows past the step's real tokens (padding up to the captured size) are left untouched;
* a step launches only what its kind needs (`StepKind`): no stock LoRA kernel without a stock
  LoRA token, no adapter kernel at all for base or merged-adapter tokens only.

The decoder stack is `bench/gpu_model.py`'s (vLLM's packed projections, the wrappers' layer
state, a stand-in for vLLM's stock LoRA kernel). Slots `lora_slots` hold stock LoRA adapters,
the others MoRA adapters.
Each step's real rows are compared with a reference that runs the same base weights
*unmerged* plus the per-token updates of the library's reference operator and of the stock
LoRA, and padded rows with the same forward where every row is padding.

    python -m bench.gpu_contract --device cuda     # what bench/gpu_check.sh runs

`bench/gpu_capture.py` replays vLLM's capture sequence on the CPU (recorded kernel launches).
Imports nothing from vLLM.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bench.gpu_model import Config, Decoder, PinSet, load_slot, make_lora, make_mora
from mora.kernels import StepKind, prepare_batch
from mora.vllm_plugin.graphs import kind_of_case
from mora.vllm_plugin.merging import MergeController
from mora.vllm_plugin.runtime import MoraRuntime, plan_step

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass
class Step:
    n: int  # real tokens
    slots: list[int]  # vLLM slot per real token (-1: base model)
    merge: int | None = None  # merge the adapter of this slot before the step (None: keep)
    unmerge: bool = False


class Harness:
    """A decoder stack, its runtime and adapters, and what vLLM and the model manager do between
    steps (activate adapters, split the mapping and prepare the step, merge, unmerge), in place."""

    def __init__(self, cfg: Config, seed: int = 0) -> None:
        self.cfg = cfg
        self.rt = MoraRuntime(cfg.adapters, cfg.device, max_tokens=cfg.max_tokens, graphs=True)
        self.stock_mapping = torch.full((cfg.max_tokens,), -1, dtype=torch.int64, device=cfg.device)
        self.model = Decoder(cfg, self.rt, self.stock_mapping, seed)
        self.adapters = [
            make_lora(self.model, cfg, seed + 100 + i) if i in cfg.lora_slots else
            make_mora(self.model, cfg, cfg.types[i % len(cfg.types)], cfg.ranks[i % len(cfg.ranks)], seed + 100 + i)
            for i in range(cfg.adapters)
        ]
        self.merges = MergeController(self.rt, lambda: [(str(i), lin) for i, lin in enumerate(self.model.linears())],
                                      PinSet())
        self.lora_ids: set[int] = set()  # ids (slot + 1) of the slots holding a stock LoRA adapter
        self.unmerged: list[torch.Tensor] = []  # base weights before the merge (the reference's)

    @property
    def merged(self) -> int | None:
        """The vLLM slot of the adapter being merged or merged (its id is slot + 1)."""
        return None if self.merges.target is None else self.merges.target - 1

    def load_stock_dummies(self) -> None:
        """vLLM's warm-up adapters: stock LoRA ones in every slot; the MoRA tables are empty."""
        for s in range(self.cfg.adapters):
            load_slot(self.model, s, make_lora(self.model, self.cfg, 7000 + s))
        self.lora_ids = set(range(1, self.cfg.adapters + 1))

    def load_adapters(self) -> None:
        for s, adapter in enumerate(self.adapters):
            load_slot(self.model, s, adapter)
        self.lora_ids = {s + 1 for s in self.cfg.lora_slots}

    def merge(self, slot: int, *, background: bool = False) -> None:
        """Start merging slot `slot`'s adapter (all at once, or a slice per `merge_slice`)."""
        self.unmerged = [lin.weight.data.clone() for lin in self.model.linears()]
        self.merges.merge(slot + 1, self.adapters[slot], background=background, max_bytes=None, commit=True)

    def merge_slice(self) -> bool:
        """One call of a background merge between two steps; True when it is merged."""
        return self.merges.merge(self.merges.target, self.adapters[self.merged], background=True, max_bytes=None,
                                 commit=True).state.value == "merged"

    def unmerge(self) -> None:
        self.merges.unmerge()
        for lin, w in zip(self.model.linears(), self.unmerged, strict=True):
            if not torch.equal(lin.weight.data, w):
                raise AssertionError("unmerge did not restore the base weights bit for bit")

    def plan(self, slots: list[int]) -> tuple[np.ndarray, np.ndarray, StepKind]:
        """The model manager's split of a step (`plan_step`): MoRA rows, vLLM's stock mapping
        (MoRA tokens hidden), the kind."""
        ids = np.asarray(slots, dtype=np.int64) + 1
        rows, moras, kind = plan_step(ids, {s + 1: s for s in range(self.cfg.adapters)}, lambda i: i not in self.lora_ids,
                                      self.merges.target, self.merges.merged_id is not None, self.rt.merged_row)
        stock = np.where(np.isin(ids, moras) | (ids == 0), -1, ids - 1)
        return rows, stock, kind

    def prepare(self, slots: list[int]) -> StepKind:
        rows, stock, kind = self.plan(slots)
        with torch.no_grad():
            self.stock_mapping[: len(slots)].copy_(torch.from_numpy(stock))
            self.stock_mapping[len(slots):].fill_(-1)
        self.rt.prepare(torch.from_numpy(rows), kind)
        return self.rt.kind

    def apply_step(self, step: Step) -> StepKind:
        if step.unmerge and self.merges.merged_id is not None:
            self.unmerge()
        if step.merge is not None:
            self.merge(step.merge)
        return self.prepare(step.slots)

    @torch.no_grad()
    def reference(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """The real rows as the library defines them: base weights unmerged, each token plus its
        own adapter (MoRA: the reference operator; LoRA: the stock update), eagerly."""
        n = len(slots)
        ids = torch.tensor(slots, dtype=torch.int64)
        lora = torch.tensor([s in self.cfg.lora_slots for s in slots], dtype=torch.bool)
        meta = prepare_batch(torch.where(lora, -1, ids).to(x.device), self.rt.max_slots)
        saved = []
        if self.merges.target is not None:
            for lin, w in zip(self.model.linears(), self.unmerged, strict=True):
                saved.append(lin.weight.data.clone())
                lin.weight.data.copy_(w)
        try:
            for lin in self.model.linears():
                lin.reference = meta
                lin.stock.reference_mapping = torch.where(lora, ids, -1).to(x.device)
            return self.model(x[:n])
        finally:
            for lin in self.model.linears():
                lin.reference = None
            for lin, w in zip(self.model.linears(), saved, strict=False):
                lin.weight.data.copy_(w)


def scenario(cfg: Config, sizes: tuple[int, ...], seed: int = 0) -> list[Step]:
    """Steps with changing token counts, mappings (skewed, mixed, all-base, more distinct
    adapters than row tiles), a merge, steps of only the merged adapter's tokens and after it, an
    unmerge; real token counts from 1 to each size's maximum."""
    g = torch.Generator().manual_seed(seed)
    A = cfg.adapters
    steps: list[Step] = []
    for k, size in enumerate(sizes):
        n = max(1, size - (k % 3))  # fewer real tokens than the padded size, mostly
        if k % 4 == 3:
            slots = [-1] * n
        elif k % 4 == 1:
            slots = [(i % (A + 1)) - 1 for i in range(n)]  # every adapter, one segment each
        else:
            slots = torch.randint(-1, A, (n,), generator=g).tolist()
        steps.append(Step(n, slots))
    merged = next(s for s in range(A // 2 + 1, A) if s not in cfg.lora_slots)
    n = max(sizes)
    steps.append(Step(n, [(merged if i % 3 == 0 else (i % A) - 1) for i in range(n)], merge=merged))
    steps.append(Step(max(1, n // 2), [merged] * max(1, n // 2)))  # only the merged adapter: no kernel
    steps.append(Step(max(1, n // 2), torch.randint(-1, A, (max(1, n // 2),), generator=g).tolist()))
    steps.append(Step(max(1, n - 1), [(i * 5) % A for i in range(max(1, n - 1))], unmerge=True))
    return steps


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(1.0, want.double().abs().max().item() if want.numel() else 0.0)
    return ((got.double() - want.double()).abs().max().item() if got.numel() else 0.0) / scale


@dataclass
class StepResult:
    size: int
    n: int
    kind: StepKind
    merged: bool
    err: float  # max |real rows - reference| / scale
    pad_ok: bool  # padded rows equal the all-padding forward, bit for bit
    ok: bool


Runner = Callable[[torch.Tensor], torch.Tensor]


def check_steps(h: Harness, steps: list[Step], run: Callable[[int], Runner], sizes: tuple[int, ...], seed: int = 1) -> list[StepResult]:
    """For each step: update state in place, run `run(size)` (the smallest size >= n) on `size`
    rows, compare real rows with the reference and padded rows with an all-padding run."""
    g = torch.Generator().manual_seed(seed)
    cfg = h.cfg
    out = []
    for step in steps:
        size = min(s for s in sizes if s >= step.n)
        x = (torch.randn(size, cfg.hidden, generator=g)).to(cfg.device, cfg.dtype)
        kind = h.apply_step(step)
        got = run(size)(x).clone()
        h.prepare([])  # every row is padding: the base model (merged weights included)
        base = run(size)(x).clone()
        want = h.reference(x, step.slots)
        h.prepare(step.slots)
        err = _err(got[: step.n], want)
        pad_ok = torch.equal(got[step.n :], base[step.n :])
        out.append(StepResult(size, step.n, kind, h.merged is not None, err, pad_ok, err <= TOL[cfg.dtype] and pad_ok))
    return out


def graphed(h: Harness, sizes: tuple[int, ...]) -> Callable[[int], Runner]:
    """Real `torch.cuda.CUDAGraph`s as vLLM captures them (`gpu_capture.capture_as_vllm` on
    the CPU): per size and LoRA case, with stock dummies and empty MoRA tables; a step replays
    the graph of its kind; the real adapters arrive in place afterwards."""
    from bench.gpu_capture import case_for_kind, lora_cases, warmup_mapping

    cfg = h.cfg
    h.load_stock_dummies()
    graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
    pool = None
    for case in lora_cases(cfg):
        for size in sorted(sizes, reverse=True):  # largest first, then share its memory pool
            x = torch.zeros(size, cfg.hidden, device=cfg.device, dtype=cfg.dtype)
            with h.rt.forcing(kind_of_case(case)):
                h.prepare(warmup_mapping(case, size, cfg))
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.no_grad():
                    h.model(x)  # warm-up: Triton compilation, allocator
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool), torch.no_grad():
                    y = h.model(x)
            pool = graph.pool()
            graphs[(case, size)] = (graph, x, y)
    h.load_adapters()

    def run(size: int) -> Runner:
        def replay(x: torch.Tensor) -> torch.Tensor:
            graph, x_static, y_static = graphs[(case_for_kind(h.rt.kind, cfg), size)]
            x_static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            return y_static

        return replay

    return run


def compiled(h: Harness, backend: str = "inductor") -> tuple[Callable[[int], Runner], object]:
    """`torch.compile(fullgraph=True, dynamic=True)` of the stack, traced while the MoRA tables
    are empty (vLLM compiles during its profiling run, before any adapter); returns the runner
    and the compile counter (`frame_count`: compilations). The adapters load afterwards."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(h.model, fullgraph=True, dynamic=True, backend=counter)
    h.load_stock_dummies()
    with torch.no_grad(), h.rt.forcing(StepKind.MORA | StepKind.LORA):
        h.prepare([i % h.cfg.adapters for i in range(2)])
        fn(torch.zeros(2, h.cfg.hidden, device=h.cfg.device, dtype=h.cfg.dtype))  # traced with empty tables
    h.load_adapters()

    def run(size: int) -> Runner:
        def call(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return fn(x)

        return call

    return run, counter


def summarize(label: str, results: list[StepResult]) -> bool:
    for r in results:
        print(f"  {label:<8} size={r.size:>3} n={r.n:>3} kind={r.kind.name or 'NONE':<9} merged={int(r.merged)} "
              f"err={r.err:.2e} pad_untouched={r.pad_ok} {'ok' if r.ok else 'FAIL'}")
    return all(r.ok for r in results)


def sync_free_step(h: Harness, sizes: tuple[int, ...]) -> bool:
    """`prepare` and an eager forward under `torch.cuda.set_sync_debug_mode("error")`: any host
    synchronization raises."""
    x = torch.randn(max(sizes), h.cfg.hidden, device=h.cfg.device, dtype=h.cfg.dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in scenario(h.cfg, sizes, seed=9)[:4]:
            h.prepare(step.slots)
            with torch.no_grad():
                h.model(x[: step.n])
        ok = True
    except RuntimeError as e:
        print(f"  sync in a step: {e}")
        ok = False
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return ok


def merge_stall(h: Harness, run: Callable[[int], Runner], size: int, steps: int = 12) -> tuple[float, float]:
    """Decode steps (graph replays) while an adapter merges a slice per step: the longest step
    (its merge slice included) and the median step without a merge, in milliseconds."""
    cfg = h.cfg
    slots = [s for s in range(cfg.adapters) if s not in cfg.lora_slots]
    x = torch.randn(size, cfg.hidden, device=cfg.device, dtype=cfg.dtype)

    def step(extra: Callable[[], object] | None = None) -> float:
        sync = torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        if extra is not None:
            extra()
        h.prepare([slots[i % len(slots)] for i in range(size)])
        run(size)(x)
        sync()
        return (time.perf_counter() - t) * 1e3

    normal = sorted(step() for _ in range(steps))[steps // 2]
    h.merge(slots[-1], background=True)
    during = [step(h.merge_slice)]
    while h.merges.merged_id is None:
        during.append(step(h.merge_slice))
    h.unmerge()
    return max(during), normal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--types", default="1,6,3", help="MoRA types of the adapters, round robin")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=688)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    types = tuple(int(t) for t in args.types.split(","))
    cfg = Config(hidden=args.hidden, inter=args.inter, layers=args.layers, dtype=dtype, device=args.device, types=types,
                 lora_slots=(3,), max_tokens=64)
    torch.manual_seed(0)
    graphs_ok = sync_ok = None
    stall = ""
    label = f"{args.dtype} types {','.join(map(str, types))} {args.hidden}x{args.inter}"
    if args.device == "cuda":
        h = Harness(cfg)
        print(f"CUDA graphs per capture size {CAPTURE_SIZES} and LoRA case, {cfg.adapters} adapters ({label}), "
              f"stock LoRA in slots {cfg.lora_slots}")
        run = graphed(h, CAPTURE_SIZES)
        graphs_ok = summarize("graph", check_steps(h, scenario(cfg, CAPTURE_SIZES), run, CAPTURE_SIZES))
        longest, normal = merge_stall(h, run, 16)
        stall = f" merge_step_ms={longest:.2f} normal_step_ms={normal:.2f}"
        print(f"  merge a slice per step: longest step {longest:.2f} ms, normal step {normal:.2f} ms")
        sync_ok = sync_free_step(h, CAPTURE_SIZES)
        print(f"  prepare + forward under set_sync_debug_mode('error'): {'no sync' if sync_ok else 'SYNC'}")
    h = Harness(cfg)
    run, counter = compiled(h, "inductor")
    sizes = tuple(s for s in CAPTURE_SIZES if s >= 2)  # sizes 0/1 are specialized by dynamo
    print(f"torch.compile(fullgraph=True, dynamic=True), inductor, traced with empty MoRA tables ({label})")
    compile_ok = summarize("compile", check_steps(h, scenario(cfg, sizes), run, sizes))
    print(f"  compilations: {counter.frame_count}")
    compile_ok = compile_ok and counter.frame_count == 1
    print(f"GPU_CONTRACT graphs_ok={graphs_ok} compile_ok={compile_ok} sync_free={sync_ok}{stall}")


if __name__ == "__main__":
    main()
