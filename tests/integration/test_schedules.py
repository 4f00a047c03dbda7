"""Schedules against the real PostgreSQL and RabbitMQ: each tick fires once whatever the replicas (three racing on
a schedule of one second; two running the README's demo schedules), a replica killed at the tick loses nothing and
doubles nothing, and the service down for an hour fires what each catch-up policy says. The clock is moved by
setting a schedule's next tick back, never by sleeping."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from sfworkflow import db
from sfworkflow.contract.topology import SCHEDULES_EXCHANGE
from sfworkflow.core.engine import Engine
from sfworkflow.core.schedules import NIL_TENANT, Schedule, tick_id, ticks
from sfworkflow.db import schedules as store
from sfworkflow.demo import schedules as demo_schedules
from sfworkflow.errors import UsageError
from sfworkflow.ops import schedules
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS
from tests.conftest import wait_for
from tests.integration.replicas import replicas, start_all
from tests.support import TENANT, running_service

ENGINE = Engine(DEFINITIONS)


class TickQueue:
    """A queue bound to every routing key of sfworkflow.schedules, as a SalesFlow job binds one."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, queue: aio_pika.abc.AbstractQueue) -> None:
        self.channel, self.queue = channel, queue

    async def drain(self) -> list[dict[str, Any]]:
        out = []
        while (m := await self.queue.get(no_ack=True, fail=False)) is not None:
            body = orjson.loads(m.body)
            assert body["message_id"] == m.message_id
            out.append(body)
        return out


async def _tick_queue(settings: Settings, binding: str) -> AsyncIterator[TickQueue]:
    connection = await aio_pika.connect(settings.amqp_url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(SCHEDULES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"test.ticks.{binding}", durable=True)
    await queue.bind(exchange, binding)
    yield TickQueue(channel, queue)
    await connection.close()


@pytest.fixture
async def tick_queue(settings: Settings) -> AsyncIterator[TickQueue]:
    """The ticks of the tests' own schedules (routing key salesflow.test): not the code-declared ones, which the
    replicas store and which fire whenever a test runs across a five-minute mark."""
    async for q in _tick_queue(settings, "salesflow.test"):
        yield q


@pytest.fixture
async def every_tick(settings: Settings) -> AsyncIterator[TickQueue]:
    """Every tick on sfworkflow.schedules."""
    async for q in _tick_queue(settings, "#"):
        yield q


async def _add(pg: asyncpg.Connection, **kwargs: Any) -> Schedule:
    s = schedules.build(ENGINE, **{"tenant": TENANT, "kind": "tick", "event_type": "salesflow.test", **kwargs})
    await schedules.add(pg, s, "test", "test")
    return s


async def _move_back(pg: asyncpg.Connection, tenant: str, name: str, to: datetime, catch_up: str) -> None:
    """The service was down: the schedule's first unfired tick is `to` (its jitter off: the ticks are due now)."""
    await pg.execute(
        "UPDATE sfworkflow.schedule SET next_tick_at = $3, due_at = $3, catch_up = $4, jitter_s = 0"
        " WHERE tenant_id = $1 AND name = $2",
        tenant, name, to, catch_up,
    )  # fmt: skip


async def _row(pg: asyncpg.Connection, tenant: str, name: str) -> asyncpg.Record:
    return await pg.fetchrow("SELECT * FROM sfworkflow.schedule WHERE tenant_id = $1 AND name = $2", tenant, name)


async def _outbox(pg: asyncpg.Connection) -> list[asyncpg.Record]:
    """What the tests' own schedules queued (routing key salesflow.test)."""
    return list(
        await pg.fetch("SELECT * FROM sfworkflow.outbox WHERE kind = 'schedule' AND routing_key = 'salesflow.test'"
                       " ORDER BY id")
    )  # fmt: skip


async def _all_published(pg: asyncpg.Connection) -> bool:
    return not await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL")


# ---- the service down for an hour, under each catch-up policy -----------------------------------------------------
@pytest.mark.parametrize(
    ("catch_up", "max_catch_up", "fired", "missed"),
    [("skip", 10, 0, 6), ("once", 10, 1, 5), ("all", 10, 6, 0), ("all", 4, 4, 2)],
)
async def test_an_hour_down_fires_what_the_catch_up_policy_says(
    pg: asyncpg.Connection, database_url: str, catch_up: str, max_catch_up: int, fired: int, missed: int
) -> None:
    now: datetime = await pg.fetchval("SELECT now()")
    # Ticks every 10 minutes, the latest 5 minutes before now: far from the `skip` grace (60 s) and the next tick.
    anchor = now - timedelta(minutes=5)
    s = await _add(pg, name="down-an-hour", every_s=600, anchor=anchor, catch_up=catch_up, max_catch_up=max_catch_up)
    first_missed = anchor - timedelta(minutes=50)  # the service went down just before it: 6 ticks fell meanwhile
    await _move_back(pg, TENANT, s.name, first_missed, catch_up)
    pool = await db.create_pool(database_url, 2)
    try:
        done = await store.fire_due(pool, 100)
        again = await store.fire_due(pool, 100)  # nothing is due any more
    finally:
        await pool.close()
    expected = ticks(s.spec, first_missed - timedelta(seconds=1), now)[6 - fired :] if fired else []
    rows = await _outbox(pg)
    assert [r["message_id"] for r in rows] == [tick_id(s.key, t) for t in expected]
    assert (done.fired[store.TENANT_LABEL], done.missed[store.TENANT_LABEL], again.due) == (fired, missed, 0)
    row = await _row(pg, TENANT, s.name)
    assert (row["fired"], row["missed"]) == (fired, missed)
    assert row["next_tick_at"] == anchor + timedelta(minutes=10)  # waits for the next tick after now
    assert row["last_tick_at"] == (expected[-1] if expected else None)


# ---- replicas racing ------------------------------------------------------------------------------------------------
async def test_three_replicas_racing_on_a_one_second_schedule_fire_each_tick_once(
    settings: Settings, pg: asyncpg.Connection, tick_queue: TickQueue, tmp_path: Path
) -> None:
    s = await _add(pg, name="every-second", every_s=1, catch_up="all", max_catch_up=1000)
    with replicas(settings, tmp_path, n=3) as made:
        await start_all(made)

        async def enough() -> int:
            return int((await _row(pg, TENANT, s.name))["fired"]) >= 8

        await wait_for(enough, timeout=60, what="8 ticks fired")
        await schedules.pause(pg, TENANT, s.name, "test", "counted enough")
        await wait_for(lambda: _all_published(pg), what="every tick published")
        row = await _row(pg, TENANT, s.name)

        async def counted() -> bool:  # each replica counts its ticks once its round committed
            return (
                sum([await r.counter("sfworkflow_schedule_ticks_total", outcome="fired") for r in made]) == row["fired"]
            )

        await wait_for(counted, what="the replicas' fired counters adding up to the ticks fired")
    got = await tick_queue.drain()
    ids = [t["message_id"] for t in got]
    assert len(ids) == len(set(ids)) == row["fired"] == len(await _outbox(pg))
    instants = sorted(datetime.fromisoformat(t["tick_at"]) for t in got)
    assert instants == [instants[0] + timedelta(seconds=k) for k in range(len(instants))]  # every tick, no gap
    assert set(ids) == {tick_id(s.key, t) for t in instants}


async def test_two_replicas_running_the_demo_schedules_fire_each_tick_once(
    settings: Settings, pg: asyncpg.Connection, every_tick: TickQueue, tmp_path: Path
) -> None:
    mine = demo_schedules.for_tenant(ENGINE, TENANT)
    for s in mine:
        await schedules.add(pg, s, "test", "the README's demo schedules")
    with replicas(settings, tmp_path, n=2) as made:
        await start_all(made)  # they store the code-declared ones (sequence.tick, follow_up.scan) as they start
        rows = {(str(r["tenant_id"]), r["name"]): r for r in await store.list_all(pg, None)}
        assert {k[1] for k in rows} == {"sequence.tick", "follow_up.scan", "daily-report", "self-improvement"}
        # Each schedule was down for three of its ticks and catches every one up: both replicas race for them.
        now: datetime = await pg.fetchval("SELECT now()")
        moved: dict[tuple[str, str], datetime] = {}
        for key, r in rows.items():
            spec = store.from_row(r).spec
            back = now
            for _ in range(3):
                back = ticks(spec, back - timedelta(days=2), back - timedelta(microseconds=1))[-1]
            moved[key] = back
            await _move_back(pg, key[0], key[1], back, "all")

        async def caught_up() -> bool:
            return all([(await _row(pg, *key))["next_tick_at"] > now for key in moved])

        await wait_for(caught_up, timeout=30, what="every demo schedule caught up")
        for key in moved:  # before counting: a real tick at a five-minute mark would come after the count
            await schedules.pause(pg, key[0], key[1], "test", "counted")
        await wait_for(lambda: _all_published(pg), what="every tick published")

        cycles = (await _row(pg, TENANT, "self-improvement"))["fired"]

        async def instances() -> bool:
            n = await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE workflow = 'self_improvement'")
            return int(n) == cycles

        await wait_for(instances, what="a cycle started by each self-improvement tick")
    got = await every_tick.drain()
    per_schedule = Counter(t["schedule"] for t in got)
    ids = [t["message_id"] for t in got]
    assert len(ids) == len(set(ids))
    for (tenant, name), back in moved.items():
        r = await _row(pg, tenant, name)
        s = store.from_row(r)
        expected = ticks(s.spec, back - timedelta(microseconds=1), r["last_tick_at"])
        assert len(expected) >= 3 and r["fired"] == len(expected), name
        if s.kind == "tick":
            assert per_schedule[name] == len(expected), name
            assert {t["message_id"] for t in got if t["schedule"] == name} == {tick_id(s.key, t) for t in expected}
        else:  # each tick started its own cycle, once
            entities = {
                r["entity_id"] for r in await pg.fetch("SELECT entity_id FROM sfworkflow.instance WHERE tenant_id = $1"
                                                       " AND workflow = 'self_improvement'", TENANT)
            }  # fmt: skip
            assert entities == {f"cycle-{t.isoformat().replace('+00:00', 'Z')}" for t in expected}
    assert (await _row(pg, NIL_TENANT, "sequence.tick"))["source"] == "code"


# ---- a replica killed at the tick -----------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["schedule_before_commit", "schedule_after_commit_before_publish"])
async def test_a_replica_killed_at_the_tick_loses_it_not_and_fires_it_once(
    settings: Settings, pg: asyncpg.Connection, tick_queue: TickQueue, tmp_path: Path, point: str
) -> None:
    s = await _add(pg, name="hourly", every_s=3600, catch_up="once")
    due: datetime = await pg.fetchval("SELECT now() - interval '1 second'")
    tick = ticks(s.spec, due - timedelta(hours=1), due)[-1]
    await _move_back(pg, TENANT, s.name, tick, "once")
    with replicas(settings, tmp_path, n=1, SFWORKFLOW_FAULT_POINT=point) as (doomed,):
        doomed.start()
        assert doomed.proc is not None
        assert doomed.proc.wait(30) == 97, doomed.log.read_text()  # it died at the fault point
    rows = await _outbox(pg)
    row = await _row(pg, TENANT, s.name)
    if point == "schedule_before_commit":  # nothing committed: the tick is still due
        assert rows == [] and row["fired"] == 0 and row["next_tick_at"] == tick
    else:  # committed, never published: the outbox holds it
        assert [r["message_id"] for r in rows] == [tick_id(s.key, tick)] and rows[0]["published_at"] is None
        assert row["fired"] == 1 and row["next_tick_at"] > tick
    with replicas(settings, tmp_path, n=1) as (survivor,):
        await start_all([survivor])
        await wait_for(lambda: _all_published(pg), what="the tick published")

        async def one_tick() -> list[dict[str, Any]]:
            return await tick_queue.drain()

        got = await wait_for(one_tick, what="the tick on the queue")
    assert [t["message_id"] for t in got] == [tick_id(s.key, tick)]
    assert (await _row(pg, TENANT, s.name))["fired"] == 1
    assert await tick_queue.drain() == []


# ---- code-declared schedules across releases; operators' changes -------------------------------------------------
async def test_a_code_schedule_no_release_declares_is_paused_at_start_up_and_can_then_be_deleted(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """A definition that dropped (or renamed) a schedule must not leave the old one firing forever."""
    await pg.execute(
        "INSERT INTO sfworkflow.schedule (tenant_id, name, kind, event_type, every_s, next_tick_at, due_at, source,"
        " workflow, updated_by) VALUES ($1, 'follow_up.old_scan', 'tick', 'follow_up.old_scan', 300, now(), now(),"
        " 'code', 'follow_up', 'sfworkflow')",
        NIL_TENANT,
    )  # fmt: skip
    async with running_service(settings):
        row = await _row(pg, NIL_TENANT, "follow_up.old_scan")
        assert row["paused"] and "no longer declared" in row["reason"]
        assert not (await _row(pg, NIL_TENANT, "follow_up.scan"))["paused"]
    with pytest.raises(UsageError, match="pause it instead"):
        await schedules.delete(pg, ENGINE, None, "follow_up.scan")
    removed = await schedules.delete(pg, ENGINE, None, "follow_up.old_scan")
    assert removed["name"] == "follow_up.old_scan" and await _row(pg, NIL_TENANT, "follow_up.old_scan") is None


async def test_resuming_a_schedule_that_is_not_paused_moves_nothing(pg: asyncpg.Connection) -> None:
    s = await _add(pg, name="hourly", every_s=3600)
    due: datetime = await pg.fetchval("SELECT now() - interval '1 second'")
    await _move_back(pg, TENANT, s.name, due, "once")  # due now, not fired yet
    after = await schedules.resume(pg, TENANT, s.name, "test", "a retried resume")
    assert after["next_tick_at"] == due and (await _row(pg, TENANT, s.name))["next_tick_at"] == due
