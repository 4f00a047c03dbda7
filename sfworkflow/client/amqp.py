"""How sfworkflow's code connects to RabbitMQ and publishes with confirms when many messages are in flight.

aiormq queues a connection's outgoing frames for its writer task in a queue of FRAME_BUFFER_SIZE (10) frames,
and a publish that waits for the writer (the queue is full, or `wait=True`: until its frame is on the socket)
holds its channel's lock meanwhile, so every other publish of the channel queues behind it. With hundreds of
messages in flight a connection then sent about one message per turn of the event loop: under the live
benchmark's load the relay's publishes waited 0.5-1.8 s for their confirms while RabbitMQ confirmed a probe on
the same queue in 3 ms, and the closed loop ran at the relay's ~1,000 messages/s. So:

- `connect_robust` deepens the write queue (WRITE_QUEUE_FRAMES) before it connects: aiormq reads it from a class
  attribute when it makes a connection (a reconnect too), and its `connect` takes no argument for it;
- `publish` hands a message to the writer without waiting for the socket (`wait=False`) and returns the
  broker's confirmation: the channel's lock is held only to queue the frames, which keeps the channel's order.

tests/integration/test_amqp_publishing.py holds both: 500 publishes on one channel are all queued in one turn.
"""

from __future__ import annotations

from typing import Any

import aio_pika
import aiormq.abc
import aiormq.connection
from aio_pika.abc import AbstractRobustConnection
from pamqp.commands import Basic

WRITE_QUEUE_FRAMES = 4096  # frames a connection's writer may have waiting (aiormq's default: 10)


def deepen_write_queue() -> None:
    """Connections made from now on queue up to WRITE_QUEUE_FRAMES frames for their writer."""
    cls = aiormq.connection.Connection
    cls.FRAME_BUFFER_SIZE = max(cls.FRAME_BUFFER_SIZE, WRITE_QUEUE_FRAMES)


async def connect_robust(url: str, **kwargs: Any) -> AbstractRobustConnection:
    """aio-pika's robust connection (reconnects, restores channels and consumers), with a deep write queue."""
    deepen_write_queue()
    connection: AbstractRobustConnection = await aio_pika.connect_robust(url, **kwargs)
    return connection


async def publish(
    channel: aiormq.abc.AbstractChannel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    properties: Basic.Properties | None = None,
) -> aiormq.abc.ConfirmationFrameType | None:
    """Publish on an aiormq channel, queued for its writer at once; the broker's confirmation (channels with
    confirms), or an exception: the channel closed, or the message was returned (mandatory) or nacked."""
    assert isinstance(channel, aiormq.Channel)  # `wait` is the concrete channel's (aiormq >= 6.8)
    return await channel.basic_publish(
        body, exchange=exchange, routing_key=routing_key, mandatory=mandatory, properties=properties, wait=False
    )
