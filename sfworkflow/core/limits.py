"""Per-key rate limits on outgoing commands: what a definition declares and the arithmetic of a reservation.

A definition declares `RateLimit`s on its commands: at most `per_s` a second per key, with bursts of `burst`. The
key is built from the command (the tenant always comes first: tenants never share a bucket). The plan reserves a
slot for each limited command in the batch's transaction (one durable bucket row per key, sfworkflow.rate_bucket,
shared by every replica) and writes the command's outbox row due at its slot: a command over its limit is deferred,
never dropped, and the relay publishes it when it falls due, after the instance's earlier messages.

The bucket is GCRA (the generic cell rate algorithm, as in ATM traffic shaping and token-bucket limiters): a bucket
holds one timestamp, its *theoretical arrival time* `tat`. A request at `now` takes the slot
`max(tat, now) - (burst - 1) / per_s` (not before `now`) and moves `tat` on by `1 / per_s`: after a quiet spell
`burst` requests go at once, then one every `1 / per_s` seconds, and over any window of `w` seconds at most
`burst + per_s * w` slots fall in it. Nothing here does I/O; the repository's `take_rates` statement moves `tat`
and this module turns its answer into the slots.

A limit may also cap a key's slots per day (`daily_cap`: a WhatsApp number's messaging tier, a mailbox's daily sending
quota). Days are UTC days. The bucket counts the slots booked on the day of its latest slot (`DayCount`); a request
that would be over the cap takes its slot at the next UTC midnight instead, and the rate applies from there on (the
bucket is not reset at midnight: a burst there only as far as the rate's interval allows). `reserve` books a capped
bucket's slots one by one; the batch writes the bucket's new `tat` and count back under the lock `take_rates` took.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

KeyOf = Callable[[Mapping[str, Any]], str]  # a command's `data` -> the part of its key after the tenant
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `per_s` commands `command` a second per key, bursts of up to `burst`; the key is the tenant and
    `key(data)` (the tenant alone when `key` is None). Named `<workflow>.<command>/<name>` in metrics, history,
    settings and the bucket table."""

    command: str  # a command name of the definition (not a compensation: an undo does not wait)
    name: str
    per_s: float
    burst: int = 1
    key: KeyOf | None = None
    description: str = ""
    daily_cap: int | None = None  # at most this many a UTC day per key (None: no cap)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"rate limit name {self.name!r}: use lower-case letters, digits and _")
        check_rate(f"rate limit {self.name!r}", self.per_s, self.burst)
        if self.daily_cap is not None:
            check_cap(f"rate limit {self.name!r}", self.daily_cap)

    @property
    def rate(self) -> Rate:
        """The rate the definition declares."""
        return Rate(self.per_s, self.burst, self.daily_cap)


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """At most `slots` commands `command` in flight per key (the tenant and `key(data)`). Every such command is queued
    behind a *gate*: its outbox row is not published until a slot is granted to it (runtime/gates.py, oldest first
    per key, across replicas). The instance holds the slot while its state is one of `held_in`; a transition out of
    them (an answer, a failure, a timeout) or the instance's end releases it, and the next queued command gets it.
    The timers named in `timers_after_release`, set by the step that issued the command, start when the slot is
    granted, not when the command was decided (a run's timeout counts from when it really goes out). Named
    `<workflow>.<command>/<name>` like a rate limit; a tenant's own `slots` override it (`sfworkflow limits set`)."""

    command: str
    name: str
    slots: int
    held_in: frozenset[str]
    timers_after_release: tuple[str, ...] = ()
    key: KeyOf | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"concurrency limit name {self.name!r}: use lower-case letters, digits and _")
        check_slots(f"concurrency limit {self.name!r}", self.slots)
        if not self.held_in:
            raise ValueError(f"concurrency limit {self.name!r}: held_in must name the states that hold a slot")


MAX_SLOTS = 100_000


def check_slots(what: str, slots: object) -> None:
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"{what}: slots must be a whole number from 1 to {MAX_SLOTS}, got {slots!r}")


Limit = RateLimit | ConcurrencyLimit


MAX_DAILY_CAP = 1_000_000_000


def check_cap(what: str, cap: object) -> None:
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_DAILY_CAP:
        raise ValueError(f"{what}: daily_cap must be a whole number from 1 to {MAX_DAILY_CAP}, got {cap!r}")


MIN_PER_S = 0.0001  # one command in under three hours: slower is a daily cap, not a rate
MAX_RATE = 1_000_000  # commands a second, and a burst, at most (more is no limit at all)


def check_rate(what: str, per_s: object, burst: object) -> None:
    """A rate must be a number from MIN_PER_S to MAX_RATE and a burst a whole number from 1 to MAX_RATE (a slot
    further than the database's timestamps reach, or a burst past 32 bits, would fail every batch that takes it)."""
    if isinstance(per_s, bool) or not isinstance(per_s, int | float) or not (MIN_PER_S <= per_s <= MAX_RATE):
        raise ValueError(f"{what}: per_s must be a number > 0 (from {MIN_PER_S:g} to {MAX_RATE:g}), got {per_s!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_RATE:
        raise ValueError(f"{what}: burst must be a whole number from 1 to {MAX_RATE}, got {burst!r}")


@dataclass(frozen=True, slots=True)
class Rate:
    """The rate in force for one limit: the definition's, or the deployment's setting replacing it."""

    per_s: float
    burst: int
    daily_cap: int | None = None

    @property
    def interval_s(self) -> float:
        return 1.0 / self.per_s


def limit_name(workflow: str, limit: Limit) -> str:
    """`sequence.send_step/per_sender`: how metrics, history, settings and the bucket table name a limit."""
    return f"{workflow}.{limit.command}/{limit.name}"


def bucket_key(full_name: str, tenant_id: str, data: Mapping[str, Any], key: KeyOf | None) -> str:
    """The bucket a command takes its slot from: the limit, the tenant, then the declared part of the key."""
    part = "*" if key is None else str(key(data))
    return f"{full_name}|{tenant_id}|{part}"


def slots(tat_after: datetime, now: datetime, n: int, rate: Rate) -> list[datetime]:
    """The slots of `n` requests that moved a bucket's `tat` to `tat_after` (by `n` intervals from
    `max(tat_before, now)`), in request order: request j goes at `start + j * interval - (burst - 1) * interval`,
    never before `now`."""
    if n < 1:
        return []
    # Each offset rounded to the microsecond once (not a rounded interval multiplied, whose error grows with j).
    start = tat_after - timedelta(seconds=n * rate.interval_s)
    return [max(now, start + timedelta(seconds=(j - rate.burst + 1) * rate.interval_s)) for j in range(n)]


def advance_s(n: int, rate: Rate) -> float:
    """Seconds `n` requests move a bucket's `tat` on."""
    return n * rate.interval_s


@dataclass(frozen=True, slots=True)
class DayCount:
    """A capped bucket's count: the UTC day of its latest slot, how many of its slots fall on that day, and whether
    they are there because an earlier day's cap filled (`pushed`)."""

    day: date | None = None
    used: int = 0
    pushed: bool = False


@dataclass(frozen=True, slots=True)
class Reservation:
    """The slots of a capped bucket's requests, in request order, and the bucket after them."""

    slots: list[datetime]
    capped: list[bool]  # the request's slot follows a day its cap filled
    tat: datetime
    count: DayCount


def utc_day(t: datetime) -> date:
    return t.astimezone(UTC).date()


def midnight(day: date) -> datetime:
    """The start of a UTC day."""
    return datetime.combine(day, time(), UTC)


def reserve(start: datetime, now: datetime, n: int, rate: Rate, count: DayCount) -> Reservation:
    """Book `n` requests on a bucket with a daily cap. `start` is `max(tat, now)` before them, `count` the bucket's
    count. Each request takes its GCRA slot, unless its day already holds `daily_cap` slots: then the first instant
    of the next UTC day, from which the rate goes on. A bucket whose booked slots reach past today (an earlier
    batch went over the cap) books after them: slots stay in request order across batches. A slot is `capped`
    while the bucket's bookings follow a day its cap filled (`DayCount.pushed`), until that later day comes."""
    cap = rate.daily_cap
    if cap is None:
        raise ValueError("reserve: the rate has no daily cap (slots() books an uncapped bucket)")
    today = utc_day(now)
    ahead = (rate.burst - 1) * rate.interval_s
    # tat = anchor + k intervals, each offset rounded once (as slots() does), the anchor moved at a day's jump.
    anchor, k, floor, day, used = start, 0, now, count.day, count.used
    pushed = count.pushed and day is not None and day > today
    if day is not None and day > today:
        floor = max(floor, midnight(day))
    out: list[datetime] = []
    capped: list[bool] = []
    for _ in range(n):
        slot = max(floor, anchor + timedelta(seconds=k * rate.interval_s - ahead))
        slot_day = utc_day(slot)
        if day is None or slot_day > day:
            day, used = slot_day, 0
        if used >= cap:  # the day is full: the next day's first instant, the bucket running from there
            day, used, pushed = day + timedelta(days=1), 0, True
            floor = midnight(day)
            anchor, k = max(anchor + timedelta(seconds=k * rate.interval_s), floor), 0
            slot = max(floor, anchor - timedelta(seconds=ahead))
        out.append(slot)
        capped.append(pushed)
        used += 1
        k += 1
    tat = anchor + timedelta(seconds=k * rate.interval_s)
    return Reservation(out, capped, tat, DayCount(day, used, pushed))


@dataclass(frozen=True, slots=True)
class RateSetting:
    """One limit in SFWORKFLOW_RATE_LIMITS: a rate replacing the definition's, and its daily cap when the setting
    names one (`sets_cap`; else the definition's cap stays)."""

    per_s: float
    burst: int
    daily_cap: int | None = None
    sets_cap: bool = False

    def over(self, declared: Rate) -> Rate:
        """The rate in force: this one, with the declared daily cap unless the setting names its own."""
        return Rate(self.per_s, self.burst, self.daily_cap if self.sets_cap else declared.daily_cap)


_SETTING_FORM = (
    "write LIMIT=PER_S[/BURST][/daily:CAP|/daily:off] or LIMIT=off, e.g. sequence.send_step/per_sender=20/40"
)


def parse_overrides(text: str) -> dict[str, RateSetting | None]:
    """`SFWORKFLOW_RATE_LIMITS`: comma-separated `<workflow>.<command>/<name>=PER_S[/BURST][/daily:CAP|/daily:off]`
    or `=off` (None: the limit is not enforced). Raises ValueError naming the part that is wrong."""
    out: dict[str, RateSetting | None] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(f"{part!r}: {_SETTING_FORM}")
        if value == "off":
            out[name] = None
            continue
        pieces = [p.strip() for p in value.split("/")]
        cap: int | None = None
        sets_cap = pieces[-1].startswith("daily:")
        if sets_cap:
            word = pieces.pop().removeprefix("daily:").strip()
            try:
                cap = None if word == "off" else int(word)
            except ValueError:
                raise ValueError(f"{part!r}: CAP must be a whole number or off") from None
            if cap is not None:
                check_cap(name, cap)
        if not 1 <= len(pieces) <= 2:
            raise ValueError(f"{part!r}: {_SETTING_FORM}")
        try:
            setting = RateSetting(float(pieces[0]), int(pieces[1]) if len(pieces) == 2 else 1, cap, sets_cap)
        except ValueError:
            raise ValueError(f"{part!r}: PER_S must be a number and BURST a whole number") from None
        check_rate(name, setting.per_s, setting.burst)
        out[name] = setting
    return out


def check_overrides(overrides: Mapping[str, RateSetting | None], declared: Sequence[str]) -> None:
    """Every overridden limit must be one a definition declares."""
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ValueError(f"unknown rate limit {', '.join(unknown)}; declared: {', '.join(sorted(declared)) or 'none'}")
