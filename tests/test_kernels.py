"""The fused multi-adapter operator: every backend against the reference and the library ops.

The Triton backend runs under `TRITON_INTERPRET=1` when no CUDA device is present. The
`backend` fixture sets that variable only for the tests that use Triton (and restores it);
this is enough because `mora.kernels.triton_gpu` defines its kernel on first call, keyed by
the flag's value then, so it does not matter whether Triton was imported earlier. Triton's
interpreter is slow: shapes here are small (tens of features, n <= 16).
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

import mora.kernels.dispatch as kernels
from mora.kernels import ShardLayout, SlotTable, mora_apply, mora_apply_slices, prepare_batch, select_backend
from mora.merge import merge_
from mora.ops import mora_forward
from mora.spec import MoraSpec, MoraType

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# torch-blas: the torch backend with torch's BLAS products instead of the native CPU kernel
# (`MORA_CPU_KERNEL=blas`; float32 tables otherwise use `mora.kernels.native`).
BACKENDS = ["reference", "torch", "torch-blas", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max |backend - reference| / max(1, max |reference|): the reference computes in the table's
# dtype, the fused backends accumulate in float32, so half-precision cases differ by roundings.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
TYPES = [1, 2, 3, 4, 6]
# (in_f, out_f, n): padding, type-6 outputs tiled past c*n, uneven groups / truncated chunks.
SHAPES = [(40, 72, 12), (72, 40, 16)]
# A mixed table for one 56 -> 72 module: every type, different n, one empty slot (6).
MIXED = [(6, 16), (1, 12), (2, 10), (3, 14), (4, 9), (6, 8), None]
MIXED_SHAPE = (56, 72)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    if request.param == "torch-blas":
        monkeypatch.setenv("MORA_CPU_KERNEL", "blas")
        return "torch"
    return request.param


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def make_table(
    layout: ShardLayout,
    entries: list[tuple[int, int] | None],
    dtype: torch.dtype,
    rng: torch.Generator,
    n_max: int = 16,
    device: str = DEVICE,
) -> tuple[SlotTable, list[torch.Tensor | None]]:
    """A table with `entries[s] = (type, n)` in slot `s` (None: empty); returns it and the Ms."""
    table = SlotTable(layout, len(entries), n_max=n_max, dtype=dtype, device=device)
    Ms: list[torch.Tensor | None] = []
    for s, entry in enumerate(entries):
        if entry is None:
            Ms.append(None)
            continue
        t, n = entry
        spec = MoraSpec(layout.in_features, layout.out_features, n, MoraType(t))
        spec.check()
        M = (torch.randn(n, n, generator=rng) / n**0.5).to(dtype)
        table.set_slot(s, M.to(device), spec)
        Ms.append(M)
    return table, Ms


def slots_for(popularity: str, T: int, S: int, rng: torch.Generator) -> torch.Tensor:
    if popularity == "distinct":  # every adapter once before any repeats, in shuffled order
        slot = torch.arange(T) % S
        slot = slot[torch.randperm(T, generator=rng)]
    elif popularity == "uniform":
        slot = torch.randint(-1, S, (T,), generator=rng)
    elif popularity == "zipf":
        p = 1.0 / torch.arange(1, S + 2, dtype=torch.float64) ** 1.3
        slot = torch.multinomial(p, T, replacement=True, generator=rng) - 1  # -1 is the most popular
    elif popularity == "identical":
        slot = torch.full((T,), 1)
    else:
        slot = torch.full((T,), -1)
    return slot.to(DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    a, e = actual.double().cpu(), expected.double().cpu()
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


def run(name: str, table: SlotTable, x: torch.Tensor, slot: torch.Tensor, y0: torch.Tensor, merged: int = -1) -> torch.Tensor:
    y = y0.clone()
    mora_apply(y, x, table, prepare_batch(slot, table.max_slots, merged_slot=merged), backend=name)
    return y


def truth(x: torch.Tensor, table: SlotTable, Ms: list, slot: torch.Tensor) -> torch.Tensor:
    """The per-token update straight from `mora_forward`, float64, no base."""
    lay = table.layout
    out = torch.zeros(x.shape[0], lay.out_features, dtype=torch.float64)
    for t, s in enumerate(slot.tolist()):
        if s >= 0 and Ms[s] is not None:
            out[t] = mora_forward(x[t].double().cpu(), Ms[s].double(), table.specs[s])
    return out


# --- every backend vs the reference -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("t", TYPES)
def test_types_and_dtypes(backend, rng, t, shape, dtype):
    in_f, out_f, n = shape
    table, Ms = make_table(ShardLayout(in_f, out_f), [(t, n), None, (t, n)], dtype, rng)
    slot = torch.tensor([0, 2, -1, 0, 1, 2, 0, 2, -1, 0, 0], device=DEVICE)
    x = torch.randn(slot.shape[0], in_f, generator=rng).to(DEVICE, dtype)
    y0 = torch.randn(slot.shape[0], out_f, generator=rng).to(DEVICE, dtype)
    y = run(backend, table, x, slot, y0)
    assert y.dtype == dtype
    assert_close(y, run("reference", table, x, slot, y0), dtype)
    untouched = (slot == -1) | (slot == 1)
    assert torch.equal(y[untouched], y0[untouched])
    if dtype == torch.float32:  # the reference itself against the library's per-token update
        assert_close(y.cpu() - y0.cpu(), truth(x, table, Ms, slot), dtype)


@pytest.mark.parametrize("T", [1, 3, 7, 133])
@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf", "identical", "all-1"])
def test_popularity_heterogeneous_table(backend, rng, popularity, T):
    in_f, out_f = MIXED_SHAPE
    table, Ms = make_table(ShardLayout(in_f, out_f), MIXED, torch.float32, rng)
    slot = slots_for(popularity, T, len(MIXED), rng)
    x = torch.randn(T, in_f, generator=rng).to(DEVICE)
    y0 = torch.randn(T, out_f, generator=rng).to(DEVICE)
    y = run(backend, table, x, slot, y0)
    assert_close(y, run("reference", table, x, slot, y0), torch.float32)
    assert_close(y.cpu() - y0.cpu(), truth(x, table, Ms, slot), torch.float32)
    untouched = (slot == -1) | (slot == 6)
    assert torch.equal(y[untouched], y0[untouched])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize(
    ("counts", "batched"),
    [
        ({0: 2, 1: 2, 2: 2, 3: 2}, "view"),  # equal rows, consecutive slots: one bmm over a table view
        ({1: 3, 3: 3, 5: 3}, "view"),  # slots in arithmetic progression: a strided view
        ({0: 1, 2: 1, 5: 1}, "gather"),  # equal rows, gathered M's
        ({1: 3, 2: 1, 4: 2, 5: 3}, "pad"),  # unequal rows: padded, gathered
        ({1: 2, 3: 1, 5: 2}, "pad-view"),  # unequal rows, slots in progression: padded, strided view
        ({0: 1, 1: 4, 2: 1}, ""),  # too much padding: one mm per adapter
    ],
    ids=["view", "strided", "gather", "padded", "padded-strided", "unbatched"],
)
def test_torch_batched_gemm_paths(monkeypatch, rng, t, dtype, counts, batched):
    """Decode-shaped batches (few rows per adapter) that the torch backend runs as one batched
    GEMM, against the reference, with the path taken checked."""
    import mora.kernels.torch_cpu as torch_cpu

    taken: list[str] = []
    real = torch_cpu.plan_module

    def plan(*args):
        result = real(*args)
        taken.extend(p.batched for p in result.passes[0])
        return result

    monkeypatch.setattr(torch_cpu, "plan_module", plan)
    in_f, out_f = 72, 40
    table, Ms = make_table(ShardLayout(in_f, out_f), [(t, 12)] * 6, dtype, rng)
    slot = torch.tensor([s for s, c in counts.items() for _ in range(c)] + [-1])
    slot = slot[torch.randperm(slot.shape[0], generator=rng)]
    x = torch.randn(slot.shape[0], in_f, generator=rng).to(dtype)
    y0 = torch.randn(slot.shape[0], out_f, generator=rng).to(dtype)
    y = run("torch", table, x, slot, y0)
    assert taken == [batched]
    assert_close(y, run("reference", table, x, slot, y0), dtype)
    assert torch.equal(y[slot == -1], y0[slot == -1])
    if dtype == torch.float32:
        assert_close(y - y0, truth(x, table, Ms, slot), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("t", "rows_major"), [(6, True), (1, False)], ids=["v@Mt", "M@vT"])
def test_torch_batched_gemm_reads_stored_rows(monkeypatch, rng, t, rows_major, dtype):
    """With torch's BLAS products, a batched product over consecutive slots whose `M`s fill a
    table stored with padded rows (n = n_max = 12, rows of 16) multiplies the `M`s as stored,
    `[k, 12, 16]`, in either orientation (2 tokens an adapter; type 6: 8 rows, `v @ M.T`; type 1:
    2 rows, `M @ v.T`), never the `[:12, :12]` view that bmm copies first in half precision; and a table
    of the same signature stored otherwise (n_max 16) runs the same plan through the view."""
    import mora.kernels.torch_cpu as torch_cpu

    monkeypatch.setenv("MORA_CPU_KERNEL", "blas")
    in_f, out_f = 72, 40
    # the CPU's storage (rows padded to whole panels), wherever the suite runs
    table, Ms = make_table(ShardLayout(in_f, out_f), [(t, 12)] * 4, dtype, rng, n_max=12, device="cpu")
    assert table.Mt.stride(1) == 16
    other = SlotTable(table.layout, 4, n_max=16, dtype=dtype)
    for s, M in enumerate(Ms):
        other.set_slot(s, M, table.specs[s])
    slot = torch.tensor([s for s in range(4) for _ in range(2)] + [-1])  # 2 tokens an adapter
    slot = slot[torch.randperm(slot.shape[0], generator=rng)]
    x = torch.randn(slot.shape[0], in_f, generator=rng).to(dtype)
    y0 = torch.randn(slot.shape[0], out_f, generator=rng).to(dtype)
    meta = prepare_batch(slot, 4)
    y = y0.clone()
    mora_apply(y, x, table, meta, backend="torch")  # binds the plan
    (p,) = torch_cpu.plan_module([table], meta, slot.shape[0]).passes[0]
    assert p.batched == "view" and (torch_cpu._ROWS_MAJOR[0] < max(p.sizes) <= torch_cpu._ROWS_MAJOR[1]) == rows_major
    y = y0.clone()
    with torch.profiler.profile(record_shapes=True) as prof:
        mora_apply(y, x, table, meta, backend="torch")
    bmm = [e.input_shapes for e in prof.events() if e.name == "aten::bmm"]
    m_shape = [4, 12, 16] if rows_major else [4, 16, 12]
    assert len(bmm) == 1 and m_shape in bmm[0], bmm
    assert not {e.name for e in prof.events()} & {"aten::clone", "aten::contiguous"}
    want = run("reference", table, x, slot, y0)
    assert_close(y, want, dtype)
    assert torch.equal(y[slot == -1], y0[slot == -1])
    y2 = y0.clone()
    mora_apply(y2, x, other, meta, backend="torch")
    assert_close(y2, want, dtype)


def test_rows_without_adapter_bit_identical(backend, rng):
    in_f, out_f = MIXED_SHAPE
    table, _ = make_table(ShardLayout(in_f, out_f), MIXED, torch.bfloat16, rng)
    slot = slots_for("uniform", 37, len(MIXED), rng)
    x = torch.randn(37, in_f, generator=rng).to(DEVICE, torch.bfloat16)
    y0 = (torch.randn(37, out_f, generator=rng) * 1e3).to(DEVICE, torch.bfloat16)
    y0[slot == -1, 0] = float("inf")  # untouched means untouched, even where arithmetic would not
    y = run(backend, table, x, slot, y0)
    untouched = (slot == -1) | (slot == 6)
    assert untouched.any() and (~untouched).any()
    assert torch.equal(y[untouched], y0[untouched])
    assert not torch.equal(y[~untouched], y0[~untouched])


def test_reused_slots_equal_a_fresh_table(backend, rng):
    """Slots emptied and refilled as page-ins do (a larger `M` cleared, a smaller one set, an
    empty slot cleared again: clear_slot zeroes only a slot that holds an adapter), or set over
    a larger `M` without a clear (set_slot zeroes only then), serve what a table filled once
    serves, bit for bit: nothing of an earlier adapter is left in the padding."""
    in_f, out_f = MIXED_SHAPE
    layout = ShardLayout(in_f, out_f)
    fresh, Ms = make_table(layout, MIXED, torch.float32, rng)
    reused, _ = make_table(layout, [(6, 16)] * len(MIXED), torch.float32, rng)  # every slot full, n = n_max
    for s, entry in enumerate(MIXED):
        reused.clear_slot(s)
        reused.clear_slot(s)  # already empty
        if entry is not None:
            reused.set_slot(s, Ms[s].to(DEVICE), fresh.specs[s])
    overwritten, _ = make_table(layout, [(6, 16)] * len(MIXED), torch.float32, rng)  # set over, not cleared
    for s, entry in enumerate(MIXED):
        if entry is not None:
            overwritten.set_slot(s, Ms[s].to(DEVICE), fresh.specs[s])
        else:
            overwritten.clear_slot(s)
    slot = slots_for("uniform", 29, len(MIXED), rng)
    x = torch.randn(29, in_f, generator=rng).to(DEVICE)
    y0 = torch.randn(29, out_f, generator=rng).to(DEVICE)
    for table in (reused, overwritten):
        assert torch.equal(table.M, fresh.M) and table.signature is fresh.signature
        assert torch.equal(run(backend, table, x, slot, y0), run(backend, fresh, x, slot, y0))


def test_signature_follows_every_write(rng):
    """The signature, computed when read, is the interned one of the table's contents after
    each write: a plan keyed by it never outlives the contents it was made for."""
    in_f, out_f = MIXED_SHAPE
    layout = ShardLayout(in_f, out_f)
    fresh, Ms = make_table(layout, MIXED, torch.float32, rng)
    table = SlotTable(layout, len(MIXED), n_max=fresh.n_max, device=DEVICE)
    empty = table.signature
    s = next(i for i, e in enumerate(MIXED) if e is not None)
    table.set_slot(s, Ms[s].to(DEVICE), fresh.specs[s])
    assert table.signature is not empty
    table.clear_slot(s)
    assert table.signature is empty
    for i, entry in enumerate(MIXED):
        if entry is not None:
            table.set_slot(i, Ms[i].to(DEVICE), fresh.specs[i])
            assert table.signature is not empty
    assert table.signature is fresh.signature


# --- packed projections and tensor-parallel shards -------------------------------------------


def test_packed_slices(backend, rng):
    """q/k/v-like slices of different widths and n (v untargeted) in one packed output."""
    in_f, widths = 48, [48, 16, 24]
    entries = [[(6, 12), (1, 8)], [(1, 8), (6, 10)], None]
    tables, Ms = [], []
    for width, ent in zip(widths, entries, strict=True):
        if ent is None:
            tables.append(None)
            Ms.append(None)
            continue
        table, ms = make_table(ShardLayout(in_f, width), ent, torch.float32, rng, n_max=12)
        tables.append(table)
        Ms.append(ms)
    offsets = [0, 48, 64, 88]
    slot = torch.tensor([1, 0, -1, 1, 1, 0, 1], device=DEVICE)
    x = torch.randn(7, in_f, generator=rng).to(DEVICE)
    y0 = torch.randn(7, offsets[-1], generator=rng).to(DEVICE)
    y = y0.clone()
    mora_apply_slices(y, x, tables, prepare_batch(slot, 2), offsets, backend=backend)
    expect = y0.double().cpu()
    for i, table in enumerate(tables):
        if table is not None:
            expect[:, offsets[i] : offsets[i + 1]] += truth(x, table, Ms[i], slot)
    assert_close(y, expect, torch.float32)
    assert torch.equal(y[:, 88:], y0[:, 88:]) and torch.equal(y[2], y0[2])


@pytest.mark.parametrize("merged", [-1, 0, 1, 3])
@pytest.mark.parametrize("popularity", ["distinct", "uniform", "zipf"])
def test_packed_slices_uneven_targets_and_merged(backend, rng, popularity, merged):
    """Adapters that target different slices of one packed module (slot 1 only the middle one,
    slot 3 only the last), with and without a merged adapter: the packed call equals one
    reference call per slice, and rows that no adapter touches stay bit-identical."""
    in_f, widths = 56, [72, 24, 40]
    per_slice = [
        [(6, 16), None, (1, 12), None, (3, 14)],
        [(1, 8), (6, 10), (6, 10), None, (1, 8)],
        [(4, 9), None, (2, 10), (6, 8), None],
    ]
    tables = [make_table(ShardLayout(in_f, w), ent, torch.float32, rng)[0] for w, ent in zip(widths, per_slice, strict=True)]
    offsets = [0, 72, 96, 136]
    T = 29
    slot = slots_for(popularity, T, 5, rng)
    x = torch.randn(T, in_f, generator=rng).to(DEVICE)
    y0 = torch.randn(T, offsets[-1], generator=rng).to(DEVICE)
    meta = prepare_batch(slot, 5, merged_slot=merged)
    y = y0.clone()
    mora_apply_slices(y, x, tables, meta, offsets, backend=backend)
    for i, table in enumerate(tables):
        cols = slice(offsets[i], offsets[i + 1])
        expect = run("reference", table, x, slot, y0[:, cols], merged)
        assert_close(y[:, cols], expect, torch.float32)
    if merged < 0:
        untouched = (slot == -1).cpu()
        assert torch.equal(y[untouched], y0[untouched])
    else:
        assert torch.equal(y[slot == merged], y0[slot == merged])


@pytest.mark.parametrize("t", TYPES)
def test_one_class_every_row_adapted(backend, rng, t):
    """Several adapters of one (type, n) covering every row: whole-batch and permuted paths,
    column shards cutting through output periods, `y` a strided slice of a wider buffer, and a
    merged adapter of the same class (each row then gets two updates of one class)."""
    in_f, out_f, n = 40, 72, 12
    cuts = [(0, out_f), (5, 50), (50, 72)]
    layouts = [ShardLayout(in_f, out_f, out_start=a, out_end=b) for a, b in cuts]
    state = rng.get_state()
    tables = []
    for lay in layouts:
        rng.set_state(state)
        tables.append(make_table(lay, [(t, n)] * 3, torch.float32, rng)[0])
    x = torch.randn(9, in_f, generator=rng).to(DEVICE)
    for slot, merged in [([2] * 9, -1), ([0, 2, 1, 1, 0, 2, 2, 0, 1], -1), ([0, 2, 1, 1, 0, 2, 2, 0, 1], 1)]:
        slot = torch.tensor(slot, device=DEVICE)
        meta = prepare_batch(slot, 3, merged_slot=merged)
        for table in tables:
            w = table.layout.local_out
            wide = torch.randn(9, w + 7, generator=rng).to(DEVICE)
            out = wide.clone()
            mora_apply(out[:, 3 : 3 + w], x, table, meta, backend=backend)  # a strided y
            assert_close(out[:, 3 : 3 + w], run("reference", table, x, slot, wide[:, 3 : 3 + w], merged), torch.float32)
            assert torch.equal(out[:, :3], wide[:, :3]) and torch.equal(out[:, 3 + w :], wide[:, 3 + w :])


def _sharded_tables(rng: torch.Generator, layouts: list[ShardLayout]) -> list[SlotTable]:
    """The mixed adapters (same Ms) in one table per layout."""
    state = rng.get_state()
    tables = []
    for lay in layouts:
        rng.set_state(state)
        tables.append(make_table(lay, MIXED, torch.float32, rng)[0])
    return tables


@pytest.mark.parametrize("merged", [-1, 0])
def test_column_shards_concatenate(backend, rng, merged):
    in_f, out_f = MIXED_SHAPE
    cuts = [0, 20, 37, out_f]  # uneven, not aligned with any n
    full, *parts = _sharded_tables(
        rng, [ShardLayout(in_f, out_f)] + [ShardLayout(in_f, out_f, out_start=a, out_end=b) for a, b in itertools.pairwise(cuts)]
    )
    slot = slots_for("uniform", 19, len(MIXED), rng)
    x = torch.randn(19, in_f, generator=rng).to(DEVICE)
    zeros = torch.zeros(19, out_f, device=DEVICE)
    whole = run(backend, full, x, slot, zeros, merged)
    pieces = [run(backend, t, x, slot, zeros[:, : t.layout.local_out], merged) for t in parts]
    assert_close(torch.cat(pieces, dim=1), whole, torch.float32)
    assert_close(whole, run("reference", full, x, slot, zeros, merged), torch.float32)


@pytest.mark.parametrize("merged", [-1, 3])
def test_row_shards_sum(backend, rng, merged):
    in_f, out_f = MIXED_SHAPE
    cuts = [0, 13, 40, in_f]  # cuts through chunks and groups; the first features are also padding
    full, *parts = _sharded_tables(
        rng, [ShardLayout(in_f, out_f)] + [ShardLayout(in_f, out_f, in_start=a, in_end=b) for a, b in itertools.pairwise(cuts)]
    )
    slot = slots_for("uniform", 19, len(MIXED), rng)
    x = torch.randn(19, in_f, generator=rng).to(DEVICE)
    zeros = torch.zeros(19, out_f, device=DEVICE)
    whole = run(backend, full, x, slot, zeros, merged)
    partial = sum(run(backend, t, x[:, t.layout.in_start : t.layout.in_end], slot, zeros, merged) for t in parts)
    assert_close(partial, whole, torch.float32)
    assert_close(whole, run("reference", full, x, slot, zeros, merged), torch.float32)


# --- merged slot ------------------------------------------------------------------------------


@pytest.mark.parametrize("merged", [0, 1])  # a type-6 and a type-1 adapter merged
def test_merged_slot_equals_merged_weights_plus_others(backend, rng, merged):
    in_f, out_f = MIXED_SHAPE
    table, Ms = make_table(ShardLayout(in_f, out_f), MIXED, torch.float32, rng)
    W = torch.randn(out_f, in_f, generator=rng) * 0.05
    W_merged = W.clone()
    merge_(W_merged, Ms[merged], table.specs[merged])
    slot = slots_for("uniform", 41, len(MIXED), rng)
    x = torch.randn(41, in_f, generator=rng)
    # what every token should see: the base weights plus its own adapter, merged or not
    expect = (x.double() @ W.double().T) + truth(x, table, Ms, slot)
    base_out = (x @ W_merged.T).to(DEVICE)
    y = run(backend, table, x.to(DEVICE), slot, base_out, merged)
    assert_close(y, expect, torch.float32)
    own = slot == merged
    assert own.any() and torch.equal(y[own], base_out[own])  # the merged adapter's tokens skip the update


# --- the selector -----------------------------------------------------------------------------


@pytest.fixture
def fresh_selector(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No override in the environment and an empty "already logged" set."""
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    monkeypatch.setattr(kernels, "_logged", set())
    return monkeypatch


def test_selector_defaults_by_device(fresh_selector, caplog):
    with caplog.at_level(logging.INFO, logger="mora.kernels"):
        assert select_backend("cpu") == "torch"
        assert select_backend(torch.device("cpu")) == "torch"
    assert [r.getMessage() for r in caplog.records] == ["MoRA fused operator: torch backend (cpu device)"]
    has_triton = kernels._triton_available()
    assert select_backend("cuda") == ("triton" if has_triton else "torch")


@pytest.mark.parametrize("name", list(kernels.BACKENDS))
def test_selector_env_override(fresh_selector, caplog, name):
    fresh_selector.setenv(kernels.ENV_BACKEND, f" {name.upper()} ")
    with caplog.at_level(logging.INFO, logger="mora.kernels"):
        assert select_backend("cpu") == name
        assert select_backend("cuda") == name
    messages = [r.getMessage() for r in caplog.records]
    assert f"MoRA fused operator: {name} backend (forced by MORA_KERNEL_BACKEND)" in messages


def test_selector_rejects_unknown(fresh_selector):
    fresh_selector.setenv(kernels.ENV_BACKEND, "cuda-graphs")
    with pytest.raises(ValueError, match="MORA_KERNEL_BACKEND"):
        select_backend("cpu")


def test_mora_apply_uses_forced_backend(fresh_selector, backend, rng):
    """`mora_apply` without `backend=` dispatches through the selector (env read per call)."""
    fresh_selector.setenv(kernels.ENV_BACKEND, backend)
    in_f, out_f = MIXED_SHAPE
    table, _ = make_table(ShardLayout(in_f, out_f), MIXED, torch.float32, rng)
    slot = slots_for("zipf", 9, len(MIXED), rng)
    x = torch.randn(9, in_f, generator=rng).to(DEVICE)
    y = torch.zeros(9, out_f, device=DEVICE)
    mora_apply(y, x, table, prepare_batch(slot, table.max_slots))
    assert_close(y, run("reference", table, x, slot, torch.zeros_like(y)), torch.float32)


def test_triton_rejects_cpu_without_interpreter(monkeypatch, rng):
    pytest.importorskip("triton")
    from mora.kernels.triton_gpu import mora_apply_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    table, _ = make_table(ShardLayout(8, 8), [(1, 4)], torch.float32, rng)
    x = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mora_apply_triton(torch.zeros(2, 8), x, table, prepare_batch(torch.zeros(2, dtype=torch.long), 1))


def test_torch_backend_without_host_segments(rng):
    """The torch backend also runs from the device-side metadata alone (as prepared on a GPU)."""
    in_f, out_f = MIXED_SHAPE
    table, _ = make_table(ShardLayout(in_f, out_f), MIXED, torch.float32, rng)
    slot = slots_for("zipf", 23, len(MIXED), rng)
    x = torch.randn(23, in_f, generator=rng).to(DEVICE)
    y = torch.zeros(23, out_f, device=DEVICE)
    meta = prepare_batch(slot, table.max_slots, merged_slot=2, host_segments=False)
    assert meta.segments is None
    mora_apply(y, x, table, meta, backend="torch")
    assert_close(y, run("reference", table, x, slot, torch.zeros_like(y), 2), torch.float32)


# --- the Triton kernel as the GPU compiler and a CUDA graph see it -------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["compress", "expand"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_triton_kernel_compiles_for_sm90(monkeypatch, dtype, compress):
    """Ahead-of-time compilation to PTX/cubin for an H100-class GPU, in every table dtype and
    both launches, which needs no GPU: the interpreter does not check what the compiler rejects
    (loop-carried types, early returns)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mora.kernels import triton_gpu

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    ints = {"stride_yt", "stride_xt", "stride_ms", "stride_mi", "stride_vp", "stride_vt", "in_f", "out_f", "in_start",
            "in_end", "out_start", "local_out", "num_rows"}
    consts = {"stride_yo": 1, "stride_xi": 1, "COMPRESS": compress, "BLOCK_T": triton_gpu.BLOCK_T, "BLOCK_N": 64,
              "BLOCK_K": 64, "PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST_DOT": False}
    signature = {}
    for name in triton_gpu._mora_kernel.__code__.co_varnames[: triton_gpu._mora_kernel.__code__.co_argcount]:
        if name in consts:
            signature[name] = "constexpr"
        elif name in ints:
            signature[name] = "i32"
        elif name == "order_ptr":
            signature[name] = "*i64"
        elif name in ("y_ptr", "x_ptr", "m_ptr", "v_ptr"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "*i32"
    src = ASTSource(fn=triton_gpu._kernel(False), signature=signature, constexprs=consts)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except RuntimeError as e:  # no ptxas in this Triton build: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"no CUDA toolchain: {e}")
        raise
    ptx = compiled.asm["ptx"]
    assert ("st.global" in ptx) if compress else ("mma" in ptx or "fma" in ptx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_cuda_graph_replay(rng):
    """Captured once, replayed after the batch metadata, the merged slot and a slot's M were
    updated in place: the replay computes the new batch (no host state baked into the graph)."""
    from mora.kernels.triton_gpu import mora_apply_triton

    in_f, out_f = MIXED_SHAPE
    table, _ = make_table(ShardLayout(in_f, out_f), MIXED, torch.float32, rng)
    T, S = 29, len(MIXED)
    x = torch.randn(T, in_f, generator=rng).to(DEVICE)
    y = torch.zeros(T, out_f, device=DEVICE)
    meta = prepare_batch(slots_for("uniform", T, S, rng), S)
    mora_apply_triton(y, x, table, meta)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mora_apply_triton(y, x, table, meta)
    for popularity, merged in [("zipf", -1), ("distinct", 3), ("identical", 1)]:
        slot = slots_for(popularity, T, S, rng)
        fresh = prepare_batch(slot, S, merged_slot=merged)
        for name in ("slot", "order", "seg_start", "seg_slot", "num_segments", "merged"):
            getattr(meta, name).copy_(getattr(fresh, name))
        table.set_slot(1, (torch.randn(12, 12, generator=rng) / 12**0.5).to(DEVICE), table.specs[1])
        x.copy_(torch.randn(T, in_f, generator=rng))
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, run("reference", table, x, slot, torch.zeros_like(y), merged), torch.float32)
