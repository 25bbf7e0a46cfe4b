"""bench.scale's loop-lag figures from two scrapes of the histogram: the difference of the
cumulative buckets, p99 as Prometheus's histogram_quantile estimates it, max as a bound."""

from __future__ import annotations

import math

from bench.scale import lag_figures

INF = math.inf
EDGES = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, INF)


def cumulative(counts: list[int]) -> dict[float, float]:
    """Per-bucket counts -> the cumulative form a scrape gives."""
    out, total = {}, 0
    for edge, c in zip(EDGES, counts, strict=True):
        total += c
        out[edge] = float(total)
    return out


def test_only_the_wakes_between_the_scrapes_count() -> None:
    # Before: 1,000 wakes, one of them 0.5-1 s late (not in the window).
    before = cumulative([990, 9, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    # Meanwhile: 98 under 1 ms, 1 in 1-2.5 ms, 1 in 25-50 ms.
    after = cumulative([990 + 98, 9 + 1, 0, 0, 0, 1, 0, 0, 0, 1, 0])
    r = lag_figures(before, after)
    assert r["wakes"] == 100
    # The 99th of 100 is the 2.5 ms bucket's only wake: its upper edge.
    assert r["p99_ms"] == 2.5
    assert r["max_ms"] == 50  # the 25-50 ms bucket: at most 50 ms


def test_p99_is_interpolated_within_its_bucket() -> None:
    r = lag_figures({}, cumulative([0, 0, 0, 100, 100, 0, 0, 0, 0, 0, 0]))
    # Rank 198 of 200: 98 of the 100 in 10-25 ms, linearly: 10 + 15 * 0.98.
    assert math.isclose(r["p99_ms"], 24.7)
    assert r["max_ms"] == 25


def test_past_the_last_edge() -> None:
    r = lag_figures({}, cumulative([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]))
    assert r["p99_ms"] == 1000 and math.isinf(r["max_ms"])
    assert math.isnan(lag_figures({}, cumulative([0] * 11))["p99_ms"])
