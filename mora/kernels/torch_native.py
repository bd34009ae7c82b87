"""The torch backend's calls into the native CPU kernels (`mora.kernels.native`), bound per plan.

* `bind_product`: a pass's per-adapter products, one `grouped_mm` call for all its adapters;
* `bind_direct`: a slice's type-6 and type-1 passes (the kinds the paper recommends) run as one
  `rope_apply` or `share_apply` call each, from `x` straight into `y` (rotation or chunk sum,
  product and periodic expansion in the kernel): no gathered input, compressed rows, products
  or expanded rows are written to memory and read back, which at decode sizes costs as much as
  the products themselves. The slice's other passes (types 2-4) stay on the general path.
  Every output column still gets one addition of one product per token, as on the general path.

Both apply to float32 tables, and to bfloat16 ones at decode sizes (`BF16_MAX_ROWS`) or where
torch's bf16 GEMM is not faster (`bf16_blas_beats_native`), where the native kernel is in use
(`native_enabled`). Where that GEMM is faster (bfloat16 prefill on AMX CPUs), a slice's type-6
and type-1 passes still run direct: `rope_rows` (`share_rows`) writes the rows, the general
path's batched BLAS product multiplies them (`torch_cpu`'s, passed in as `blas`), `rope_add`
(`share_add`) adds the products into `y`. Their rotation and additions are the kernel's, so a
token rotates alike at decode and in prefill; the general path's elementwise rotation, expansion
and scatter took 60-75% of such a call (bench.kernel --dtype bfloat16, a Xeon with AMX).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mora.kernels.native import native_enabled, native_isa
from mora.kernels.table import SlotTable
from mora.kernels.torch_plan import Pass, Plan
from mora.ops import rope_signed_tables
from mora.spec import MoraType

__all__ = ["DirectOp", "DirectSlice", "bind_direct", "bind_product", "slot_order_is_free"]

DirectOp = Callable[[SlotTable, torch.Tensor, torch.Tensor], None]  # (table, x, y): a direct slice, or one of its steps
# The general path's product of a pass (on a table like the one given) by torch's BLAS: (V,
# out_c, ops reading the table), with `out_c[:, :n] = V @ M[slot].T` per item once the ops ran
# (torch_cpu's scratch buffers; out_c may be wider than n).
BlasProduct = Callable[[Pass, SlotTable], tuple[torch.Tensor, torch.Tensor, list[Callable[[SlotTable], object]]]]
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # float16 tables keep torch's BLAS
# bfloat16 rows are multiplied in float32 lanes, while oneDNN's bf16 GEMM uses the CPU's bf16
# dot products (AMX, AVX512_BF16): with more rows per adapter than one token's chunks (prefill,
# or two decode tokens of one adapter) BLAS is as fast or faster; with up to this many (decode,
# one token per adapter) the native kernel is up to 1.9x faster (bench.kernel --dtype bfloat16).
BF16_MAX_ROWS = 16
DIRECT_TYPES = (MoraType.ROPE, MoraType.SHARING)  # bind_direct's: one native call from x into y


def _native_for(p: Pass, dtype: torch.dtype) -> bool:
    if dtype not in NATIVE_DTYPES or not native_enabled():
        return False
    return dtype == torch.float32 or max(p.sizes) <= BF16_MAX_ROWS or not bf16_blas_beats_native()


def slot_order_is_free(dtype: torch.dtype) -> bool:
    """Whether every product over `dtype` tables runs in the native kernel, which reads each
    adapter's `M` in whatever slot it sits: then the slots need no compaction (BLAS's batched
    products want the `M`s of one kind in consecutive slots)."""
    if dtype not in NATIVE_DTYPES or not native_enabled():
        return False
    return dtype == torch.float32 or not bf16_blas_beats_native()


def bf16_blas_beats_native() -> bool:
    """Whether torch's bfloat16 GEMM beats the native kernel on products with more rows per
    adapter than one decode token's: where it runs on the CPU's bf16 dot products and the
    native kernel widens to float32 lanes, or where it has AMX. Where the native kernel runs
    on the dot products too (`avx512_bf16`, no AMX: AMD Zen 4) it takes every size, as its fused
    `rope_apply` also saves the general path's elementwise passes."""
    if not bf16_gemm_has_dot_products():
        return False
    return native_isa() != "avx512_bf16" or bool(torch.ops.mora_native.cpu_has("AMX_BF16"))


@functools.cache
def bf16_gemm_has_dot_products() -> bool:
    """Whether torch's bfloat16 GEMM is oneDNN's on the CPU's bf16 dot products (AMX or
    AVX512_BF16). Elsewhere it widens or, where oneDNN has no bf16 kernel (CPUs without AVX-512,
    or `ONEDNN_MAX_CPU_ISA` below it), runs a generic loop: 1 GFLOP/s against the native
    kernel's 60-70 on AVX2, so the native kernel takes bfloat16 products of every size."""
    ops = torch.ops.mora_native
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (ops.cpu_has("AMX_BF16") or ops.cpu_has("AVX512_BF16"))


def _slots(p: Pass) -> torch.Tensor:
    return torch.tensor([s for s, _, _ in p.items], dtype=torch.int64)


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64)


def bind_product(p: Pass, V: torch.Tensor, out_c: torch.Tensor) -> Callable[[SlotTable], None] | None:
    """`out_c[item] = sign * V[item] @ M[slot].T` for every item in one call, or None (not native)."""
    if not _native_for(p, V.dtype):
        return None
    offsets, slots = _offsets(p.sizes), _slots(p)  # rows of V (the chunk domain)
    n, sign, op = p.spec.n, float(p.sign), torch.ops.mora_native.grouped_mm

    def product(table: SlotTable) -> None:
        op(V, offsets, slots, table.Mt, n, sign, out_c)

    return product


def bind_direct(passes: list[Pass], plan: Plan, table: SlotTable, x: torch.Tensor, y: torch.Tensor, lo: int,
                hi: int, blas: BlasProduct) -> tuple[DirectOp | None, list[Pass]]:
    """The slice `y[:, lo:hi]`'s type-6 and type-1 passes as one `rope_apply` or `share_apply`
    call each (where torch's GEMM beats the native products, `_native_for`: their rows, `blas`'s
    product of them and the products' additions), and the passes left to the general path
    (types 2-4; all of them where the slice cannot run direct: a merged adapter to subtract, whose pass the general path must write
    first, a row-parallel shard, mixed dtypes). Passes cover disjoint rows, so each column of `y`
    still gets one addition per token."""
    lay = table.layout
    if (not passes or lay.local_in != lay.in_features or not x.dtype == y.dtype == table.dtype
            or any(p.sign < 0 for p in passes)):
        return None, passes
    if x.dtype not in NATIVE_DTYPES or not native_enabled():
        return None, passes
    mine = [p for p in passes if p.spec.mora_type in DIRECT_TYPES]
    if not mine:
        return None, passes
    calls: list[DirectOp] = []
    kernels: list[str] = []
    for p in mine:  # products by the native kernel, or (where torch's GEMM beats it) by that GEMM
        steps, names = _direct_call(p, plan, lay.out_start, x.dtype) if _native_for(p, x.dtype) else \
            _rows_blas_add(p, plan, table, x.dtype, blas)
        calls += steps
        kernels += names
    direct = DirectSlice(tuple(calls), tuple(kernels), lo, hi, lo == 0 and hi == y.shape[1])
    return direct, [p for p in passes if all(p is not q for q in mine)]


@dataclass(frozen=True)
class DirectSlice:
    """A slice's direct calls (`bind_direct`), run in order into `y[:, lo:hi]`; `kernels` names
    the ops they run, per pass (`rope_apply`; or `rope_rows`, `blas`, `rope_add`)."""

    calls: tuple[DirectOp, ...]
    kernels: tuple[str, ...]
    lo: int
    hi: int
    whole: bool

    def __call__(self, table: SlotTable, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.stride(1) != 1:
            x = x.contiguous()
        dst = y if self.whole else y[:, self.lo : self.hi]
        for call in self.calls:
            call(table, x, dst)


def _tokens(p: Pass, plan: Plan) -> torch.Tensor:
    """The rows of x and y of the pass's tokens, in work order."""
    return (plan.rows[p.a : p.b] if plan.rows is not None else torch.arange(p.a, p.b)).contiguous()


def _rope_tables(p: Pass, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The pass's chunks' (cos, signed sin), in `dtype` as the general path rounds them."""
    spec = p.spec
    return rope_signed_tables(spec.n, spec.num_chunks, p.k_lo, p.k_lo + p.chunks, dtype, torch.device("cpu"))


def _direct_call(p: Pass, plan: Plan, out_start: int, dtype: torch.dtype) -> tuple[list[DirectOp], list[str]]:
    """Pass `p` as one `rope_apply` (`share_apply`) call, every operand but x, Mt and y bound."""
    spec = p.spec
    offsets, slots = _offsets([e - s for _, s, e in p.items]), _slots(p)  # in tokens
    tokens = _tokens(p, plan)
    if spec.mora_type is MoraType.SHARING:
        share = torch.ops.mora_native.share_apply
        return [lambda t, x, y: share(x, tokens, offsets, slots, t.Mt, spec.n, spec.num_chunks, out_start, 1.0, y)], \
            ["share_apply"]
    cos, ssin = _rope_tables(p, dtype)
    rope, period = torch.ops.mora_native.rope_apply, spec.num_chunks * spec.n
    return [lambda t, x, y: rope(x, tokens, offsets, slots, t.Mt, cos, ssin, p.k_lo, period, out_start, 1.0, y)], \
        ["rope_apply"]


def _rows_blas_add(p: Pass, plan: Plan, table: SlotTable, dtype: torch.dtype, blas: BlasProduct
                   ) -> tuple[list[DirectOp], list[str]]:
    """Pass `p` as its rows (`rope_rows`), `blas`'s product of them, and the products' additions
    (`rope_add`); share_* for type 1."""
    spec, ops, out_start = p.spec, torch.ops.mora_native, table.layout.out_start
    tokens = _tokens(p, plan)
    V, out_c, product = blas(p, table)
    if spec.mora_type is MoraType.SHARING:
        rows: DirectOp = lambda t, x, y: ops.share_rows(x, tokens, spec.n, spec.num_chunks, V)  # noqa: E731
        add: DirectOp = lambda t, x, y: ops.share_add(out_c, tokens, spec.n, out_start, y)  # noqa: E731
        names = ["share_rows", "blas", "share_add"]
    else:
        cos, ssin = _rope_tables(p, dtype)
        period = spec.num_chunks * spec.n
        rows = lambda t, x, y: ops.rope_rows(x, tokens, cos, ssin, p.k_lo, V)  # noqa: E731
        add = lambda t, x, y: ops.rope_add(out_c, tokens, spec.n, p.k_lo, p.chunks, period, out_start, y)  # noqa: E731
        names = ["rope_rows", "blas", "rope_add"]
    steps = [rows, *[(lambda t, x, y, op=op: op(t)) for op in product], add]
    return steps, names
