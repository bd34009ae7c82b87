"""Operators vs a dense construction written from the spec with plain loops (independent code)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mora.delta import delta_weight
from mora.ops import mora_forward, rope_tables
from mora.spec import MoraSpec, MoraType


def _groups(total: int, n: int) -> list[int]:
    """Group index of each of `total` positions: first groups one longer (spec, types 2-4)."""
    q, m = divmod(total, n)
    out = []
    for g in range(n):
        out += [g] * (q + 1 if g < m else q)
    return out


def loop_dense(M: torch.Tensor, in_f: int, out_f: int, t: int) -> torch.Tensor:
    """delta_W [out_f, in_f] in float64, built element by element from MORA_SPEC.md."""
    n = M.shape[0]
    M = M.double()
    C = torch.zeros(n, in_f, dtype=torch.float64)  # compress: v = C x
    c = math.ceil(in_f / n)
    padded = list(range(in_f)) + list(range(c * n - in_f))  # x_pad[k] = x[padded[k]]
    if t in (1, 4):
        for k, src in enumerate(padded):
            C[k % n, src] += 1
    elif t in (2, 3):
        for i, g in enumerate(_groups(in_f, n)):
            C[g, i] += 1
    if t in (1, 2, 3, 4):
        D = torch.zeros(out_f, n, dtype=torch.float64)  # decompress: out = D v
        rows = [j % n for j in range(out_f)] if t in (1, 3) else _groups(out_f, n)
        for j, g in enumerate(rows):
            D[j, g] = 1
        return D @ M @ C
    # type 6: chunk k rotated (RoPE at position k), M applied, chunks concatenated, tiled.
    cos, sin = rope_tables(n, c, torch.float64)
    out = torch.zeros(out_f, in_f, dtype=torch.float64)
    for k in range(c):
        R = torch.zeros(n, n, dtype=torch.float64)  # rotated = R u
        for p in range(n):
            R[p, p] = cos[k, p]
            if p < n // 2:
                R[p, p + n // 2] = -sin[k, p]
            else:
                R[p, p - n // 2] = sin[k, p]
        block = M @ R
        for j in range(out_f):
            if (j % (c * n)) // n != k:
                continue
            for q in range(n):
                out[j, padded[k * n + q]] += block[j % n, q]
    return out


shapes = st.tuples(
    st.integers(1, 70), st.integers(1, 70), st.integers(1, 6), st.sampled_from([1, 2, 3, 4, 6])
).filter(lambda s: _trainable(*s))


def _trainable(in_f: int, out_f: int, r: int, t: int) -> bool:
    spec = MoraSpec.from_rank(in_f, out_f, r, t)
    try:
        spec.check()
    except Exception:  # noqa: BLE001
        return False
    return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_forward_equals_dense_loop_construction(shape, seed):
    in_f, out_f, r, t = shape
    spec = MoraSpec.from_rank(in_f, out_f, r, t)
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(spec.n, spec.n, generator=g, dtype=torch.float64)
    x = torch.randn(5, in_f, generator=g, dtype=torch.float64)
    dense = loop_dense(M, in_f, out_f, t)
    torch.testing.assert_close(mora_forward(x, M, spec), x @ dense.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(delta_weight(M, spec), dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("in_f", "out_f"), [(48, 48), (37, 91), (91, 37), (100, 30), (13, 64)])
@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
def test_shape_regimes(in_f, out_f, t):
    """in_f % n != 0, in_f < out_f and in_f > out_f, each type (spec edge cases)."""
    spec = MoraSpec.from_rank(in_f, out_f, 4, t)
    if not _trainable(in_f, out_f, 4, t):
        pytest.skip("untrainable combination (covered by test_spec)")
    M = torch.randn(spec.n, spec.n, dtype=torch.float64)
    x = torch.randn(3, 7, in_f, dtype=torch.float64)
    y = mora_forward(x, M, spec)
    assert y.shape == (3, 7, out_f)
    torch.testing.assert_close(y, x @ loop_dense(M, in_f, out_f, t).T)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 6e-2), (torch.float32, 1e-5)])
def test_any_float_dtype(t, dtype, tol):
    spec = MoraSpec.from_rank(96, 160, 2, t)
    M = torch.randn(spec.n, spec.n) * 0.1
    x = torch.randn(4, 96)
    ref = mora_forward(x.double(), M.double(), spec)
    y = mora_forward(x.to(dtype), M.to(dtype), spec)
    assert y.dtype == dtype
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
def test_differentiable(t):
    spec = MoraSpec.from_rank(21, 17, 2, t)
    M = torch.randn(spec.n, spec.n, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 21, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, M: mora_forward(x, M, spec), (x, M))


def test_rope_tables_follow_reference_construction():
    cos, sin = rope_tables(8, 3, torch.float32)
    theta = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    a = torch.outer(torch.arange(3), theta)
    a = torch.cat((a, a), -1)
    assert torch.equal(cos, a.cos()) and torch.equal(sin, a.sin())
    # bf16 activations use bf16-rounded tables, as the reference's .to(x.dtype) does
    cb, _ = rope_tables(8, 3, torch.bfloat16)
    assert torch.equal(cb, a.cos().to(torch.bfloat16))


def test_no_python_loop_in_hot_path():
    """Large shapes must take the vectorized path: a 4096x11008 type-6 forward stays fast."""
    import time

    spec = MoraSpec.from_rank(4096, 11008, 8, MoraType.ROPE)
    M = torch.randn(spec.n, spec.n)
    x = torch.randn(4, 4096)
    start = time.perf_counter()
    y = mora_forward(x, M, spec)
    assert y.shape == (4, 11008)
    assert time.perf_counter() - start < 5.0  # a per-feature Python loop would take minutes
