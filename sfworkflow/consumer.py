"""The event consumer: deliveries from `sfworkflow.events`, applied in micro-batches, acked after commit.

Each consumer channel has its own buffer and applies one batch at a time, so one
`basic.ack(multiple=True)` on the batch's last delivery tag acks exactly that batch. A batch whose
transaction fails for a transient reason (PostgreSQL down, deadlock) is retried with backoff and
nothing is acked meanwhile; prefetch then stops the broker from sending more. A batch failing for
any other reason is split and applied message by message, so one bad message cannot fail its
neighbours.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from sfworkflow.db import is_connection_error, is_transient
from sfworkflow.envelope import EventParser, IncomingEvent
from sfworkflow.errors import DeadReason, Rejection
from sfworkflow.faults import fault_point
from sfworkflow.metrics import Metrics
from sfworkflow.settings import Settings
from sfworkflow.store import Delivery, Store
from sfworkflow.topology import EVENTS_QUEUE

log = structlog.get_logger("sfworkflow.consumer")

BACKOFF_START_S = 0.2
BACKOFF_CAP_S = 5.0
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
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.store = store
        self.parser = parser
        self.metrics = metrics
        self.health = health
        self._channels: list[tuple[AbstractChannel, AbstractQueue, str]] = []
        self._buffers: list[asyncio.Queue[AbstractIncomingMessage | None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        for i in range(self.settings.consumers):
            buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
            channel = await self.connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.settings.prefetch)
            queue = await channel.get_queue(EVENTS_QUEUE, ensure=True)
            tag = await queue.consume(buffer.put, no_ack=False)
            self._channels.append((channel, queue, tag))
            self._buffers.append(buffer)
            self._tasks.append(asyncio.create_task(self._batch_loop(buffer), name=f"sfworkflow-consumer-{i}"))
        self.health.consuming = True
        log.info("consuming", queue=EVENTS_QUEUE, consumers=self.settings.consumers, prefetch=self.settings.prefetch)

    async def stop(self, timeout: float) -> None:
        """Stop taking deliveries, apply and ack what was already delivered, then close the channels."""
        self.health.consuming = False
        for _channel, queue, tag in self._channels:
            try:
                await queue.cancel(tag)
            except Exception as exc:  # channel already gone: its deliveries come back to the queue
                log.info("cancel failed", error=type(exc).__name__)
        self._stopping.set()
        for buffer in self._buffers:
            buffer.put_nowait(None)  # after cancel-ok nothing more arrives: this is the end of the buffer
        deadline = time.monotonic() + timeout
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, max(0.1, deadline - time.monotonic()))
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
        for channel, _q, _t in self._channels:
            if not channel.is_closed:
                try:
                    await channel.close()
                except Exception:
                    pass

    async def _batch_loop(self, buffer: asyncio.Queue[AbstractIncomingMessage | None]) -> None:
        """Take what is buffered (up to a batch), linger briefly for more, apply; until the stop sentinel."""
        size = self.settings.batch_size
        linger = self.settings.batch_linger_ms / 1000.0
        ended = False
        while not ended:
            first = await buffer.get()
            if first is None:
                return
            batch = [first]
            ended = self._drain(buffer, batch, size)
            if not ended and len(batch) < size and linger > 0:
                await asyncio.sleep(linger)
                ended = self._drain(buffer, batch, size)
            if not await self._process(batch):
                # Not applied (stopping while PostgreSQL is down): acking any later batch with
                # multiple=True would ack this one too. Stop here; the broker redelivers the rest.
                return

    @staticmethod
    def _drain(
        buffer: asyncio.Queue[AbstractIncomingMessage | None], batch: list[AbstractIncomingMessage], size: int
    ) -> bool:
        """Move buffered deliveries into `batch`; True when the stop sentinel was reached."""
        while len(batch) < size:
            try:
                m = buffer.get_nowait()
            except asyncio.QueueEmpty:
                return False
            if m is None:
                return True
            batch.append(m)
        return False

    def _delivery(self, m: AbstractIncomingMessage) -> Delivery:
        try:
            parsed: IncomingEvent | Rejection = self.parser.parse(m.body, m.content_type)
        except Exception as exc:  # never let one message stop the consumer: dead-letter it, say why
            log.error("parsing a message raised", error=repr(exc)[:300])
            parsed = Rejection(DeadReason.INTERNAL_ERROR, f"parsing raised {type(exc).__name__}: {str(exc)[:200]}")
        return Delivery(
            parsed=parsed,
            body=m.body,
            headers=json_safe_headers(m.headers),
            routing_key=m.routing_key or "",
            exchange=m.exchange or "",
            content_type=m.content_type,
            message_id=m.message_id,
        )

    async def _process(self, batch: list[AbstractIncomingMessage]) -> bool:
        """Apply a batch and ack it after commit; False when it could not be applied (nothing acked)."""
        started = time.perf_counter()
        deliveries = [self._delivery(m) for m in batch]
        if not await self._apply_with_retry(deliveries):
            return False
        fault_point("after_commit_before_ack")
        committed = datetime.now(UTC)
        await _ack(batch)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        observe = self.metrics.event_age.observe
        for d in deliveries:
            if isinstance(d.parsed, IncomingEvent):
                observe(max(0.0, (committed - d.parsed.timestamp).total_seconds()))
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

    async def _apply_with_retry(self, deliveries: list[Delivery]) -> bool:
        delay = BACKOFF_START_S
        while True:
            try:
                report = await self.store.apply_deliveries(deliveries)
            except Exception as exc:
                if is_transient(exc):
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
        """One message the batch path could not apply: apply it alone, or dead-letter it.

        A message that fails alone for a reason that is not transient is dead-lettered
        `internal_error`; if even its dead letter cannot be written, it is written without its headers
        (they are what a producer controls beyond the body, which is stored as bytes)."""
        delay = BACKOFF_START_S
        ctx = _context_of(d)
        while True:
            try:
                with structlog.contextvars.bound_contextvars(**ctx):
                    report = await self.store.apply_deliveries([d])
                self.metrics.record(report)
                return True
            except Exception as exc:
                if is_transient(exc):
                    if not await self._backoff(exc, delay, "message not applied; retrying", 1):
                        return False
                    delay = min(BACKOFF_CAP_S, delay * 2)
                    continue
                if isinstance(d.parsed, Rejection):
                    if d.headers:
                        log.error(
                            "dead letter cannot be written; retrying without headers", error=repr(exc)[:300], **ctx
                        )
                        dropped = {"x-sfworkflow-headers-dropped": f"could not be stored: {type(exc).__name__}"}
                        d = replace(d, headers=dropped)
                        continue
                    log.error("dead letter cannot be written; retrying", error=repr(exc)[:300], **ctx)
                    if not await self._backoff(exc, delay, "dead letter not written; retrying", 1):
                        return False
                    delay = min(BACKOFF_CAP_S, delay * 2)
                    continue
                detail = f"applying this message failed: {type(exc).__name__}: {str(exc)[:300]}"
                log.error("message dead-lettered after an internal error", error=detail, **ctx)
                d = replace(d, parsed=Rejection(DeadReason.INTERNAL_ERROR, detail))


def _context_of(d: Delivery) -> dict[str, str]:
    """The ids bound to every log line about this message."""
    e = d.parsed
    if isinstance(e, IncomingEvent):
        return {"tenant_id": e.tenant_id, "workflow": e.workflow, "entity_id": e.entity_id, "event_id": e.event_id}
    return {"message_id": d.message_id or "", "routing_key": d.routing_key[:200]}


async def _ack(batch: Sequence[AbstractIncomingMessage]) -> None:
    """Ack the batch: one multiple-ack per channel, on the last delivery from that channel."""
    last: dict[int, AbstractIncomingMessage] = {}
    for m in batch:
        try:
            last[id(m.channel)] = m
        except Exception:  # the channel closed; the broker redelivers, the inbox drops the duplicate
            continue
    for m in last.values():
        try:
            await m.ack(multiple=True)
        except Exception as exc:
            log.info("ack failed; the batch will be redelivered and dropped as duplicates", error=type(exc).__name__)


def json_safe_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """AMQP headers as JSON-able values (bytes become text or base64), bounded in size."""
    if not headers:
        return {}
    out = {_key(k): _safe(v, 0) for k, v in list(headers.items())[:64]}
    if len(repr(out)) > MAX_HEADER_BYTES:
        return {"x-sfworkflow-headers-dropped": f"{len(headers)} headers over {MAX_HEADER_BYTES} bytes"}
    return out


def _key(k: Any) -> str:
    return str(k)[:200].replace("\x00", "\ufffd")


def _safe(v: Any, depth: int) -> Any:
    if depth > 4:
        return "<nested too deep>"
    if v is None or isinstance(v, bool | int | float):
        return v
    if isinstance(v, str):
        return v[:2000].replace("\x00", "\ufffd")  # PostgreSQL jsonb cannot hold NUL
    if isinstance(v, bytes | bytearray | memoryview):
        b = bytes(v)[:2000]
        try:
            return b.decode().replace("\x00", "\ufffd")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(b).decode()
    if isinstance(v, dict):
        return {_key(k): _safe(x, depth + 1) for k, x in list(v.items())[:64]}
    if isinstance(v, list | tuple):
        return [_safe(x, depth + 1) for x in list(v)[:64]]
    return str(v)[:200].replace("\x00", "\ufffd")
