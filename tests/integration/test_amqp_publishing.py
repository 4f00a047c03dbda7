"""Many publishes in flight on one channel, as the relay and the simulated worker make them, go to the
connection's writer at once, not one per turn of the event loop.

aiormq queues a connection's outgoing frames for its writer task in a queue of 10, and a publish that waits for
the writer (a full queue, or `wait=True`: until its frame is on the socket) holds its channel's lock, so the
channel's other publishes queue behind it. With hundreds in flight the connection then sent about one message
per turn of the loop: under the live benchmark's load the relay's publishes waited 0.5-1.8 s for their confirms
while RabbitMQ confirmed a probe on the same queue in 3 ms, and the closed loop went at ~1,000 messages/s.
"""

from __future__ import annotations

import asyncio
import uuid

import aiormq
from pamqp.commands import Basic

from sfworkflow.client import amqp

IN_FLIGHT = 500


async def test_publishes_in_flight_on_one_channel_are_queued_for_the_writer_in_one_turn(amqp_url: str) -> None:
    connection = await amqp.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("", exclusive=True)
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        before = underlay.delivery_tag
        pending = [
            asyncio.ensure_future(amqp.publish(underlay, b"{}", exchange="", routing_key=queue.name, mandatory=True))
            for _ in range(IN_FLIGHT)
        ]
        for _ in range(3):  # a few turns of the event loop
            await asyncio.sleep(0)
        assert underlay.delivery_tag - before == IN_FLIGHT  # every publish is past its channel's lock
        confirms = await asyncio.gather(*pending)
        assert all(isinstance(c, aiormq.spec.Basic.Ack) for c in confirms)
    finally:
        await connection.close()


def _message(n: int, routing_key: str, mandatory: bool = True) -> amqp.Outgoing:
    return amqp.Outgoing(f"m{n}".encode(), "", routing_key, mandatory, Basic.Properties(message_id=str(uuid.uuid4())))


async def test_a_batch_is_published_in_order_and_confirmed_message_by_message(amqp_url: str) -> None:
    """A batch is one write, and each message in it is confirmed, returned or failed as a single publish is."""
    connection = await amqp.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue("", exclusive=True)
        underlay = await channel.get_underlay_channel()
        batch = [_message(n, queue.name) for n in range(300)]
        batch[100] = _message(100, "nowhere")  # mandatory and unroutable: returned
        batch[101] = _message(101, "nowhere", mandatory=False)  # not mandatory: dropped by the broker, confirmed
        outcomes = await amqp.publish_many(underlay, batch)
        assert isinstance(outcomes[100], aiormq.exceptions.DeliveryError)
        assert all(isinstance(o, aiormq.spec.Basic.Ack) for n, o in enumerate(outcomes) if n != 100)
        got: list[bytes] = []
        async with queue.iterator(no_ack=True) as messages:
            async for m in messages:
                got.append(m.body)
                if len(got) == 298:
                    break
        assert got == [f"m{n}".encode() for n in range(300) if n not in (100, 101)]
        # and one by one, as publish_many does on a channel without the internals it uses: the same outcomes
        again = await amqp._one_by_one(underlay, [_message(1, queue.name), _message(2, "nowhere")])
        assert isinstance(again[0], aiormq.spec.Basic.Ack) and isinstance(again[1], aiormq.exceptions.DeliveryError)
    finally:
        await connection.close()


async def test_a_batch_on_a_channel_that_closes_fails_instead_of_waiting(amqp_url: str) -> None:
    connection = await amqp.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        underlay = await channel.get_underlay_channel()
        # publishing to an exchange that does not exist closes the channel (404): the batch's confirmations fail
        batch = [amqp.Outgoing(b"x", "no-such-exchange", "k", True, Basic.Properties(message_id=str(uuid.uuid4())))]
        outcomes = await asyncio.wait_for(amqp.publish_many(underlay, batch * 3), 10)
        assert all(isinstance(o, BaseException) for o in outcomes)
    finally:
        await connection.close()


async def test_no_channel_can_hold_up_the_frames_of_the_others(amqp_url: str) -> None:
    """aiormq's connection reader hands each incoming frame to its channel's queue, and by default a channel's queue
    holds 10 frames: when one channel's reader falls behind (a consumer channel with hundreds of deliveries
    prefetched, on a busy event loop), the connection reader waits for it, and every other channel's deliveries and
    confirms wait behind it in the socket. Under the fairness benchmark's burst a quiet tenant's event then waited
    68 ms (p50) to 279 ms (p99) between RabbitMQ's confirm to its producer and its delivery reaching the service's
    buffer, while a probe consumer on an idle connection got the same message in 6 / 29 ms. What a channel can be
    sent is bounded already (prefetch for deliveries, the publishes in flight for confirms), so channels opened
    through `connect_robust`, and those it reopens, take every frame without a bound of their own."""
    connection = await amqp.connect_robust(amqp_url)
    try:
        consuming = await connection.channel(publisher_confirms=False)
        publishing = await connection.channel(publisher_confirms=True)
        for channel in (consuming, publishing):
            underlay = await channel.get_underlay_channel()
            assert isinstance(underlay, aiormq.Channel)
            assert underlay.frames.maxsize == 0, "a channel's incoming frames are bounded: its reader can stall others"
        # A channel the broker closes (a passive declare of a queue that does not exist) is reopened by aio-pika
        # through the same path, and takes every frame too.
        before = await publishing.get_underlay_channel()
        try:
            await publishing.declare_queue(f"no-such-queue-{uuid.uuid4()}", passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            pass
        for _ in range(200):
            if not publishing.is_closed and (await publishing.get_underlay_channel()) is not before:
                break
            await asyncio.sleep(0.05)
        reopened = await publishing.get_underlay_channel()
        assert reopened is not before
        assert reopened.frames.maxsize == 0
    finally:
        await connection.close()
