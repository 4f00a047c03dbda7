"""Hostile headers, unroutable commands and quorum queues, against the real service."""

from __future__ import annotations

import dataclasses

import aio_pika
import asyncpg

from sfworkflow.contract.topology import COMMANDS_EXCHANGE, commands_queue
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import Amqp, enrolled_data, event, running_service, state_of


async def test_nul_bytes_in_headers_are_dead_lettered_and_the_queue_keeps_flowing(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish_raw(b"{broken", headers={"x-\x00key": "va\x00lue", "nested": {"k": "a\x00b"}})
        good = event("sequence.enrolled", "after-nul", enrolled_data(steps=1, delay_s=60))
        await mq.publish(good)
        await wait_for(lambda: state_of(pg, "after-nul"), what="the valid event after the bad one applied")
        dead = await wait_for(lambda: mq.drain("sfworkflow.dead"), what="the dead letter")
    assert dead[0].body == b"{broken"
    assert dead[0].headers["x-sfworkflow-reason"] == "invalid_json"
    assert dead[0].headers["x-\ufffdkey"] == "va\ufffdlue"


async def test_an_unroutable_command_stays_in_the_outbox_until_it_can_be_routed(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(settings) as service, Amqp(settings.amqp_url) as mq:
        assert mq.connection is not None
        channel = await mq.connection.channel()
        queue = await channel.get_queue(commands_queue("sequence"))
        await queue.unbind(COMMANDS_EXCHANGE, "sequence.#")  # a broken topology: the command has no route
        await mq.publish(event("sequence.enrolled", "unroutable", enrolled_data(steps=1)))
        row = await wait_for(
            lambda: pg.fetchrow(
                "SELECT publish_attempts, last_error FROM sfworkflow.outbox WHERE kind = 'command' "
                "AND last_error IS NOT NULL"
            ),
            what="a failed publish recorded on the outbox row",
        )
        assert row["publish_attempts"] >= 1 and "PublishError" in row["last_error"]
        assert await mq.drain(commands_queue("sequence")) == []
        failures = service.metrics.publish_failures.labels("command")._value.get()
        assert failures >= 1
        await queue.bind(COMMANDS_EXCHANGE, "sequence.#")  # fixed: the relay's retry gets it through
        commands = await wait_for(lambda: mq.drain_json(commands_queue("sequence")), timeout=20, what="the command")
        await channel.close()
    assert [c["entity_id"] for c in commands] == ["unroutable"]
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL") == 0


async def test_quorum_queues_end_to_end(settings: Settings, pg: asyncpg.Connection) -> None:
    quorum = dataclasses.replace(settings, queue_type="quorum")
    async with running_service(quorum), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "q-1", enrolled_data(steps=1)))
        commands = await wait_for(lambda: mq.drain_json(commands_queue("sequence")), what="send_step")
        await mq.publish(event("sequence.step_sent", "q-1", {"step": 0, "provider_message_id": "p"}))
        await wait_for(lambda: _is(pg, "q-1", "completed"), what="completed")
        assert mq.connection is not None
        channel = await mq.connection.channel()
        # A passive declare with the classic type fails on a quorum queue: the queues really are quorum.
        try:
            await channel.declare_queue(commands_queue("sequence"), durable=True, arguments={"x-queue-type": "classic"})
            declared_as_classic = True
        except aio_pika.exceptions.ChannelPreconditionFailed:
            declared_as_classic = False
    assert [c["data"]["step"] for c in commands] == [0]
    assert not declared_as_classic


async def _is(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    return await state_of(pg, entity) == state
