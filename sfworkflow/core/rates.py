"""Rates over about the last minute from a process's own cumulative metrics. Pure: the caller reads them.

The status page takes a `Snapshot` of this replica's counters (events received, and the bucket counts of the
histogram of event age at commit) each time it renders, keeps them in a `Window`, and shows the difference
against the snapshot closest to WINDOW_S ago: events per second and the p50/p99 lag, as Prometheus's
`rate()` and `histogram_quantile()` would compute them. The figures say which span they cover: right after
start-up that is the time since the first snapshot, and when nobody looked at the page for a while it is
longer than a minute.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from sfworkflow.core.stuck import format_age

WINDOW_S = 60.0  # seconds the figures cover, when there is a snapshot that old
MAX_SNAPSHOTS = 256  # at most kept (the page renders at most every few seconds; this bounds a misuse)

Buckets = tuple[tuple[float, float], ...]  # (upper bound `le`, cumulative count), ascending; +Inf last


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # seconds on a monotonic clock
    events: float  # events received so far, every workflow and outcome
    age_buckets: Buckets = ()  # the event-age histogram so far


@dataclass(frozen=True, slots=True)
class Figures:
    span_s: float  # seconds covered; 0 when there is no earlier snapshot
    events: float  # events received in the span
    events_per_s: float | None  # None when the span is 0
    p50_s: float | None  # event age at commit; None when no event was committed in the span
    p99_s: float | None  # math.inf: above the histogram's last finite bucket (see `last_bound_s`)
    last_bound_s: float  # the histogram's largest finite bucket bound (0 when it has none)
    since_first: bool  # the span starts at the first snapshot (start-up), shorter than WINDOW_S


def merge_buckets(samples: Iterable[tuple[float, float]]) -> Buckets:
    """(le, cumulative count) samples of any number of label sets, summed per bound and sorted."""
    total: dict[float, float] = {}
    for le, count in samples:
        total[le] = total.get(le, 0.0) + count
    return tuple(sorted(total.items()))


def difference(now: Buckets, then: Buckets) -> Buckets:
    """The counts observed between two snapshots of one histogram (`then` empty: since it was created)."""
    before = dict(then)
    if then and set(before) != {le for le, _c in now}:
        return now  # the buckets changed (a different histogram): nothing to subtract from
    return tuple((le, max(count - before.get(le, 0.0), 0.0)) for le, count in now)


def quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket holding rank q·count (the first bucket from 0).
    None when nothing was observed; math.inf when the rank falls in the +Inf bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return math.inf
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return math.inf


def figures(now: Snapshot, then: Snapshot | None, since_first: bool = False) -> Figures:
    """What happened between `then` and `now` (`then` None: nothing to compare with yet)."""
    finite = [le for le, _c in now.age_buckets if not math.isinf(le)]
    last_bound = finite[-1] if finite else 0.0
    if then is None or now.at <= then.at:
        return Figures(0.0, 0.0, None, None, None, last_bound, since_first)
    span = now.at - then.at
    events = now.events - then.events if now.events >= then.events else now.events
    observed = difference(now.age_buckets, then.age_buckets)
    return Figures(
        span_s=span,
        events=events,
        events_per_s=events / span,
        p50_s=quantile(0.5, observed),
        p99_s=quantile(0.99, observed),
        last_bound_s=last_bound,
        since_first=since_first,
    )


class Window:
    """Snapshots of the last WINDOW_S or so, the oldest kept until a newer one is at least that old."""

    def __init__(self, window_s: float = WINDOW_S, first: Snapshot | None = None) -> None:
        self.window_s = window_s
        self.snapshots: deque[Snapshot] = deque(maxlen=MAX_SNAPSHOTS)
        self.first_at = first.at if first is not None else None
        if first is not None:
            self.snapshots.append(first)

    def add(self, now: Snapshot) -> Figures:
        """Keep `now` and compare it with the snapshot closest to `window_s` before it."""
        if self.first_at is None:
            self.first_at = now.at
        target = now.at - self.window_s
        while len(self.snapshots) >= 2 and self.snapshots[1].at <= target:
            self.snapshots.popleft()  # the next one is old enough: this one is farther from the target
        then = min(self.snapshots, key=lambda s: abs(s.at - target), default=None)
        self.snapshots.append(now)
        since_first = then is not None and then.at == self.first_at and now.at - then.at < self.window_s
        return figures(now, then, since_first)


# ---- text for people ---------------------------------------------------------------------------------------


def format_seconds(value: float | None, last_bound_s: float = 0.0) -> str:
    """A lag for people: 35 ms, 1.2 s, 12m; "—" for none; "> 60 s" past the histogram's last bound."""
    if value is None:
        return "—"
    if math.isinf(value):
        return f"> {format_seconds(last_bound_s)}" if last_bound_s else "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 100:
        return f"{value:.1f} s"
    return format_age(value)


def format_rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def format_span(span_s: float) -> str:
    return f"{span_s:.0f} s" if span_s < 120 else format_age(span_s)
