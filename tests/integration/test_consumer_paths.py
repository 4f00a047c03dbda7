"""The consumer's two delivery paths (runtime/consumer.py): aiormq's frames (the fast path it swaps in) and
aio-pika's message (the path aio-pika restores on its own) read the same fields; the swap is made at start
and again after the broker closed and aio-pika reopened the channel, and events go on being applied."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import aio_pika
import aiormq
import asyncpg

from sfworkflow.runtime.deliveries import Received, received_from_aio_pika, received_from_frames
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import Amqp, enrolled_data, event, running_service, state_of

HEADERS = {"x-tenant": "acme", "x-count": 3, "x-flag": True, "x-nested": {"a": [1, "b"]}}


def _fields(r: Received) -> dict[str, Any]:
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name not in ("channel", "delivery_tag")}


async def _publish(channel: aio_pika.abc.AbstractChannel, queue: str, body: bytes) -> None:
    message = aio_pika.Message(body, headers=HEADERS, content_type="application/json", message_id="m-1")
    await channel.default_exchange.publish(message, routing_key=queue)


async def test_both_delivery_paths_read_the_same_fields(settings: Settings) -> None:
    queue = f"test.paths.{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await conn.channel()
        q = await channel.declare_queue(queue)
        await _publish(channel, queue, b'{"n": 1}')

        via_aio_pika: asyncio.Queue[Received] = asyncio.Queue()

        async def slow(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            await via_aio_pika.put(received_from_aio_pika(m))

        tag = await q.consume(slow, no_ack=True)
        first = await asyncio.wait_for(via_aio_pika.get(), 10)
        await q.cancel(tag)
        await _publish(channel, queue, b'{"n": 1}')  # the same message again, for the other path

        underlay = await channel.get_underlay_channel()
        via_frames: asyncio.Queue[Received] = asyncio.Queue()

        async def fast(m: aiormq.abc.DeliveredMessage) -> None:
            await via_frames.put(received_from_frames(m))

        await underlay.basic_consume(queue, fast, no_ack=True)
        second = await asyncio.wait_for(via_frames.get(), 10)
        await q.delete(if_unused=False)
    finally:
        await conn.close()
    assert _fields(first) == _fields(second)
    assert first.headers == HEADERS
    assert (first.routing_key, first.exchange, first.message_id) == (queue, "", "m-1")


async def _on_fast_path(channel: aio_pika.abc.AbstractChannel, tag: str) -> bool:
    try:
        underlay = await channel.get_underlay_channel()
    except aiormq.exceptions.ChannelInvalidStateError:
        return False
    assert isinstance(underlay, aiormq.Channel)
    return not underlay.is_closed and getattr(underlay.consumers.get(tag), "__name__", "") == "fast"


async def test_fast_path_is_taken_again_after_the_broker_closed_the_channel(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    one = dataclasses.replace(settings, consumers=1)
    async with running_service(one) as service:
        assert service.consumer is not None
        channel, _queue, tag = service.consumer._channels[0]
        assert await _on_fast_path(channel, tag)
        before = await channel.get_underlay_channel()
        # An ack of a delivery tag the broker never sent: it closes the channel (PRECONDITION_FAILED).
        await before.basic_ack(987654)
        await wait_for(lambda: _reopened(channel, before), timeout=30, what="the channel reopened")
        await wait_for(lambda: _on_fast_path(channel, tag), timeout=30, what="the fast path taken again")
        async with Amqp(settings.amqp_url) as mq:
            for i in range(5):
                await mq.publish(event("sequence.enrolled", f"reopened-{i}", enrolled_data(steps=1)))

        async def all_sending() -> bool:
            return all([await state_of(pg, f"reopened-{i}") == "sending" for i in range(5)])

        await wait_for(all_sending, timeout=30, what="events applied after the reopen")


async def _reopened(channel: aio_pika.abc.AbstractChannel, before: aiormq.abc.AbstractChannel) -> bool:
    try:
        now = await channel.get_underlay_channel()
    except aiormq.exceptions.ChannelInvalidStateError:
        return False
    return now is not before and not now.is_closed
