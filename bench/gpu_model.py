"""The decoder stack of the GPU contract harness (`bench/gpu_contract.py`), without vLLM.

Each decoder layer has vLLM's packed projections (qkv with three slices, gate_up with two, o
and down) around per-token mixing (no attention: padding must not reach real rows through
anything but the operators under test). Each projection is a `MoraSlots` layer (the vLLM
wrappers' own layer state: slot tables, the reserved merged row, the per-layer merged mark),
with vLLM's stock LoRA update reduced to one kernel (`StockLora`, the stand-in for vLLM's shrink
and expand, gated like `mora::stock_lora`), then the fused MoRA op: the same calls as the vLLM
wrappers' graph-safe forward. Adapters are written into slots as the model manager writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mora.kernels import BatchMeta, ShardLayout, StepKind, mora_apply_slices
from mora.kernels.custom_op import direct_op
from mora.kernels.step import step_by_handle
from mora.spec import MoraSpec, MoraType, mora_size
from mora.vllm_plugin.runtime import MoraRuntime
from mora.vllm_plugin.slots import MoraSlots


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


@direct_op("mora_bench::stock_lora", mutates_args=("y",))
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
