"""Schedule ticks without a clock or a database (core/schedules.py): cron in a time zone across daylight-saving
changes, intervals from their anchor, each catch-up policy after an hour down, deterministic ids and jitter."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfworkflow.client.producer import validate_event
from sfworkflow.contract import schemas
from sfworkflow.core.schedules import (
    CatchUp,
    Kind,
    Schedule,
    Spec,
    due,
    due_at,
    fire,
    jitter_of,
    manual_tick_id,
    message,
    next_tick,
    prev_tick,
    tick_id,
    ticks,
)
from sfworkflow.workflows import DEFINITIONS

BERLIN_0230 = Spec(cron="30 2 * * *", timezone="Europe/Berlin")
RIYADH_0800 = Spec(cron="0 8 * * *", timezone="Asia/Riyadh")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_berlin_0230_tick_is_skipped_on_the_spring_forward_day_and_fires_once_on_the_fall_back_day() -> None:
    # 2027-03-28: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist that day.
    spring = ticks(BERLIN_0230, utc(2027, 3, 26, 12), utc(2027, 3, 30, 12))
    # CET the 27th, none the 28th, CEST from the 29th
    assert spring == [utc(2027, 3, 27, 1, 30), utc(2027, 3, 29, 0, 30), utc(2027, 3, 30, 0, 30)]
    # 2027-10-31: 03:00 CEST falls back to 02:00 CET, so 02:30 happens twice: the tick is the first one (CEST).
    autumn = ticks(BERLIN_0230, utc(2027, 10, 29, 12), utc(2027, 11, 2, 12))
    assert autumn == [utc(2027, 10, 30, 0, 30), utc(2027, 10, 31, 0, 30), utc(2027, 11, 1, 1, 30),
                      utc(2027, 11, 2, 1, 30)]  # fmt: skip


def test_a_riyadh_0800_tick_is_0500_utc_all_year() -> None:
    year = ticks(RIYADH_0800, utc(2027, 1, 1), utc(2028, 1, 1))
    assert len(year) == 365 and {(t.hour, t.minute) for t in year} == {(5, 0)}


def test_an_hourly_cron_ticks_once_an_hour_of_real_time_across_both_changes() -> None:
    hourly = Spec(cron="0 * * * *", timezone="Europe/Berlin")
    spring = ticks(hourly, utc(2027, 3, 27, 22), utc(2027, 3, 28, 4))
    assert [t.hour for t in spring] == [23, 0, 1, 2, 3, 4]  # wall 00, 01, 03 (02 skipped: it is 03), 04, 05, 06
    autumn = ticks(hourly, utc(2027, 10, 30, 22), utc(2027, 10, 31, 4))
    # wall 00, 01, 02 (first, CEST), 03 (CET), 04, 05: the repeated 02:00 ticks once, so one UTC hour has none
    assert [t.hour for t in autumn] == [23, 0, 2, 3, 4]


def test_an_interval_counts_from_its_anchor_and_never_drifts() -> None:
    every = Spec(every_s=300, anchor=utc(2026, 12, 7, 0, 1))
    assert next_tick(every, utc(2026, 12, 7, 9, 3, 17)) == utc(2026, 12, 7, 9, 6)
    assert next_tick(every, utc(2026, 12, 7, 9, 6)) == utc(2026, 12, 7, 9, 11)  # strictly after
    assert next_tick(every, utc(2026, 12, 6)) == utc(2026, 12, 6, 0, 1)  # before the anchor too


FIVE_MIN = dict(every_s=300, anchor=utc(2026, 12, 7))


@pytest.mark.parametrize(
    ("policy", "fired", "missed"),
    [
        (CatchUp.SKIP, [], 13),  # down an hour: nothing missed is fired, the latest is 2 min late (> 60 s grace)
        (CatchUp.ONCE, [utc(2026, 12, 7, 11, 0)], 12),
        (CatchUp.ALL, [utc(2026, 12, 7, 10, 50) + timedelta(minutes=5 * i) for i in range(3)], 10),
    ],
)
def test_after_an_hour_down_each_catch_up_policy_fires_what_it_says(
    policy: CatchUp, fired: list[datetime], missed: int
) -> None:
    spec = Spec(**FIVE_MIN, catch_up=policy, max_catch_up=3)  # type: ignore[arg-type]
    got = due(spec, utc(2026, 12, 7, 10, 0), utc(2026, 12, 7, 11, 2))
    assert got.fire == fired and got.missed == missed
    assert got.next_at == utc(2026, 12, 7, 11, 5)


def test_a_tick_a_little_late_fires_under_every_policy_and_nothing_fires_early() -> None:
    for policy in CatchUp:
        spec = Spec(**FIVE_MIN, catch_up=policy)  # type: ignore[arg-type]
        assert due(spec, utc(2026, 12, 7, 10, 0), utc(2026, 12, 7, 10, 0, 2)).fire == [utc(2026, 12, 7, 10, 0)]
        early = due(spec, utc(2026, 12, 7, 10, 0), utc(2026, 12, 7, 9, 59, 59))
        assert early.fire == [] and early.next_at == utc(2026, 12, 7, 10, 0)


@given(st.integers(0, 10**6), st.integers(1, 86_400))
def test_tick_ids_and_jitter_are_the_same_on_every_try_and_jitter_stays_in_range(offset: int, jitter: int) -> None:
    spec = Spec(cron="0 8 * * *", timezone="Asia/Riyadh", jitter_s=min(jitter, 3600))
    tick = utc(2026, 12, 7) + timedelta(seconds=offset)
    assert tick_id("t/report", tick) == tick_id("t/report", tick.astimezone(RIYADH_0800.zone))
    assert tick_id("t/report", tick) != tick_id("t/other", tick)
    j = jitter_of(spec, "t/report", tick)
    assert j == jitter_of(spec, "t/report", tick) and timedelta(0) <= j < timedelta(seconds=spec.jitter_s)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "either a cron expression or an interval"),
        ({"cron": "0 8 * * *", "every_s": 60}, "not both"),
        ({"cron": "61 * * * *"}, "not a cron expression"),
        ({"cron": "H 8 * * *"}, "not a cron expression"),
        ({"every_s": 300, "jitter_s": 151}, "more than half the 300 s between ticks"),
        ({"cron": "*/5 * * * *", "jitter_s": 200}, "more than half the 300 s between ticks"),
        ({"every_s": 0}, "every_s must be"),
        ({"cron": "0 8 * * *", "timezone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"every_s": 60, "anchor": datetime(2026, 1, 1)}, "aware"),
        ({"every_s": 60, "max_catch_up": 0}, "max_catch_up"),
    ],
)
def test_a_schedule_that_cannot_tick_is_refused_with_what_to_write(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Spec(**kwargs)  # type: ignore[arg-type]


def test_the_latest_tick_before_an_instant_in_the_repeated_hour_is_its_first_occurrence() -> None:
    # 01:15 UTC on 2027-10-31 is 02:15 CET, the second time that wall time came: 02:30 CEST (00:30 UTC) has ticked.
    assert prev_tick(BERLIN_0230, utc(2027, 10, 31, 1, 15)) == utc(2027, 10, 31, 0, 30)
    assert prev_tick(BERLIN_0230, utc(2027, 10, 31, 0, 30)) == utc(2027, 10, 31, 0, 30)  # at or before
    assert prev_tick(BERLIN_0230, utc(2027, 3, 28, 12)) == utc(2027, 3, 27, 1, 30)  # the 28th has none


@pytest.mark.parametrize("expr", ["0 0 30 2 *", "30 2 * 3 L0", "R 8 * * *", "H 8 * * *"])
def test_a_cron_that_never_ticks_or_ticks_at_random_is_refused(expr: str) -> None:
    with pytest.raises(ValueError, match=r"never ticks|not a cron expression"):
        Spec(cron=expr, timezone="Europe/Berlin", anchor=utc(2027, 1, 1))


def test_two_days_down_every_second_fires_the_latest_ticks_not_stale_ones() -> None:
    for policy, fired in ((CatchUp.ONCE, [utc(2027, 1, 3)]), (CatchUp.ALL, [utc(2027, 1, 3) - timedelta(seconds=1),
                                                                            utc(2027, 1, 3)])):  # fmt: skip
        spec = Spec(every_s=1, anchor=utc(2027, 1, 1), catch_up=policy, max_catch_up=2)
        got = due(spec, utc(2027, 1, 1, 0, 0, 1), utc(2027, 1, 3, 0, 0, 0, 500_000))
        assert got.fire == fired and got.next_at == utc(2027, 1, 3, 0, 0, 1)


def test_an_interval_anchored_in_a_zone_counts_real_seconds_across_a_dst_change() -> None:
    berlin_midnight = datetime(2027, 3, 27, tzinfo=BERLIN_0230.zone)  # 23:00Z the 26th
    spec = Spec(every_s=86_400, anchor=berlin_midnight)
    assert ticks(spec, utc(2027, 3, 26, 12), utc(2027, 3, 29, 12)) == [
        utc(2027, 3, 26, 23), utc(2027, 3, 27, 23), utc(2027, 3, 28, 23)
    ]  # fmt: skip


# ---- schedules as declared, and what firing one writes ------------------------------------------------------------
T = "6f1c2d3e-4b5a-4c6d-8e7f-9a0b1c2d3e4f"


def _cycle(**spec: object) -> Schedule:
    return Schedule(
        "self-improvement", Kind.EVENT, "self_improvement.cycle_started", Spec(**spec),  # type: ignore[arg-type]
        entity_id="cycle-{date}-{tick}", data={"requested_by": "scheduler"}, tenant_id=T,
    )  # fmt: skip


def test_a_scheduled_event_is_an_envelope_with_the_tick_id_the_tenant_header_and_the_filled_entity() -> None:
    s = _cycle(cron="0 8 * * *", timezone="Asia/Riyadh", catch_up=CatchUp.ONCE)
    tick = datetime(2027, 3, 28, 5, 0, tzinfo=UTC)
    m = message(s, tick, tick_id(s.key, tick))
    assert m.exchange == "sfworkflow.events" and m.routing_key == "self_improvement.cycle_started" and m.mandatory
    assert m.body["event_id"] == m.message_id == tick_id(f"{T}/self-improvement", tick)
    assert m.body["entity_id"] == "cycle-2027-03-28-2027-03-28T05:00:00Z"
    assert m.body["tenant_id"] == T and m.headers["x-sfworkflow-tenant"] == T
    assert m.body["timestamp"] == "2027-03-28T05:00:00Z" and m.body["data"] == {"requested_by": "scheduler"}
    validate_event(m.body)  # the envelope and its data pass the schemas the consumer checks


def test_a_tick_goes_to_the_schedules_exchange_unmandatory_and_names_its_schedule() -> None:
    s = Schedule("follow_up.scan", Kind.TICK, "follow_up.scan", Spec(every_s=300), data={"stale_after_s": 86400})
    tick = datetime(2027, 1, 1, 0, 5, tzinfo=UTC)
    m = message(s, tick, tick_id(s.key, tick))
    assert (m.exchange, m.routing_key, m.mandatory) == ("sfworkflow.schedules", "follow_up.scan", False)
    assert m.body["schedule"] == "follow_up.scan" and m.body["tick_at"] == "2027-01-01T00:05:00Z"
    assert m.body["tenant_id"] == "00000000-0000-0000-0000-000000000000" and m.body["manual"] is False


def test_two_tenants_schedules_of_one_name_never_share_a_tick_id() -> None:
    tick = datetime(2027, 1, 1, tzinfo=UTC)
    a, b = _cycle(every_s=60), replace(_cycle(every_s=60), tenant_id="00000000-0000-0000-0000-000000000001")
    assert tick_id(a.key, tick) != tick_id(b.key, tick)
    assert manual_tick_id(a.key, "r1") == manual_tick_id(a.key, "r1") != manual_tick_id(a.key, "r2")


def test_fire_after_an_hour_down_queues_the_policy_s_ticks_and_waits_for_the_next_one() -> None:
    now = datetime(2027, 1, 1, 12, 0, 30, tzinfo=UTC)
    s = _cycle(every_s=600, catch_up=CatchUp.ALL, max_catch_up=4)
    f = fire(s, now - timedelta(hours=1), now)
    assert f.ticks == [datetime(2027, 1, 1, 11, m, tzinfo=UTC) for m in (30, 40, 50)] + [
        datetime(2027, 1, 1, 12, 0, tzinfo=UTC)
    ]
    assert f.missed == 3 and f.next_tick_at == datetime(2027, 1, 1, 12, 10, tzinfo=UTC)
    assert [m.message_id for m in f.messages] == [tick_id(s.key, t) for t in f.ticks]
    assert f.lateness_s == 30.0 and f.due_at == f.next_tick_at  # no jitter


def test_jitter_delays_when_the_loop_takes_a_schedule_not_the_tick_it_fires() -> None:
    s = _cycle(every_s=60, jitter_s=30)
    tick = datetime(2027, 1, 1, 0, 1, tzinfo=UTC)
    assert tick <= due_at(s, tick) < tick + timedelta(seconds=30)
    f = fire(s, tick, due_at(s, tick))
    assert f.ticks == [tick] and f.lateness_s == 0.0 and f.due_at == due_at(s, f.next_tick_at)


@pytest.mark.parametrize(
    ("kwargs", "message_part"),
    [
        ({"name": "Daily Report"}, "is not a schedule name"),
        ({"name": "daily\n"}, "is not a schedule name"),
        ({"event_type": "self_improvement.cycle_started\n"}, "is not a dotted event type"),
        ({"entity_id": None}, "needs an entity id"),
        ({"entity_id": "cycle-{when}"}, "only {tick}"),
        ({"entity_id": "cycle-{tick:%Y}"}, "only {tick}"),
        ({"entity_id": "cycle-{tick"}, "entity id template"),
        ({"event_type": "cycle started"}, "is not a dotted event type"),
        ({"kind": Kind.TICK}, "a tick has no entity id"),
    ],
)
def test_a_schedule_that_cannot_publish_is_refused_saying_what_to_write(
    kwargs: dict[str, Any], message_part: str
) -> None:
    fields: dict[str, Any] = {
        "name": "self-improvement", "kind": Kind.EVENT, "event_type": "self_improvement.cycle_started",
        "spec": Spec(every_s=900), "entity_id": "cycle-{tick}",
    }  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message_part)):
        Schedule(**{**fields, **kwargs})


def test_the_shipped_definitions_declare_salesflow_s_beat_jobs() -> None:
    declared = {s.name: s for d in DEFINITIONS for s in d.schedules}
    assert {n: (s.kind, s.spec.every_s) for n, s in declared.items()} == {
        "sequence.tick": (Kind.TICK, 300), "follow_up.scan": (Kind.TICK, 300),
    }  # fmt: skip


def test_a_tick_s_body_passes_the_tick_schema_salesflow_s_jobs_are_given() -> None:
    s = Schedule("follow_up.scan", Kind.TICK, "follow_up.scan", Spec(every_s=300), data={"stale_after_s": 86400})
    tick = datetime(2027, 1, 1, 0, 5, tzinfo=UTC)
    for m in (message(s, tick, tick_id(s.key, tick)), message(s, tick, manual_tick_id(s.key, "r"), manual=True)):
        assert schemas.default().errors("envelope", "tick", m.body) == []
    assert schemas.default().errors("envelope", "tick", {**m.body, "tick_at": 5}) != []


def test_cron_names_are_names_not_random_fields() -> None:
    assert next_tick(Spec(cron="0 8 * MAR THU"), utc(2027, 3, 1)) == utc(2027, 3, 4, 8)
    assert next_tick(Spec(cron="0 9 * * MON-FRI"), utc(2027, 3, 6)) == utc(2027, 3, 8, 9)  # a Saturday: Monday


def test_a_tick_waiting_for_its_jitter_is_not_missed_and_fires_when_due() -> None:
    """Every 60 s, jitter up to 30 s: the 00:01 tick is not due before its jitter has passed (and is not missed
    meanwhile); under `skip` its lateness is counted from its jitter."""
    spec = Spec(every_s=60, jitter_s=30, catch_up=CatchUp.SKIP, grace_s=40)
    key = "t/jittered"

    def j(t: datetime) -> timedelta:
        return jitter_of(spec, key, t)

    tick = utc(2027, 1, 1, 0, 1)
    at = tick + j(tick)
    d = due(spec, tick, at - timedelta(microseconds=1), j)
    assert (d.fire, d.missed, d.next_at) == ([], 0, tick)  # not yet: waits for its jitter
    d = due(spec, tick, at, j)
    assert (d.fire, d.missed, d.next_at) == ([tick], 0, tick + timedelta(seconds=60))
    later = due(spec, tick, at + timedelta(seconds=40), j)  # a poll late, within the grace counted from the jitter
    assert (later.fire, later.missed) == ([tick], 0)
    lost = due(spec, tick, at + timedelta(seconds=40, microseconds=1), j)  # past it, before the next tick is due
    assert (lost.fire, lost.missed, lost.next_at) == ([], 1, tick + timedelta(seconds=60))
