"""Reading `sfworkflow.dead` without losing anything, for the `sfworkflow dead-letters` commands.

A `DeadLetterQueue` takes every ready message with basic.get on one channel and does not ack it;
closing the channel returns every message it did not `remove` to the queue, unchanged. Quorum
queues count each such return in `x-delivery-count` (and RabbitMQ 4 drops a message past its
delivery limit, 20 by default), so a message returned `REFRESH_AT` times or more is re-published
unchanged (with confirms) and only then acked: its count starts again at zero.

Redrive publishes on a second channel, with publisher confirms and mandatory routing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aiormq.exceptions import ChannelNotFoundEntity

from sfworkflow import db
from sfworkflow.client import amqp
from sfworkflow.contract.headers import (
    DEAD_LETTERED_AT,
    DETAIL,
    ORIGINAL_CONTENT_TYPE,
    ORIGINAL_MESSAGE_ID,
    ORIGINAL_ROUTING_KEY,
    PREFIX,
    REASON,
    REDRIVES,
    TENANT,
)
from sfworkflow.contract.topology import DEAD_QUEUE, EVENTS_EXCHANGE
from sfworkflow.errors import DeadLetterQueueError, StoreUnavailable
from sfworkflow.settings import Settings, redact_url

DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues

REFRESH_AT = 10  # returns after which a dead letter is re-published to reset its delivery count
CONNECT_TIMEOUT_S = 10.0
CONFIRM_TIMEOUT_S = 30.0
PERSISTENT = aio_pika.DeliveryMode.PERSISTENT


@dataclass
class DeadLetter:
    """One message read from sfworkflow.dead (still held, not acked)."""

    message_id: str | None
    body: bytes
    headers: dict[str, Any]
    content_type: str | None
    delivery_count: int
    message: AbstractIncomingMessage = field(repr=False)
    _parsed: Any = field(default=None, init=False, repr=False)
    _parsed_done: bool = field(default=False, init=False, repr=False)

    @classmethod
    def of(cls, m: AbstractIncomingMessage) -> DeadLetter:
        headers = {str(k): _text(v) for k, v in (m.headers or {}).items()}
        count = _int(headers.pop(DELIVERY_COUNT, 0))
        return cls(m.message_id, m.body, headers, m.content_type, count, m)

    @property
    def reason(self) -> str:
        return str(self.headers.get(REASON) or "unknown")

    @property
    def detail(self) -> str:
        return str(self.headers.get(DETAIL) or "")

    @property
    def original_routing_key(self) -> str:
        return str(self.headers.get(ORIGINAL_ROUTING_KEY) or "")

    @property
    def original_message_id(self) -> str | None:
        """The message_id the message arrived with (a dead letter has an id of its own)."""
        value = self.headers.get(ORIGINAL_MESSAGE_ID)
        return str(value) if value else None

    @property
    def original_content_type(self) -> str | None:
        value = self.headers.get(ORIGINAL_CONTENT_TYPE)
        return str(value) if value else None

    @property
    def redrives(self) -> int:
        return _int(self.headers.get(REDRIVES, 0))

    @property
    def dead_lettered_at(self) -> datetime | None:
        return parse_time(self.headers.get(DEAD_LETTERED_AT))

    @property
    def parsed_body(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        if not self._parsed_done:
            self._parsed_done = True
            with contextlib.suppress(orjson.JSONDecodeError, RecursionError):
                self._parsed = orjson.loads(self.body)
        return self._parsed

    @property
    def event_type(self) -> str | None:
        body = self.parsed_body
        value = body.get("event_type") if isinstance(body, dict) else None
        return value if isinstance(value, str) and value else None

    @property
    def redrive_routing_key(self) -> str | None:
        """Where a redrive publishes it: the original routing key, else the body's event_type."""
        return self.original_routing_key or self.event_type

    def redrive_headers(self) -> dict[str, Any]:
        """The original headers without sfworkflow's (but the tenant's, which picks the event's shard), plus the
        redrive count + 1."""
        out = {k: v for k, v in self.headers.items() if not k.startswith(PREFIX) or k == TENANT}
        out[REDRIVES] = self.redrives + 1
        return out


class DeadLetterQueue:
    """A session over sfworkflow.dead: read everything, remove (ack) some, return the rest on close."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.amqp_url
        self.connection: AbstractConnection | None = None
        self._reader: AbstractChannel | None = None
        self._publisher: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._worn: dict[int, DeadLetter] = {}  # delivery tag -> held, not removed, returned REFRESH_AT+ times

    async def __aenter__(self) -> DeadLetterQueue:
        try:
            self.connection = await amqp.connect(self.url, timeout=CONNECT_TIMEOUT_S)
        except Exception as exc:
            raise DeadLetterQueueError(
                f"cannot connect to RabbitMQ at {redact_url(self.url)} ({describe(exc, self.url)}); "
                "check that RabbitMQ runs and that SFWORKFLOW_AMQP_URL (host, credentials, vhost) is right"
            ) from exc
        self._reader = await self.connection.channel()
        try:
            self._queue = await self._reader.declare_queue(DEAD_QUEUE, passive=True)
        except ChannelNotFoundEntity as exc:
            await self.connection.close()
            raise DeadLetterQueueError(
                f"queue {DEAD_QUEUE} does not exist at {redact_url(self.url)}; start the service once "
                "(`sfworkflow run`) so that it declares its queues, or check the vhost in SFWORKFLOW_AMQP_URL"
            ) from exc
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc is None:
                await self._refresh_worn()
        finally:
            if self.connection is not None:
                with contextlib.suppress(Exception):
                    await self.connection.close()  # every message still held goes back to the queue

    @property
    def ready(self) -> int:
        """Messages ready in the queue when the session started."""
        assert self._queue is not None and self._queue.declaration_result is not None
        return self._queue.declaration_result.message_count or 0

    async def read(self) -> AsyncIterator[DeadLetter]:
        """Every message that was ready when the session started (not those dead-lettered meanwhile)."""
        assert self._queue is not None
        for _ in range(self.ready):
            m = await self._queue.get(no_ack=False, fail=False, timeout=CONFIRM_TIMEOUT_S)
            if m is None:
                return
            dl = DeadLetter.of(m)
            if dl.delivery_count >= REFRESH_AT and m.delivery_tag is not None:
                self._worn[m.delivery_tag] = dl
            yield dl

    async def remove(self, dl: DeadLetter) -> None:
        """Ack (delete) a message read in this session."""
        await dl.message.ack()
        if dl.message.delivery_tag is not None:
            self._worn.pop(dl.message.delivery_tag, None)

    async def publish_event(self, dl: DeadLetter, routing_key: str) -> None:
        """Publish the original body to sfworkflow.events; returns once the broker confirmed it.

        Raises when the broker nacks it or cannot route it (mandatory)."""
        channel = await self._publishing_channel()
        exchange = await self._events_exchange(channel)
        message = aio_pika.Message(
            dl.body,
            content_type=dl.original_content_type,
            message_id=dl.original_message_id or dl.message_id,  # as the producer sent it
            headers=dl.redrive_headers(),
            delivery_mode=PERSISTENT,
            app_id="sfworkflow-redrive",
        )
        await exchange.publish(message, routing_key=routing_key, mandatory=True, timeout=CONFIRM_TIMEOUT_S)

    async def _publishing_channel(self) -> AbstractChannel:
        if self._publisher is None or self._publisher.is_closed:
            assert self.connection is not None
            self._publisher = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        return self._publisher

    async def _events_exchange(self, channel: AbstractChannel) -> aio_pika.abc.AbstractExchange:
        try:
            return await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        except ChannelNotFoundEntity as exc:
            raise DeadLetterQueueError(
                f"exchange {EVENTS_EXCHANGE} does not exist at {redact_url(self.url)}; start the service once "
                "(`sfworkflow run`) so that it declares its exchanges"
            ) from exc

    async def _refresh_worn(self) -> None:
        """Re-publish held messages whose delivery count is high, then ack them (see the module doc)."""
        worn = list(self._worn.values())
        if not worn:
            return
        channel = await self._publishing_channel()
        refreshed = 0
        for dl in worn:
            message = aio_pika.Message(
                dl.body,
                content_type=dl.content_type,
                message_id=dl.message_id,
                headers=dl.headers,
                delivery_mode=PERSISTENT,
                app_id=dl.message.app_id,
            )
            try:
                await channel.default_exchange.publish(
                    message, routing_key=DEAD_QUEUE, mandatory=True, timeout=CONFIRM_TIMEOUT_S
                )
                await self.remove(dl)
                refreshed += 1
            except Exception as exc:
                print(
                    f"note: dead letter {dl.message_id} was returned {dl.delivery_count} times and could not be "
                    f"refreshed ({type(exc).__name__}); it stays in {DEAD_QUEUE}",
                    file=sys.stderr,
                )
        if refreshed:
            print(
                f"note: {refreshed} dead letter(s) returned {REFRESH_AT}+ times were re-published unchanged at the "
                f"tail of {DEAD_QUEUE} (quorum queues drop a message past its delivery limit)",
                file=sys.stderr,
            )


async def connect_database(settings: Settings) -> asyncpg.Connection:
    """A connection to sfworkflow's database; StoreUnavailable (naming the redacted URL) when it fails."""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:
        raise StoreUnavailable(
            f"cannot connect to PostgreSQL at {redact_url(settings.database_url)} "
            f"({describe(exc, settings.database_url)}); "
            "check that PostgreSQL runs and that SFWORKFLOW_DATABASE_URL is right"
        ) from exc
    await db.init_connection(conn)
    return conn


def describe(exc: BaseException, url: str) -> str:
    """`Type: message` of an exception, with the URL's password (if any) masked."""
    text = f"{type(exc).__name__}: {exc}"[:300]
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
        if password:
            text = text.replace(password, "***")
    return text


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 timestamp as an aware datetime (UTC when no zone is given), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _text(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
