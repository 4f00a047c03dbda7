"""Declaring the topology (contract/topology.py names it) on RabbitMQ at start-up, idempotently."""

from __future__ import annotations

from collections.abc import Iterable

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import AMQPError, ChannelNotFoundEntity, ChannelPreconditionFailed

from sfworkflow.client import amqp
from sfworkflow.contract.headers import TENANT
from sfworkflow.contract.topology import (
    COMMANDS_EXCHANGE,
    COMPENSATIONS_EXCHANGE,
    CONSISTENT_HASH,
    CONSISTENT_HASH_PLUGIN,
    DEAD_QUEUE,
    EVENT_SHARDS_EXCHANGE,
    EVENTS_EXCHANGE,
    LEGACY_EVENTS_QUEUE,
    LIFECYCLE_EXCHANGE,
    SCHEDULES_EXCHANGE,
    commands_queue,
    compensations_queue,
    event_queues,
    queue_arguments,
)
from sfworkflow.errors import ConfigurationError

log = structlog.get_logger("sfworkflow.declare")


async def declare(
    connection: AbstractConnection, workflows: Iterable[str], queue_type: str, shards: int, *, amqp_url: str
) -> list[str]:
    """Declare every exchange, queue and binding; a queue of another type, or a broker without the consistent-hash
    exchange, is a clear error. Returns the event queues to consume: the `shards` shard queues, then the queue of
    the layout before shards when it still holds events (unbound here, so it only drains; probed on a connection of
    its own to `amqp_url`)."""
    channel = await connection.channel()
    try:
        await _declare(channel, list(workflows), queue_type, shards)
    except ChannelPreconditionFailed as exc:
        raise ConfigurationError(
            f"RabbitMQ refused a declaration ({exc}); a queue probably exists with another type or "
            f"arguments. sfworkflow declares {queue_type} queues (SFWORKFLOW_QUEUE_TYPE): set it to "
            "the type the existing queues have, or delete them once empty."
        ) from exc
    except AMQPError as exc:
        if CONSISTENT_HASH not in str(exc):
            raise
        raise ConfigurationError(
            f"RabbitMQ does not know the exchange type {CONSISTENT_HASH} ({exc}): sfworkflow spreads events over "
            f"queues by tenant with it. Enable the plugin that ships with RabbitMQ, on every node: "
            f"`rabbitmq-plugins enable {CONSISTENT_HASH_PLUGIN}` (scripts/services does it on this machine)."
        ) from exc
    finally:
        if not channel.is_closed:
            await channel.close()
    queues = event_queues(shards)
    if await _unbind_legacy_queue(amqp_url):
        queues.append(LEGACY_EVENTS_QUEUE)
    return queues


async def _declare(channel: AbstractChannel, workflows: list[str], queue_type: str, shards: int) -> None:
    args = queue_arguments(queue_type)
    topic = aio_pika.ExchangeType.TOPIC
    events = await channel.declare_exchange(EVENTS_EXCHANGE, topic, durable=True)
    by_tenant = await channel.declare_exchange(
        EVENT_SHARDS_EXCHANGE, CONSISTENT_HASH, durable=True, arguments={"hash-header": TENANT}
    )
    await by_tenant.bind(events, "#")
    commands = await channel.declare_exchange(COMMANDS_EXCHANGE, topic, durable=True)
    compensations = await channel.declare_exchange(COMPENSATIONS_EXCHANGE, topic, durable=True)
    await channel.declare_exchange(LIFECYCLE_EXCHANGE, topic, durable=True)
    await channel.declare_exchange(SCHEDULES_EXCHANGE, topic, durable=True)
    for name in event_queues(shards):
        q = await channel.declare_queue(name, durable=True, arguments=args)
        await q.bind(by_tenant, "1")  # the binding key is the shard's weight: every shard the same
    await channel.declare_queue(DEAD_QUEUE, durable=True, arguments=args)
    for w in workflows:
        cq = await channel.declare_queue(commands_queue(w), durable=True, arguments=args)
        await cq.bind(commands, f"{w}.#")
        kq = await channel.declare_queue(compensations_queue(w), durable=True, arguments=args)
        await kq.bind(compensations, f"{w}.#")


async def _unbind_legacy_queue(amqp_url: str) -> bool:
    """Whether to read the one events queue of the layout before shards: it exists and holds events. If it exists,
    unbind it from the events exchange first (new events go to the shards), so that it only drains; an empty one is
    not read at all (a replica reading it would lose its connection when an operator deletes it). Probed on a
    connection of its own: a passive declare of a missing queue closes its channel, which a robust connection would
    reopen. A replica of the earlier version binds it again while it runs: events then reach both, and the inbox
    drops the second copy."""
    probe = await amqp.connect(amqp_url)
    try:
        channel = await probe.channel()
        try:
            queue = await channel.declare_queue(LEGACY_EVENTS_QUEUE, passive=True)
        except ChannelNotFoundEntity:
            return False
        await queue.unbind(EVENTS_EXCHANGE, "#")
        result = queue.declaration_result
        waiting = result.message_count if result else 0
        hint = f"delete it once every replica runs this version: rabbitmqctl delete_queue {LEGACY_EVENTS_QUEUE}"
        if not waiting:
            log.info("the events queue of the layout before shards is empty: not read", queue=LEGACY_EVENTS_QUEUE,
                     hint=hint)  # fmt: skip
            return False
        log.info("draining the events queue of the layout before shards", queue=LEGACY_EVENTS_QUEUE, messages=waiting,
                 hint="restart this replica once it is empty, then " + hint)  # fmt: skip
        return True
    finally:
        await probe.close()
