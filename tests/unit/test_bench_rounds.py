"""The production comparison shows the ratio of each interleaved round beside the medians."""

from __future__ import annotations

from bench._loadgen import LoadResult
from bench.exchange import Row, round_by_round


def _row(label: str, ok: int) -> Row:
    return Row(label, "g", LoadResult(label=label, seconds=1.0, ok=ok), 1.0, 1.0, [1.0])


def test_each_rounds_ratio_pairs_the_same_round() -> None:
    rows = [
        _row("broker: token exchange #1", 2963),
        _row("bao + audit #1", 2839),
        _row("broker: token exchange #2", 2474),
        _row("bao + audit #2", 2722),
        _row("broker: token exchange #3", 2521),
        _row("bao + audit #3", 2372),
    ]
    [row] = round_by_round(rows, "broker: token exchange", "bao + audit")
    assert row[0] == "broker: token exchange vs bao + audit, round by round"
    assert row[1] == "1.04x, 0.91x, 1.06x"


def test_no_row_for_a_single_round_or_a_missing_baseline() -> None:
    assert round_by_round([_row("a #1", 10), _row("b #1", 10)], "a", "b") == []
    assert round_by_round([_row("a #1", 10), _row("a #2", 10)], "a", "b") == []
