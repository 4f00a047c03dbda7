"""Schedules: when a schedule's ticks fall, and which of them to fire after a wait. Pure: no I/O, no clock.

A schedule ticks on a cron expression read in an IANA time zone, or every N seconds from an anchor. Cron ticks are
wall-clock times in the zone, so daylight-saving changes are decided here (docs/design/schedules.md):

- a wall time that does not exist on a spring-forward day (02:30 in Europe/Berlin on the last Sunday of March) has
  no tick that day;
- a wall time that exists twice on a fall-back day (02:30 in Europe/Berlin on the last Sunday of October) ticks
  once, at its first occurrence;
- a zone without daylight saving (Asia/Riyadh) ticks at the same UTC time every day.

Intervals are counted from the anchor, not from the last fire, so they never drift. After a wait (the service down,
or a replica late), `due` says which ticks to fire under the schedule's catch-up policy: `skip` fires the latest
tick only if it is less than `grace` late, `once` fires the latest whatever its lateness, `all` fires the latest
`max_catch_up` ticks oldest first; the others are counted as missed. Each tick has a deterministic event id
(`tick_id`), so firing it twice is deduplicated by the inbox, and a deterministic jitter (`jitter_of`).

Cron expressions are read by croniter (5 fields, or 6 with seconds last as croniter takes them): a well-kept
parser of the full cron grammar (ranges, steps, names, `L`, `#`), which is what no hand-written one gets right.
"""

from __future__ import annotations

import hashlib
import re
import string
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from sfworkflow.contract.headers import SCHEDULE, TENANT
from sfworkflow.contract.topology import EVENTS_EXCHANGE, SCHEDULES_EXCHANGE

NAMESPACE = uuid.UUID("4b2f0c7e-5d51-4b8e-9a5c-3f6e0d1c2a90")  # the tick ids' uuid5 namespace
MAX_SCAN = 10_000  # cron ticks counted at most as missed (intervals are counted by arithmetic, without a bound)
MAX_CANDIDATES = 10_000  # cron wall times tried for one tick: one that only ever falls in skipped hours never ticks
NIL_TENANT = "00000000-0000-0000-0000-000000000000"  # the tenant of code-declared schedules
SOURCE = "sfworkflow.schedules"  # the `source` of the events schedules publish
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")  # a schedule's name (the table's CHECK says the same)
TEMPLATE_FIELDS = frozenset({"tick", "date", "schedule"})  # what an entity id template may name


class CatchUp(StrEnum):
    SKIP = "skip"
    ONCE = "once"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class Spec:
    """When a schedule ticks: `cron` in `timezone`, or `every_s` seconds from `anchor` (UTC)."""

    cron: str | None = None
    every_s: int | None = None
    anchor: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    timezone: str = "UTC"
    jitter_s: float = 0.0
    catch_up: CatchUp = CatchUp.ONCE
    max_catch_up: int = 10
    grace_s: float = 60.0  # `skip`: a tick this late or less is on time, not missed
    zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("a schedule needs either a cron expression or an interval (every_s), not both")
        if self.cron is not None and (not croniter.is_valid(self.cron) or _random_field(self.cron)):
            raise ValueError(f"{self.cron!r} is not a cron expression (minute hour day month weekday, e.g. 0 8 * * *)")
        if self.every_s is not None and (isinstance(self.every_s, bool) or not 1 <= self.every_s <= 366 * 86400):
            raise ValueError(f"every_s must be a whole number of seconds from 1 to a year, got {self.every_s!r}")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"{self.timezone!r} is not an IANA time zone (e.g. Europe/Berlin, Asia/Riyadh)") from None
        if self.anchor.tzinfo is None:
            raise ValueError("the anchor must be an aware datetime")
        object.__setattr__(self, "anchor", self.anchor.astimezone(UTC))  # an interval counts real seconds
        if not 0 <= self.jitter_s <= 3600:
            raise ValueError(f"jitter_s must be from 0 to 3600 seconds, got {self.jitter_s!r}")
        if not 1 <= self.max_catch_up <= 1000:
            raise ValueError(f"max_catch_up must be from 1 to 1000, got {self.max_catch_up!r}")
        object.__setattr__(self, "zone", zone)
        if self.cron is not None:
            try:
                next_tick(self, self.anchor)
            except (CroniterError, ValueError, OverflowError):
                raise ValueError(f"{self.cron!r} never ticks (in {self.timezone}): no date matches it") from None
        _check_jitter(self)


def _random_field(cron: str) -> bool:
    """Whether a field is croniter's random (R) or hashed (H) one: replicas would disagree on the ticks. No month or
    day name starts with either letter, so MAR and THU are names, not these."""
    return any(token.upper().startswith(("R", "H")) for f in cron.split() for token in f.split(","))


def _check_jitter(spec: Spec) -> None:
    """A jitter shorter than half the gap between ticks, so a tick's jitter never carries it past the next tick."""
    if spec.jitter_s <= 0:
        return
    t = next_tick(spec, spec.anchor)
    gap = float("inf")
    for _ in range(24):
        u = next_tick(spec, t)
        gap, t = min(gap, (u - t).total_seconds()), u
    if spec.jitter_s > gap / 2:
        raise ValueError(
            f"jitter_s {spec.jitter_s:g} is more than half the {gap:g} s between ticks: a tick would be fired "
            "after the next one; make it at most half"
        )


def next_tick(spec: Spec, after: datetime) -> datetime:
    """The schedule's first tick strictly after `after`, in UTC."""
    if spec.every_s is not None:
        step = spec.every_s
        k = int((after - spec.anchor).total_seconds() // step) + 1
        tick = spec.anchor + timedelta(seconds=k * step)
        while tick <= after:  # float division at the boundary
            tick += timedelta(seconds=step)
        return tick.astimezone(UTC)
    assert spec.cron is not None
    candidates = croniter(spec.cron, after.astimezone(spec.zone).replace(tzinfo=None))
    for _ in range(MAX_CANDIDATES):
        found = _real(spec, candidates.get_next(datetime))
        if found is not None and found > after:
            return found
    raise ValueError(f"{spec.cron!r} has no tick in {spec.timezone} within {MAX_CANDIDATES} candidates")


def prev_tick(spec: Spec, at: datetime) -> datetime:
    """The schedule's latest tick at or before `at`, in UTC."""
    if spec.every_s is not None:
        k = int((at - spec.anchor).total_seconds() // spec.every_s)
        tick = spec.anchor + timedelta(seconds=k * spec.every_s)
        while tick > at:
            tick -= timedelta(seconds=spec.every_s)
        return tick.astimezone(UTC)
    assert spec.cron is not None
    # Wall times from a second past `at` (croniter's get_prev is strict), and past the hour a recent fall-back
    # repeated: its first occurrence ticked before `at` though its wall time is later than `at`'s.
    repeated = max(timedelta(0), _offset(spec, at - timedelta(hours=3)) - _offset(spec, at))
    start = (at + timedelta(seconds=1)).astimezone(spec.zone).replace(tzinfo=None) + repeated
    candidates = croniter(spec.cron, start)
    for _ in range(MAX_CANDIDATES):
        found = _real(spec, candidates.get_prev(datetime))
        if found is not None and found <= at:
            return found
    raise ValueError(f"{spec.cron!r} has no tick in {spec.timezone} within {MAX_CANDIDATES} candidates")


def _offset(spec: Spec, at: datetime) -> timedelta:
    return at.astimezone(spec.zone).utcoffset() or timedelta(0)


def _real(spec: Spec, local: datetime) -> datetime | None:
    """A cron wall time as the instant it ticks: None when the spring-forward skips it, the first occurrence when
    the fall-back repeats it."""
    aware = local.replace(tzinfo=spec.zone, fold=0)
    if aware.astimezone(UTC).astimezone(spec.zone).replace(tzinfo=None) != local:
        return None
    return aware.astimezone(UTC)


def ticks(spec: Spec, after: datetime, until: datetime, limit: int = MAX_SCAN) -> list[datetime]:
    """The ticks in (after, until], at most `limit` of them, in order."""
    out: list[datetime] = []
    t = next_tick(spec, after)
    while t <= until and len(out) < limit:
        out.append(t)
        t = next_tick(spec, t)
    return out


@dataclass(frozen=True, slots=True)
class Due:
    fire: list[datetime]  # ticks to fire now, oldest first
    missed: int  # ticks passed over under the catch-up policy (at least; the count stops at MAX_SCAN)
    next_at: datetime  # the first tick after now: where the schedule waits next


Jitter = Callable[[datetime], timedelta]  # a tick's jitter (jitter_of bound to a schedule)


def _no_jitter(_tick: datetime) -> timedelta:
    return timedelta(0)


def due(spec: Spec, next_at: datetime, now: datetime, jitter: Jitter = _no_jitter) -> Due:
    """What to fire at `now` for a schedule whose first unfired tick is `next_at`. A tick is due once its instant
    plus its jitter has passed; one that has not stays unfired (the schedule waits for it), so a jitter never turns
    a tick into a missed one."""
    if next_at + jitter(next_at) > now:
        return Due([], 0, next_at)
    latest = max(next_at, prev_tick(spec, now))
    while latest > next_at and latest + jitter(latest) > now:  # the latest tick may still wait for its jitter
        latest = max(next_at, prev_tick(spec, latest - timedelta(microseconds=1)))
    passed = _count(spec, next_at, latest)
    if spec.catch_up is CatchUp.ALL:
        fire = [latest]
        while len(fire) < spec.max_catch_up and fire[0] > next_at:
            fire.insert(0, max(next_at, prev_tick(spec, fire[0] - timedelta(microseconds=1))))
    elif spec.catch_up is CatchUp.ONCE or (now - latest - jitter(latest)).total_seconds() <= spec.grace_s:
        fire = [latest]
    else:
        fire = []
    return Due(fire, max(0, passed - len(fire)), next_tick(spec, latest))


def _count(spec: Spec, first: datetime, last: datetime) -> int:
    """How many ticks from `first` to `last`, both ticks (a cron's counted up to MAX_SCAN)."""
    if spec.every_s is not None:
        return round((last - first).total_seconds() / spec.every_s) + 1
    return 1 + len(ticks(spec, first, last, limit=MAX_SCAN))


def tick_id(schedule_key: str, tick: datetime) -> str:
    """The event id of a tick: the same for every replica and every retry, so the inbox keeps one."""
    return str(uuid.uuid5(NAMESPACE, f"{schedule_key}@{tick.astimezone(UTC).isoformat()}"))


def jitter_of(spec: Spec, schedule_key: str, tick: datetime) -> timedelta:
    """A tick's jitter: spread over [0, jitter_s) by a hash of the schedule and the tick, the same on every try."""
    if spec.jitter_s <= 0:
        return timedelta(0)
    digest = hashlib.sha256(f"{schedule_key}@{tick.astimezone(UTC).isoformat()}".encode()).digest()
    span_us = max(1, int(spec.jitter_s * 1_000_000))
    return timedelta(microseconds=int.from_bytes(digest[:8], "big") % span_us)


def manual_tick_id(schedule_key: str, request_id: str) -> str:
    """The event id of a tick fired by hand (`schedules trigger`): one per request, whatever the retries."""
    return str(uuid.uuid5(NAMESPACE, f"{schedule_key}@manual:{request_id}"))


# ---- schedules as declared, and what firing one writes -----------------------------------------------------------
class Kind(StrEnum):
    EVENT = "event"  # an event into sfworkflow (sfworkflow.events): a start event starts an instance per tick
    TICK = "tick"  # a tick message for SalesFlow's own jobs (sfworkflow.schedules, routing key = event_type)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule: what it publishes at each tick of `spec`. Declared in a workflow definition (the nil tenant's,
    source `code`) or at run time per tenant (`schedules add`, the admin API; source `api`)."""

    name: str
    kind: Kind
    event_type: str  # event: the event's type; tick: the tick's routing key
    spec: Spec
    entity_id: str | None = None  # event: the entity, a template naming {tick}, {date} or {schedule}
    data: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    tenant_id: str = NIL_TENANT

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ValueError(
                f"{self.name!r} is not a schedule name: lower-case letters, digits, '.', '_' or '-', up to 100, "
                "e.g. sequence.tick or daily-report"
            )
        object.__setattr__(self, "kind", Kind(self.kind))
        if not re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+", self.event_type) or len(self.event_type) > 100:
            raise ValueError(f"{self.event_type!r} is not a dotted event type or routing key, e.g. sequence.tick")
        if self.kind is Kind.EVENT:
            if not self.entity_id:
                raise ValueError(f"schedule {self.name}: an event needs an entity id (a template, e.g. cycle-{{tick}})")
            check_template(self.entity_id)
        elif self.entity_id is not None:
            raise ValueError(
                f"schedule {self.name}: a tick has no entity id (it goes to SalesFlow's jobs, not to "
                "an instance); use kind event to publish an event to an instance"
            )
        if not isinstance(self.data, Mapping):
            raise ValueError(f"schedule {self.name}: data must be a JSON object")

    @property
    def key(self) -> str:
        """What its tick ids hash: the tenant and the name (two tenants' schedules of one name never collide)."""
        return f"{self.tenant_id}/{self.name}"


def check_template(template: str) -> None:
    """Raise ValueError unless `template` names only {tick}, {date} and {schedule} (and no format spec)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"entity id template {template!r}: {exc} (write {{{{ and }}}} for braces)") from None
    for _text, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conversion:
            raise ValueError(
                f"entity id template {template!r} names {{{name}}}: only {{tick}} (the tick's instant), {{date}} "
                "(its date in the schedule's zone) and {schedule} (its name)"
            )


def entity_of(schedule: Schedule, tick: datetime) -> str:
    """The entity id a tick's event goes to: the template with the tick filled in."""
    assert schedule.entity_id is not None
    return schedule.entity_id.format(
        tick=_iso(tick), date=tick.astimezone(schedule.spec.zone).date().isoformat(), schedule=schedule.name
    )


@dataclass(frozen=True, slots=True)
class TickMessage:
    """One message a tick publishes, as the outbox takes it."""

    message_id: str
    exchange: str
    routing_key: str
    body: dict[str, Any]
    headers: dict[str, str]
    mandatory: bool  # an event must reach sfworkflow's queues; a tick nobody listens to is dropped


def message(schedule: Schedule, tick: datetime, message_id: str, manual: bool = False) -> TickMessage:
    """What `schedule` publishes for `tick` under `message_id` (tick_id, or manual_tick_id for a trigger)."""
    if schedule.kind is Kind.EVENT:
        body = {
            "event_id": message_id, "event_type": schedule.event_type, "spec_version": "1.0", "schema_version": 1,
            "tenant_id": schedule.tenant_id, "entity_id": entity_of(schedule, tick), "correlation_id": None,
            "causation_id": None, "source": SOURCE, "actor_type": "system", "timestamp": _iso(tick),
            "trace_id": None, "data": dict(schedule.data),
        }  # fmt: skip
        headers = {TENANT: schedule.tenant_id, SCHEDULE: schedule.name}
        return TickMessage(message_id, EVENTS_EXCHANGE, schedule.event_type, body, headers, True)
    body = {
        "message_id": message_id, "schedule": schedule.name, "tenant_id": schedule.tenant_id,
        "tick_at": _iso(tick), "timezone": schedule.spec.timezone, "manual": manual, "data": dict(schedule.data),
    }  # fmt: skip
    headers = {TENANT: schedule.tenant_id, SCHEDULE: schedule.name}
    return TickMessage(message_id, SCHEDULES_EXCHANGE, schedule.event_type, body, headers, False)


@dataclass(frozen=True, slots=True)
class Fire:
    """What one round does with a due schedule: the messages to queue, and where the schedule waits next."""

    messages: list[TickMessage]
    ticks: list[datetime]  # the ticks fired, oldest first
    missed: int
    next_tick_at: datetime
    due_at: datetime  # next_tick_at with its jitter
    lateness_s: float  # how late the latest tick fired is (seconds past its instant and jitter), 0 when none


def fire(schedule: Schedule, next_tick_at: datetime, now: datetime) -> Fire:
    """The ticks of `schedule` to fire at `now`, its first unfired tick being `next_tick_at` (the catch-up policy
    decides which of several missed ones), and its next wait."""
    d = due(schedule.spec, next_tick_at, now, lambda t: jitter_of(schedule.spec, schedule.key, t))
    messages = [message(schedule, t, tick_id(schedule.key, t)) for t in d.fire]
    late = 0.0
    if d.fire:
        latest = d.fire[-1]
        late = max(0.0, (now - latest - jitter_of(schedule.spec, schedule.key, latest)).total_seconds())
    return Fire(messages, d.fire, d.missed, d.next_at, due_at(schedule, d.next_at), late)


def due_at(schedule: Schedule, tick: datetime) -> datetime:
    """When the loop takes a schedule whose next tick is `tick`: the tick plus its jitter."""
    return tick + jitter_of(schedule.spec, schedule.key, tick)


def first_tick(schedule: Schedule, now: datetime) -> datetime:
    """Where a new (or resumed, or changed) schedule waits: its first tick after `now`."""
    return next_tick(schedule.spec, now)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")
