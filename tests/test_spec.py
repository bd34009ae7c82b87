import math

import pytest

from mora.errors import UnsupportedMoraTypeError, UntrainableShapeError
from mora.spec import MoraSpec, MoraType, group_sizes, mora_size


@pytest.mark.parametrize(("in_f", "out_f", "r", "t", "n"), [
    (4096, 4096, 8, 1, 256), (4096, 4096, 8, 6, 256), (4096, 11008, 8, 1, 348), (4096, 11008, 8, 6, 348),
    (64, 64, 4, 1, 23), (64, 64, 4, 6, 22), (100, 100, 3, 6, 24), (24, 40, 8, 2, 23),
])
def test_size_formula_matches_reference(in_f, out_f, r, t, n):
    assert mora_size(in_f, out_f, r, t) == n
    assert n == (int(math.sqrt((in_f + out_f) * r) + 0.5) // (2 if t == 6 else 1)) * (2 if t == 6 else 1)


def test_group_sizes():
    assert group_sizes(10, 4) == [3, 3, 2, 2]
    assert group_sizes(3, 5) == [1, 1, 1, 0, 0]
    assert sum(group_sizes(4097, 256)) == 4097


@pytest.mark.parametrize("bad", [5, 0, 7, -1, "1", 1.0, True, None])
def test_unknown_types_rejected(bad):
    with pytest.raises(UnsupportedMoraTypeError) as e:
        MoraType.parse(bad)
    assert "1, 2, 3, 4, 6" in str(e.value)


@pytest.mark.parametrize("t", [1, 4, 6])
def test_padding_longer_than_input_is_untrainable(t):
    # n = 22 or 23 for in_f=10,out_f=40,r=10; pad = n - 10 > 10: the reference's view() fails.
    spec = MoraSpec.from_rank(10, 40, 10, t)
    assert spec.pad > spec.in_features
    with pytest.raises(UntrainableShapeError, match="pads the input"):
        spec.check()


def test_grouped_types_accept_small_inputs():
    # Types 2 and 3 group instead of padding: any in_f works, empty groups sum to zero.
    MoraSpec.from_rank(10, 40, 10, 2).check()
    MoraSpec.from_rank(10, 40, 10, 3).check()


def test_rank_must_be_positive():
    with pytest.raises(UntrainableShapeError):
        MoraSpec.from_rank(64, 64, 0, 1)


def test_odd_n_rejected_for_rope():
    with pytest.raises(UntrainableShapeError, match="even"):
        MoraSpec(64, 64, 23, MoraType.ROPE).check()
