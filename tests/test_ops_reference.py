"""The operators against the 75 vectors produced by the authors' reference implementation."""

import torch

from mora.delta import delta_weight
from mora.ops import mora_forward
from mora.spec import MoraSpec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_all_cases_present(reference_cases):
    assert len(reference_cases) == 75
    assert {c["mora_type"] for c in reference_cases} == {1, 2, 3, 4, 6}
    assert any(c["in_features"] % c["r_hat"] for c in reference_cases)


def test_size_matches(reference_cases):
    for c in reference_cases:
        spec = MoraSpec.from_rank(c["in_features"], c["out_features"], c["r"], c["mora_type"])
        assert spec.n == c["r_hat"] == c["M"].shape[0], c["case"]


def test_forward_matches_reference(reference_cases):
    worst = 0.0
    for c in reference_cases:
        spec = MoraSpec.from_rank(c["in_features"], c["out_features"], c["r"], c["mora_type"])
        y = mora_forward(c["x"], c["M"], spec)
        assert y.shape == c["y"].shape
        err = _rel(y, c["y"])
        assert err <= 1e-5, (c["case"], err)
        worst = max(worst, err)
    assert worst > 0 or worst == 0  # reported by -v runs via the assertion above


def test_dense_delta_matches_reference(reference_cases):
    checked = 0
    for c in reference_cases:
        spec = MoraSpec.from_rank(c["in_features"], c["out_features"], c["r"], c["mora_type"])
        d = delta_weight(c["M"], spec)
        assert _rel(c["x"] @ d.T, c["y"]) <= 1e-5, c["case"]
        if c["has_delta_weight"]:
            assert _rel(d, c["delta_weight"]) <= 1e-5, c["case"]
            checked += 1
    assert checked == 60
