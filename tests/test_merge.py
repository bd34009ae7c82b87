"""merge_/unmerge_: exact round trips, merged == unmerged, untouched blocks, safe mode."""

from __future__ import annotations

import pytest
import torch

from mora.delta import delta_weight
from mora.errors import MergeError, NonFiniteMergeError
from mora.merge import merge_, unmerge_
from mora.ops import mora_forward
from mora.spec import MoraSpec

SHAPES = [(64, 64, 4), (96, 160, 2), (160, 96, 2), (100, 100, 3), (24, 40, 8), (300, 50, 2), (50, 300, 2), (10, 30, 3)]
TYPES = [1, 2, 3, 4, 6]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _case(in_f, out_f, r, t, dtype, seed=0):
    spec = MoraSpec.from_rank(in_f, out_f, r, t)
    try:
        spec.check()
    except Exception:  # noqa: BLE001
        pytest.skip("untrainable")
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype)
    M = torch.randn(spec.n, spec.n, generator=g) * 0.02
    return spec, W, M


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep_storage", [None, True])
def test_exact_round_trip(shape, t, dtype, keep_storage):
    spec, W, M = _case(*shape, t, dtype)
    original = W.clone()
    ptr = W.data_ptr()
    record = merge_(W, M, spec, keep_storage=keep_storage)
    assert not torch.equal(W, original), "merge changed nothing"
    if keep_storage:
        assert W.data_ptr() == ptr
    # merged weight == base weight + dense delta, within one rounding of the weight dtype
    expect = original.double() + delta_weight(M.double(), spec)
    assert (W.double() - expect).abs().max().item() <= TOL[dtype] * max(1.0, expect.abs().max().item())
    unmerge_(W, record)
    assert torch.equal(W, original)
    assert W.dtype == dtype


@pytest.mark.parametrize("t", TYPES)
def test_merged_forward_equals_unmerged(t):
    spec, W, M = _case(96, 160, 2, t, torch.float32)
    x = torch.randn(7, 96)
    unmerged = x @ W.T + mora_forward(x, M, spec)
    base = x @ W.T
    rec = merge_(W, M, spec)
    merged = x @ W.T
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, base, atol=1e-4), "output must differ from the base model"
    unmerge_(W, rec)
    assert torch.equal(x @ W.T, base)


@pytest.mark.parametrize("shape", SHAPES)
def test_type6_touches_only_its_blocks(shape):
    spec, W, M = _case(*shape, 6, torch.float32)
    mask = delta_weight(torch.ones_like(M) + torch.arange(M.numel()).view_as(M), spec) != 0
    original = W.clone()
    rec = merge_(W, M, spec, keep_storage=True)
    assert torch.equal(W[~mask], original[~mask])
    w = min(spec.n, spec.in_features)
    assert rec.changed_elements == spec.out_features * w == int(mask.sum())
    assert rec.backup_bytes == rec.changed_elements * W.element_size()
    assert rec.changed_elements < W.numel() or spec.in_features <= spec.n
    unmerge_(W, rec)
    assert torch.equal(W, original)


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inexact_mode_keeps_nothing(t, dtype):
    spec, W, M = _case(100, 100, 3, t, dtype)
    original = W.clone()
    rec = merge_(W, M, spec, exact=False)
    assert rec.backup_bytes == 0
    unmerge_(W, rec)
    assert (W.double() - original.double()).abs().max().item() <= 2 * TOL[dtype]


def test_swap_mode_reuses_spare_buffer():
    spec, W, M = _case(64, 64, 4, 1, torch.bfloat16)
    original = W.clone()
    rec = merge_(W, M, spec)
    assert rec.swapped
    spare = unmerge_(W, rec)
    assert spare is not None and torch.equal(W, original)
    rec = merge_(W, M, spec, spare=spare)
    assert W.data_ptr() == spare.data_ptr()
    unmerge_(W, rec)
    assert torch.equal(W, original)


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("keep_storage", [None, True])
def test_safe_mode_refuses_overflow_and_leaves_weight_alone(t, keep_storage):
    spec, W, M = _case(64, 64, 4, t, torch.float16)
    W[0, 0] = 60000.0
    M = M * 0 + 3e4
    original = W.clone()
    with pytest.raises(NonFiniteMergeError):
        merge_(W, M, spec, keep_storage=keep_storage)
    assert torch.equal(W, original)
    # with safety off the overflow goes through, as asked
    rec = merge_(W, M, spec, safe=False, keep_storage=keep_storage)
    assert not torch.isfinite(W).all()
    unmerge_(W, rec)
    assert torch.equal(W, original)


def test_known_weight_bound_skips_the_check_but_stays_correct():
    spec, W, M = _case(96, 160, 2, 1, torch.bfloat16)
    original = W.clone()
    rec = merge_(W, M, spec, weight_absmax=float(W.abs().max()))
    unmerge_(W, rec)
    assert torch.equal(W, original)
    W2 = original.clone()
    W2[0, 0] = 3e38
    with pytest.raises(NonFiniteMergeError):  # a wrong (too small) bound is caught by the bound test on M only
        merge_(W2, M * 0 + 1e38, spec, weight_absmax=3e38)


def test_shape_mismatch_is_an_error():
    spec, W, M = _case(64, 64, 4, 1, torch.float32)
    with pytest.raises(MergeError, match="does not match"):
        merge_(W.T.contiguous()[:10], M, spec)
    with pytest.raises(MergeError, match="M has shape"):
        merge_(W, M[:-1, :-1], spec)


def test_seven_b_layer_shapes_round_trip():
    """The bench's shapes (Llama-2-7B), bf16, both recommended types, exact."""
    for t in (1, 6):
        for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
            spec = MoraSpec.from_rank(in_f, out_f, 8, t)
            W = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)
            M = torch.randn(spec.n, spec.n) * 0.01
            original = W.clone()
            rec = merge_(W, M, spec, keep_storage=True)
            unmerge_(W, rec)
            assert torch.equal(W, original)
