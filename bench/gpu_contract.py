"""MoRA-wrapped decoder layers under CUDA graphs and torch.compile, without vLLM.

The contract vLLM's GPU model runner relies on, checked on the project's own runtime and
kernels (`MoraRuntime` in graph-safe mode, `torch.ops.mora.fused_apply`, the slot tables):

* a forward captured once (a CUDA graph at a padded batch size, or one `torch.compile`
  trace with dynamic token counts) serves later steps whose adapters, mappings, token counts
  and merged adapter changed, when the state was updated only in place (`prepare`,
  `set_slot`, merge/unmerge) - as vLLM does between steps;
* rows past the step's real tokens (padding up to the captured size) are left untouched by
  the MoRA update.

Each decoder layer has vLLM's packed projections (qkv with three slices, gate_up with two,
o and down) around per-token mixing (no attention: padding must not reach real rows through
anything but the operator under test). Each step's real rows are compared with a reference
that runs the same base weights *unmerged* plus the per-token updates of the library's
reference operator (`backend="reference"`), and padded rows with the same forward where every
row is padding.

    python -m bench.gpu_contract --device cuda     # what bench/gpu_check.sh runs

Imports nothing from vLLM.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mora.kernels import BatchMeta, ShardLayout, SlotTable, TableGroup, mora_apply_slices, prepare_batch
from mora.merge import MergeRecord, merge_, unmerge_
from mora.spec import MoraSpec, MoraType, mora_size
from mora.vllm_plugin.runtime import MoraRuntime

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Config:
    hidden: int = 64
    inter: int = 96
    layers: int = 2
    adapters: int = 16  # resident adapters, vLLM slots 0..adapters-1 (+ the reserved merged row)
    types: tuple[int, ...] = (1, 6, 3)
    ranks: tuple[int, ...] = (4, 8)
    max_tokens: int = 64  # vLLM's max_num_batched_tokens
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: str | None = None  # None: by device (triton on CUDA, torch on the CPU)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)


class MoraLinear(nn.Module):
    """A packed linear layer with MoRA slices: `y = x @ W.T`, then the fused op, the same
    calls as the vLLM wrappers' graph-safe forward (`MoraLayerMixin._apply_lora_to_output`)."""

    def __init__(self, in_f: int, widths: list[int], rt: MoraRuntime, cfg: Config, g: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(sum(widths), in_f, generator=g) * in_f**-0.5
        self.weight = nn.Parameter(w.to(cfg.device, cfg.dtype), requires_grad=False)
        self.offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.tables = [
            SlotTable(ShardLayout(in_f, out), rt.max_slots, max_rank=cfg.max_rank, dtype=cfg.dtype, device=cfg.device)
            for out in widths
        ]
        self.group = TableGroup(self.tables, self.offsets, cfg.backend)
        self.rt = rt
        self.reference: BatchMeta | None = None  # set: compute the reference instead (eager only)
        self.records: list[tuple[slice, MergeRecord]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reference is None:
            self.rt.apply(y, x, self.group)
        else:
            n = self.reference.num_tokens
            mora_apply_slices(y[:n], x[:n], self.tables, self.reference, self.offsets, backend="reference")
        return y

    def slices(self) -> list[slice]:
        return [slice(a, b) for a, b in zip(self.offsets, self.offsets[1:], strict=False)]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, rt: MoraRuntime, g: torch.Generator) -> None:
        super().__init__()
        h, kv = cfg.hidden, cfg.hidden // 2
        self.kv = kv
        self.qkv_proj = MoraLinear(h, [h, kv, kv], rt, cfg, g)
        self.o_proj = MoraLinear(h, [h], rt, cfg, g)
        self.gate_up_proj = MoraLinear(h, [cfg.inter, cfg.inter], rt, cfg, g)
        self.down_proj = MoraLinear(cfg.inter, [h], rt, cfg, g)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(F.rms_norm(h, (h.shape[-1],))).split([h.shape[-1], self.kv, self.kv], dim=-1)
        h = h + self.o_proj(q * torch.sigmoid(torch.cat([k, v], dim=-1)))
        gate, up = self.gate_up_proj(F.rms_norm(h, (h.shape[-1],))).chunk(2, dim=-1)
        return h + self.down_proj(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, cfg: Config, rt: MoraRuntime, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rt, g) for _ in range(cfg.layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h

    def linears(self) -> list[MoraLinear]:
        return [m for m in self.modules() if isinstance(m, MoraLinear)]


@dataclass
class Adapter:
    """One adapter: `(M, spec)` per slice of every linear (in `Decoder.linears()` order)."""

    mora_type: int
    rank: int
    entries: list[list[tuple[torch.Tensor, MoraSpec]]] = field(default_factory=list)


def make_adapter(model: Decoder, cfg: Config, mora_type: int, rank: int, seed: int, scale: float = 0.05) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(mora_type, rank)
    for lin in model.linears():
        per = []
        for t in lin.tables:
            lay = t.layout
            n = mora_size(lay.in_features, lay.out_features, rank, MoraType(mora_type))
            spec = MoraSpec(lay.in_features, lay.out_features, n, MoraType(mora_type))
            per.append(((torch.randn(n, n, generator=g) * scale).to(cfg.device, cfg.dtype), spec))
        adapter.entries.append(per)
    return adapter


def load_slot(model: Decoder, row: int, adapter: Adapter | None) -> None:
    """Write `adapter` into table row `row` of every layer in place (None: clear it)."""
    for lin, per in zip(model.linears(), adapter.entries if adapter else [None] * len(model.linears()), strict=True):
        for i, t in enumerate(lin.tables):
            if per is None:
                t.clear_slot(row)
            else:
                t.set_slot(row, *per[i])


@dataclass
class Step:
    n: int  # real tokens
    slots: list[int]  # vLLM slot per real token (-1: base model)
    merge: int | None = None  # merge the adapter of this slot before the step (None: keep)
    unmerge: bool = False


class Harness:
    """A decoder stack, its runtime and adapters, and the operations vLLM performs between
    steps (activate adapters, prepare, merge, unmerge), all in place."""

    def __init__(self, cfg: Config, seed: int = 0) -> None:
        self.cfg = cfg
        self.rt = MoraRuntime(cfg.adapters, cfg.device, max_tokens=cfg.max_tokens, graph_safe=True)
        self.model = Decoder(cfg, self.rt, seed)
        self.adapters = [
            make_adapter(self.model, cfg, cfg.types[i % len(cfg.types)], cfg.ranks[i % len(cfg.ranks)], seed + 100 + i)
            for i in range(cfg.adapters)
        ]
        self.merged: int | None = None  # the vLLM slot whose adapter is merged
        self.unmerged: list[torch.Tensor] = []

    def load_dummies(self) -> None:
        """vLLM's warm-up: dummy adapters (other types and values) in every slot."""
        cfg = self.cfg
        for s in range(cfg.adapters):
            dummy = make_adapter(self.model, cfg, cfg.types[(s + 1) % len(cfg.types)], cfg.max_rank, 7000 + s)
            load_slot(self.model, s, dummy)

    def load_adapters(self) -> None:
        for s, adapter in enumerate(self.adapters):
            load_slot(self.model, s, adapter)

    def merge(self, slot: int) -> None:
        """Fold slot `slot`'s adapter into the base weights (exactly undoable), its `M`s into the
        reserved row, and mark the reserved row merged (as `MoraLoRAModelManager.mora_merge`)."""
        adapter = self.adapters[slot]
        self.unmerged = [lin.weight.data.clone() for lin in self.model.linears()]  # for the reference
        for lin, per in zip(self.model.linears(), adapter.entries, strict=True):
            for rows, (M, spec) in zip(lin.slices(), per, strict=True):
                lin.records.append((rows, merge_(lin.weight.data[rows], M, spec, exact=True, keep_storage=True)))
        load_slot(self.model, self.rt.merged_row, adapter)
        self.rt.set_merged(self.rt.merged_row)
        self.merged = slot

    def unmerge(self) -> None:
        for lin in self.model.linears():
            for rows, rec in reversed(lin.records):
                unmerge_(lin.weight.data[rows], rec)
            lin.records.clear()
        for lin, w in zip(self.model.linears(), self.unmerged, strict=True):
            if not torch.equal(lin.weight.data, w):
                raise AssertionError("unmerge did not restore the base weights bit for bit")
        self.rt.set_merged(-1)
        load_slot(self.model, self.rt.merged_row, None)
        self.merged = None

    def prepare(self, slots: list[int]) -> None:
        token_slots = torch.tensor(slots, dtype=torch.int64, device=self.cfg.device)
        self.rt.prepare(token_slots, -1 if self.merged is None else self.merged)

    def apply_step(self, step: Step) -> None:
        if step.unmerge and self.merged is not None:
            self.unmerge()
        if step.merge is not None:
            self.merge(step.merge)
        self.prepare(step.slots)

    @torch.no_grad()
    def reference(self, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """The real rows as the library defines them: base weights unmerged, each token plus its
        own adapter, computed by the reference operator (eager)."""
        n = len(slots)
        meta = prepare_batch(torch.tensor(slots, dtype=torch.int64, device=x.device), self.rt.max_slots)
        saved = []
        if self.merged is not None:
            for lin, w in zip(self.model.linears(), self.unmerged, strict=True):
                saved.append(lin.weight.data.clone())
                lin.weight.data.copy_(w)
        try:
            for lin in self.model.linears():
                lin.reference = meta
            return self.model(x[:n])
        finally:
            for lin in self.model.linears():
                lin.reference = None
            for lin, w in zip(self.model.linears(), saved, strict=False):
                lin.weight.data.copy_(w)


def scenario(cfg: Config, sizes: tuple[int, ...], seed: int = 0) -> list[Step]:
    """Steps with changing token counts, mappings (skewed, mixed, all-base), a merge, a step
    after it, an unmerge; real token counts from 1 to each size's maximum."""
    g = torch.Generator().manual_seed(seed)
    A = cfg.adapters
    steps: list[Step] = []
    for k, size in enumerate(sizes):
        n = max(1, size - (k % 3))  # fewer real tokens than the padded size, mostly
        if k % 4 == 3:
            slots = [-1] * n
        else:
            slots = torch.randint(-1, A, (n,), generator=g).tolist()
        steps.append(Step(n, slots))
    merged = A // 2 + 1  # a type-6 or type-3 adapter; its tokens appear while merged
    n = max(sizes)
    steps.append(Step(n, [(merged if i % 3 == 0 else (i % A) - 1) for i in range(n)], merge=merged))
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
        h.apply_step(step)
        got = run(size)(x).clone()
        h.prepare([])  # every row is padding: the base model (merged weights included)
        base = run(size)(x).clone()
        h.prepare(step.slots)
        want = h.reference(x, step.slots)
        err = _err(got[: step.n], want)
        pad_ok = torch.equal(got[step.n :], base[step.n :])
        out.append(StepResult(size, step.n, h.merged is not None, err, pad_ok, err <= TOL[cfg.dtype] and pad_ok))
    return out


def graphed(h: Harness, sizes: tuple[int, ...]) -> Callable[[int], Runner]:
    """One real `torch.cuda.CUDAGraph` per padded size, captured with dummy adapters at a step
    using every slot; replays read the state as later updated in place."""
    cfg = h.cfg
    h.load_dummies()
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
    pool = None
    for size in sorted(sizes, reverse=True):  # largest first, then share its memory pool
        x = torch.zeros(size, cfg.hidden, device=cfg.device, dtype=cfg.dtype)
        h.prepare([i % cfg.adapters for i in range(size)])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            h.model(x)  # warm-up: Triton compilation, allocator
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), torch.no_grad():
            y = h.model(x)
        pool = graph.pool()
        graphs[size] = (graph, x, y)
    h.load_adapters()  # the real adapters arrive after capture, in place

    def run(size: int) -> Runner:
        graph, x_static, y_static = graphs[size]

        def replay(x: torch.Tensor) -> torch.Tensor:
            x_static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            return y_static

        return replay

    return run


def compiled(h: Harness, backend: str = "inductor") -> tuple[Callable[[int], Runner], object]:
    """`torch.compile(fullgraph=True, dynamic=True)` of the stack; returns the runner and the
    compile counter (`frame_count`: compilations)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(h.model, fullgraph=True, dynamic=True, backend=counter)

    def run(size: int) -> Runner:
        def call(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return fn(x)

        return call

    return run, counter


def summarize(label: str, results: list[StepResult]) -> bool:
    for r in results:
        print(f"  {label:<8} size={r.size:>3} n={r.n:>3} merged={int(r.merged)} err={r.err:.2e} "
              f"pad_untouched={r.pad_ok} {'ok' if r.ok else 'FAIL'}")
    return all(r.ok for r in results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="float32 (default): the replayed and the reference base GEMMs are the same, errors are the operator's alone")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=688)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cfg = Config(hidden=args.hidden, inter=args.inter, dtype=dtype, device=args.device, max_tokens=64)
    torch.manual_seed(0)
    graphs_ok = None
    if args.device == "cuda":
        h = Harness(cfg)
        print(f"CUDA graphs at padded sizes {CAPTURE_SIZES}, {cfg.adapters} adapters of types {cfg.types}, {args.dtype}")
        graphs_ok = summarize("graph", check_steps(h, scenario(cfg, CAPTURE_SIZES), graphed(h, CAPTURE_SIZES), CAPTURE_SIZES))
    h = Harness(cfg)
    h.load_adapters()
    run, counter = compiled(h, "inductor")
    sizes = tuple(s for s in CAPTURE_SIZES if s >= 2)  # sizes 0/1 are specialized by dynamo
    print("torch.compile(fullgraph=True, dynamic=True), inductor")
    compile_ok = summarize("compile", check_steps(h, scenario(cfg, sizes), run, sizes))
    print(f"  compilations: {counter.frame_count}")
    compile_ok = compile_ok and counter.frame_count == 1
    print(f"GPU_CONTRACT graphs_ok={graphs_ok} compile_ok={compile_ok}")


if __name__ == "__main__":
    main()
