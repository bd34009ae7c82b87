"""The schedules by which the native kernels stream what a thread reads next into L2 (common.h's
`Stream`), read through `stream_lines` and `stream_span_lines` (the same code, recording
instead of prefetching).

What they must do: request every line of the next `M`'s rows, in address order, nothing between
rows (a table's rows are padded to its largest `n`), spread over the current group's products so
that about `kStreamPace` (0.8) of them are requested by the group's end; and every line of the
next run's listed ranges (its rows of `x` or `V`, its rows of `y`), in the order given, all of
them by the current run's end. Speed itself is `bench.kernel`'s to measure (docs/benchmarks.md,
"The next `M` streamed in address order").
"""

from __future__ import annotations

import pytest
import torch
from test_native_kernel import needs_x86

import mora.kernels.native as native

pytestmark = needs_x86

PACE = 0.8
PIECE = 16  # a block paces once per 16 k


def every_line(rows: int, length: int, ld: int, offset: int) -> list[int]:
    """Each row's lines in address order (merged rows as one run of memory)."""
    if ld == length:
        rows, length = 1, rows * length
    out: list[int] = []
    for i in range(rows):
        lo = offset + i * ld
        out += range(lo // 64 * 64, lo + length, 64)
    return out


# (rows, bytes of a row, bytes between rows, offset of the first byte in its line): Mt of
# float32 n=256 and n=348 (unpadded, and padded to n_max=384), bf16 n=348 (padded to 352), a
# tiny n, and rows whose boundary lines are shared
SHAPES = [(256, 1024, 1024, 0), (348, 1392, 1392, 0), (348, 1392, 1536, 0), (348, 696, 704, 32),
          (8, 32, 32, 16), (5, 100, 130, 60), (3, 64, 64, 63)]


@pytest.mark.parametrize(("rows", "length", "ld", "offset"), SHAPES)
def test_every_line_once_in_address_order(rows: int, length: int, ld: int, offset: int) -> None:
    work = rows * 16 * length  # any: `done` runs far past it
    got = native.stream_lines(rows, length, ld, offset, work, 10 * work, 4096).tolist()
    assert got == every_line(rows, length, ld, offset)
    assert got == sorted(got)
    touched = {b // 64 * 64 for i in range(rows) for b in range(offset + i * ld, offset + i * ld + length)}
    assert set(got) == touched  # nothing between rows, nothing past the last


@pytest.mark.parametrize(("rows", "length", "ld", "offset"), SHAPES[:4])
@pytest.mark.parametrize("units", [1, 2, 4, 16])
def test_paced_over_the_group(rows: int, length: int, ld: int, offset: int, units: int) -> None:
    """A group of `units` 16-row units over n columns of panels: its products are
    rows x panels x k; blocks of 8 rows x 3 panels pace each piece of 16 k."""
    n, step = rows, 8 * 3 * PIECE
    work = units * 16 * (n // 16 + 1) * n
    total = len(every_line(rows, length, ld, offset))
    assert native.stream_lines(rows, length, ld, offset, work, 0, step).numel() == 0
    half = native.stream_lines(rows, length, ld, offset, work, work // 2, step).numel()
    end = native.stream_lines(rows, length, ld, offset, work, work, step).numel()
    assert 0.45 * PACE * total <= half <= 0.55 * PACE * total
    assert 0.95 * PACE * total <= end <= 1.1 * PACE * total  # the last lines: the next group's panels'
    # the same products in other steps (a 1-panel block, a bf16 dot block's pieces) come to as many
    for other in (8 * PIECE, 12 * 2 * PIECE):
        assert abs(native.stream_lines(rows, length, ld, offset, work, work, other).numel() - end) <= 1


def test_bad_arguments_refused() -> None:
    for args in [(0, 64, 64, 0, 1, 1, 1), (1, 64, 32, 0, 1, 1, 1), (1, 64, 64, 64, 1, 1, 1),
                 (1, 64, 64, 0, 0, 1, 1), (1, 64, 64, 0, 1, 1, 0), (1, 64, 64, 0, 1, -1, 1)]:
        with pytest.raises(RuntimeError, match="stream_lines"):
            native.stream_lines(*args)


def listed_lines(spans: list[tuple[int, int]]) -> list[int]:
    return [line for first, last in spans for line in range(first // 64 * 64, last, 64)]


# a decode token's x and y rows (float32 q_proj), V rows of a padded grouped_mm, ranges sharing
# lines, one byte, out of address order
SPAN_CASES = [[(0, 16384), (1 << 20, (1 << 20) + 16384)], [(i * 1536, i * 1536 + 1392) for i in range(16)],
              [(10, 70), (70, 130), (200, 201)], [(5, 6)], [(4096, 8192), (0, 100), (100_000, 100_064)]]


@pytest.mark.parametrize("spans", SPAN_CASES)
def test_listed_ranges_every_line_in_the_order_given(spans: list[tuple[int, int]]) -> None:
    tensor = torch.tensor(spans, dtype=torch.long)
    want = listed_lines(spans)
    work = 1000 * len(want)
    assert native.stream_span_lines(tensor, work, work, 384).tolist() == want  # all by the run's end
    assert native.stream_span_lines(tensor, work, 0, 384).numel() == 0
    half = native.stream_span_lines(tensor, work, work // 2, 384).numel()
    assert abs(half - len(want) / 2) <= 1


def test_listed_ranges_refused_when_bad() -> None:
    for spans, args in [([(5, 5)], (1, 1, 1)), ([(6, 5)], (1, 1, 1)), ([(-1, 5)], (1, 1, 1)), ([(0, 5)], (0, 1, 1)),
                        ([(0, 5)], (1, 1, 0))]:
        with pytest.raises(RuntimeError, match="stream_span_lines"):
            native.stream_span_lines(torch.tensor(spans, dtype=torch.long), *args)
    with pytest.raises(RuntimeError, match="stream_span_lines"):
        native.stream_span_lines(torch.zeros(3, dtype=torch.long), 1, 1, 1)
