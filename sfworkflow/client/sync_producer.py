"""A producer for synchronous code (Celery tasks, Django views, FastAPI's sync endpoints): pika with publisher
confirms, the same envelope (`build_event`) and validation as the asyncio producer.

    from sfworkflow.client.sync_producer import SyncEventPublisher
    from sfworkflow.client.producer import build_event

    with SyncEventPublisher.connect("amqp://guest:guest@rabbitmq:5672/") as pub:
        pub.publish(build_event("sequence.enrolled", tenant_id=..., entity_id="enrollment-42", data={...},
                                source="salesflow.sequences"))

`publish` returns once the broker confirmed the event (persistent, message_id = event_id, mandatory: an event
no queue takes raises instead of vanishing). A connection lost mid-publish is reopened and the event published
again; sfworkflow's inbox drops the copy if the first one got through (the event id is the same), so a retry is
always safe. Publish *after* SalesFlow's own transaction commits (Django: `transaction.on_commit`), or the event
may announce something that was rolled back; and build the event (its id) before the commit if a retry of the
task must not create a second event. One publisher per thread: pika's connections are not thread-safe.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import orjson
import pika
import pika.exceptions

from sfworkflow.client import tracing
from sfworkflow.client.amqp import PERSISTENT
from sfworkflow.client.producer import validate_event
from sfworkflow.client.urls import split_urls
from sfworkflow.contract.headers import event_headers
from sfworkflow.contract.topology import EVENTS_EXCHANGE

# What a lost or closed connection raises in pika; a confirm the broker refused (NackError) or an event no queue
# took (UnroutableError) is not one of them: those are the event's, and are raised to the caller.
_CONNECTION_LOST = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionClosed,
    pika.exceptions.ChannelClosed,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.StreamLostError,
)


class SyncEventPublisher:
    """Publishes events to sfworkflow.events with publisher confirms from synchronous code."""

    def __init__(self, amqp_url: str, *, retries: int = 3) -> None:
        self.amqp_url = amqp_url
        self.retries = retries
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None

    @classmethod
    def connect(cls, amqp_url: str, *, retries: int = 3) -> SyncEventPublisher:
        publisher = cls(amqp_url, retries=retries)
        publisher._open()
        return publisher

    def _open(self) -> None:
        self.close()
        # Several URLs (the nodes of a cluster, comma-separated): pika tries each in turn.
        nodes = [pika.URLParameters(url) for url in split_urls(self.amqp_url)]
        self._connection = pika.BlockingConnection(nodes)
        channel = self._connection.channel()
        channel.confirm_delivery()
        self._channel = channel

    def publish(self, event: dict[str, Any], *, validate: bool = True, traceparent: str | None = None) -> None:
        """Validate (InvalidEvent names what is wrong), publish and wait for the broker's confirm; reopen the
        connection and publish again, up to `retries` times, when it was lost. W3C trace context: `traceparent`,
        else the current OpenTelemetry span's (when the application traces), else none."""
        if validate:
            validate_event(event)
        body = orjson.dumps(event)
        tp = traceparent or tracing.current_traceparent_for(event)
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            message_id=event["event_id"],
            headers=event_headers(event, tp),
        )
        for attempt in range(self.retries + 1):
            try:
                if self._channel is None or not self._channel.is_open:
                    self._open()
                self._channel.basic_publish(
                    EVENTS_EXCHANGE, event["event_type"], body, properties=properties, mandatory=True
                )
                return
            except _CONNECTION_LOST:
                self._channel = None
                if attempt == self.retries:
                    raise

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except _CONNECTION_LOST:
                pass

    def __enter__(self) -> SyncEventPublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
