"""A direct op's rows and additions alone (`rope_rows`, `share_rows`, `rope_add`, `share_add`),
and the torch backend running them around torch's BLAS product where that product beats the
native kernel's (bfloat16 prefill on CPUs with AMX).

Each op against its semantics, bit for bit (they only move values and round where `rope_apply`
rounds), and rows + the native product + additions against `rope_apply` itself: the same bits,
so a token rotates and adds alike whichever product it gets.
"""
# ruff: noqa: F811 - `isa` and `fresh_status` are test_native_kernel's fixtures, imported to be used as arguments

from __future__ import annotations

import pytest
import torch
from test_native_kernel import ROPE_CASES, SHARE_CASES, bits, fresh_status, isa, rope_problem, share_problem  # noqa: F401

import mora.kernels.native as native
from mora.kernels import ShardLayout, SlotTable

BF16 = torch.bfloat16


def rotated(x: torch.Tensor, t: int, c: int, i: int, cos: torch.Tensor, ssin: torch.Tensor) -> torch.Tensor:
    """rope_apply's v for token t, chunk c (row i of the tables), rounded where it rounds: the
    sine product to x's dtype, then the sum of it and the cosine product (float32 products)."""
    n = cos.shape[1]
    u = torch.cat([x, x], 1)[t, c * n : (c + 1) * n].float()
    partner = torch.cat([u[n // 2 :], u[: n // 2]])
    sine = (partner * ssin[i].float()).to(x.dtype).float()
    return (sine + u * cos[i].float()).to(x.dtype)


def chunk_sum(x: torch.Tensor, t: int, n: int, chunks: int) -> torch.Tensor:
    """share_apply's v: the padded input's chunks summed in order in float32, rounded once."""
    xp = torch.cat([x, x[:, : chunks * n - x.shape[1]]], 1)[t].float()
    acc = torch.zeros(n)
    for c in range(chunks):
        acc = acc + xp[c * n : (c + 1) * n]
    return acc.to(x.dtype)


@pytest.mark.parametrize(("in_f", "n", "k_lo", "chunks", "out_start", "width"), ROPE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_rope_rows_and_adds_match_semantics(isa, in_f, n, k_lo, chunks, out_start, width, dtype):
    (x, tokens, _, _, _, cos, ssin, k_lo, period, out_start), y = rope_problem(in_f, n, k_lo, chunks, out_start, width, dtype)
    V = torch.full((len(tokens) * chunks, n + 3), 7.0, dtype=dtype)
    native.rope_rows(x, tokens, cos, ssin, k_lo, V)
    want = torch.stack([rotated(x, t, k_lo + i, i, cos, ssin) for t in tokens.tolist() for i in range(chunks)])
    assert torch.equal(bits(V[:, :n]), bits(want))
    assert (V[:, n:] == 7).all(), "columns past n were written"

    P = (torch.randn(len(tokens) * chunks, n + 2, generator=torch.Generator().manual_seed(n)) * 0.5).to(dtype)
    got, ref = y.clone(), y.clone()
    native.rope_add(P, tokens, n, k_lo, chunks, period, out_start, got)
    cols = (out_start + torch.arange(width)) % period
    for j, t in enumerate(tokens.tolist()):
        for i in range(chunks):
            c = k_lo + i
            hit = (cols >= c * n) & (cols < (c + 1) * n)
            ref[t, hit] = (ref[t, hit].float() + P[j * chunks + i, cols[hit] - c * n].float()).to(dtype)
    assert torch.equal(bits(got), bits(ref))


@pytest.mark.parametrize(("in_f", "n", "out_start", "width"), SHARE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_share_rows_and_adds_match_semantics(isa, in_f, n, out_start, width, dtype):
    (x, tokens, _, _, _, n, chunks, out_start), y = share_problem(in_f, n, out_start, width, dtype)
    V = torch.full((len(tokens), n + 1), 7.0, dtype=dtype)
    native.share_rows(x, tokens, n, chunks, V)
    want = torch.stack([chunk_sum(x, t, n, chunks) for t in tokens.tolist()])
    assert torch.equal(bits(V[:, :n]), bits(want))
    assert (V[:, n:] == 7).all()

    P = torch.randn(len(tokens), n, generator=torch.Generator().manual_seed(n)).to(dtype)
    got, ref = y.clone(), y.clone()
    native.share_add(P, tokens, n, out_start, got)
    cols = (out_start + torch.arange(width)) % n
    for j, t in enumerate(tokens.tolist()):
        ref[t] = (ref[t].float() + P[j, cols].float()).to(dtype)
    assert torch.equal(bits(got), bits(ref))


@pytest.mark.parametrize("op", ["rope", "share"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
def test_rows_product_and_adds_are_the_direct_op(isa, op, dtype):
    """Rows, the native product (`grouped_mm`, alpha 1) and the additions give `rope_apply`'s
    (`share_apply`'s) bits: the split path rotates, sums and adds exactly as the direct op."""
    for case in ROPE_CASES if op == "rope" else SHARE_CASES:
        if op == "rope":
            args, y = rope_problem(*case, dtype)
            x, tokens, offsets, slots, Mt, cos, ssin, k_lo, period, out_start = args
            per, n = cos.shape
        else:
            args, y = share_problem(*case, dtype)
            x, tokens, offsets, slots, Mt, n, chunks, out_start = args
            per = 1
        want = y.clone()
        (native.rope_apply if op == "rope" else native.share_apply)(*args, 1.0, want)
        V = torch.empty(len(tokens) * per, n, dtype=dtype)
        P = torch.empty_like(V)
        if op == "rope":
            native.rope_rows(x, tokens, cos, ssin, k_lo, V)
        else:
            native.share_rows(x, tokens, n, chunks, V)
        native.grouped_mm(V, offsets * per, slots, Mt, n, 1.0, P)
        got = y.clone()
        if op == "rope":
            native.rope_add(P, tokens, n, k_lo, per, period, out_start, got)
        else:
            native.share_add(P, tokens, n, out_start, got)
        assert torch.equal(bits(got), bits(want)), case


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens": torch.tensor([0, 99])}, "token row out of range"),
    ({"tokens": torch.tensor([0, 1], dtype=torch.int32)}, "tokens must be int64"),
    ({"V": torch.empty(3, 12)}, r"rows must be \[N \* chunks, >= n\]"),
    ({"V": torch.empty(8, 12, dtype=BF16)}, "one dtype"),
    ({"k_lo": 9}, "chunks out of range"),
])
def test_rope_rows_refuses_bad_operands(isa, change, message):
    from mora.ops import rope_tables

    cos, sin = rope_tables(12, 4, torch.float32)
    ssin = torch.cat([-sin[:, :6], sin[:, 6:]], 1).contiguous()
    base = {"x": torch.randn(5, 40), "tokens": torch.tensor([0, 3]), "cos": cos, "ssin": ssin, "k_lo": 0,
            "V": torch.empty(8, 12)}
    with pytest.raises(RuntimeError, match=message):
        native.rope_rows(**{**base, **change})


@pytest.mark.parametrize(("change", "message"), [
    ({"tokens": torch.tensor([0, 5])}, "token row out of range"),
    ({"P": torch.empty(7, 12)}, r"rows must be \[N \* chunks, >= n\]"),
    ({"period": 40}, "period or out_start out of range"),
    ({"out_start": -1}, "period or out_start out of range"),
])
def test_rope_add_refuses_bad_operands(isa, change, message):
    base = {"P": torch.zeros(8, 12), "tokens": torch.tensor([0, 3]), "n": 12, "k_lo": 0, "chunks": 4, "period": 48,
            "out_start": 0, "y": torch.zeros(5, 72)}
    y = base["y"].clone()
    with pytest.raises(RuntimeError, match=message):
        native.rope_add(**{**base, **change})
    assert torch.equal(base["y"], y), "a refused call wrote y"


def _prefill_on_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch backend as on a CPU whose bf16 GEMM beats the native products (AMX)."""
    from mora.kernels import torch_native

    monkeypatch.setattr(torch_native, "bf16_blas_beats_native", lambda: True)


def _batch_and_reference(table: SlotTable, slot: torch.Tensor, gen: torch.Generator):
    """Random bf16 x and y for the tokens of `slot` (a 40 -> 72 table), the reference's y, and
    the batch's metadata."""
    from mora.kernels import mora_apply, prepare_batch

    x = torch.randn(slot.numel(), 40, generator=gen).to(BF16)
    y0 = torch.randn(slot.numel(), 72, generator=gen).to(BF16)
    want = y0.clone()
    mora_apply(want, x, table, prepare_batch(slot, table.max_slots), backend="reference")
    return x, y0, want, prepare_batch(slot, table.max_slots)


@pytest.mark.parametrize("kind", ["ROPE", "SHARING"])
@pytest.mark.parametrize("traffic", ["skewed", "even"])
def test_bf16_prefill_runs_rows_blas_and_adds(isa, monkeypatch, kind, traffic):
    """Where torch's bf16 GEMM beats the native products, a prefill-sized type-6 (type-1) slice
    runs direct as rows, the general path's BLAS product and additions: no gathered input, no
    scatter; it matches the reference, keeps rows without an adapter, and its decode-sized
    batches still take `rope_apply`. Skewed traffic multiplies one adapter at a time; even
    traffic (equal rows, slots 0 and 2) one batched product over a strided view of the table."""
    from mora.kernels import mora_apply
    from mora.kernels.torch_plan import plan_module
    from mora.spec import MoraSpec, MoraType

    _prefill_on_blas(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    table = SlotTable(ShardLayout(40, 72), 4, n_max=16, dtype=BF16)
    for s, n in enumerate([12, 8, 12]):
        table.set_slot(s, (torch.randn(n, n, generator=gen) * 0.1).to(BF16), MoraSpec(40, 72, n, MoraType[kind]))
    short = "rope" if kind == "ROPE" else "share"
    for tokens, kernels in ((100, (f"{short}_rows", "blas", f"{short}_add")), (3, (f"{short}_apply",))):
        pattern = [2, 0, -1, 1, 0] if traffic == "skewed" else [2, 0, 2, 0, -1]
        slot = torch.tensor(pattern)[torch.arange(tokens) % 5]
        x, y0, want, meta = _batch_and_reference(table, slot, gen)
        y = y0.clone()
        mora_apply(y, x, table, meta, backend="torch")
        (program,) = plan_module([table], meta, tokens).programs.values()
        assert program.gather is None
        ((_, direct),) = program.direct
        assert set(direct.kernels) == set(kernels), (tokens, direct.kernels)
        if tokens > 5 and traffic == "even":  # slots 0 and 2, equal rows: the batched product
            (p,) = [p for p in plan_module([table], meta, tokens).passes[0] if p.spec.n == 12]
            assert p.m_view is not None and min(p.sizes) == max(p.sizes) > 32
        torch.testing.assert_close(y, want, rtol=3e-2, atol=3e-2)
        assert torch.equal(bits(y[slot == -1]), bits(y0[slot == -1]))


def test_a_token_gets_the_same_bits_in_prefill_and_decode(isa, monkeypatch):
    """With M = I/2 every product is exact whatever sums it (BLAS, AMX, the native kernel), so a
    token's output shows its rotation and addition alone: the same bits in a prefill batch (rows,
    BLAS, additions) as alone at decode (`rope_apply`)."""
    from mora.kernels import mora_apply, prepare_batch
    from mora.kernels.torch_plan import plan_module
    from mora.spec import MoraSpec, MoraType

    _prefill_on_blas(monkeypatch)
    n = 16
    table = SlotTable(ShardLayout(64, 64), 2, n_max=n, dtype=BF16)
    table.set_slot(0, (torch.eye(n) * 0.5).to(BF16), MoraSpec(64, 64, n, MoraType.ROPE))
    tokens = 24  # 4 chunks each: 96 rows
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(11)).to(BF16)
    slot = torch.zeros(tokens, dtype=torch.int64)
    meta = prepare_batch(slot, 2)
    y = torch.zeros(tokens, 64, dtype=BF16)
    mora_apply(y, x, table, meta, backend="torch")
    for t in range(tokens):
        alone = torch.zeros(1, 64, dtype=BF16)
        mora_apply(alone, x[t : t + 1], table, prepare_batch(slot[:1], 2), backend="torch")
        assert torch.equal(bits(y[t]), bits(alone[0])), t
    (program,) = plan_module([table], meta, tokens).programs.values()
    ((_, direct),) = program.direct
    assert "blas" in direct.kernels


@pytest.mark.parametrize("n_other", [12, 16, None])
def test_bf16_prefill_reads_padded_m_rows_in_place(isa, monkeypatch, n_other):
    """Where a table's stored rows are longer than `n` (n=12, rows padded to 16 columns), the
    batched BLAS product of consecutive slots reads the `M`s as stored: no copy of them (over the
    `[:n, :n]` view bmm copied every `M` first), and the reference's values. A plan bound on
    such a table also runs on another table of the same signature stored otherwise (`n_other`:
    n_max 12 with its own padding, n_max 16 whose rows `n` does not fill)."""
    from mora.kernels import mora_apply
    from mora.spec import MoraSpec, MoraType

    _prefill_on_blas(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    Ms = [(torch.randn(12, 12, generator=gen) * 0.1).to(BF16) for _ in range(2)]
    spec = MoraSpec(40, 72, 12, MoraType.ROPE)

    def table_of(n_max: int) -> SlotTable:
        table = SlotTable(ShardLayout(40, 72), 3, n_max=n_max, dtype=BF16)
        for s, M in enumerate(Ms):
            table.set_slot(s, M, spec)
        return table

    table = table_of(12)
    assert table.Mt.stride(1) == 16 and not table.weights(12).is_contiguous()
    tokens = 60  # slots 0, 1 alternating: 30 tokens x 4 chunks each, one batched product
    slot = torch.arange(tokens) % 2
    x, y0, want, meta = _batch_and_reference(table, slot, gen)
    y = y0.clone()
    mora_apply(y, x, table, meta, backend="torch")  # binds the plan
    y = y0.clone()
    with torch.profiler.profile() as prof:
        mora_apply(y, x, table, meta, backend="torch")
    ran = {e.name for e in prof.events()}
    assert "aten::bmm" in ran and not ran & {"aten::copy_", "aten::clone", "aten::contiguous"}, sorted(ran)
    torch.testing.assert_close(y, want, rtol=3e-2, atol=3e-2)
    if n_other is not None:  # the same signature (layout, specs), a table stored otherwise
        other = table_of(n_other) if n_other != 12 else table_of(12)
        y2 = y0.clone()
        mora_apply(y2, x, other, meta, backend="torch")
        assert torch.equal(bits(y2), bits(y))
