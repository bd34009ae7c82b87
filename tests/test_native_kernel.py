"""The native CPU product (`mora.kernels.native.grouped_mm`) against its semantics, and how it
is chosen, built and loaded.

Every test of the kernels runs once per ISA path (`isa`: forced with `MORA_CPU_ISA`), skipped
where the CPU lacks a feature the path needs; the paths' results are compared bit for bit.
The fused operator's own tests (test_kernels.py) run the torch backend with this kernel
(float32) and with torch's BLAS (`torch-blas`); the engine tests serve through it.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mora.kernels.native as native
from mora.kernels import ShardLayout, SlotTable
from mora.kernels.native import ISAS, NativeKernelError, grouped_mm, native_isa, native_status

X86_64 = platform.machine().lower() in native.X86_64
needs_x86 = pytest.mark.skipif(not X86_64, reason="the native kernel needs an x86-64 CPU")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_status(monkeypatch: pytest.MonkeyPatch):
    """The mode decision re-made (it is cached per process), and afterwards made again for the
    process's own settings (the library runs the path they name)."""
    native._status.cache_clear()
    yield
    monkeypatch.undo()
    native._status.cache_clear()
    if X86_64:
        native_status()


def use_path(monkeypatch: pytest.MonkeyPatch, isa: str) -> str | None:
    """Runs the native kernel on path `isa` from now on; None, or the features the CPU lacks for it."""
    monkeypatch.setenv(native.ENV_ISA, isa)
    native._status.cache_clear()
    try:
        native_status()
    except NativeKernelError as exc:
        if "lacks" not in str(exc):
            raise
        return str(exc).split("lacks ", 1)[1]
    return None


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch, fresh_status) -> str:
    """Each ISA path in turn, the test skipped where the CPU cannot run it."""
    if not X86_64:
        pytest.skip("the native kernel needs an x86-64 CPU")
    missing = use_path(monkeypatch, request.param)
    if missing:
        pytest.skip(f"needs {missing}")
    assert native_isa() == request.param
    return request.param


def each_path(monkeypatch: pytest.MonkeyPatch, fn) -> dict[str, object]:
    """`fn()` on every ISA path this CPU runs (at least two, or the test skips)."""
    out = {isa: fn() for isa in ISAS if X86_64 and not use_path(monkeypatch, isa)}
    if len(out) < 2:
        pytest.skip(f"this CPU runs fewer than two ISA paths ({', '.join(out) or 'none'})")
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (torch.equal on floats would take -0 for +0)."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def reference(V, offsets, slots, Mt, n, alpha, out):
    """The docstring's semantics, in float64."""
    ref = out.clone()
    for g in range(len(slots)):
        a, b = int(offsets[g]), int(offsets[g + 1])
        ref[a:b, :n] = (alpha * (V[a:b, :n].double() @ Mt[int(slots[g]), :n, :n].double())).float()
    return ref


def problem(n: int, sizes: list[int], slots: list[int], S: int, n_max: int, seed: int = 0, spare_rows: int = 3):
    g = torch.Generator().manual_seed(seed)
    Mt = torch.randn(S, n_max, n_max + 5, generator=g)[:, :, :n_max]  # rows padded, as a CPU table's
    R = sum(sizes) + spare_rows  # rows past the groups: never written
    V = torch.randn(R, n + 7, generator=g)
    out = torch.full((R, n + 3), 7.0)
    offsets = torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)
    return V, offsets, torch.tensor(slots, dtype=torch.int64), Mt, out


def zipf_sizes(groups: int, total: int, gen: torch.Generator) -> list[int]:
    weights = 1.0 / torch.arange(1, groups + 1, dtype=torch.float64)
    draws = torch.multinomial(weights, total, replacement=True, generator=gen)
    return torch.bincount(draws, minlength=groups).tolist()


@pytest.mark.parametrize("n", [1, 5, 16, 17, 37, 100, 348])
# [100]: units of 15 rows and a last of 10, run as 4 + 3 panel-interleaved (a run of unequal units)
@pytest.mark.parametrize("sizes", [[1], [16], [17], [3, 0, 40, 1], [12] * 5, [100], list(range(1, 20)), "zipf"])
@pytest.mark.parametrize("alpha", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_semantics(isa, n, sizes, alpha, dtype):
    gen = torch.Generator().manual_seed(n)
    if sizes == "zipf":  # skewed popularity: one adapter has most rows, many have one or none
        sizes = zipf_sizes(16, 97, gen)
    S = 24
    slots = torch.randint(0, S, (len(sizes),), generator=gen).tolist()
    V, offsets, slots_t, Mt, out = (t.to(dtype) if t.is_floating_point() else t
                                    for t in problem(n, sizes, slots, S, n_max=n + n % 4))
    want = reference(V.float(), offsets, slots_t, Mt.float(), n, alpha, out.float())
    grouped_mm(V, offsets, slots_t, Mt, n, alpha, out)
    scale = max(1.0, want.abs().max().item())
    if dtype == torch.float32:
        assert (out - want).abs().max().item() / scale < 2e-6 * n**0.5
    else:  # float32 sums rounded once: within half a bf16 ulp (2**-9 relative) of the exact result
        rows = int(offsets[-1])
        assert ((out[:rows, :n].float() - want[:rows, :n]).abs() <= want[:rows, :n].abs() * 2**-8 + 1e-5 * scale).all()
    rows = int(offsets[-1])
    assert torch.equal(out[rows:].float(), torch.full_like(out[rows:].float(), 7.0)), "rows past the groups were written"
    assert torch.equal(out[:, n:].float(), torch.full_like(out[:, n:].float(), 7.0)), "columns past n were written"


def test_negation_is_exact(isa):
    V, offsets, slots, Mt, out = problem(37, [5, 20], [1, 0], 2, 40)
    plus, minus = out.clone(), out.clone()
    grouped_mm(V, offsets, slots, Mt, 37, 1.0, plus)
    grouped_mm(V, offsets, slots, Mt, 37, -1.0, minus)
    assert torch.equal(plus[:25, :37], -minus[:25, :37])


def test_a_row_does_not_depend_on_the_batch(isa):
    """The same row times the same M gives the same bits alone, among other rows and groups,
    at any row position in its block and with any thread count (no batch-dependent summation)."""
    n, S = 348, 4
    V, offsets, slots, Mt, out = problem(n, [13, 40, 1, 7], [2, 0, 2, 3], S, 352)
    grouped_mm(V, offsets, slots, Mt, n, 1.0, out)
    threads = torch.get_num_threads()
    try:
        for row, slot in [(0, 2), (12, 2), (13, 0), (30, 0), (53, 2), (60, 3)]:
            torch.set_num_threads(1 if row % 2 else max(2, threads))
            alone = torch.zeros(1, n)
            grouped_mm(V[row : row + 1], torch.tensor([0, 1]), torch.tensor([slot]), Mt, n, 1.0, alone)
            assert torch.equal(alone[0], out[row, :n]), row
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_path_gives_the_same_bits(monkeypatch, fresh_status, dtype):
    """The ISA paths sum the same terms in the same order with one rounding each: the same bits
    for odd n and partial panels, 0-40 rows per group, zipf-skewed groups, any alpha."""
    gen = torch.Generator().manual_seed(3)
    cases = []
    for n, sizes, alpha in [(5, [1, 3], 1.0), (17, [16, 17, 2], -1.0), (37, [3, 0, 40, 1], 0.37),
                            (256, [12] * 5, 1.0), (348, zipf_sizes(16, 97, gen), -1.0)]:
        slots = torch.randint(0, 24, (len(sizes),), generator=gen).tolist()
        operands = problem(n, sizes, slots, 24, n_max=n + n % 4, seed=n)
        cases.append(([t.to(dtype) if t.is_floating_point() else t for t in operands], n, alpha))

    def run():
        outs = []
        for (V, offsets, slots, Mt, out), n, alpha in cases:
            out = out.clone()
            grouped_mm(V, offsets, slots, Mt, n, alpha, out)
            outs.append(bits(out))
        return outs

    (first, want), *others = each_path(monkeypatch, run).items()
    for isa, got in others:
        for case, (a, b) in enumerate(zip(want, got, strict=True)):
            assert torch.equal(a, b), f"{isa} differs from {first} in case {case}"


@pytest.mark.parametrize("where", ["subnormal V", "subnormal M", "tiny V and M", "one value of V", "one value of M"])
def test_dot_products_give_the_same_bits_with_tiny_values(monkeypatch, fresh_status, where):
    """avx512_bf16's vdpbf16ps reads subnormal operands as 0 and flushes subnormal sums; values
    under 2^-56 (products and sums near the subnormal range) send a unit (tiny V rows) or a block
    (tiny panels of M) to the widened kernel, so every path still gives the same bits.

    Each case differs on the dot-product path with the checks removed (tried)."""
    if X86_64 and use_path(monkeypatch, "avx512_bf16"):
        pytest.skip("the CPU has no AVX512_BF16")
    n, sizes = 37, [16, 3, 1, 9]  # rows 0-15 use slot 0, 16-18 slot 1, 19 slot 2, 20-28 slot 1
    V, offsets, slots, Mt, out = problem(n, sizes, [0, 1, 2, 1], 3, n_max=40, seed=2)
    V, Mt = V.clone(), Mt.clone()
    if where == "subnormal V":
        V[:16] *= 2.0**-128
    elif where == "subnormal M":
        Mt[1] *= 2.0**-130
    elif where == "tiny V and M":  # normal operands, subnormal products
        V[16:19] *= 2.0**-64
        Mt[1] *= 2.0**-64
    elif where == "one value of V":
        V[5] = 0.0
        V[5, 3] = 2.0**-130
    elif where == "one value of M":
        Mt[0] = 0.0
        Mt[0, 30, 17] = 2.0**-128
    V, Mt, out = V.bfloat16(), Mt.bfloat16(), out.bfloat16()

    def run():
        o = out.clone()
        grouped_mm(V, offsets, slots, Mt, n, 1.0, o)
        return bits(o)

    got = each_path(monkeypatch, run)
    assert all(torch.equal(got["avx512_bf16"], b) for b in got.values()), where


def test_reads_a_slot_table_in_place(isa):
    """The table's storage (rows padded to 64-byte lines on the CPU) is what the kernel reads."""
    table = SlotTable(ShardLayout(348, 700), 3, n_max=348)
    assert table.Mt.stride(1) == 352 and table.Mt.stride(2) == 1
    from mora.spec import MoraSpec

    spec = MoraSpec.from_rank(348, 700, 8, 6)
    M = torch.randn(spec.n, spec.n)
    table.set_slot(1, M, spec)
    assert torch.equal(table.M[1, : spec.n, : spec.n], M)
    V = torch.randn(4, spec.n)
    out = torch.zeros(4, spec.n)
    grouped_mm(V, torch.tensor([0, 4]), torch.tensor([1]), table.Mt, spec.n, 1.0, out)
    torch.testing.assert_close(out, V @ M.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(V=a["V"].double()), "CPU tensors of one dtype, float32 or bfloat16"),
        (lambda a: a.update(V=a["V"].bfloat16()), "CPU tensors of one dtype, float32 or bfloat16"),
        (lambda a: a.update(offsets=torch.tensor([0, 99])), "offsets out of range"),
        (lambda a: a.update(offsets=torch.tensor([3, 1])), "offsets out of range"),
        (lambda a: a.update(slots=torch.tensor([5])), "slot out of range"),
        (lambda a: a.update(slots=torch.tensor([0, 0])), "offsets [G+1] and slots [G]"),
        (lambda a: a.update(n=17), "n exceeds an operand"),
        (lambda a: a.update(V=a["V"].t().contiguous().t()), "rows must be contiguous"),
    ],
)
def test_bad_operands_are_refused(isa, change, message):
    args = dict(V=torch.randn(4, 16), offsets=torch.tensor([0, 4]), slots=torch.tensor([0]),
                Mt=torch.randn(2, 16, 16), n=16, alpha=1.0, out=torch.zeros(4, 16))
    change(args)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        grouped_mm(**args)


def test_mode_is_validated(monkeypatch, fresh_status):
    monkeypatch.setenv(native.ENV_KERNEL, "fast")
    with pytest.raises(NativeKernelError, match="MORA_CPU_KERNEL='fast': expected one of auto, native, blas"):
        native_status()


def test_blas_mode_never_uses_native(monkeypatch, fresh_status):
    monkeypatch.setenv(native.ENV_KERNEL, "blas")
    assert native_status() == (False, "MORA_CPU_KERNEL=blas")
    with pytest.raises(NativeKernelError, match="not in use: MORA_CPU_KERNEL=blas"):
        grouped_mm(torch.zeros(1, 1), torch.tensor([0, 1]), torch.tensor([0]), torch.zeros(1, 1, 1), 1, 1.0,
                   torch.zeros(1, 1))


def test_cpu_not_x86_64(monkeypatch, fresh_status, caplog):
    """`auto` falls back to BLAS and says why, once; `native` refuses, naming what is missing."""
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setenv(native.ENV_KERNEL, "native")
    with pytest.raises(NativeKernelError, match=re.escape("MORA_CPU_KERNEL=native, but this CPU is not x86-64 (aarch64)")):
        native_status()
    monkeypatch.setenv(native.ENV_KERNEL, "auto")
    with caplog.at_level(logging.WARNING, logger="mora.kernels.native"):
        assert native_status() == (False, "this CPU is not x86-64 (aarch64)")
        native_status()
    assert native_isa() is None
    assert [r.getMessage() for r in caplog.records] == [
        "MoRA CPU products use torch's BLAS, not the native kernel: this CPU is not x86-64 (aarch64)"
    ]


def test_isa_is_validated(monkeypatch, fresh_status):
    monkeypatch.setenv(native.ENV_ISA, "sse9")
    with pytest.raises(NativeKernelError, match="MORA_CPU_ISA='sse9': expected one of auto, avx512_bf16, avx512, avx2, portable"):
        native_status()


@needs_x86
def test_auto_runs_the_best_path_the_cpu_has(monkeypatch, fresh_status):
    """The library's CPU check agrees with the kernel's own report of the CPU, and `auto` takes the first path
    it allows.

    The flags come from /proc/cpuinfo, not torch: torch's capability follows ATEN_CPU_CAPABILITY, which the
    AVX2 emulation (tests/emulate_cpu) caps while the CPU itself keeps its AVX-512."""
    monkeypatch.setenv(native.ENV_ISA, "auto")
    enabled, why = native_status()
    runs = [isa for isa in ISAS if not native._missing(isa)]
    best = _auto_path()
    assert enabled and runs[-1] == "portable" and native_isa() == best and f"isa={best} (" in why
    flags = _cpuinfo_flags()
    assert ("avx512_bf16" in runs) == ({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags)
    assert ("avx512" in runs) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
    assert ("avx2" in runs) == ({"avx2", "fma"} <= flags)


def _auto_path() -> str:
    """The path `auto` should take: the first this CPU runs, but avx512_bf16 on AMD CPUs only (its
    dot products pay there, kernel_dp.h)."""
    vendor = next(row.split(":", 1)[1].strip() for row in open("/proc/cpuinfo").read().splitlines()
                  if row.startswith("vendor_id"))
    return next(isa for isa in ISAS if not native._missing(isa) and (isa != "avx512_bf16" or vendor == "AuthenticAMD"))


def _cpuinfo_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare the library's CPU check with")
    line = next(row for row in text.splitlines() if row.startswith("flags"))
    return set(line.split(":", 1)[1].split())


@needs_x86
@pytest.mark.parametrize("mode", ["auto", "native"])
def test_forcing_a_path_the_cpu_lacks_is_refused(monkeypatch, fresh_status, mode):
    native_status()  # the library is loaded; then the CPU is made to lack AVX-512
    monkeypatch.setattr(native, "_missing", lambda isa: "AVX512F AVX512BW" if isa == "avx512" else "")
    monkeypatch.setenv(native.ENV_KERNEL, mode)
    monkeypatch.setenv(native.ENV_ISA, "avx512")
    with pytest.raises(NativeKernelError, match="MORA_CPU_ISA=avx512, but this CPU lacks AVX512F AVX512BW"):
        native_status()
    monkeypatch.setenv(native.ENV_ISA, "avx2")
    assert native_status()[0] and native_isa() == "avx2"


@needs_x86
def test_the_library_refuses_paths_it_does_not_know():
    with pytest.raises(RuntimeError, match="unknown ISA path 'neon': expected auto, avx512_bf16, avx512, avx2 or portable"):
        torch.ops.mora_native.set_isa("neon")
    assert torch.ops.mora_native.isa_missing("portable") == ""


@needs_x86
def test_failed_build_is_reported(monkeypatch, fresh_status, tmp_path):
    (tmp_path / "grouped_mm.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE_DIR", tmp_path)
    monkeypatch.setenv(native.ENV_DIR, str(tmp_path / "build"))
    monkeypatch.setenv(native.ENV_KERNEL, "native")
    with pytest.raises(NativeKernelError, match="MORA_CPU_KERNEL=native, but building the native kernel failed"):
        native_status()


@needs_x86
def test_prebuilt_library_loads_from_a_read_only_folder(tmp_path):
    """An image builds the kernel ahead of time (`python -m mora.kernels.native`); a pod with a
    read-only root filesystem loads it without writing anything."""
    env = {**os.environ, native.ENV_DIR: str(tmp_path / "native"), native.ENV_KERNEL: "native", native.ENV_ISA: "auto",
           "PYTHONPATH": str(ROOT)}
    built = subprocess.run([sys.executable, "-m", "mora.kernels.native"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr
    library = Path(built.stdout.strip().splitlines()[-1])
    assert library.is_file() and library.parent.parent == tmp_path / "native"
    for path in [tmp_path / "native", *sorted((tmp_path / "native").rglob("*"))]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        check = ("import torch; from mora.kernels.native import grouped_mm, native_status; print(native_status()[1]);"
                 "o = torch.zeros(1, 2); grouped_mm(torch.ones(1, 2), torch.tensor([0, 1]), torch.tensor([0]),"
                 " torch.eye(2)[None] * 3, 2, 1.0, o); print(o.tolist())")
        loaded = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
        assert loaded.returncode == 0, loaded.stderr
        best = _auto_path()
        assert loaded.stdout.splitlines() == [f"native grouped_mm, isa={best} ({library})", "[[3.0, 3.0]]"]
    finally:
        for path in [tmp_path / "native", *(tmp_path / "native").rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
        shutil.rmtree(tmp_path / "native", ignore_errors=True)


# --- rope_apply: type 6 from x straight into y ----------------------------------------------


def rope_reference(x, tokens, offsets, slots, Mt, cos, ssin, k_lo, period, out_start, alpha, y):
    """The docstring's semantics, in float64, one loop per token and chunk."""
    ref = y.double().clone()
    n, chunks = cos.shape[1], cos.shape[0]
    xp = torch.cat([x, x], 1).double()
    cols = (out_start + torch.arange(y.shape[1])) % period
    for g in range(len(slots)):
        for t in tokens[offsets[g] : offsets[g + 1]].tolist():
            for i in range(chunks):
                c = k_lo + i
                u = xp[t, c * n : (c + 1) * n]
                v = u * cos[i].double() + torch.cat([u[n // 2 :], u[: n // 2]]) * ssin[i].double()
                o = alpha * (v @ Mt[int(slots[g]), :n, :n].double())
                hit = (cols >= c * n) & (cols < (c + 1) * n)
                ref[t, hit] += o[cols[hit] - c * n]
    return ref.float()


ROPE_CASES = [
        (40, 12, 0, 4, 0, 72),      # input padded (wraps), outputs tiled past c*n
        (72, 16, 0, 3, 0, 40),      # fewer outputs than c*n: only the first chunks are used
        (64, 16, 1, 2, 20, 24),     # a column shard inside one period, chunks 1-2
        (96, 32, 0, 3, 50, 100),    # a shard crossing a period boundary
        (348, 348, 0, 1, 0, 1000),  # one chunk, n not a multiple of 16
        (4096, 256, 0, 16, 0, 512),
]


def rope_problem(in_f, n, k_lo, chunks, out_start, width, dtype):
    """rope_apply's operands but alpha and y (a tuple), and a y (`direct_operands`)."""
    from mora.ops import rope_tables

    period = -(-in_f // n) * n
    cos, sin = rope_tables(n, period // n, dtype)
    cos = cos[k_lo : k_lo + chunks].contiguous()
    ssin = torch.cat([-sin[k_lo : k_lo + chunks, : n // 2], sin[k_lo : k_lo + chunks, n // 2 :]], 1).contiguous()
    (x, tokens, offsets, slots, Mt), y = direct_operands(in_f, n, width, dtype, torch.Generator().manual_seed(in_f + n))
    return (x, tokens, offsets, slots, Mt, cos, ssin, k_lo, period, out_start), y


def direct_operands(in_f, n, width, dtype, gen):
    """A direct op's x, tokens, offsets, slots and Mt (a tuple), and a y: 23 tokens over 6 slots
    with skewed popularity, 4 of them without an adapter."""
    T, S = 23, 6
    sizes = zipf_sizes(4, 19, gen)
    tokens = torch.randperm(T, generator=gen)[: sum(sizes)].contiguous()
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    slots = torch.randint(0, S, (len(sizes),), generator=gen)
    Mt = (torch.randn(S, n, n + 9, generator=gen) * 0.1).to(dtype)[:, :, :n]
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    y = torch.randn(T, width, generator=gen).to(dtype)
    return (x, tokens, offsets, slots, Mt), y


@pytest.mark.parametrize(("in_f", "n", "k_lo", "chunks", "out_start", "width"), ROPE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rope_apply_matches_semantics(isa, in_f, n, k_lo, chunks, out_start, width, dtype):
    from mora.kernels.native import rope_apply

    args, y = rope_problem(in_f, n, k_lo, chunks, out_start, width, dtype)
    x, tokens = args[:2]
    T = x.shape[0]
    want = rope_reference(*args, 1.0, y)
    before = y.clone()
    rope_apply(*args, 1.0, y)
    if dtype == torch.float32:
        torch.testing.assert_close(y, want, rtol=1e-5, atol=2e-5 * n**0.5)
    else:  # bf16 roundings of the rotation, the product and the sum
        torch.testing.assert_close(y.float(), want, rtol=3e-2, atol=3e-2 * max(1.0, want.abs().max().item()))
    others = torch.ones(T, dtype=torch.bool)
    others[tokens] = False
    assert torch.equal(y[others], before[others]), "rows without an adapter changed"


# --- share_apply: type 1 from x straight into y ---------------------------------------------


SHARE_CASES = [  # (in_f, n, out_start, width)
        (40, 12, 0, 72),       # input padded (the last chunk wraps), outputs tiled
        (72, 16, 20, 24),      # a column shard inside one tile
        (96, 32, 50, 100),     # a shard crossing tile boundaries
        (348, 348, 0, 1000),   # one chunk, n not a multiple of 16
        (4096, 362, 0, 512),   # 12 chunks, the last padded
]


def share_problem(in_f, n, out_start, width, dtype):
    """share_apply's operands but alpha and y (a tuple), and a y (`direct_operands`)."""
    operands, y = direct_operands(in_f, n, width, dtype, torch.Generator().manual_seed(in_f + n + 1))
    return (*operands, n, -(-in_f // n), out_start), y


@pytest.mark.parametrize(("in_f", "n", "out_start", "width"), SHARE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_share_apply_matches_semantics(isa, in_f, n, out_start, width, dtype):
    """share_apply against its docstring's semantics in float64, and the chunk sum against
    torch.sum (what the general path and the reference compress with) to within its roundings."""
    from mora.kernels.native import share_apply

    (x, tokens, offsets, slots, Mt, n, chunks, out_start), y = share_problem(in_f, n, out_start, width, dtype)
    before, ref = y.clone(), y.double().clone()
    xp = torch.cat([x, x[:, : chunks * n - in_f]], 1)
    cols = (out_start + torch.arange(width)) % n
    for g in range(len(slots)):
        for t in tokens[offsets[g] : offsets[g + 1]].tolist():
            v = xp[t].view(chunks, n).double().sum(0)
            ref[t] += ((v @ Mt[int(slots[g]), :n, :n].double()) * 0.5)[cols]
    share_apply(x, tokens, offsets, slots, Mt, n, chunks, out_start, 0.5, y)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-5 * (n * chunks) ** 0.5)
    else:  # bf16 roundings of the sum, the product and the addition
        torch.testing.assert_close(y.double(), ref, rtol=3e-2, atol=3e-2 * max(1.0, ref.abs().max().item()))
    others = torch.ones(len(y), dtype=torch.bool)
    others[tokens] = False
    assert torch.equal(y[others], before[others]), "rows without an adapter changed"


@pytest.mark.parametrize("op", ["rope_apply", "share_apply"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_direct_ops_give_the_same_bits_on_every_path(monkeypatch, fresh_status, op, dtype):
    from mora.kernels import native as ops

    apply, make, shapes = {"rope_apply": (ops.rope_apply, rope_problem, ROPE_CASES),
                           "share_apply": (ops.share_apply, share_problem, SHARE_CASES)}[op]
    cases = [make(*case, dtype) for case in shapes]

    def run():
        outs = []
        for case, (args, y) in enumerate(cases):
            y = y.clone()
            apply(*args, -0.5 if case % 2 else 1.0, y)
            outs.append(bits(y))
        return outs

    (first, want), *others = each_path(monkeypatch, run).items()
    for isa, got in others:
        for case, (a, b) in enumerate(zip(want, got, strict=True)):
            assert torch.equal(a, b), f"{op}: {isa} differs from {first} in {shapes[case]}"


@pytest.mark.parametrize("where", ["subnormal x", "subnormal products", "negative NaN"])
def test_rotated_rows_give_the_same_bits_with_special_values(monkeypatch, fresh_status, where):
    """avx512_bf16 rotates rope_apply's rows with vcvtneps2bf16, which reads subnormal values as 0
    and keeps a NaN's sign; a row that rounds one is rotated again the widened way, so every path
    gives the same bits (y starts at 0: a subnormal product is not lost in the sum).

    The subnormal cases differ on the dot-product path with that check removed (tried)."""
    from mora.kernels.native import rope_apply

    if X86_64 and use_path(monkeypatch, "avx512_bf16"):
        pytest.skip("the CPU has no AVX512_BF16")
    (x, tokens, offsets, slots, Mt, cos, ssin, k_lo, period, out_start), y = rope_problem(
        4096, 256, 0, 16, 0, 512, torch.bfloat16)
    x, y = x.clone(), torch.zeros_like(y)
    chosen = tokens[offsets[0] : offsets[1]]  # the first group's tokens
    # a token whose only nonzero inputs are tiny: any other product would swamp theirs
    if where == "subnormal x":
        x[chosen[0]] = 0.0
        x[chosen[0], 300:340] = 2.0**-127
    elif where == "subnormal products":  # normal x, cos and sin; their products under 2^-126
        x[chosen[0]] = 0.0
        x[chosen[0], 300:340] = 2.0**-126
        cos, ssin = torch.full_like(cos, 0.5), torch.full_like(ssin, -0.75)
    else:
        x[chosen[0], 17] = -float("nan")

    def run():
        out = y.clone()
        rope_apply(x, tokens, offsets, slots, Mt, cos, ssin, k_lo, period, out_start, 1.0, out)
        return bits(out)

    got = each_path(monkeypatch, run)
    assert all(torch.equal(got["avx512_bf16"], b) for b in got.values()), where


def test_share_apply_refuses_bad_operands(isa):
    from mora.kernels.native import share_apply

    base = dict(x=torch.randn(3, 40), tokens=torch.tensor([0, 2]), offsets=torch.tensor([0, 2]), slots=torch.tensor([0]),
                Mt=torch.randn(1, 12, 12), n=12, chunks=4, out_start=0, alpha=1.0, y=torch.zeros(3, 16))
    for change, message in [
        (dict(tokens=torch.tensor([0, 3])), "token row out of range"),
        (dict(chunks=3), "chunks must be ceil"),  # 36 < 40 features: some would be dropped
        (dict(chunks=5), "chunks must be ceil"),
        (dict(n=16), "n must fit Mt"),
        (dict(slots=torch.tensor([1])), "slot out of range"),
        (dict(y=torch.zeros(3, 16, dtype=torch.float64)), "CPU tensors of one dtype, float32 or bfloat16"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            share_apply(**{**base, **change})


def test_rope_apply_refuses_bad_operands(isa):
    from mora.kernels.native import rope_apply

    cos = torch.ones(2, 8)
    base = dict(x=torch.randn(3, 16), tokens=torch.tensor([0, 2]), offsets=torch.tensor([0, 2]), slots=torch.tensor([0]),
                Mt=torch.randn(1, 8, 8), cos=cos, ssin=cos, k_lo=0, period=16, out_start=0, alpha=1.0,
                y=torch.zeros(3, 16))
    for change, message in [
        (dict(tokens=torch.tensor([0, 3])), "token row out of range"),
        (dict(k_lo=3), "chunks out of range"),
        (dict(cos=torch.ones(2, 7), ssin=torch.ones(2, 7)), "n must be even"),
        (dict(y=torch.zeros(3, 16, dtype=torch.float64)), "CPU tensors of one dtype, float32 or bfloat16"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            rope_apply(**{**base, **change})


@pytest.mark.parametrize("kind", ["ROPE", "SHARING"])
@pytest.mark.parametrize("merged", [-1, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_runs_direct_slices_directly(isa, monkeypatch, kind, merged, dtype):
    """A float32 (or decode-sized bfloat16) slice whose only work is type 6 (or type 1) runs as
    rope_apply (share_apply) calls: no gathered input, no scatter; with a merged adapter to
    subtract it takes the general path. Both equal the reference backend and the BLAS path, and
    rows without an adapter keep their bits."""
    from mora.kernels import mora_apply, prepare_batch
    from mora.kernels.torch_plan import plan_module
    from mora.spec import MoraSpec, MoraType

    gen = torch.Generator().manual_seed(5)
    lay = ShardLayout(40, 72)
    table = SlotTable(lay, 4, n_max=16, dtype=dtype)
    for s, n in enumerate([12, 8, 12]):  # two (type, n): two passes, one direct call each
        table.set_slot(s, (torch.randn(n, n, generator=gen) * 0.1).to(dtype), MoraSpec(40, 72, n, MoraType[kind]))
    slot = torch.tensor([2, 0, -1, 1, 0, 2, 2, -1, 1, 0, 0])
    x = torch.randn(len(slot), 40, generator=gen).to(dtype)
    y0 = torch.randn(len(slot), 72, generator=gen).to(dtype)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    meta = prepare_batch(slot, 4, merged_slot=merged) if merged >= 0 else prepare_batch(slot, 4)
    want = y0.clone()
    mora_apply(want, x, table, meta, backend="reference")
    outs = {}
    for mode in ("native", "blas"):
        monkeypatch.setenv(native.ENV_KERNEL, mode)
        meta = prepare_batch(slot, 4, merged_slot=merged) if merged >= 0 else prepare_batch(slot, 4)
        y = y0.clone()
        mora_apply(y, x, table, meta, backend="torch")
        outs[mode] = y
        (program,) = plan_module([table], meta, len(slot)).programs.values()
        assert (program.gather is None) == (mode == "native" and merged < 0)
        torch.testing.assert_close(y, want, **tol)
        if merged < 0:
            assert torch.equal(y[slot == -1], y0[slot == -1])
    if dtype == torch.float32:
        torch.testing.assert_close(outs["native"], outs["blas"], **tol)
    else:  # the same roundings at the same steps; float32 sums in another order: at most 1 bf16 ulp apart
        diff = (outs["native"].float() - outs["blas"].float()).abs()
        assert (diff <= outs["blas"].float().abs() * 2**-7 + 1e-6).all(), diff.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_direct_passes_run_beside_other_types(isa, monkeypatch, dtype):
    """In a slice that mixes types 6, 1 and 4 (a mixed batch), the type-6 and type-1 passes run
    as rope_apply and share_apply calls and only type 4 takes the general path, its rows of
    theirs zeroed. So a token gets the same bits in a mixed batch as alone, whatever its type:
    the general path rotates with torch's elementwise ops, whose vectorized addcmul_ rounds once
    where rope_apply (and torch at its scalar capability) rounds twice, and a type-6 token that
    took it in mixed batches only was a ulp away from itself alone. Rows without an adapter keep
    their bits."""
    from mora.kernels import mora_apply, mora_apply_slices, prepare_batch, torch_cpu
    from mora.kernels.torch_plan import plan_module
    from mora.spec import MoraSpec, MoraType

    gen = torch.Generator().manual_seed(8)
    lays = [ShardLayout(40, 72), ShardLayout(40, 24)]
    tables = [SlotTable(lay, 6, n_max=16, dtype=dtype) for lay in lays]
    kinds = [(12, MoraType.ROPE), (8, MoraType.SHARING), (8, MoraType.ROPE), (12, MoraType.ROPE),
             (6, MoraType.SHARING_REPEATED)]
    for s, (n, kind) in enumerate(kinds):
        for i, table in enumerate(tables):  # the second slice: type 6 only
            spec = MoraSpec(40, table.layout.out_features, n, kind if i == 0 else MoraType.ROPE)
            table.set_slot(s, (torch.randn(n, n, generator=gen) * 0.1).to(dtype), spec)
    slot = torch.tensor([2, 0, -1, 1, 4, 0, 3, 2, -1, 1, 0, 4, 3, 1])
    x = torch.randn(len(slot), 40, generator=gen).to(dtype)
    y0 = torch.randn(len(slot), 96, generator=gen).to(dtype)

    def run(rows: list[int]) -> tuple[torch.Tensor, object]:
        meta, y = prepare_batch(slot[rows], 6), y0[rows].clone()
        mora_apply_slices(y, x[rows], tables, meta, [0, 72, 96], backend="torch")
        plan = plan_module(tables, meta, len(rows))  # None: no work (a row without an adapter)
        return y, plan and next(iter(plan.programs.values()))

    y, program = run(list(range(len(slot))))
    assert program.gather is not None and [i for i, _ in program.direct] == [0, 1]
    assert [i for i, _ in program.slices] == [0]  # the mixed slice's type 4
    for r in range(len(slot)):
        assert torch.equal(y[r], run([r])[0][0]), (r, kinds[slot[r]] if slot[r] >= 0 else None)
    assert torch.equal(y[slot == -1], y0[slot == -1])
    want = y0.clone()
    for i, table in enumerate(tables):
        mora_apply(want[:, [0, 72][i] : [72, 96][i]], x, table, prepare_batch(slot, 6), backend="reference")
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y, want, **tol)
    # the general path alone: the same bits on the rows it computes either way (type 4)
    monkeypatch.setattr(torch_cpu, "bind_direct", lambda passes, *_: (None, passes))
    general, program = run(list(range(len(slot))))
    assert not program.direct
    other = torch.tensor([s >= 0 and kinds[s][1] is MoraType.SHARING_REPEATED for s in slot.tolist()])
    assert other.any() and torch.equal(y[other, :72], general[other, :72])


@pytest.mark.parametrize("dot_products", [True, False])
@pytest.mark.parametrize(("dtype", "tokens", "native_path"), [
    (torch.float32, 40, True), (torch.bfloat16, 4, True), (torch.bfloat16, 40, False)])
def test_bfloat16_prefill_keeps_blas(isa, monkeypatch, dot_products, dtype, tokens, native_path):
    """bfloat16 adapters with many rows each (prefill) keep oneDNN's bf16 GEMM where it runs on
    the CPU's bf16 dot products and the native kernel does not (or the CPU has AMX): the slice
    still runs direct, its rows and additions native around that GEMM (test_native_rows.py);
    float32, decode-sized bfloat16, and any bfloat16 where torch's bf16 GEMM has no dot products
    to run on (AVX2 CPUs: a generic loop) or the native kernel has them too (avx512_bf16 without
    AMX) take the native kernel's products (`rope_apply`)."""
    from mora.kernels import mora_apply, prepare_batch, torch_native
    from mora.kernels.torch_native import BF16_MAX_ROWS
    from mora.kernels.torch_plan import plan_module
    from mora.spec import MoraSpec, MoraType

    monkeypatch.setattr(torch_native, "bf16_gemm_has_dot_products", lambda: dot_products)
    table = SlotTable(ShardLayout(40, 72), 2, n_max=16, dtype=dtype)
    table.set_slot(0, torch.randn(12, 12).to(dtype), MoraSpec(40, 72, 12, MoraType.ROPE))
    assert (tokens * 4 <= BF16_MAX_ROWS) == (tokens == 4)  # 4 chunks per token
    slot = torch.zeros(tokens, dtype=torch.int64)
    meta = prepare_batch(slot, 2)
    x, y = torch.randn(tokens, 40).to(dtype), torch.zeros(tokens, 72, dtype=dtype)
    mora_apply(y, x, table, meta, backend="torch")
    (program,) = plan_module([table], meta, tokens).programs.values()
    blas_wins = dot_products and (isa != "avx512_bf16" or torch.ops.mora_native.cpu_has("AMX_BF16"))
    assert program.gather is None
    ((_, direct),) = program.direct
    want = ("rope_apply",) if native_path or not blas_wins else ("rope_rows", "blas", "rope_add")
    assert direct.kernels == want


@needs_x86
def test_bf16_gemm_dot_products_follow_the_cpu(fresh_status):
    """oneDNN's bf16 GEMM has dot products where the CPU has AMX or AVX512_BF16 (and oneDNN
    supports bf16 at all)."""
    from mora.kernels import torch_native

    native_status()
    ops = torch.ops.mora_native
    want = torch.ops.mkldnn._is_mkldnn_bf16_supported() and (ops.cpu_has("AMX_BF16") or ops.cpu_has("AVX512_BF16"))
    assert torch_native.bf16_gemm_has_dot_products() == want
    assert (ops.cpu_has("AVX2") and ops.cpu_has("FMA")) == (not ops.isa_missing("avx2"))
    with pytest.raises(RuntimeError, match="unknown CPU feature 'SSE9'"):
        ops.cpu_has("SSE9")


@needs_x86
def test_slot_order_is_free_only_where_every_product_is_native(monkeypatch, fresh_status):
    """The vLLM manager compacts slots (one kind in consecutive slots) only for BLAS's batched
    products: the native kernel reads each `M` in its slot, so moving adapters would be waste
    (bench.scale with 78 slots, profiled: compaction was half of the worker's adapter bookkeeping)."""
    from mora.kernels import slot_order_is_free
    from mora.kernels.torch_native import bf16_gemm_has_dot_products

    monkeypatch.setenv(native.ENV_KERNEL, "auto")
    assert slot_order_is_free(torch.float32)
    ops = torch.ops.mora_native
    blas_wins = bf16_gemm_has_dot_products() and (native_isa() != "avx512_bf16" or ops.cpu_has("AMX_BF16"))
    assert slot_order_is_free(torch.bfloat16) is not blas_wins  # bf16 prefill may take BLAS
    if not ops.isa_missing("avx512_bf16"):  # the dot-product path takes every bf16 product where the CPU has no AMX
        monkeypatch.setenv(native.ENV_ISA, "avx512_bf16")
        assert slot_order_is_free(torch.bfloat16) is not ops.cpu_has("AMX_BF16")
        monkeypatch.setenv(native.ENV_ISA, "avx512")
        assert slot_order_is_free(torch.bfloat16) is not bf16_gemm_has_dot_products()
    assert not slot_order_is_free(torch.float16)
    monkeypatch.setenv(native.ENV_KERNEL, "blas")
    assert not slot_order_is_free(torch.float32)
