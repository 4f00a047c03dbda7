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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
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

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"rate limit name {self.name!r}: use lower-case letters, digits and _")
        check_rate(f"rate limit {self.name!r}", self.per_s, self.burst)


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


def parse_overrides(text: str) -> dict[str, Rate | None]:
    """`SFWORKFLOW_RATE_LIMITS`: comma-separated `<workflow>.<command>/<name>=PER_S[/BURST]` or `=off` (None: the limit
    is not enforced). Raises ValueError naming the part that is wrong."""
    out: dict[str, Rate | None] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(
                f"{part!r}: write LIMIT=PER_S[/BURST] or LIMIT=off, e.g. sequence.send_step/per_sender=20/40"
            )
        if value == "off":
            out[name] = None
            continue
        per, _, burst = value.partition("/")
        try:
            rate = Rate(float(per), int(burst) if burst else 1)
        except ValueError:
            raise ValueError(f"{part!r}: PER_S must be a number and BURST a whole number") from None
        check_rate(name, rate.per_s, rate.burst)
        out[name] = rate
    return out


def check_overrides(overrides: Mapping[str, Rate | None], declared: Sequence[str]) -> None:
    """Every overridden limit must be one a definition declares."""
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ValueError(f"unknown rate limit {', '.join(unknown)}; declared: {', '.join(sorted(declared)) or 'none'}")
