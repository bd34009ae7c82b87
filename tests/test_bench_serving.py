"""bench.serving's summary ratios: each is the median of the rounds' own ratios, so a machine
whose speed drifts during the run moves both sides of a ratio, not one (docs/benchmarks.md,
"Base in the same rounds")."""

from __future__ import annotations

import pytest

from bench.serving import RATIOS, _paired_order, _ratios


def _rounds(**scenarios: list[float]) -> dict[str, list[float]]:
    names = {n for pair in RATIOS.values() for n in pair}
    return {n: scenarios.get(n, [1.0, 1.0, 1.0]) for n in names}


def test_a_drifting_machine_moves_both_sides_of_a_ratio():
    # Merged keeps pace with base in its round; the machine slows by half from the middle of
    # round 2 on (after base ran in it). The medians of each side would pair merged's slow
    # median with base's fast one: 49.5 / 100.
    ratios = _ratios(_rounds(base_beside_merged=[100.0, 100.0, 50.0], merged=[99.0, 49.5, 49.5]))
    assert ratios["merged_vs_base"] == pytest.approx(0.99)


def test_mora_vs_lora_is_a_time_ratio():
    ratios = _ratios(_rounds(lora=[50.0, 50.0, 50.0], unmerged=[100.0, 100.0, 100.0]))
    assert ratios["mora_vs_lora"] == pytest.approx(0.5)


def test_rounds_of_unequal_length_are_refused():
    with pytest.raises(ValueError):
        _ratios(_rounds(base=[100.0, 100.0], merged=[99.0, 99.0, 99.0]))


def test_merged_and_base_swap_order_every_round():
    ran: list[str] = []
    for r in range(4):
        for run in _paired_order(r, lambda: ran.append("merged"), lambda: ran.append("base")):
            run()
    assert ran == ["merged", "base", "base", "merged", "merged", "base", "base", "merged"]
