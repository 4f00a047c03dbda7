"""A small producer for SalesFlow code: build a valid event envelope, validate it, publish with confirms.

async with EventPublisher.connect("amqp://guest:guest@127.0.0.1:5672/") as pub:
    await pub.publish(build_event("sequence.enrolled", tenant_id=..., entity_id="enrollment-42",
                                  data={...}, source="salesflow.sequences"))
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from pamqp.commands import Basic

from sfworkflow.client import amqp, tracing
from sfworkflow.contract import schemas
from sfworkflow.contract.headers import event_headers
from sfworkflow.contract.topology import EVENTS_EXCHANGE
from sfworkflow.errors import InvalidEvent


def build_event(
    event_type: str,
    *,
    tenant_id: str,
    entity_id: str,
    data: dict[str, Any],
    source: str,
    event_id: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    actor_type: str = "system",
    timestamp: datetime | None = None,
    schema_version: int = 1,
    trace_id: str | None = None,
) -> dict[str, Any]:
    """An event envelope with a fresh event id and the current UTC time unless given; `trace_id`, unless given,
    is the current OpenTelemetry span's (when the application traces)."""
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "event_type": event_type,
        "spec_version": "1.0",
        "schema_version": schema_version,
        "tenant_id": tenant_id,
        "entity_id": entity_id,
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "source": source,
        "actor_type": actor_type,
        "timestamp": (timestamp or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "trace_id": trace_id if trace_id is not None else tracing.current_trace_id(),
        "data": data,
    }


def validate_event(event: dict[str, Any], schema_set: schemas.SchemaSet | None = None) -> None:
    """Raise InvalidEvent unless the envelope and its data match their schemas."""
    s = schema_set or schemas.default()
    errors = s.errors("envelope", "event", event)
    if not errors:
        name, version = event["event_type"], event["schema_version"]
        if s.validator("events", name, version) is None:
            errors = [f"unknown event type {name!r} (schema version {version})"]
        else:
            errors = s.errors("events", name, event["data"], version)
    if errors:
        raise InvalidEvent(f"{event.get('event_type')!r} is not valid: " + "; ".join(errors))


class EventPublisher:
    """Publishes events to sfworkflow.events with publisher confirms, persistent, message_id = event_id."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel, exchange: AbstractExchange) -> None:
        self.connection = connection
        self.channel = channel
        self.exchange = exchange

    @classmethod
    async def connect(cls, amqp_url: str) -> EventPublisher:
        connection = await amqp.connect_robust(amqp_url)
        # Confirms, and a returned (unroutable) event raises instead of being confirmed and lost.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        return cls(connection, channel, exchange)

    async def publish(self, event: dict[str, Any], *, validate: bool = True, traceparent: str | None = None) -> None:
        """Validate and publish `event`, with W3C trace context: `traceparent`, else the current OpenTelemetry
        span's (when the application traces), else none (sfworkflow reads the envelope's trace_id)."""
        if validate:
            validate_event(event)
        tp = traceparent or tracing.current_traceparent_for(event)
        await self.publish_raw(
            orjson.dumps(event),
            routing_key=event["event_type"],
            message_id=event["event_id"],
            headers=event_headers(event, tp),
        )

    async def publish_raw(
        self,
        body: bytes,
        *,
        routing_key: str,
        message_id: str | None = None,
        content_type: str | None = "application/json",
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish bytes as they are (tests and tools use this to send what producers get wrong). Many may be in
        flight at once (each awaits its own confirm): they are queued on the channel without waiting for the
        socket (client/amqp.py)."""
        properties = Basic.Properties(
            content_type=content_type, delivery_mode=amqp.PERSISTENT, message_id=message_id, headers=headers
        )
        channel = await self.channel.get_underlay_channel()
        await amqp.publish(channel, body, exchange=EVENTS_EXCHANGE, routing_key=routing_key, mandatory=True,
                           properties=properties)  # fmt: skip

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> EventPublisher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
