"""Rate limits on outgoing commands without PostgreSQL: the GCRA arithmetic of core/limits.py, what a definition may
declare, the deployment's overrides, and what the batch plan does with a limited command (tests/unit/plankit.py's
in-memory database answers its TakeRates request the way take_rates does)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.core.batch import TakeRates
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Engine
from sfworkflow.core.limits import DayCount, Rate, RateLimit, RateSetting, bucket_key, parse_overrides, reserve, slots
from sfworkflow.core.plan import BatchPlan
from sfworkflow.errors import DefinitionError
from sfworkflow.workflows import DEFINITIONS
from tests.unit.plankit import T0, TENANT, TOY, FakeDatabase, delivery

LIMITED = dataclasses.replace(
    TOY, limits=(RateLimit("do", name="per_letter", per_s=2, burst=3, key=lambda d: str(d["key"])[:1]),)
)
ENGINE = Engine([LIMITED])


def plan(engine: Engine = ENGINE, now: datetime = T0) -> BatchPlan:
    return BatchPlan(engine, timedelta(hours=1), now=now)


def started(db: FakeDatabase, *entities: str) -> None:
    db.apply(plan().deliveries([delivery("start", e) for e in entities]))
    db.requests.clear()


def sends(db: FakeDatabase, keys: list[str], engine: Engine = ENGINE) -> tuple[BatchPlan, Any]:
    """One `send` event per key, each to its own instance `i-<key>` (started before)."""
    p = plan(engine, db.now)
    ws = db.apply(p.deliveries([delivery("send", f"i-{k}", key=k) for k in keys]))
    return p, ws


# ---- the arithmetic ----------------------------------------------------------------------------------------
def test_a_quiet_bucket_lets_a_burst_go_at_once_then_one_an_interval() -> None:
    rate = Rate(per_s=2, burst=3)
    tat = T0 + timedelta(seconds=5 * 0.5)  # a fresh bucket after 5 reservations
    got = [(s - T0).total_seconds() for s in slots(tat, T0, 5, rate)]
    assert got == [0.0, 0.0, 0.0, 0.5, 1.0]


def test_a_busy_bucket_continues_from_its_arrival_time() -> None:
    rate = Rate(per_s=10, burst=1)
    tat_before = T0 + timedelta(seconds=3)
    got = slots(tat_before + timedelta(seconds=0.2), T0, 2, rate)
    assert [(s - T0).total_seconds() for s in got] == [3.0, 3.1]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    per_s=st.sampled_from([0.5, 1.0, 3.0, 20.0, 50.0]),
    burst=st.integers(1, 60),
    batches=st.lists(st.tuples(st.floats(0, 5), st.integers(1, 40)), min_size=1, max_size=30),
)
def test_no_window_holds_more_than_the_burst_and_the_rate_allow(
    per_s: float, burst: int, batches: list[tuple[float, int]]
) -> None:
    """Batches arriving at any times, each reserving n slots as take_rates does: no slot is before its batch,
    slots of one bucket never go backwards, and any window of w seconds holds at most burst + per_s * w slots."""
    rate = Rate(per_s, burst)
    tat: datetime | None = None
    now = T0
    out: list[datetime] = []
    for gap, n in batches:
        now += timedelta(seconds=gap)
        tat = max(tat or now, now) + timedelta(seconds=n * rate.interval_s)
        got = slots(tat, now, n, rate)
        assert all(s >= now for s in got)
        assert got == sorted(got) and (not out or got[0] >= out[-1])
        out += got
    for i, a in enumerate(out):
        for j in range(i, len(out)):
            w = (out[j] - a).total_seconds()
            assert j - i + 1 <= burst + per_s * (w + 1e-4), (i, j, w)  # slots are whole microseconds


def test_the_key_starts_with_the_limit_and_the_tenant() -> None:
    key = bucket_key("sequence.send_step/per_sender", TENANT, {"recipient": {"channel": "email"}}, None)
    assert key == f"sequence.send_step/per_sender|{TENANT}|*"


# ---- declarations and overrides ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("per_s", "burst"),
    [
        (0, 1),
        (-1, 1),
        (1e-13, 1),
        (2e6, 1),
        (float("inf"), 1),
        (float("nan"), 1),
        (1, 0),
        (1, 1.5),
        (True, 1),
        (1, 2**31),
    ],
)
def test_a_rate_that_cannot_be_kept_is_refused(per_s: Any, burst: Any) -> None:
    with pytest.raises(ValueError, match=r"per_s|burst"):
        RateLimit("do", name="x", per_s=per_s, burst=burst)


def test_a_limit_on_a_compensation_or_an_unknown_command_is_refused() -> None:
    undo = dataclasses.replace(TOY, compensations=frozenset({"undo"}), limits=(RateLimit("undo", name="u", per_s=1),))
    with pytest.raises(DefinitionError, match="an undo never waits"):
        Engine([undo])
    with pytest.raises(DefinitionError, match="not a command"):
        Engine([dataclasses.replace(TOY, limits=(RateLimit("nope", name="n", per_s=1),))])
    twice = (RateLimit("do", name="n", per_s=1), RateLimit("do", name="n", per_s=2))
    with pytest.raises(DefinitionError, match="declared twice"):
        Engine([dataclasses.replace(TOY, limits=twice)])


def test_overrides_parse_and_name_only_declared_limits() -> None:
    assert parse_overrides(" toy.do/per_letter=20/40 , toy.do/other=off,") == {
        "toy.do/per_letter": RateSetting(20.0, 40),
        "toy.do/other": None,
    }
    assert parse_overrides("toy.do/per_letter=0.5") == {"toy.do/per_letter": RateSetting(0.5, 1)}
    assert parse_overrides("a.b/c=2/4/daily:500, a.b/d=1/daily:off") == {
        "a.b/c": RateSetting(2.0, 4, 500, sets_cap=True),
        "a.b/d": RateSetting(1.0, 1, None, sets_cap=True),
    }
    for bad in ("toy.do/per_letter", "=3", "toy.do/per_letter=fast", "toy.do/per_letter=0", "x=1/0",
                "x=1/2/3", "x=1/daily:0", "x=1/daily:many", "x=daily:5"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_overrides(bad)
    with pytest.raises(DefinitionError, match=r"unknown rate limit toy\.do/typo; declared: toy\.do/per_letter"):
        Engine([LIMITED], {"toy.do/typo": RateSetting(1, 1)})


def test_a_setting_keeps_the_definition_s_daily_cap_unless_it_names_one() -> None:
    capped = dataclasses.replace(TOY, limits=(RateLimit("do", name="per_letter", per_s=2, burst=3, daily_cap=100),))
    (limit,) = capped.limits
    assert isinstance(limit, RateLimit)
    name = "toy.do/per_letter"
    assert Engine([capped]).rate_in_force(name, limit) == Rate(2, 3, 100)
    assert Engine([capped], parse_overrides(f"{name}=5/5")).rate_in_force(name, limit) == Rate(5, 5, 100)
    assert Engine([capped], parse_overrides(f"{name}=5/5/daily:7")).rate_in_force(name, limit) == Rate(5, 5, 7)
    assert Engine([capped], parse_overrides(f"{name}=5/5/daily:off")).rate_in_force(name, limit) == Rate(5, 5)
    assert Engine([capped], parse_overrides(f"{name}=off")).rate_in_force(name, limit) is None
    with pytest.raises(ValueError, match="daily_cap"):
        RateLimit("do", name="x", per_s=1, daily_cap=0)


# ---- daily caps: core/limits.py reserve ---------------------------------------------------------------------
NIGHT = datetime(2026, 12, 6, 23, 59, 58, tzinfo=UTC)
MIDNIGHT = datetime(2026, 12, 7, tzinfo=UTC)


def test_past_the_day_s_cap_a_request_takes_the_next_utc_midnight_and_the_rate_goes_on_from_there() -> None:
    rate = Rate(per_s=1, burst=2, daily_cap=2)
    got = reserve(NIGHT, NIGHT, 4, rate, DayCount())
    # Two at once (the burst) fill the day; the third would go at 23:59:59: it takes midnight instead, and the rest
    # follows from there at the rate (its burst of 2).
    assert got.slots == [NIGHT, NIGHT, MIDNIGHT, MIDNIGHT]
    assert got.capped == [False, False, True, True]  # the fourth too: on a day the cap pushed the bucket to
    assert got.count == DayCount(MIDNIGHT.date(), 2, pushed=True)
    assert got.tat == MIDNIGHT + timedelta(seconds=2)
    # The next batch, still on the 6th: tomorrow is full too, so the day after.
    later = reserve(got.tat, NIGHT + timedelta(seconds=1), 1, rate, got.count)
    assert later.slots == [MIDNIGHT + timedelta(days=1)] and later.capped == [True]
    # A request the rate alone puts past midnight is not the cap's doing.
    natural = reserve(NIGHT + timedelta(seconds=3), NIGHT, 1, Rate(per_s=1, burst=1, daily_cap=2), DayCount())
    assert natural.slots == [NIGHT + timedelta(seconds=3)] and natural.capped == [False]


def test_a_count_of_an_earlier_day_does_not_hold_today_back() -> None:
    rate = Rate(per_s=10, burst=10, daily_cap=2)
    got = reserve(MIDNIGHT, MIDNIGHT, 2, rate, DayCount(NIGHT.date(), 2))
    assert got.slots == [MIDNIGHT, MIDNIGHT] and got.capped == [False, False]
    assert got.count == DayCount(MIDNIGHT.date(), 2)


def test_reserve_needs_a_cap() -> None:
    with pytest.raises(ValueError, match="no daily cap"):
        reserve(NIGHT, NIGHT, 1, Rate(1, 1), DayCount())


@settings(max_examples=100, deadline=None)
@given(cap=st.integers(1, 50), burst=st.integers(1, 60), batches=st.lists(st.integers(1, 90), min_size=2, max_size=8))
def test_every_send_the_cap_moved_past_today_says_so_whatever_the_batches(
    cap: int, burst: int, batches: list[int]
) -> None:
    """Far from midnight and at a rate that cannot reach it, every slot past today is the cap's doing: each one is
    flagged, in the batch that filled the day and in every later one."""
    rate = Rate(per_s=1000, burst=burst, daily_cap=cap)
    noon = NIGHT.replace(hour=12)
    tat, count = noon, DayCount()
    for n in batches:
        got = reserve(max(tat, noon), noon, n, rate, count)
        assert got.capped == [slot.date() > noon.date() for slot in got.slots]
        tat, count = got.tat, got.count


def test_slots_keep_the_rate_without_rounding_drift() -> None:
    """Each offset is rounded once: 30,000 slots at 3 a second end where the rate says, not milliseconds early."""
    rate = Rate(per_s=3, burst=1, daily_cap=1_000_000)
    got = reserve(NIGHT.replace(hour=0), NIGHT.replace(hour=0), 30_000, rate, DayCount())
    assert got.slots[-1] == NIGHT.replace(hour=0) + timedelta(seconds=29_999 / 3)
    assert got.tat == NIGHT.replace(hour=0) + timedelta(seconds=10_000)


@settings(max_examples=200, deadline=None)
@given(
    per_s=st.sampled_from([0.5, 1.0, 3.0, 50.0]),
    burst=st.integers(1, 6),
    cap=st.integers(1, 12),
    batches=st.lists(st.tuples(st.floats(0, 200_000), st.integers(1, 20)), min_size=1, max_size=12),
)
def test_no_utc_day_holds_more_than_the_cap_and_slots_keep_their_order(
    per_s: float, burst: int, cap: int, batches: list[tuple[float, int]]
) -> None:
    rate = Rate(per_s, burst, cap)
    tat, count, now = NIGHT, DayCount(), NIGHT - timedelta(hours=1)
    booked: list[datetime] = []
    for gap, n in batches:
        now += timedelta(seconds=gap)
        got = reserve(max(tat, now), now, n, rate, count)
        assert all(slot >= now for slot in got.slots), "a slot before its batch"
        booked += got.slots
        tat, count = got.tat, got.count
    assert booked == sorted(booked), "slots out of request order"
    per_day: dict[Any, int] = {}
    for slot in booked:
        per_day[slot.date()] = per_day.get(slot.date(), 0) + 1
    assert max(per_day.values()) <= cap


def test_the_shipped_sequence_declares_its_per_sender_limit() -> None:
    engine = Engine(DEFINITIONS)
    assert "sequence.send_step/per_sender" in engine.limit_names()
    compiled = engine.workflow("sequence")
    assert compiled is not None
    ((name, limit, rate),) = engine.rate_limits(compiled, "sequence.send_step")
    assert (name, rate) == ("sequence.send_step/per_sender", Rate(50, 50, 100_000))
    assert limit.key is not None
    assert limit.key({"recipient": {"channel": "whatsapp", "address": "+1", "sender": "+15550100"}}) == (
        "whatsapp:+15550100"
    )
    assert limit.key({"recipient": {"channel": "email", "address": "a@b.c"}}) == "email:-"


# ---- the plan --------------------------------------------------------------------------------------------
def test_commands_over_the_limit_are_deferred_in_order_never_dropped() -> None:
    db = FakeDatabase()
    keys = ["a1", "a2", "a3", "a4", "a5", "b1"]
    started(db, *(f"i-{k}" for k in keys))
    p, ws = sends(db, keys)
    takes = [r for r in db.requests if isinstance(r, TakeRates)]
    assert len(takes) == 1 and [(t.bucket_key.split("|")[2], t.n) for t in takes[0].takes] == [("a", 5), ("b", 1)]
    by_key = {orjson_key(r.body): r for r in ws.outbox if r.kind == "command"}
    assert set(by_key) == set(keys)  # every command queued
    after = {
        k: None if r.deferred_until is None else (r.deferred_until - T0).total_seconds() for k, r in by_key.items()
    }
    assert after == {"a1": None, "a2": None, "a3": None, "a4": 0.5, "a5": 1.0, "b1": None}
    assert {r.deferred_by for r in by_key.values() if r.deferred_until} == {"toy.do/per_letter"}
    deferred = [h for h in ws.history if h.outcome == "deferred"]
    assert sorted(h.detail["command_id"] for h in deferred) == sorted(by_key[k].message_id for k in ("a4", "a5"))
    assert p.report.deferred == {("toy", "toy.do", "toy.do/per_letter"): 2}
    assert sorted(s for _w, _l, s in p.report.deferral_s) == [0.5, 1.0]


def test_the_next_batch_continues_behind_the_deferred_ones() -> None:
    db = FakeDatabase()
    started(db, "i-a1", "i-a2", "i-a3", "i-a4", "i-a5")
    sends(db, ["a1", "a2", "a3", "a4"])
    db.now = T0 + timedelta(seconds=0.25)
    _p, ws = sends(db, ["a5"])
    (row,) = [r for r in ws.outbox if r.kind == "command"]
    assert row.deferred_until == T0 + timedelta(seconds=1.0)  # after a4's slot at 0.5 s


def test_a_command_past_its_key_s_daily_cap_waits_for_the_next_utc_day_and_says_so() -> None:
    db = FakeDatabase(overrides={(TENANT, "toy.do/per_letter"): Rate(per_s=100, burst=100, daily_cap=2)})
    db.now = NIGHT
    started(db, "i-a1", "i-a2", "i-a3", "i-a4")
    p, ws = sends(db, ["a1", "a2", "a3"])
    after = {orjson_key(r.body): r.deferred_until for r in ws.outbox if r.kind == "command"}
    assert after == {"a1": None, "a2": None, "a3": MIDNIGHT}
    (entry,) = [h.detail for h in ws.history if h.outcome == "deferred"]
    assert (entry["cause"], entry["daily_cap"], entry["until"]) == ("daily_cap", 2, MIDNIGHT.isoformat())
    assert p.report.capped == {("toy", "toy.do", "toy.do/per_letter"): 1}
    (written,) = ws.buckets  # the count goes back with the batch's writes
    assert written.count == DayCount(MIDNIGHT.date(), 1, pushed=True)
    # The next batch, still before midnight, books behind it: the 7th's second slot (the cap's doing too).
    _p, ws2 = sends(db, ["a4"])
    assert [r.deferred_until for r in ws2.outbox if r.kind == "command"] == [MIDNIGHT]
    assert db.counts[written.bucket_key] == DayCount(MIDNIGHT.date(), 2, pushed=True)
    assert [h.detail["cause"] for h in ws2.history if h.outcome == "deferred"] == ["daily_cap"]


def test_a_suppressed_send_takes_no_slot() -> None:
    db = FakeDatabase()
    started(db, "i-a1", "i-a1-again")
    db.apply(plan().deliveries([delivery("send", "i-a1", key="a1")]))
    db.requests.clear()
    p = plan()
    ws = db.apply(p.deliveries([delivery("send", "i-a1-again", key="a1")]))  # same effect key: suppressed
    assert not [r for r in ws.outbox if r.kind == "command"]
    assert not [r for r in db.requests if isinstance(r, TakeRates)]


def test_a_limit_turned_off_by_the_deployment_asks_nothing() -> None:
    db = FakeDatabase()
    started(db, "i-a1", "i-a2", "i-a3", "i-a4")
    off = Engine([LIMITED], {"toy.do/per_letter": None})
    _p, ws = sends(db, ["a1", "a2", "a3", "a4"], off)
    assert not [r for r in db.requests if isinstance(r, TakeRates)]
    assert all(r.deferred_until is None for r in ws.outbox)


def test_a_batch_without_limited_commands_asks_nothing_more() -> None:
    db = FakeDatabase()
    db.apply(plan().deliveries([delivery("start", "x")]))
    assert db.requests and not [r for r in db.requests if isinstance(r, TakeRates)]


def orjson_key(body: bytes) -> str:
    return str(orjson.loads(body)["data"]["key"])


def test_a_tenant_s_override_sets_its_slots_and_is_recorded_with_the_deferral() -> None:
    db = FakeDatabase(overrides={(TENANT, "toy.do/per_letter"): Rate(per_s=10, burst=1)})
    started(db, "i-a1", "i-a2", "i-a3")
    _p, ws = sends(db, ["a1", "a2", "a3"])
    after = {orjson_key(r.body): r.deferred_until and (r.deferred_until - T0).total_seconds() for r in ws.outbox}
    assert after == {"a1": None, "a2": 0.1, "a3": 0.2}  # 10/s burst 1, not the definition's 2/s burst 3
    assert {(h.detail["per_s"], h.detail["burst"]) for h in ws.history if h.outcome == "deferred"} == {(10, 1)}


def test_a_message_queued_after_a_deferred_one_of_its_instance_waits_for_it() -> None:
    """Bucket `b` is free, but the instance's earlier send (bucket `a`, over its limit) waits 0.5 s: the later send
    waits for it, in the same batch and in a later one, so the relay never finds it due behind a row that is not."""
    db = FakeDatabase()
    started(db, "i-a1", "i-a2", "i-a3", "x")
    sends(db, ["a1", "a2", "a3"])  # the burst of 3 used up
    p = plan()
    ws = db.apply(p.deliveries([delivery("send", "x", key="a4"), delivery("send", "x", key="b1")]))
    after = {orjson_key(r.body): r.deferred_until and (r.deferred_until - T0).total_seconds() for r in ws.outbox}
    assert after == {"a4": 0.5, "b1": 0.5}
    held = [h.detail for h in ws.history if h.outcome == "deferred" and "behind" in h.detail]
    assert [d["behind"] for d in held] == ["toy.do/per_letter"]
    assert p.report.deferred == {("toy", "toy.do", "toy.do/per_letter"): 1}  # b1 was not deferred by its limit
    assert db.instances[key_of("x")]["deferred_until"] == T0 + timedelta(seconds=0.5)
    _p, later = sends_to(db, "x", "b2")  # a later batch: bucket b still free, the instance's send still waiting
    assert [r.deferred_until for r in later.outbox] == [T0 + timedelta(seconds=0.5)]


def key_of(entity: str) -> InstanceKey:
    return InstanceKey(TENANT, "toy", entity)


def sends_to(db: FakeDatabase, entity: str, key: str) -> tuple[BatchPlan, Any]:
    p = plan(ENGINE, db.now)
    return p, db.apply(p.deliveries([delivery("send", entity, key=key)]))


def test_a_replayed_command_takes_a_slot_like_any_other() -> None:
    """`sfworkflow replay --all-stuck` after a provider outage reissues thousands of sends: each takes its slot."""
    db = FakeDatabase()
    started(db, "i-a1", "i-a2", "i-a3", "i-a4")
    sends(db, ["a1", "a2", "a3"])  # the burst of 3 used up
    row = dict(db.instances[key_of("i-a4")], terminal=False)
    command = {"command_id": "c-9", "command_type": "toy.do", "idempotency_key": "do/a4", "attempt": 2,
               "data": {"key": "a4"}}  # fmt: skip
    ws = db.run(plan().reissue_command(row, command, {"by": "oncall"}))
    (out,) = ws.outbox
    assert (out.deferred_until, out.deferred_by) == (T0 + timedelta(seconds=0.5), "toy.do/per_letter")
    assert [h.outcome for h in ws.history] == ["replayed", "deferred"]


def test_a_replayed_command_past_the_day_s_cap_waits_for_the_next_day_and_says_why() -> None:
    db = FakeDatabase(overrides={(TENANT, "toy.do/per_letter"): Rate(per_s=100, burst=100, daily_cap=3)})
    db.now = NIGHT
    started(db, "i-a1", "i-a2", "i-a3", "i-a4")
    sends(db, ["a1", "a2", "a3"])  # the day's 3 used up
    row = dict(db.instances[key_of("i-a4")], terminal=False)
    command = {"command_id": "c-9", "command_type": "toy.do", "idempotency_key": "do/a4", "attempt": 2,
               "data": {"key": "a4"}}  # fmt: skip
    p = plan(now=NIGHT)
    ws = db.run(p.reissue_command(row, command, {"by": "oncall"}))
    (out,) = ws.outbox
    assert out.deferred_until == MIDNIGHT
    (deferred,) = [h.detail for h in ws.history if h.outcome == "deferred"]
    assert (deferred["cause"], deferred["daily_cap"]) == ("daily_cap", 3)
    assert p.report.capped == {("toy", "toy.do", "toy.do/per_letter"): 1}
    assert [b.count for b in ws.buckets] == [DayCount(MIDNIGHT.date(), 1, pushed=True)]  # written back
