"""Several AMQP URLs (a cluster's nodes, comma-separated): a connection is made to the first node that accepts one,
for the service's robust connection and for one-shot ones alike (client/amqp.py). The node-failure half, a node
killed under a consumer and a publisher, runs against a real three-node cluster in the chaos suite
(`python -m bench.chaos --scenario broker_node`)."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from sfworkflow.client import amqp
from sfworkflow.client.producer import EventPublisher, build_event
from sfworkflow.contract.topology import EVENTS_EXCHANGE

DOWN = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1: refused at once


async def test_a_robust_connection_skips_a_node_that_is_down_and_works_on_the_next(amqp_url: str) -> None:
    connection = await amqp.connect_robust(f"{DOWN},{amqp_url}")
    try:
        assert isinstance(connection, amqp.FailoverConnection)
        assert connection.url.port == 5672  # the live node
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hello"), routing_key=queue.name)
        message = await queue.get(timeout=5, fail=True)
        assert message is not None and message.body == b"hello"
        await message.ack()
        # The next attempt (a reconnect) starts with the node after the one in use, then goes round.
        assert [u.port for u in connection.node_order()] == [1, 5672]
    finally:
        await connection.close()


async def test_a_one_shot_connection_takes_the_first_node_that_answers(amqp_url: str) -> None:
    connection = await amqp.connect(f"{DOWN},{amqp_url}")
    try:
        assert not connection.is_closed
    finally:
        await connection.close()


async def test_when_no_node_answers_the_connection_fails_at_once() -> None:
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(amqp.connect_robust(f"{DOWN},amqp://guest:guest@127.0.0.1:2/"), 10)


async def test_a_producer_publishes_through_the_live_node_of_the_list(amqp_url: str) -> None:
    publisher = await EventPublisher.connect(f"{DOWN},{amqp_url}")
    try:
        queue = await publisher.channel.declare_queue("", exclusive=True)
        await queue.bind(EVENTS_EXCHANGE, "#")
        event = build_event("sequence.enrolled", tenant_id="00000000-0000-4000-8000-000000000001",
                            entity_id="e-1", data={}, source="test")  # fmt: skip
        await publisher.publish(event, validate=False)  # confirmed by the broker, or it raises
        message = await queue.get(timeout=5, fail=True)
        assert message is not None and message.message_id == event["event_id"]
    finally:
        await publisher.close()
