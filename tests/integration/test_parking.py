"""Events that arrive too early are parked and applied later (or dead-lettered past their deadline);
events for ended instances are ignored; paused instances fire no timers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import orjson

from sfworkflow.db.pool import q
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import (
    COMMANDS_Q,
    DEAD_Q,
    Inbox,
    counter,
    history_for_event,
    outcomes,
    parked_rows,
    quick,
    timers_of,
    wait_all_published,
    wait_state,
)
from tests.support import Amqp, enrolled_data, event, history, instance, outbox, running_service


async def _parked_count(pg: asyncpg.Connection) -> int:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.parked")


async def test_out_of_order_step_sent_is_parked_then_applied(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "ooo-1", enrolled_data(steps=2)))
        await commands.wait(1)
        await wait_state(pg, "ooo-1", "sending")

        early = event("sequence.step_sent", "ooo-1", {"step": 1, "provider_message_id": "p1"})
        await mq.publish(early)
        await wait_for(lambda: _parked_count(pg), what="step_sent for step 1 parked")
        parked = await parked_rows(pg)
        assert [(p["event_id"], p["event_type"], p["entity_id"]) for p in parked] == [
            (early["event_id"], "sequence.step_sent", "ooo-1")
        ]
        row = await instance(pg, "ooo-1")
        assert row["parked_count"] == 1 and row["state"] == "sending" and row["context"]["cursor"] == 0
        assert await history_for_event(pg, early["event_id"]) == []

        await mq.publish(event("sequence.step_sent", "ooo-1", {"step": 0, "provider_message_id": "p0"}))
        await wait_state(pg, "ooo-1", "completed")
        await wait_all_published(pg)
        sends = await commands.settle(0.3)

    assert [c["data"]["step"] for c in sends] == [0, 1]
    assert await parked_rows(pg) == []
    row = await instance(pg, "ooo-1")
    assert row["parked_count"] == 0 and row["context"]["sent"] == 2
    applied = await history_for_event(pg, early["event_id"])
    assert len(applied) == 1
    assert applied[0]["outcome"] == "applied" and applied[0]["detail"]["unparked"] is True
    assert (applied[0]["from_state"], applied[0]["to_state"]) == ("sending", "completed")
    assert counter(service.metrics.events, "sequence", "parked") == 1
    assert counter(service.metrics.unparked, "sequence") == 1


async def test_events_before_their_instance_exists_wait_for_enrolled(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        # A pause before the enrollment: parked, no instance yet.
        paused = event("sequence.paused", "early-pause", {"reason": "lead asked"})
        await mq.publish(paused)
        # A step report before the enrollment: parked too.
        sent = event("sequence.step_sent", "early-sent", {"step": 0, "provider_message_id": "p0"})
        await mq.publish(sent)
        # A resume before the enrollment: parked, then noted (the sequence was not paused; a pause older
        # than this resume must not apply later).
        resumed = event("sequence.resumed", "early-resume", {})
        await mq.publish(resumed)
        await wait_for(lambda: _parked_count_is(pg, 3), what="three events parked")
        for entity in ("early-pause", "early-sent", "early-resume"):
            assert await instance(pg, entity) is None

        await mq.publish(event("sequence.enrolled", "early-pause", enrolled_data(steps=1, delay_s=1)))
        await mq.publish(event("sequence.enrolled", "early-sent", enrolled_data(steps=1)))
        await mq.publish(event("sequence.enrolled", "early-resume", enrolled_data(steps=1, delay_s=30)))
        await wait_state(pg, "early-pause", "paused")
        await wait_state(pg, "early-sent", "completed")
        await wait_for(lambda: history_for_event(pg, resumed["event_id"]), what="early resume recorded")
        await wait_all_published(pg)
        # Paused: the step timer was cancelled, so nothing is sent for early-pause.
        await asyncio.sleep(1.5)
        sends = await commands.settle(0.2)

    assert [c["entity_id"] for c in sends] == ["early-sent"]
    assert await parked_rows(pg) == []
    assert await outcomes(pg, "early-pause") == [
        ("sequence.enrolled", "applied", "new", "waiting"),
        ("sequence.paused", "applied", "waiting", "paused"),
    ]
    assert (await history_for_event(pg, paused["event_id"]))[0]["detail"]["unparked"] is True
    assert await timers_of(pg, "early-pause") == []
    assert await outcomes(pg, "early-sent") == [
        ("sequence.enrolled", "applied", "new", "waiting"),
        ("sequence.timer.step_due", "applied", "waiting", "sending"),
        ("sequence.step_sent", "applied", "sending", "completed"),
    ]
    assert (await history_for_event(pg, sent["event_id"]))[0]["detail"]["unparked"] is True
    assert await outcomes(pg, "early-resume") == [
        ("sequence.enrolled", "applied", "new", "waiting"),
        ("sequence.resumed", "applied", "waiting", "waiting"),
    ]
    assert (await instance(pg, "early-resume"))["state"] == "waiting"
    for entity in ("early-pause", "early-sent", "early-resume"):
        assert (await instance(pg, entity))["parked_count"] == 0


async def _parked_count_is(pg: asyncpg.Connection, n: int) -> bool:
    return await _parked_count(pg) == n


async def test_parked_event_of_an_instance_that_ends_is_ignored(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "end-1", enrolled_data(steps=2)))
        await wait_state(pg, "end-1", "sending")
        early = event("sequence.step_sent", "end-1", {"step": 1, "provider_message_id": "p1"})
        await mq.publish(early)
        await wait_for(lambda: _parked_count(pg), what="parked")
        await mq.publish(event("sequence.cancelled", "end-1", {"reason": "converted"}))
        await wait_state(pg, "end-1", "cancelled")
        await wait_all_published(pg)

    assert await parked_rows(pg) == []
    rows = await history_for_event(pg, early["event_id"])
    assert len(rows) == 1 and rows[0]["outcome"] == "ignored"
    assert rows[0]["detail"] == {"reason": "instance is cancelled"}
    assert (await instance(pg, "end-1"))["parked_count"] == 0


async def test_parked_event_past_its_deadline_is_dead_lettered(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings, park_timeout_s=1.0)) as service, Amqp(settings.amqp_url) as mq:
        dead = Inbox(mq, DEAD_Q)
        await mq.publish(event("sequence.enrolled", "late-1", enrolled_data(steps=2)))
        await wait_state(pg, "late-1", "sending")
        never = event("sequence.step_sent", "late-1", {"step": 1, "provider_message_id": "p1"})
        await mq.publish(never)
        orphan = event("sequence.cancelled", "never-enrolled", {})  # its instance never comes
        await mq.publish(orphan)
        await wait_for(lambda: _parked_count_is(pg, 2), what="two events parked")
        await dead.wait_raw(2, timeout=10, what="dead letters transition_not_allowed")
        await wait_all_published(pg)
        messages = await dead.settle(0.3)
        expired = counter(service.metrics.dead, "transition_not_allowed")

    assert len(messages) == 2
    by_entity = {orjson.loads(m.body)["entity_id"]: m for m in dead.messages}
    for m in dead.messages:
        assert m.headers["x-sfworkflow-reason"] == "transition_not_allowed"
        assert m.headers["x-sfworkflow-detail"].strip()
    m = by_entity["late-1"]
    assert "step_sent" in m.headers["x-sfworkflow-detail"]
    assert m.headers["x-sfworkflow-original-routing-key"] == "sequence.step_sent"
    assert orjson.loads(m.body) == never  # the original body, as published
    assert orjson.loads(by_entity["never-enrolled"].body) == orphan
    assert await parked_rows(pg) == []
    assert await instance(pg, "never-enrolled") is None
    assert expired == 2
    assert await state_of_late(pg) == "sending"
    assert (await history_for_event(pg, never["event_id"])) == []


async def state_of_late(pg: asyncpg.Connection) -> str:
    return (await instance(pg, "late-1"))["state"]


async def test_events_after_cancel_are_ignored_and_timers_deleted(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "cxl-1", enrolled_data(steps=2, delay_s=2)))
        await wait_state(pg, "cxl-1", "waiting")
        assert [t["name"] for t in await timers_of(pg, "cxl-1")] == ["step_due"]
        await mq.publish(event("sequence.cancelled", "cxl-1", {"reason": "lead converted"}))
        await wait_state(pg, "cxl-1", "cancelled")
        assert await timers_of(pg, "cxl-1") == []
        await wait_all_published(pg)
        outbox_before = await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox")

        late = event("sequence.step_sent", "cxl-1", {"step": 0, "provider_message_id": "p0"})
        await mq.publish(late)
        await wait_for(lambda: history_for_event(pg, late["event_id"]), what="late step_sent recorded")
        await asyncio.sleep(3.0)  # past the cancelled step's due time
        sends = await commands.settle(0.2)
        outbox_after = await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox")

    assert sends == []
    assert outbox_after == outbox_before
    rows = await history_for_event(pg, late["event_id"])
    assert [(r["outcome"], r["from_state"], r["to_state"]) for r in rows] == [("ignored", "cancelled", "cancelled")]
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.timer") == 0
    assert [(h["event_type"], h["outcome"]) for h in await history(pg, "cxl-1")] == [
        ("sequence.enrolled", "applied"),
        ("sequence.cancelled", "applied"),
        ("sequence.step_sent", "ignored"),
    ]
    lifecycle = await outbox(pg, "cxl-1", "lifecycle")
    assert [m["body"]["event_type"] for m in lifecycle] == ["workflow.started", "workflow.completed"]
    assert lifecycle[1]["body"]["data"] == {"final_state": "cancelled"}


async def test_report_during_a_pause_while_sending_waits_for_resume(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "psend-1", enrolled_data(steps=2)))
        await commands.wait(1)
        await wait_state(pg, "psend-1", "sending")
        await mq.publish(event("sequence.paused", "psend-1", {}))
        await wait_state(pg, "psend-1", "paused")
        # The provider reports the send that was in flight: not allowed while paused, parked.
        sent = event("sequence.step_sent", "psend-1", {"step": 0, "provider_message_id": "p0"})
        await mq.publish(sent)
        await wait_for(lambda: _parked_count(pg), what="step_sent parked during the pause")
        assert (await instance(pg, "psend-1"))["state"] == "paused"
        # A second pause is ignored, not parked.
        again = event("sequence.paused", "psend-1", {})
        await mq.publish(again)
        await wait_for(lambda: history_for_event(pg, again["event_id"]), what="second pause recorded")
        await mq.publish(event("sequence.resumed", "psend-1", {}))
        sends = await commands.wait(2)  # resumed into sending, the parked report applies, step 1 is sent
        await wait_state(pg, "psend-1", "sending")
        await wait_all_published(pg)
        sends = await commands.settle(0.3)

    assert [c["data"]["step"] for c in sends] == [0, 1]
    assert await parked_rows(pg) == []
    assert [(r["outcome"], r["detail"]) for r in await history_for_event(pg, again["event_id"])] == [
        ("ignored", {"reason": "already paused"})
    ]
    assert await outcomes(pg, "psend-1") == [
        ("sequence.enrolled", "applied", "new", "waiting"),
        ("sequence.timer.step_due", "applied", "waiting", "sending"),
        ("sequence.paused", "applied", "sending", "paused"),
        ("sequence.paused", "ignored", "paused", "paused"),
        ("sequence.resumed", "applied", "paused", "sending"),
        ("sequence.step_sent", "applied", "sending", "waiting"),
        ("sequence.timer.step_due", "applied", "waiting", "sending"),
    ]
    assert (await history_for_event(pg, sent["event_id"]))[0]["detail"]["unparked"] is True


async def test_pause_holds_the_timer_and_resume_fires_it(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "pause-1", enrolled_data(steps=1, delay_s=1)))
        await wait_state(pg, "pause-1", "waiting")
        await mq.publish(event("sequence.paused", "pause-1", {"reason": "holiday"}))
        await wait_state(pg, "pause-1", "paused")
        assert await timers_of(pg, "pause-1") == []
        await asyncio.sleep(2.0)  # past the step's due time
        assert await commands.settle(0.1) == []
        assert (await instance(pg, "pause-1"))["state"] == "paused"

        await mq.publish(event("sequence.resumed", "pause-1", {}))
        sends = await commands.wait(1, timeout=5)
        await wait_state(pg, "pause-1", "sending")
        await wait_all_published(pg)
        sends = await commands.settle(0.3)

    assert len(sends) == 1 and sends[0]["data"]["step"] == 0
    assert await outcomes(pg, "pause-1") == [
        ("sequence.enrolled", "applied", "new", "waiting"),
        ("sequence.paused", "applied", "waiting", "paused"),
        ("sequence.resumed", "applied", "paused", "waiting"),
        ("sequence.timer.step_due", "applied", "waiting", "sending"),
    ]


async def _waiting_on_lock(pg: asyncpg.Connection, statement: str) -> int:
    return await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND query LIKE $1",
        f"%{statement}%",
    )


async def _parked_or_waiting(pg: asyncpg.Connection) -> bool:
    return bool(await _parked_count(pg)) or bool(await _waiting_on_lock(pg, "INSERT INTO sfworkflow.instance"))


@contextlib.asynccontextmanager
async def _enrollment_held_uncommitted(
    pg: asyncpg.Connection, database_url: str, mq: Amqp, entity: str
) -> AsyncIterator[asyncpg.transaction.Transaction]:
    """Publish an enrollment and hold its batch at its write statement (write_batch, which queues its outbox rows),
    with the new instance uncommitted, by a SHARE lock on sfworkflow.outbox; yields the lock's transaction, which
    the caller rolls back to let the batch go on."""
    locker = await asyncpg.connect(database_url)
    try:
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE sfworkflow.outbox IN SHARE MODE")
        await mq.publish(event("sequence.enrolled", entity, enrolled_data(steps=1, delay_s=1)))
        await wait_for(
            lambda: _waiting_on_lock(pg, q("write_batch").splitlines()[0]),  # the text is long: its first line
            timeout=5,
            what="the enrollment's batch waiting at its outbox insert",
        )
        yield tx
    finally:
        await locker.close()


async def test_cancel_racing_the_enrollment_on_another_consumer_is_not_lost(
    settings: Settings, pg: asyncpg.Connection, database_url: str
) -> None:
    """enrolled and cancelled for one entity, taken by the two consumer channels at the same time.

    To make the overlap certain, the enrollment's batch is held at its write statement with the new instance
    uncommitted, while the other channel takes the cancellation (which writes no outbox row)."""
    async with running_service(quick(settings, consumers=2)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        async with _enrollment_held_uncommitted(pg, database_url, mq, "race-1") as tx:
            await mq.publish(event("sequence.cancelled", "race-1", {"reason": "enrolled by mistake"}))
            # Round robin hands the cancellation to the other channel: it parks it (bug) or waits for the
            # enrollment's insert (fixed).
            await wait_for(
                lambda: _parked_or_waiting(pg), timeout=5, what="the cancellation taken by the second consumer channel"
            )
            await tx.rollback()
        await wait_state(pg, "race-1", "cancelled", timeout=5)
        await asyncio.sleep(1.5)  # past the step's due time: nothing may be sent
        await wait_all_published(pg)
        sends = await commands.settle(0.2)

    assert sends == []
    assert await parked_rows(pg) == []


async def test_cancel_racing_the_enrollment_on_another_replica_is_not_lost(
    settings: Settings, pg: asyncpg.Connection, database_url: str
) -> None:
    """enrolled and cancelled for one entity, taken by two replicas at the same time.

    As above, the enrollment's batch is held at its write statement with the new instance uncommitted. The first
    replica has a prefetch of 1, so while the enrollment is unacked the broker can only deliver the cancellation
    to the second replica, which parks it (the defect) or waits for the enrollment's key (fixed)."""
    first = quick(settings, consumers=1, prefetch=1, batch_size=1)
    async with running_service(first), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        async with _enrollment_held_uncommitted(pg, database_url, mq, "race-2") as tx:
            async with running_service(quick(settings, consumers=1)):
                await mq.publish(event("sequence.cancelled", "race-2", {"reason": "enrolled by mistake"}))
                await wait_for(
                    lambda: _parked_or_waiting(pg), timeout=5, what="the cancellation taken by the second replica"
                )
                await tx.rollback()
                await wait_state(pg, "race-2", "cancelled", timeout=5)
                await wait_all_published(pg)
        await asyncio.sleep(1.5)  # past the step's due time: nothing may be sent
        await wait_all_published(pg)
        sends = await commands.settle(0.2)

    assert sends == []
    assert await parked_rows(pg) == []
