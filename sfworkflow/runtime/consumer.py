"""The event consumer: deliveries from the event shard queues, applied in micro-batches, acked after commit.

Each batch loop has one channel per event queue (the shards of contract/topology.py), each with its own buffer,
and applies one batch at a time. A batch takes a fair share of every buffer (core/admission.py), always a prefix
of it, so one `basic.ack(multiple=True)` per channel on the batch's last delivery tag from it acks exactly that
batch, and a tenant's burst on one shard holds another shard's events back by one batch at most. A batch whose
transaction fails for a transient reason (PostgreSQL down, deadlock) is retried with backoff and
nothing is acked meanwhile; prefetch then stops the broker from sending more. A batch failing for
any other reason is split and applied message by message, so one bad message cannot fail its
neighbours.

Deliveries take aiormq's path, not aio-pika's: the consumer is registered through aio-pika (so its robust
channel restores it after a reconnect and recovers it after a broker-side cancel), then its callback on the
underlying aiormq channel is swapped for `fast`, which buffers the frame's fields as a `Received` without
building an aio-pika `IncomingMessage` and a second task per message: 107 against 76 us of CPU per message
consumed and acked on this machine, the largest single cost of the event path after the plan itself. After
a channel is reopened the swap is made again; until then, or whenever aio-pika re-registers the consumer on
its own, `slow` receives aio-pika's message and buffers the same `Received` (both are made per channel in
`Consumer.start`).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import deque
from dataclasses import replace
from functools import partial
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from sfworkflow.client import tracing
from sfworkflow.contract.envelope import EventParser, IncomingEvent
from sfworkflow.contract.headers import HEADERS_DROPPED, dead_letter_headers
from sfworkflow.contract.storable import clean_json, clean_text
from sfworkflow.contract.topology import DEAD_QUEUE, EVENTS_EXCHANGE
from sfworkflow.core.admission import fair_shares
from sfworkflow.core.batch import Delivery
from sfworkflow.db.pool import is_connection_error, is_transient
from sfworkflow.db.repository import Store
from sfworkflow.errors import DeadReason, Rejection
from sfworkflow.runtime import hooks
from sfworkflow.runtime.deliveries import (
    Received,
    ack_batch,
    received_from_aio_pika,
    received_from_frames,
    retake_fast_path,
    take_fast_path,
)
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.supervisor import Supervisor
from sfworkflow.settings import Settings

log = structlog.get_logger("sfworkflow.consumer")

BACKOFF_START_S = 0.2
BACKOFF_CAP_S = 5.0
MAX_TRANSIENT_RETRIES = 5  # tries of one batch or message after a transient error other than "unreachable"
MAX_HEADER_BYTES = 16 * 1024  # JSON size of the headers kept with a dead letter or parked event


class Health:
    """Readiness facts shared by the consumer, relay, timers and /readyz."""

    def __init__(self) -> None:
        self.db_ok = True
        self.db_error = ""
        self.consuming = False

    def db_failed(self, exc: BaseException) -> None:
        self.db_ok = False
        self.db_error = type(exc).__name__

    def db_recovered(self) -> None:
        self.db_ok = True
        self.db_error = ""


class Consumer:
    def __init__(
        self,
        settings: Settings,
        connection: AbstractRobustConnection,
        store: Store,
        parser: EventParser,
        metrics: Metrics,
        health: Health,
        supervisor: Supervisor | None = None,
        *,
        queues: list[str],
        tracer: Any = None,
    ) -> None:
        self.settings = settings
        self.supervisor = supervisor or Supervisor()  # the service's, which stops it when a batch loop dies
        self.tracer = tracer  # OpenTelemetry's (client/tracing.py); None: no spans
        self.connection = connection
        self.store = store
        self.parser = parser
        self.metrics = metrics
        self.health = health
        self.queues = list(queues)  # the event queues to consume: the shards (and a legacy queue) declare.py returned
        self._channels: list[tuple[AbstractChannel, AbstractQueue, str]] = []
        self._buffers: list[ShardBuffers] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._dead_channel: AbstractChannel | None = None  # publishes what cannot be stored at all

    async def start(self) -> None:
        """Consume the event queues: `settings.consumers` batch loops, each with a channel per queue."""
        for i in range(self.settings.consumers):
            buffers = ShardBuffers(len(self.queues))
            for k, name in enumerate(self.queues):
                await self._consume(name, buffers, k)
            self._buffers.append(buffers)
            self._tasks.append(self.supervisor.spawn("consumer", self._batch_loop(buffers), index=i))
        self.health.consuming = True
        s = self.settings
        log.info("consuming", queues=len(self.queues), consumers=s.consumers, prefetch=s.prefetch)

    async def _consume(self, name: str, buffers: ShardBuffers, k: int) -> None:
        """One channel consuming queue `name` into buffer k."""
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        queue = await channel.get_queue(name, ensure=True)
        buffer = buffers.shards[k]
        arrived = buffers.arrived

        async def slow(m: AbstractIncomingMessage) -> None:
            try:
                buffer.append(received_from_aio_pika(m))
                arrived.set()
            except aio_pika.exceptions.ChannelInvalidStateError:
                pass  # its channel closed meanwhile: the broker redelivers it

        async def fast(m: aiormq.abc.DeliveredMessage) -> None:
            buffer.append(received_from_frames(m))
            arrived.set()

        tag = await queue.consume(slow, no_ack=False)
        await take_fast_path(channel, tag, fast)
        assert isinstance(channel, AbstractRobustChannel)
        channel.reopen_callbacks.add(partial(retake_fast_path, tag=tag, fast=fast))
        self._channels.append((channel, queue, tag))

    def buffered(self) -> list[int]:
        """Deliveries waiting in this replica's buffers, per event queue (a hot shard shows here)."""
        return [sum(len(b.shards[k]) for b in self._buffers) for k in range(len(self.queues))]

    async def stop(self, timeout: float) -> None:
        """Stop taking deliveries, apply and ack what was already delivered, then close the channels.

        A batch loop that died before (the supervisor reported it) acks nothing more: closing its channels
        hands their unacked deliveries back to RabbitMQ, which redelivers them."""
        self.health.consuming = False
        for task in self._tasks:
            self.supervisor.stopping(task)  # before any loop can see the end of its buffers and return
        for _channel, queue, tag in self._channels:
            try:
                await queue.cancel(tag)
            except Exception as exc:  # channel already gone: its deliveries come back to the queue
                log.info("cancel failed", error=type(exc).__name__)
        self._stopping.set()
        for buffers in self._buffers:
            buffers.end()  # after cancel-ok nothing more arrives: what is buffered is all there is
        deadline = time.monotonic() + timeout
        for task in self._tasks:
            await self.supervisor.stop(task, max(0.1, deadline - time.monotonic()))
        channels = [c for c, _q, _t in self._channels] + ([self._dead_channel] if self._dead_channel else [])
        for channel in channels:
            if not channel.is_closed:
                try:
                    await channel.close()
                except Exception:
                    pass

    async def _batch_loop(self, buffers: ShardBuffers) -> None:
        """Take a fair share of what is buffered (up to a batch), linger briefly for more, apply; until the end
        of the buffers after stop."""
        size = self.settings.batch_size
        linger = self.settings.batch_linger_ms / 1000.0
        while True:
            if not await buffers.wait():
                return
            if buffers.total() < size and linger > 0 and not buffers.ended:
                await asyncio.sleep(linger)
            if not await self._process(buffers.take(size)):
                # Not applied (stopping while PostgreSQL is down): acking any later batch with
                # multiple=True would ack this one too. Stop here; the broker redelivers the rest.
                return

    def _delivery(self, m: Received) -> Delivery:
        try:
            parsed: IncomingEvent | Rejection = self.parser.parse(m.body, m.content_type, m.headers)
        except Exception as exc:  # never let one message stop the consumer: dead-letter it, say why
            log.error("parsing a message raised", error=repr(exc)[:300])
            parsed = Rejection(DeadReason.INTERNAL_ERROR, f"parsing raised {type(exc).__name__}: {str(exc)[:200]}")
        headers, replaced = json_safe_headers(m.headers)
        return Delivery(
            parsed=parsed,
            body=m.body,
            headers=headers,
            routing_key=m.routing_key,
            exchange=m.exchange,
            content_type=m.content_type,
            message_id=m.message_id,
            replaced_in_headers=replaced,
        )

    async def _process(self, batch: list[Received]) -> bool:
        """Apply a batch and ack it after commit; False when it could not be applied (nothing acked)."""
        started = time.perf_counter()
        deliveries = [self._delivery(m) for m in batch]
        if self.tracer is None:
            applied = await self._apply_with_retry(deliveries)
        else:
            applied = await self._apply_traced(deliveries)
        if not applied:
            return False
        hooks.fault_point("after_commit_before_ack")
        await ack_batch(batch)
        hooks.fault_point("after_batch_acked")
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        return True

    async def _backoff(self, exc: BaseException, delay: float, what: str, size: int) -> bool:
        """Record a transient failure and wait; False when stopping (the caller gives the work up)."""
        if is_connection_error(exc):
            self.health.db_failed(exc)
        self.metrics.batch_retries.inc()
        log.warning(what, error=type(exc).__name__, detail=str(exc)[:200], retry_in_s=round(delay, 2), batch=size)
        if self._stopping.is_set():
            return False  # shutting down with the database failing: leave the work to redelivery
        await asyncio.sleep(delay)
        return True

    async def _apply_traced(self, deliveries: list[Delivery]) -> bool:
        """_apply_with_retry in a span of its own (a batch belongs to many traces): linked to each event's span."""
        links = [
            link
            for d in deliveries
            if isinstance(d.parsed, IncomingEvent)
            and d.parsed.trace is not None
            and (link := tracing.link(d.parsed.trace.traceparent, d.parsed.trace.tracestate)) is not None
        ]
        with self.tracer.start_as_current_span(
            f"process {EVENTS_EXCHANGE}",
            context=tracing.start_context(None),  # a trace of its own: a batch holds many
            kind=tracing.span_kind("CONSUMER"),
            links=links,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": EVENTS_EXCHANGE,
                "messaging.batch.message_count": len(deliveries),
            },
        ) as span:
            applied = await self._apply_with_retry(deliveries)
            if not applied:
                span.set_status(tracing.error_status("the batch was not applied; it is redelivered"))
            return applied

    async def _apply_with_retry(self, deliveries: list[Delivery]) -> bool:
        delay = BACKOFF_START_S
        transient_failures = 0
        while True:
            try:
                report = await self.store.apply_deliveries(deliveries)
            except Exception as exc:
                if _retry_same(exc, transient_failures):
                    transient_failures += 0 if is_connection_error(exc) else 1
                    if not await self._backoff(exc, delay, "batch not applied; retrying", len(deliveries)):
                        return False
                    delay = min(BACKOFF_CAP_S, delay * 2)
                    continue
                log.error("batch failed; applying its messages one by one", error=repr(exc)[:300])
                for d in deliveries:
                    if not await self._apply_alone(d):
                        return False
                return True
            if not self.health.db_ok:
                log.info("database reachable again")
            self.health.db_recovered()
            self.metrics.record(report)
            return True

    async def _apply_alone(self, d: Delivery) -> bool:
        """One message the batch path could not apply: settle it alone, in a bounded number of tries.

        Each failure for a reason that is not transient takes the next, simpler form of the message:
          the event as it is  ->  a dead letter `internal_error` (original headers kept)
          a dead letter       ->  the same dead letter without the original headers
          without headers     ->  published raw to sfworkflow.dead from here, reason `unstorable`
        Transient failures retry the same form with backoff: without end while PostgreSQL is
        unreachable (nothing can be applied then, and nothing is lost), MAX_TRANSIENT_RETRIES times for
        the others (deadlocks, resources), after which they count as failures of that form.
        False only when the service stops before the message is settled (it is redelivered)."""
        delay = BACKOFF_START_S
        ctx = _context_of(d)
        transient_failures = 0
        tries = 0
        while True:
            tries += 1
            try:
                with structlog.contextvars.bound_contextvars(**ctx):
                    report = await self.store.apply_deliveries([d])
                self.metrics.record(report)
                return True
            except Exception as exc:
                if _retry_same(exc, transient_failures):
                    transient_failures += 0 if is_connection_error(exc) else 1
                    if not await self._backoff(exc, delay, "message not applied; retrying", 1):
                        return False
                    delay = min(BACKOFF_CAP_S, delay * 2)
                    continue
                transient_failures = 0
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
                if isinstance(d.parsed, IncomingEvent):
                    log.error("message dead-lettered after an internal error", error=error, **ctx)
                    d = replace(
                        d, parsed=Rejection(DeadReason.INTERNAL_ERROR, f"applying this message failed: {error}")
                    )
                elif d.headers and not d.headers.get(HEADERS_DROPPED):
                    log.error("dead letter cannot be written; retrying without headers", error=error, **ctx)
                    d = replace(d, headers={HEADERS_DROPPED: f"could not be stored: {type(exc).__name__}"})
                else:
                    log.error("dead letter cannot be stored; publishing it raw", error=error, tries=tries, **ctx)
                    return await self._publish_unstorable(d, error)

    async def _publish_unstorable(self, d: Delivery, error: str) -> bool:
        """The last resort for a message that cannot be stored even as a dead letter: publish its body
        to sfworkflow.dead from here (publisher confirms), reason `unstorable`, then it may be acked.
        Retried with backoff while RabbitMQ refuses; False when stopping first (it is redelivered)."""
        reason = d.parsed.reason if isinstance(d.parsed, Rejection) else DeadReason.INTERNAL_ERROR
        headers = unstorable_headers(d, reason, error)
        delay = BACKOFF_START_S
        while True:
            try:
                if self._dead_channel is None or self._dead_channel.is_closed:
                    self._dead_channel = await self.connection.channel(publisher_confirms=True)
                message = aio_pika.Message(
                    d.body,
                    headers=headers,
                    message_id=d.message_id,
                    content_type=_storable_or_none(d.content_type),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                await self._dead_channel.default_exchange.publish(message, routing_key=DEAD_QUEUE)
                self.metrics.dead.labels(str(DeadReason.UNSTORABLE)).inc()
                return True
            except Exception as exc:
                log.warning("unstorable message not published yet; retrying", error=repr(exc)[:200])
                if self._stopping.is_set():
                    return False
                await asyncio.sleep(delay)
                delay = min(BACKOFF_CAP_S, delay * 2)


class ShardBuffers:
    """One batch loop's buffers, one per event queue, filled by the channels' delivery callbacks."""

    def __init__(self, n: int) -> None:
        self.shards: list[deque[Received]] = [deque() for _ in range(n)]
        self.arrived = asyncio.Event()  # set by every delivery and by `end`
        self.ended = False  # set by `end`: nothing more arrives
        self._start = 0  # the shard a batch's remainder starts from, turned one on per batch

    def total(self) -> int:
        return sum(len(b) for b in self.shards)

    async def wait(self) -> bool:
        """Wait until something is buffered: True; False when the buffers ended empty."""
        while not any(self.shards):
            if self.ended:
                return False
            self.arrived.clear()
            await self.arrived.wait()
        return True

    def take(self, size: int) -> list[Received]:
        """The next batch: each buffer's fair share (core/admission.py), a prefix of it, in shard order."""
        shares = fair_shares([len(b) for b in self.shards], size, self._start)
        self._start = (self._start + 1) % max(1, len(self.shards))
        batch: list[Received] = []
        for buffer, n in zip(self.shards, shares, strict=True):
            batch.extend(buffer.popleft() for _ in range(n))
        return batch

    def end(self) -> None:
        self.ended = True
        self.arrived.set()


def _retry_same(exc: BaseException, transient_failures: int) -> bool:
    """Whether to retry the same work after `exc`: always while PostgreSQL is unreachable (nothing can
    be applied, nothing is lost), MAX_TRANSIENT_RETRIES times after other transient errors, never else."""
    return is_transient(exc) and (is_connection_error(exc) or transient_failures < MAX_TRANSIENT_RETRIES)


def unstorable_headers(d: Delivery, reason: DeadReason, error: str) -> dict[str, Any]:
    """The headers of a message published raw to sfworkflow.dead: the reason `unstorable`, what the
    message was rejected for first, and why it could not be stored; every text cleaned (storable.py)."""
    routing_key, _ = clean_text(d.routing_key[:255])
    detail, _ = clean_text(
        f"this message could not be stored even as a dead letter ({error[:300]}); it was first rejected as "
        f"{reason}: {d.parsed.detail if isinstance(d.parsed, Rejection) else 'applying it failed'}"
    )
    return dict(
        dead_letter_headers(
            str(DeadReason.UNSTORABLE), detail[:1500], routing_key=routing_key, exchange=clean_text(d.exchange)[0],
            content_type=_storable_or_none(d.content_type), message_id=_storable_or_none(d.message_id),
            first_reason=str(reason),
        )
    )  # fmt: skip


def _storable_or_none(text: str | None) -> str | None:
    return None if text is None else clean_text(text[:255])[0]


def _context_of(d: Delivery) -> dict[str, str]:
    """The ids bound to every log line about this message."""
    e = d.parsed
    if isinstance(e, IncomingEvent):
        ids = {"tenant_id": e.tenant_id, "workflow": e.workflow, "entity_id": e.entity_id, "event_id": e.event_id}
        if e.correlation_id is not None:
            ids["correlation_id"] = e.correlation_id
        if e.trace is not None:
            ids["trace_id"] = e.trace.trace_id
        return ids
    return {"message_id": d.message_id or "", "routing_key": d.routing_key[:200]}


def json_safe_headers(headers: dict[str, Any] | None) -> tuple[dict[str, Any], int]:
    """AMQP headers as JSON-able values PostgreSQL can store (bytes become text or base64), bounded in
    size; and how many characters were replaced with U+FFFD to make them storable (storable.py)."""
    if not headers:
        return {}, 0
    out, replaced = clean_json({str(k)[:200]: _safe(v, 0) for k, v in list(headers.items())[:64]})
    if len(repr(out)) > MAX_HEADER_BYTES:
        return {HEADERS_DROPPED: f"{len(headers)} headers over {MAX_HEADER_BYTES} bytes"}, 0
    return out, replaced


def _safe(v: Any, depth: int) -> Any:
    if depth > 4:
        return "<nested too deep>"
    if v is None or isinstance(v, bool | int | float | str):
        return v[:2000] if isinstance(v, str) else v
    if isinstance(v, bytes | bytearray | memoryview):
        b = bytes(v)[:2000]
        try:
            return b.decode()
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(b).decode()
    if isinstance(v, dict):
        return {str(k)[:200]: _safe(x, depth + 1) for k, x in list(v.items())[:64]}
    if isinstance(v, list | tuple):
        return [_safe(x, depth + 1) for x in list(v)[:64]]
    return str(v)[:200]
