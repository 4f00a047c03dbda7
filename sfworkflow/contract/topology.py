"""The RabbitMQ topology sfworkflow owns, declared idempotently at start-up.

exchange sfworkflow.events        (topic)  -> queue sfworkflow.events                      binding '#'
exchange sfworkflow.commands      (topic)  -> queue sfworkflow.commands.<workflow>         binding '<workflow>.#'
exchange sfworkflow.compensations (topic)  -> queue sfworkflow.compensations.<workflow>    binding '<workflow>.#'
exchange sfworkflow.lifecycle     (topic)     routing key '<workflow.event>.<workflow>', no queue of ours
queue sfworkflow.dead                         dead letters, published through the default exchange
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import ChannelPreconditionFailed

from sfworkflow.errors import ConfigurationError

# Every exchange and queue name sfworkflow uses is defined here, once (header names: contract/headers.py).
EVENTS_EXCHANGE = "sfworkflow.events"  # events in, routing key = event_type
EVENTS_QUEUE = "sfworkflow.events"  # the queue the service consumes, bound to EVENTS_EXCHANGE with '#'
COMMANDS_EXCHANGE = "sfworkflow.commands"  # commands out, routing key = command_type
COMPENSATIONS_EXCHANGE = "sfworkflow.compensations"  # compensation commands out, routing key = command_type
LIFECYCLE_EXCHANGE = "sfworkflow.lifecycle"  # workflow.started/completed/failed/compensated, for observers
DEAD_QUEUE = "sfworkflow.dead"  # dead letters, published to it through DEFAULT_EXCHANGE
DEFAULT_EXCHANGE = ""  # AMQP's default exchange: the routing key is the queue's name


def commands_queue(workflow: str) -> str:
    """The queue of one workflow's commands: sfworkflow.commands.<workflow>."""
    return f"{COMMANDS_EXCHANGE}.{workflow}"


def compensations_queue(workflow: str) -> str:
    """The queue of one workflow's compensation commands: sfworkflow.compensations.<workflow>."""
    return f"{COMPENSATIONS_EXCHANGE}.{workflow}"


def queue_arguments(queue_type: str) -> dict[str, Any]:
    return {"x-queue-type": queue_type}


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
