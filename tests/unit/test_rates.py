"""Events/s and lag quantiles from snapshots of cumulative counters (core/rates.py), on made-up snapshots."""

from __future__ import annotations

import math

import pytest

from sfworkflow.core import rates
from sfworkflow.core.rates import Snapshot, Window

INF = math.inf
BOUNDS = (0.01, 0.1, 1.0, 10.0, INF)


def buckets(*per_bucket: float) -> rates.Buckets:
    """Cumulative buckets from the count in each bucket (BOUNDS order)."""
    out, total = [], 0.0
    for le, n in zip(BOUNDS, per_bucket, strict=True):
        total += n
        out.append((le, total))
    return tuple(out)


def test_quantiles_interpolate_within_the_bucket_like_histogram_quantile() -> None:
    b = buckets(0, 100, 0, 0, 0)  # all in (0.01, 0.1]
    assert rates.quantile(0.5, b) == pytest.approx(0.055)
    assert rates.quantile(0.99, b) == pytest.approx(0.01 + 0.09 * 0.99)
    b = buckets(50, 49, 1, 0, 0)
    assert rates.quantile(0.5, b) == pytest.approx(0.01)  # rank 50 ends the first bucket
    assert rates.quantile(0.99, b) == pytest.approx(0.1)  # rank 99 ends the second
    assert rates.quantile(0.995, b) == pytest.approx(0.1 + 0.9 * 0.5)
    assert rates.quantile(0.25, b) == pytest.approx(0.005)  # the first bucket starts at 0


def test_quantiles_of_nothing_and_beyond_the_last_bucket() -> None:
    assert rates.quantile(0.5, ()) is None
    assert rates.quantile(0.5, buckets(0, 0, 0, 0, 0)) is None
    assert rates.quantile(0.99, buckets(90, 0, 0, 0, 10)) == INF
    assert rates.quantile(0.5, buckets(90, 0, 0, 0, 10)) == pytest.approx(0.01 * 50 / 90)


def test_merge_and_difference() -> None:
    merged = rates.merge_buckets([(1.0, 2), (INF, 3), (1.0, 5), (INF, 5), (0.5, 1)])
    assert merged == ((0.5, 1), (1.0, 7), (INF, 8))
    assert rates.difference(buckets(1, 2, 3, 0, 0), buckets(1, 1, 0, 0, 0)) == buckets(0, 1, 3, 0, 0)
    assert rates.difference(buckets(1, 2, 3, 0, 0), ()) == buckets(1, 2, 3, 0, 0)
    assert rates.difference(buckets(1, 2, 3, 0, 0), ((1.0, 5), (INF, 5))) == buckets(1, 2, 3, 0, 0)  # other bounds


def test_figures_between_two_snapshots() -> None:
    then = Snapshot(100.0, 1000, buckets(10, 0, 0, 0, 0))
    now = Snapshot(160.0, 1600, buckets(10, 600, 0, 0, 0))
    f = rates.figures(now, then)
    assert f.span_s == 60 and f.events == 600 and f.events_per_s == pytest.approx(10.0)
    assert f.p50_s == pytest.approx(0.055) and f.p99_s == pytest.approx(0.01 + 0.09 * 0.99)
    assert f.last_bound_s == 10.0
    quiet = rates.figures(Snapshot(220.0, 1600, now.age_buckets), now)
    assert quiet.events_per_s == 0 and quiet.p50_s is None and quiet.p99_s is None
    assert rates.figures(now, None).events_per_s is None and rates.figures(now, None).span_s == 0


def test_the_window_compares_with_the_snapshot_closest_to_a_minute_ago() -> None:
    w = Window(60.0, first=Snapshot(0.0, 0, buckets(0, 0, 0, 0, 0)))
    f = w.add(Snapshot(10.0, 50, buckets(0, 50, 0, 0, 0)))
    assert f.span_s == 10 and f.since_first and f.events_per_s == pytest.approx(5.0)
    for t in range(13, 200, 3):  # one view every 3 s (the page's cache), 5 events/s throughout
        f = w.add(Snapshot(float(t), 5.0 * t, buckets(0, 5.0 * t, 0, 0, 0)))
    assert f.span_s == 60 and not f.since_first and f.events_per_s == pytest.approx(5.0)
    assert len(w.snapshots) <= 22  # about a minute of them, not all
    last = w.snapshots[-1]
    assert last.at == 199
    f = w.add(Snapshot(260.0, last.events, last.age_buckets))  # then nothing for a minute
    assert f.events_per_s == 0 and f.p50_s is None and f.span_s == 61  # against the one at 199 s


def test_after_a_pause_the_figures_cover_the_pause_and_say_so() -> None:
    w = Window(60.0, first=Snapshot(0.0, 0))
    f = w.add(Snapshot(600.0, 1200))
    assert f.span_s == 600 and f.events_per_s == pytest.approx(2.0) and not f.since_first
    assert rates.format_span(f.span_s) == "10m"


def test_a_window_without_a_first_snapshot_has_no_figures_at_its_first_view() -> None:
    w = Window(60.0)
    f = w.add(Snapshot(5.0, 10))
    assert f.span_s == 0 and f.events_per_s is None
    assert w.add(Snapshot(8.0, 16)).events_per_s == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "—"),
        (0.0123, "12 ms"),
        (0.9994, "999 ms"),
        (1.25, "1.2 s"),
        (99.0, "99.0 s"),
        (400, "6m"),
        (INF, "> 10.0 s"),
    ],
)
def test_formatting(value: float | None, text: str) -> None:
    assert rates.format_seconds(value, 10.0) == text


def test_formatting_rates_and_spans() -> None:
    assert rates.format_rate(None) == "—" and rates.format_rate(2.345) == "2.3" and rates.format_rate(1234.5) == "1234"
    assert rates.format_span(42.4) == "42 s" and rates.format_seconds(INF) == "—"
