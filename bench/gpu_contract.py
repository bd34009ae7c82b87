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

Each decoder layer has vLLM's packed projections (qkv with three slices, gate_up with two,
o and down) around per-token mixing (no attention: padding must not reach real rows through
anything but the operators under test), each with vLLM's stock LoRA update reduced to one
kernel (`StockLora`, the stand-in for vLLM's shrink and expand, gated like
`mora::stock_lora`). Slots `lora_slots` hold stock LoRA adapters, the others MoRA adapters.
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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mora.kernels import BatchMeta, ShardLayout, StepKind, mora_apply_slices, prepare_batch
from mora.kernels.step import step_by_handle
from mora.spec import MoraSpec, MoraType, mora_size
from mora.vllm_plugin.graphs import kind_of_case
from mora.vllm_plugin.merging import MergeController
from mora.vllm_plugin.runtime import MoraRuntime, plan_step
from mora.vllm_plugin.slots import MoraSlots

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Config:
    hidden: int = 64
    inter: int = 96
    layers: int = 2
    adapters: int = 16  # vLLM slots 0..adapters-1 (+ the reserved merged row)
    types: tuple[int, ...] = (1, 6, 3)
    ranks: tuple[int, ...] = (4, 8)
    lora_slots: tuple[int, ...] = ()  # slots holding a stock LoRA adapter instead of a MoRA one
    lora_rank: int = 8
    max_tokens: int = 64  # vLLM's max_num_batched_tokens
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    backend: str | None = None  # None: by device (triton on CUDA, torch on the CPU)

    @property
    def max_rank(self) -> int:
        return max(self.ranks)


# --- vLLM's stock LoRA update, reduced to one kernel -------------------------------------------


def stock_kernel(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mapping: torch.Tensor) -> None:
    """`y[t] += x[t] @ a[s].T @ b[s].T` with `s = mapping[t]` (-1: the always-zero last slot), as
    vLLM's shrink and expand compute it; reads the mapping on the device."""
    s = mapping[: x.shape[0]]
    s = torch.where(s < 0, a.shape[0] - 1, s)
    y += torch.bmm(torch.bmm(x.unsqueeze(1), a[s].transpose(1, 2)), b[s].transpose(1, 2)).squeeze(1).to(y.dtype)


LAUNCHERS: dict[str, Callable[..., None]] = {"stock": stock_kernel}  # patched by gpu_capture's recorder


class StockLora:
    """A layer's stock LoRA buffers (vLLM's `lora_a_stacked`/`lora_b_stacked`, one extra zero
    slot) and its update, gated by the step's kind like `mora::stock_lora`."""

    def __init__(self, in_f: int, out_f: int, cfg: Config, mapping: torch.Tensor) -> None:
        S = cfg.adapters + 1
        self.a = torch.zeros(S, cfg.lora_rank, in_f, dtype=cfg.dtype, device=cfg.device)
        self.b = torch.zeros(S, out_f, cfg.lora_rank, dtype=cfg.dtype, device=cfg.device)
        self.mapping = mapping

    def apply(self, y: torch.Tensor, x: torch.Tensor, step: int) -> None:
        torch.ops.mora_bench.stock_lora(y, x, id(self), step)

    def set(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.a[slot].zero_() if a is None else self.a[slot].copy_(a)
            self.b[slot].zero_() if b is None else self.b[slot].copy_(b)


_STOCK: dict[int, StockLora] = {}


@torch.library.custom_op("mora_bench::stock_lora", mutates_args=("y",))
def stock_lora_op(y: torch.Tensor, x: torch.Tensor, layer: int, step: int) -> None:
    """The harness's `mora::stock_lora`: the stock update if the step's kind has `LORA`."""
    if StepKind.LORA in step_by_handle(step).kind:
        lora = _STOCK[layer]
        LAUNCHERS["stock"](y, x, lora.a, lora.b, lora.mapping)


@stock_lora_op.register_fake
def _stock_fake(y: torch.Tensor, x: torch.Tensor, layer: int, step: int) -> None:
    return None


# --- the decoder stack ---------------------------------------------------------------------------


class Base:
    """The base layer as the merge code reads it (`base_layer.weight`, no quantization)."""

    quant_method = None

    def __init__(self, weight: nn.Parameter) -> None:
        self.weight = weight


class MoraLinear(nn.Module, MoraSlots):
    """A packed linear layer with MoRA slices: `y = x @ W.T`, the stock LoRA op, then the fused
    op: the same calls as the vLLM wrappers' graph-safe forward."""

    def __init__(self, name: str, in_f: int, widths: list[int], rt: MoraRuntime, cfg: Config, g: torch.Generator,
                 stock_mapping: torch.Tensor) -> None:
        super().__init__()
        w = torch.randn(sum(widths), in_f, generator=g) * in_f**-0.5
        self.weight = nn.Parameter(w.to(cfg.device, cfg.dtype), requires_grad=False)
        self.base_layer = Base(self.weight)
        self.input_size = in_f
        self.init_mora([(i, ShardLayout(in_f, out)) for i, out in enumerate(widths)], cfg.adapters, cfg.max_rank,
                       cfg.dtype, torch.device(cfg.device))
        self.attach(rt, [f"{name}.{i}" for i in range(len(widths))])
        self.mora_group.backend = cfg.backend or rt.backend
        self.stock = StockLora(in_f, sum(widths), cfg, stock_mapping)
        _STOCK[id(self.stock)] = self.stock
        self.rt = rt
        self.reference: BatchMeta | None = None  # set: compute the reference instead (eager only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reference is None:
            self.stock.apply(y, x, self.rt.step.handle)
            self.mora_update(x, y)
        else:
            n = self.reference.num_tokens
            mora_apply_slices(y[:n], x[:n], self.mora_tables, self.reference, self._mora_offsets, backend="reference")
            stock_kernel(y[:n], x[:n], self.stock.a, self.stock.b, self.stock.reference_mapping)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, index: int, cfg: Config, rt: MoraRuntime, g: torch.Generator, mapping: torch.Tensor) -> None:
        super().__init__()
        h, kv = cfg.hidden, cfg.hidden // 2
        self.kv = kv
        p = f"layers.{index}."
        self.qkv_proj = MoraLinear(p + "qkv_proj", h, [h, kv, kv], rt, cfg, g, mapping)
        self.o_proj = MoraLinear(p + "o_proj", h, [h], rt, cfg, g, mapping)
        self.gate_up_proj = MoraLinear(p + "gate_up_proj", h, [cfg.inter, cfg.inter], rt, cfg, g, mapping)
        self.down_proj = MoraLinear(p + "down_proj", cfg.inter, [h], rt, cfg, g, mapping)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(F.rms_norm(h, (h.shape[-1],))).split([h.shape[-1], self.kv, self.kv], dim=-1)
        h = h + self.o_proj(q * torch.sigmoid(torch.cat([k, v], dim=-1)))
        gate, up = self.gate_up_proj(F.rms_norm(h, (h.shape[-1],))).chunk(2, dim=-1)
        return h + self.down_proj(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, cfg: Config, rt: MoraRuntime, mapping: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(DecoderLayer(i, cfg, rt, g, mapping) for i in range(cfg.layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h

    def linears(self) -> list[MoraLinear]:
        return [m for m in self.modules() if isinstance(m, MoraLinear)]


# --- adapters --------------------------------------------------------------------------------------


@dataclass
class Adapter:
    """A MoRA adapter (`mora`: `(M, spec)` by module, as `MoraLoRAModel.mora`) or a stock LoRA
    one (`lora`: `(A, B)` by layer)."""

    kind: str
    mora: dict[str, tuple[torch.Tensor, MoraSpec]] = field(default_factory=dict)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def make_mora(model: Decoder, cfg: Config, mora_type: int, rank: int, seed: int, scale: float = 0.05) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter("mora")
    for lin in model.linears():
        for module, table in lin.mora_slices():
            lay = table.layout
            n = mora_size(lay.in_features, lay.out_features, rank, MoraType(mora_type))
            spec = MoraSpec(lay.in_features, lay.out_features, n, MoraType(mora_type))
            adapter.mora[module] = ((torch.randn(n, n, generator=g) * scale).to(cfg.device, cfg.dtype), spec)
    return adapter


def make_lora(model: Decoder, cfg: Config, seed: int, scale: float = 0.05) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter("lora")
    for i, lin in enumerate(model.linears()):
        a = torch.randn(cfg.lora_rank, lin.input_size, generator=g) * scale
        b = torch.randn(lin.weight.shape[0], cfg.lora_rank, generator=g) * scale
        adapter.lora[str(i)] = (a.to(cfg.device, cfg.dtype), b.to(cfg.device, cfg.dtype))
    return adapter


def load_slot(model: Decoder, row: int, adapter: Adapter | None) -> None:
    """Write `adapter` into slot `row` of every layer in place (None: clear it), as the model
    manager's activation does (a MoRA adapter clears the slot's stock buffers, and vice versa)."""
    for i, lin in enumerate(model.linears()):
        if adapter is not None and adapter.kind == "mora":
            lin.set_mora(row, lin.mora_entries(adapter.mora))
            lin.stock.set(row, None, None)
        else:
            lin.clear_mora(row)
            ab = adapter.lora[str(i)] if adapter is not None else (None, None)
            lin.stock.set(row, *ab)


class PinSet:
    """The part of vLLM's host cache a merge uses (pins)."""

    def __init__(self) -> None:
        self.pinned_items: set[int] = set()

    def pin(self, key: int) -> None:
        self.pinned_items.add(key)

    def _unpin(self, key: int) -> None:
        self.pinned_items.discard(key)


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
