"""The sequence workflow end to end against the real service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import Amqp, enrolled_data, event, history, outbox, running_service, state_of


async def test_happy_path_reaches_completed(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "enr-1", enrolled_data(steps=2)))
        await wait_for(lambda: state_of(pg, "enr-1"), what="instance created")
        await wait_for(lambda: _state_is(pg, "enr-1", "sending"), what="step 0 sending")
        commands = await wait_for(lambda: mq.drain_json("sfworkflow.commands.sequence"), what="send_step 0")
        assert [c["data"]["step"] for c in commands] == [0]
        assert commands[0]["attempt"] == 1
        await mq.publish(event("sequence.step_sent", "enr-1", {"step": 0, "provider_message_id": "p0"}))
        commands = await wait_for(lambda: mq.drain_json("sfworkflow.commands.sequence"), what="send_step 1")
        assert [c["data"]["step"] for c in commands] == [1]
        await mq.publish(event("sequence.step_sent", "enr-1", {"step": 1, "provider_message_id": "p1"}))
        await wait_for(lambda: _state_is(pg, "enr-1", "completed"), what="completed")
        await wait_for(lambda: _published(pg), what="outbox drained")

    transitions = [(h["from_state"], h["to_state"]) for h in await history(pg, "enr-1")]
    assert transitions == [
        ("new", "waiting"),
        ("waiting", "sending"),
        ("sending", "waiting"),
        ("waiting", "sending"),
        ("sending", "completed"),
    ]
    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "enr-1", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.completed"]
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.timer") == 0


async def _state_is(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    return await state_of(pg, entity) == state


async def _published(pg: asyncpg.Connection) -> bool:
    return await pg.fetchval("SELECT count(*) = 0 FROM sfworkflow.outbox WHERE published_at IS NULL")


async def test_a_command_caused_by_a_timer_names_an_event_its_history_shows(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """send_step is caused by the step's timer firing, not by an event a producer sent: its causation_id must
    still resolve, in the history that `inspect` and the admin API show, to the timer entry that caused it."""
    from sfworkflow.ops.inspect import load_instance
    from tests.support import TENANT

    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        enrolled = await mq.publish(event("sequence.enrolled", "enr-cause", enrolled_data(steps=1)))
        commands = await wait_for(lambda: mq.drain_json("sfworkflow.commands.sequence"), what="send_step 0")
    shown = await load_instance(pg, TENANT, "sequence", "enr-cause")
    assert shown is not None
    by_id = {str(h["event_id"]): h for h in shown["history"] if h["event_id"] is not None}
    cause = by_id.get(commands[0]["causation_id"])
    assert cause is not None, (commands[0]["causation_id"], shown["history"])
    assert (cause["event_type"], cause["to_state"]) == ("sequence.timer.step_due", "sending")
    assert str(enrolled["event_id"]) in by_id  # the event that started it all is there too
