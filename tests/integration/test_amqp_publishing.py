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

import aiormq

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
