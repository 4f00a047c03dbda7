"""Declaring the topology (contract/topology.py names it) on RabbitMQ at start-up, idempotently."""

from __future__ import annotations

from collections.abc import Iterable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import ChannelPreconditionFailed

from sfworkflow.contract.topology import (
    COMMANDS_EXCHANGE,
    COMPENSATIONS_EXCHANGE,
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    EVENTS_QUEUE,
    LIFECYCLE_EXCHANGE,
    commands_queue,
    compensations_queue,
    queue_arguments,
)
from sfworkflow.errors import ConfigurationError


async def declare(connection: AbstractConnection, workflows: Iterable[str], queue_type: str) -> None:
    """Declare every exchange, queue and binding; a queue of another type is a clear error."""
    channel = await connection.channel()
    try:
        await _declare(channel, list(workflows), queue_type)
    except ChannelPreconditionFailed as exc:
        raise ConfigurationError(
            f"RabbitMQ refused a declaration ({exc}); a queue probably exists with another type or "
            f"arguments. sfworkflow declares {queue_type} queues (SFWORKFLOW_QUEUE_TYPE): set it to "
            "the type the existing queues have, or delete them once empty."
        ) from exc
    finally:
        if not channel.is_closed:
            await channel.close()


async def _declare(channel: AbstractChannel, workflows: list[str], queue_type: str) -> None:
    args = queue_arguments(queue_type)
    topic = aio_pika.ExchangeType.TOPIC
    events = await channel.declare_exchange(EVENTS_EXCHANGE, topic, durable=True)
    commands = await channel.declare_exchange(COMMANDS_EXCHANGE, topic, durable=True)
    compensations = await channel.declare_exchange(COMPENSATIONS_EXCHANGE, topic, durable=True)
    await channel.declare_exchange(LIFECYCLE_EXCHANGE, topic, durable=True)
    q = await channel.declare_queue(EVENTS_QUEUE, durable=True, arguments=args)
    await q.bind(events, "#")
    await channel.declare_queue(DEAD_QUEUE, durable=True, arguments=args)
    for w in workflows:
        cq = await channel.declare_queue(commands_queue(w), durable=True, arguments=args)
        await cq.bind(commands, f"{w}.#")
        kq = await channel.declare_queue(compensations_queue(w), durable=True, arguments=args)
        await kq.bind(compensations, f"{w}.#")
