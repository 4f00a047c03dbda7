"""How sfworkflow's code connects to RabbitMQ and publishes with confirms when many messages are in flight.

aiormq queues a connection's outgoing frames for its writer task in a queue of FRAME_BUFFER_SIZE (10) frames,
and a publish that waits for the writer (the queue is full, or `wait=True`: until its frame is on the socket)
holds its channel's lock meanwhile, so every other publish of the channel queues behind it. With hundreds of
messages in flight a connection then sent about one message per turn of the event loop: under the live
benchmark's load the relay's publishes waited 0.5-1.8 s for their confirms while RabbitMQ confirmed a probe on
the same queue in 3 ms, and the closed loop ran at the relay's ~1,000 messages/s. So:

- `connect_robust` deepens the write queue (WRITE_QUEUE_FRAMES) before it connects: aiormq reads it from a class
  attribute when it makes a connection (a reconnect too), and its `connect` takes no argument for it;
- the same holds the other way: aiormq's connection reader hands each incoming frame to its channel's queue of 10,
  and waits while that queue is full, so one channel whose reader falls behind (a consumer channel with hundreds
  of deliveries prefetched, on a busy event loop) holds every other channel's deliveries and confirms in the
  socket. Under the fairness benchmark's burst a quiet tenant's event waited 68 ms (p50) to 279 ms (p99) there,
  behind the burst's channel. `connect_robust` and `connect` make channels (those aio-pika reopens too) take every
  frame: what a channel can be sent is bounded already, by its prefetch and by the publishes it has in flight, so
  every consumer of sfworkflow's sets a prefetch. The change is aiormq's, so it holds for every channel of the
  process once sfworkflow connected: an application that imports the client and consumes without a prefetch (or
  with `no_ack`) on its own connections gets no backpressure from aiormq's queue of 10 there either;
- `publish` hands a message to the writer without waiting for the socket (`wait=False`) and returns the
  broker's confirmation: the channel's lock is held only to queue the frames, which keeps the channel's order;
- `publish_many` publishes a batch as one write: the channel's lock taken once, one delivery tag and one
  confirmation future per message, as `basic_publish` makes them, and every frame marshalled into one buffer.
  35 against 84 us of client CPU per message confirmed (20,000 messages of 700 bytes in chunks of 500), and a
  write syscall per batch instead of one per message. It uses aiormq's channel internals (the attributes
  `basic_publish` uses, the same from aiormq 6.8 to 7.x); on a channel without them it publishes one by one.

tests/integration/test_amqp_publishing.py holds these: 500 publishes on one channel are all queued in one turn,
and a batch is confirmed, returned or failed message by message as single publishes are.

A broker of several nodes is named by several URLs separated by commas (`amqp://…:5672/,amqp://…:5672/`, the
nodes of one cluster; SFWORKFLOW_AMQP_URL takes the same). `connect_robust` then makes a `FailoverConnection`:
every (re)connection attempt tries the nodes in turn, starting after the one it used last, so a replica whose
node died reconnects to a live one at once, and aio-pika restores its channels, consumers and declarations there
(quorum queues live on every node). `connect` (a one-shot connection, no reconnects) takes the first node that
answers. Each attempt on one node is bounded by CONNECT_TIMEOUT_S, so a node whose host is gone (no refusal, packets
dropped) costs that long, not the operating system's minutes of retries. Options in a URL's query (heartbeat, TLS
files) are each node's own: give every node the ones it needs. tests/integration/test_amqp_failover.py holds the
connecting (a node down, the next taken); the chaos suite's broker_node (bench/chaos.py) a node of a real cluster
killed under load.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import aio_pika
import aiormq.abc
import aiormq.connection
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from yarl import URL

from sfworkflow.client.urls import split_urls

log = structlog.get_logger("sfworkflow.amqp")

PERSISTENT = 2  # AMQP delivery mode: the broker keeps the message on disk
CONNECT_TIMEOUT_S = 10.0  # one connection attempt to one node: TCP, TLS and the AMQP handshake
WRITE_QUEUE_FRAMES = 4096  # frames a connection's writer may have waiting (aiormq's default: 10)


def deepen_queues() -> None:
    """Connections made from now on queue up to WRITE_QUEUE_FRAMES frames for their writer, and their channels take
    every incoming frame without a bound of their own (the module docstring says why). Idempotent."""
    cls = aiormq.connection.Connection
    cls.FRAME_BUFFER_SIZE = max(cls.FRAME_BUFFER_SIZE, WRITE_QUEUE_FRAMES)
    if getattr(cls.channel, "_sfworkflow_unbounded", False):
        return
    bounded = cls.channel

    @functools.wraps(bounded)
    async def channel(
        self: aiormq.connection.Connection,
        channel_number: int | None = None,
        publisher_confirms: bool = True,
        frame_buffer_size: int = 0,  # aiormq's 0: an unbounded queue
        timeout: Any = None,
        **kwargs: Any,
    ) -> aiormq.abc.AbstractChannel:
        return await bounded(
            self, channel_number=channel_number, publisher_confirms=publisher_confirms,
            frame_buffer_size=frame_buffer_size, timeout=timeout, **kwargs,
        )  # fmt: skip

    channel._sfworkflow_unbounded = True  # type: ignore[attr-defined]
    cls.channel = channel  # type: ignore[method-assign]


async def connect_robust(url: str, *, timeout: float = CONNECT_TIMEOUT_S, **kwargs: Any) -> AbstractRobustConnection:
    """aio-pika's robust connection (reconnects, restores channels and consumers), with a deep write queue; over
    several nodes (a comma-separated `url`), a FailoverConnection. `timeout` bounds each attempt on each node;
    `kwargs` are aio-pika's URL options (they go into every node's URL, as aio_pika.connect_robust does)."""
    deepen_queues()
    urls = split_urls(url)
    if len(urls) == 1:
        connection: AbstractRobustConnection = await aio_pika.connect_robust(urls[0], timeout=timeout, **kwargs)
        return connection
    failover = FailoverConnection([aio_pika.connection.make_url(u, **dict(kwargs)) for u in urls], **kwargs)
    await failover.connect(timeout=timeout)
    return failover


async def connect(url: str, *, timeout: float = CONNECT_TIMEOUT_S, **kwargs: Any) -> AbstractConnection:
    """A one-shot connection (no reconnects) to the first node of `url` (comma-separated) that accepts one."""
    deepen_queues()
    failure: BaseException | None = None
    for one in split_urls(url):
        try:
            connection: AbstractConnection = await aio_pika.connect(one, timeout=timeout, **kwargs)
            return connection
        except CONNECTION_EXCEPTIONS as exc:
            failure = exc
    assert failure is not None
    raise failure


_CONNECT_TRANSPORT = "_RobustConnection__connect_transport"  # aio-pika's one connection attempt (10.x)


def can_fail_over() -> bool:
    """Whether this aio-pika's reconnect loop makes its attempts through `_CONNECT_TRANSPORT`, the method
    FailoverConnection wraps (tests/unit/test_cluster_urls.py checks it for the installed version)."""
    factory = getattr(aio_pika.RobustConnection, "_RobustConnection__connection_factory", None)
    code = getattr(factory, "__code__", None)
    return (
        hasattr(aio_pika.RobustConnection, _CONNECT_TRANSPORT)
        and code is not None
        and (_CONNECT_TRANSPORT in code.co_names)
    )


class FailoverConnection(aio_pika.RobustConnection):
    """A robust connection over the nodes of a cluster: each (re)connection attempt tries every node once, starting
    with the one after the node it used last, and fails only when none accepts (then aio-pika waits its reconnect
    interval and tries again). aio-pika's robust connection reconnects to its one URL only; its attempt is the
    private `__connect_transport`, which this class wraps (checked when a connection is made)."""

    def __init__(self, urls: Sequence[URL], **kwargs: Any) -> None:
        if not urls:
            raise ValueError("FailoverConnection needs at least one URL")
        if not can_fail_over():
            raise RuntimeError(
                f"this aio-pika ({aio_pika.__version__}) has no RobustConnection.{_CONNECT_TRANSPORT}: a connection "
                "over several AMQP URLs cannot fail over; install an aio-pika that pyproject.toml allows"
            )
        super().__init__(urls[0], **kwargs)
        self.urls = list(urls)
        self._next = 0

    def node_order(self) -> list[URL]:
        """The nodes the next attempt tries, in order."""
        n = len(self.urls)
        return [self.urls[(self._next + i) % n] for i in range(n)]

    async def _RobustConnection__connect_transport(self) -> None:  # aio-pika's private name: see the class
        failure: BaseException | None = None
        start, n = self._next, len(self.urls)
        for i in range(n):
            k = (start + i) % n
            self._next = (k + 1) % n
            url = self.url = self.urls[k]
            try:
                await getattr(super(), _CONNECT_TRANSPORT)()
            except CONNECTION_EXCEPTIONS as exc:
                failure = exc
                log.warning("AMQP node refused a connection; trying the next", node=_host(url), error=repr(exc)[:200])
                continue
            log.info("connected to AMQP node", node=_host(url), nodes=len(self.urls))
            return
        assert failure is not None
        raise failure


def _host(url: URL) -> str:
    return f"{url.host}:{url.port}"


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


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message of a `publish_many` batch; its properties carry a message_id (returns are matched by it)."""

    body: bytes
    exchange: str
    routing_key: str
    mandatory: bool
    properties: Basic.Properties


_INTERNALS = ("lock", "delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue", "number",
              "publisher_confirms", "_split_body", "create_future")  # fmt: skip


class ConfirmTimeout(TimeoutError):
    """RabbitMQ neither confirmed nor refused a publish in time: the message may or may not be in its queue."""


async def publish_many(
    channel: aiormq.abc.AbstractChannel, messages: Sequence[Outgoing], *, timeout: float | None = None
) -> list[object]:
    """Publish `messages` in order, in one write; each one's confirmation (Basic.Ack), or the exception its
    single publish would raise (returned: PublishError; nacked: DeliveryError; the channel closed), or, past
    `timeout` seconds without an answer, ConfirmTimeout (the confirmation is left to the channel: a late answer is
    ignored; publish again on another channel)."""
    if not messages:
        return []
    if not isinstance(channel, aiormq.Channel) or not all(hasattr(channel, a) for a in _INTERNALS):
        return await _one_by_one(channel, messages, timeout)
    if not channel.publisher_confirms:
        raise ValueError("publish_many needs a channel with publisher confirms")
    confirmations: list[asyncio.Future[Any]] = []
    frames: list[Any] = []
    async with channel.lock:
        for m in messages:
            message_id = m.properties.message_id
            if not message_id:
                raise ValueError("publish_many needs a message_id on every message (returns are matched by it)")
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            confirmation = channel.create_future()
            channel.confirmations[tag] = confirmation
            channel.message_id_delivery_tag[message_id] = tag
            confirmation.add_done_callback(partial(_forget, channel, message_id, tag))
            confirmations.append(confirmation)
            frames.append(Basic.Publish(exchange=m.exchange, routing_key=m.routing_key, mandatory=m.mandatory))
            frames.append(ContentHeader(properties=m.properties, body_size=len(m.body)))
            frames += channel._split_body(m.body)
        await channel.write_queue.put(aiormq.abc.ChannelFrame.marshall(frames=frames, channel_number=channel.number))
    return await _outcomes(confirmations, timeout)


async def _outcomes(pending: Sequence[asyncio.Future[Any]], timeout: float | None) -> list[object]:
    """Each future's result or exception, in order; ConfirmTimeout for one still pending after `timeout` seconds
    (not cancelled: the channel still holds it, and a late confirm finds it done and is ignored)."""
    if timeout is not None:
        await asyncio.wait(pending, timeout=timeout)
    else:
        await asyncio.gather(*pending, return_exceptions=True)
    out: list[object] = []
    for f in pending:
        if not f.done():
            out.append(ConfirmTimeout(f"no confirm from RabbitMQ within {timeout:g} s"))
        elif f.cancelled():
            out.append(asyncio.CancelledError())
        else:
            out.append(f.exception() or f.result())
    return out


def _forget(channel: aiormq.Channel, message_id: str, tag: int, _: object) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id)


async def _one_by_one(
    channel: aiormq.abc.AbstractChannel, messages: Sequence[Outgoing], timeout: float | None = None
) -> list[object]:
    singles = [
        asyncio.ensure_future(publish(channel, m.body, exchange=m.exchange, routing_key=m.routing_key,
                                      mandatory=m.mandatory, properties=m.properties))
        for m in messages
    ]  # fmt: skip
    return await _outcomes(singles, timeout)
