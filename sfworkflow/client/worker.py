"""A worker SDK for SalesFlow's side: one async function per command type, everything else built in.

    worker = CommandWorker(AMQP_URL, store=await PostgresDedupe.open(DATABASE_URL), source="salesflow.messaging")

    @worker.handler("sequence.send_step", failure="sequence.step_failed")
    async def send_step(cmd: Command) -> Answer:
        sent = await provider.send(cmd.data["recipient"], cmd.data["template_id"],
                                   idempotency_key=cmd.idempotency_key)
        return cmd.answer("sequence.step_sent", {"step": cmd.data["step"], "provider_message_id": sent.id})

    await worker.run()  # until SIGTERM / SIGINT, then drains what it holds

For every delivery, in this order (a crash anywhere loses nothing and executes nothing twice that can be kept
from it; client/dedupe.py says why):

1. read and validate the command against its envelope and data schemas (`schemas/`); a command that fails, or
   one this worker has no handler for, is dead-lettered to `sfworkflow.dead` with a reason code
   (WorkerDeadReason) and acked: never lost, never retried forever, never blocking the queue;
2. claim its `command_id` in the dedupe store; a command answered before is answered again from the store
   (its recorded events, the same event ids) without running the handler;
3. run the handler (at most `concurrency` at once, each within `handler_timeout_s`), structlog's context bound
   to the command for the rest of its delivery (command_id, command_type, tenant_id, entity_id, correlation_id,
   attempt, trace_id);
4. map an exception to the declared failure event (`failure=`) by the FailurePolicy: `Retryable` / `Fatal`
   (with an error code) say it themselves, declared exception types are retryable or fatal, anything else is
   retryable by default (sfworkflow bounds the retries). A handler without a failure event that fails
   retryably is redelivered with a back-off up to `max_redeliveries` times, then dead-lettered;
5. validate the answers, record them in the store, publish them with publisher confirms, and only then ack.

Answers are built from the command (`Command.answer`): tenant and entity, `causation_id` = the command's id,
its `correlation_id`, its `attempt` echoed when the event has an `attempt` field, and an event id derived
from the command id, so that even a command executed twice (a worker that died mid-handler) answers with the
same event ids and sfworkflow applies the answer once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aio_pika
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sfworkflow.client import amqp, memory, tracing
from sfworkflow.client.dedupe import DedupeStore, MemoryDedupe, PostgresDedupe
from sfworkflow.client.producer import build_event, validate_event
from sfworkflow.contract import headers as wire
from sfworkflow.contract import schemas
from sfworkflow.contract.ids import uuid5_text
from sfworkflow.contract.topology import (
    DEAD_QUEUE,
    DEFAULT_EXCHANGE,
    EVENTS_EXCHANGE,
    commands_queue,
    compensations_queue,
)
from sfworkflow.contract.tracing import TRACEPARENT, TRACESTATE
from sfworkflow.errors import InvalidEvent

__all__ = [
    "Answer", "Command", "CommandFailed", "CommandWorker", "DedupeStore", "FailurePolicy", "Fatal", "MemoryDedupe",
    "PostgresDedupe", "Retryable", "WorkerDeadReason",
]  # fmt: skip

log = structlog.get_logger("sfworkflow.worker")

Answer = dict[str, Any]  # an event envelope (client/producer.build_event), made by Command.answer
Handler = Callable[["Command"], Awaitable[Answer | Sequence[Answer] | None]]

ANSWER_NAMESPACE = uuid.UUID("5d1f4a3c-7e0b-4c1e-9a57-2f6b8c0d9e41")  # answers' event ids derive from it
_ANSWER_NAMESPACE_BYTES = ANSWER_NAMESPACE.bytes
MAX_DETAIL = 500  # characters of an exception kept in a failure event's message or a dead letter's detail


class WorkerDeadReason(StrEnum):
    """Reason codes (`x-sfworkflow-reason`) of the commands a worker dead-letters to `sfworkflow.dead`."""

    INVALID_COMMAND = "invalid_command"  # not JSON, or fails the command envelope or its data schema
    NO_HANDLER = "no_handler"  # this worker has no handler for the command type
    HANDLER_FAILED = "handler_failed"  # fatal, or still failing after max_redeliveries; no failure event declared
    INVALID_ANSWER = "invalid_answer"  # the handler's answer fails its event schema (a bug in the handler)


class CommandFailed(Exception):
    """Raise from a handler to answer with the declared failure event: an error code, retryable or not."""

    retryable = False

    def __init__(self, error_code: str, message: str = "") -> None:
        super().__init__(message or error_code)
        self.error_code = error_code
        self.message = message


class Retryable(CommandFailed):
    """A failure worth retrying (the provider timed out, rate-limited): sfworkflow issues the command again."""

    retryable = True


class Fatal(CommandFailed):
    """A failure retrying cannot fix (rejected template, no consent): sfworkflow moves on as its workflow says."""

    retryable = False


@dataclass(frozen=True)
class FailurePolicy:
    """Which exceptions a handler raises are worth a retry. CommandFailed says it itself; then `fatal`, then
    `retryable` (matched with isinstance, in that order); anything else is `otherwise_retryable`."""

    retryable: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError)
    fatal: tuple[type[BaseException], ...] = ()
    otherwise_retryable: bool = True
    error_code: str = "worker_error"  # the error code of an exception that is not a CommandFailed

    def classify(self, exc: BaseException) -> tuple[str, bool, str]:
        """(error_code, retryable, message) of a handler's exception."""
        if isinstance(exc, CommandFailed):
            return exc.error_code, exc.retryable, exc.message
        message = f"{type(exc).__name__}: {exc}"[:MAX_DETAIL]
        if isinstance(exc, self.fatal):
            return self.error_code, False, message
        if isinstance(exc, self.retryable):
            return self.error_code, True, message
        return self.error_code, self.otherwise_retryable, message


@dataclass(frozen=True)
class Command:
    """One command as delivered (the envelope of schemas/envelope/command.v1.json, read-only)."""

    envelope: dict[str, Any]
    source: str  # the worker's: the `source` of the answers it builds
    schema_set: schemas.SchemaSet = field(repr=False)
    # W3C trace context to pass on to what the handler calls (an HTTP request's `traceparent` and `tracestate`
    # headers): the worker's span when OpenTelemetry is configured, else the command's own headers; {} when the
    # command came without. Its answers are published with them.
    trace_headers: dict[str, str] = field(default_factory=dict)

    @property
    def traceparent(self) -> str | None:
        return self.trace_headers.get(TRACEPARENT)

    @property
    def trace_id(self) -> str | None:
        """The trace this command belongs to (the event that caused it, or its instance's)."""
        value = self.envelope.get("trace_id")
        return None if value is None else str(value)

    @property
    def command_id(self) -> str:
        return str(self.envelope["command_id"])

    @property
    def command_type(self) -> str:
        return str(self.envelope["command_type"])

    @property
    def tenant_id(self) -> str:
        return str(self.envelope["tenant_id"])

    @property
    def entity_id(self) -> str:
        return str(self.envelope["entity_id"])

    @property
    def workflow(self) -> str:
        return str(self.envelope["workflow"])

    @property
    def idempotency_key(self) -> str:
        """The same across retries of the same command: pass it to the provider that carries the effect out."""
        return str(self.envelope["idempotency_key"])

    @property
    def attempt(self) -> int:
        return int(self.envelope["attempt"])

    @property
    def kind(self) -> str:
        """ "command", or "compensation" for a command that undoes or mitigates."""
        return str(self.envelope["kind"])

    @property
    def correlation_id(self) -> str | None:
        value = self.envelope.get("correlation_id")
        return None if value is None else str(value)

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.envelope["data"]
        return data

    def answer(self, event_type: str, data: dict[str, Any], *, n: int = 0) -> Answer:
        """The event answering this command: causation = this command, its correlation id, its attempt echoed
        when the event has an `attempt` field, and an event id derived from (command id, event type, `n`): the
        same answer built again (a redelivery executed again) has the same id, so sfworkflow applies it once."""
        data = dict(data)
        if "attempt" not in data and "attempt" in self._event_fields(event_type):
            data["attempt"] = self.attempt
        return build_event(
            event_type,
            tenant_id=self.tenant_id,
            entity_id=self.entity_id,
            data=data,
            source=self.source,
            actor_type="worker",
            event_id=uuid5_text(_ANSWER_NAMESPACE_BYTES, f"{self.command_id}/{event_type}/{n}"),
            correlation_id=self.correlation_id,
            causation_id=self.command_id,
            trace_id=self.envelope.get("trace_id"),
        )

    def failure(self, event_type: str, error_code: str, retryable: bool, message: str = "") -> Answer:
        """The declared failure event: error_code, retryable and message, plus every field of the event that the
        command's data has under the same name (e.g. `step` of send_step into step_failed)."""
        fields = self._event_fields(event_type)
        data = {k: v for k, v in self.data.items() if k in fields}
        data.update(error_code=error_code, retryable=retryable)
        if message and "message" in fields:
            data["message"] = message[:MAX_DETAIL]
        return self.answer(event_type, data)

    def _event_fields(self, event_type: str) -> set[str]:
        raw = self.schema_set.raw.get(("events", event_type, 1), {})
        return set(raw.get("properties", {}))


@dataclass(frozen=True)
class Registration:
    handler: Handler
    failure: str | None  # the event type that reports the command failed, when the workflow has one


class WorkerMetrics:
    """The worker's Prometheus metrics, on the registry given (serve it with prometheus_client)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "sfworkflow_worker_commands",
            "Commands taken, by type and outcome: answered, failed (answered with the failure event), repeated "
            "(answered again from the dedupe store), dead_lettered, redelivered (handed back to the broker).",
            ["command_type", "outcome"],
            registry=registry,
        )
        self.handler_seconds = Histogram(
            "sfworkflow_worker_handler_seconds",
            "Time a handler took, by command type.",
            ["command_type"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=registry,
        )
        self.in_flight = Gauge("sfworkflow_worker_in_flight", "Commands being handled now.", registry=registry)


class CommandWorker:
    """Consumes sfworkflow's command and compensation queues of the workflows it has handlers for."""

    def __init__(
        self,
        amqp_url: str,
        *,
        store: DedupeStore,
        source: str,
        prefetch: int = 32,
        concurrency: int = 8,
        handler_timeout_s: float = 120.0,
        policy: FailurePolicy | None = None,
        max_redeliveries: int = 5,
        registry: CollectorRegistry | None = None,
        schema_set: schemas.SchemaSet | None = None,
        tracer_provider: Any = None,
    ) -> None:
        """`tracer_provider`: OpenTelemetry's, for a span per command (default: the global one, when the
        application set one; without, no spans and no cost, client/tracing.py)."""
        if concurrency < 1 or prefetch < concurrency:
            raise ValueError(f"need 1 <= concurrency <= prefetch, got concurrency={concurrency} prefetch={prefetch}")
        self.amqp_url = amqp_url
        self.store = store
        self.source = source
        self.prefetch = prefetch
        self.concurrency = concurrency
        self.handler_timeout_s = handler_timeout_s
        self.policy = policy or FailurePolicy()
        self.max_redeliveries = max_redeliveries
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.schemas = schema_set or schemas.default()
        self.tracer = tracing.tracer(tracer_provider)
        self.handlers: dict[str, Registration] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._connection: AbstractRobustConnection | None = None
        self._consuming: list[tuple[AbstractQueue, str]] = []
        self._publish_channel: AbstractRobustChannel | None = None
        self._outgoing: list[tuple[list[amqp.Outgoing], asyncio.Future[list[object]]]] = []  # for the next wave
        self._waves: set[asyncio.Future[None]] = set()
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()  # (command_type, outcome)
        self.worker_id = str(uuid.uuid4())  # this process's claims in the dedupe store
        self._executing: set[str] = set()  # command ids whose handling runs in this process now
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- declaring handlers ---------------------------------------------------------------------------------
    def handler(self, command_type: str, *, failure: str | None = None) -> Callable[[Handler], Handler]:
        """Register the decorated async function as the handler of `command_type`; `failure`: the event type
        that reports this command failed (e.g. "sequence.step_failed" for "sequence.send_step")."""
        if command_type not in self.schemas.names("commands"):
            raise ValueError(f"unknown command type {command_type!r}: it has no schema in {self.schemas.root}/commands")
        if failure is not None and failure not in self.schemas.names("events"):
            raise ValueError(f"unknown failure event {failure!r}: it has no schema in {self.schemas.root}/events")
        if command_type in self.handlers:
            raise ValueError(f"{command_type!r} has a handler already")

        def register(fn: Handler) -> Handler:
            self.handlers[command_type] = Registration(fn, failure)
            return fn

        return register

    # ---- running --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and consume the command and compensation queues of every workflow with a handler. The queues
        are sfworkflow's (it declares them when it starts): a missing one is an error that says so."""
        if not self.handlers:
            raise RuntimeError("no handlers registered: decorate a function with @worker.handler(COMMAND_TYPE)")
        self._connection = await amqp.connect_robust(self.amqp_url)
        publish = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        assert isinstance(publish, AbstractRobustChannel)
        self._publish_channel = publish
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        workflows = sorted({t.split(".", 1)[0] for t in self.handlers})
        for w in workflows:
            known = self.schemas.names("commands")
            missing = sorted(t for t in known if t.startswith(w + ".") and t not in self.handlers)
            if missing:
                log.warning("no handler for some command types; such commands will be dead-lettered no_handler",
                            workflow=w, command_types=missing)  # fmt: skip
            for name in (commands_queue(w), compensations_queue(w)):
                try:
                    queue = await channel.get_queue(name, ensure=True)
                except aio_pika.exceptions.ChannelClosed as exc:
                    raise RuntimeError(
                        f"queue {name} does not exist: start sfworkflow once (it declares its queues), "
                        f"or check the workflow name {w!r}"
                    ) from exc
                tag = await queue.consume(self._on_message)
                self._consuming.append((queue, tag))
        log.info("worker consuming", workflows=workflows, prefetch=self.prefetch, concurrency=self.concurrency)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop taking commands, let the ones being handled finish (up to `timeout_s`; what is left unacked is
        redelivered), then close."""
        for queue, tag in self._consuming:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consuming.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        await self.store.close()

    async def run(self) -> None:
        """start(), then run until SIGTERM or SIGINT, then stop(). It owns its process: once started it tunes the
        garbage collector for a long-running process (client/memory.py), as the service does."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        memory.settle_heap()
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    # ---- one delivery ---------------------------------------------------------------------------------------
    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._in_flight += 1
        self._idle.clear()
        try:
            async with self._slots:
                self.metrics.in_flight.inc()
                try:
                    await self._take(message)
                finally:
                    self.metrics.in_flight.dec()
        except Exception as exc:  # the store or the broker failed midway: hand it back for a redelivery
            log.warning("command not finished; handed back to the broker", error=repr(exc)[:300])
            await asyncio.sleep(1.0)  # not a hot loop while PostgreSQL or RabbitMQ is away
            with contextlib.suppress(Exception):  # on a closed channel the broker redelivers it anyway
                await message.nack(requeue=True)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _take(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            await self._dead_letter(message, WorkerDeadReason.INVALID_COMMAND, "the body is not UTF-8 JSON", "?")
            return
        errors = self._errors(envelope)
        command_type = str(envelope.get("command_type", "?")) if isinstance(envelope, dict) else "?"
        if errors:
            await self._dead_letter(message, WorkerDeadReason.INVALID_COMMAND, "; ".join(errors), command_type)
            return
        registration = self.handlers.get(command_type)
        if registration is None:
            detail = f"this worker has no handler for {command_type}; register one with @worker.handler"
            await self._dead_letter(message, WorkerDeadReason.NO_HANDLER, detail, command_type)
            return
        cmd = Command(envelope, self.source, self.schemas, tracing.incoming(message.headers))
        if cmd.command_id in self._executing:  # a copy redelivered while this process still handles it
            await asyncio.sleep(1.0)
            await message.nack(requeue=True)
            self._count(command_type, "redelivered")
            return
        self._executing.add(cmd.command_id)
        try:
            await self._bound(message, cmd, registration)
        finally:
            self._executing.discard(cmd.command_id)

    async def _bound(self, message: AbstractIncomingMessage, cmd: Command, registration: Registration) -> None:
        # Each delivery is handled in a task of its own (aio-pika's consumer starts one per message), whose
        # context is a copy that ends with it: the command's log context is bound once and needs no undoing
        # (structlog's bound_contextvars, which saves and restores every variable, cost 3x as much per command).
        structlog.contextvars.bind_contextvars(
            command_id=cmd.command_id, command_type=cmd.command_type, tenant_id=cmd.tenant_id, entity_id=cmd.entity_id,
            correlation_id=cmd.correlation_id, attempt=cmd.attempt, trace_id=cmd.trace_id,
        )  # fmt: skip
        if self.tracer is None:
            await self._handle(message, cmd, registration)
            return
        parent = tracing.parent_context(cmd.traceparent, cmd.trace_headers.get(TRACESTATE))
        with self.tracer.start_as_current_span(
            f"process {message.routing_key}",
            context=tracing.start_context(parent),
            kind=tracing.span_kind("CONSUMER"),
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": message.exchange or "",
                "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
                "messaging.message.id": cmd.command_id,
                "sfworkflow.command.attempt": cmd.attempt,
            },
        ) as span:
            # The handler runs in this span (its own spans are children); the answers name it as their parent,
            # unless the command came without trace context: a span of a new trace must not become its trace.
            if parent is not None:
                cmd = dataclasses.replace(cmd, trace_headers=tracing.headers_of(span))
            await self._handle(message, cmd, registration)

    def _errors(self, envelope: Any) -> list[str]:
        if not isinstance(envelope, dict):
            return ["<root>: not a JSON object"]
        errors = self.schemas.errors("envelope", "command", envelope)
        if errors:
            return errors
        return self.schemas.errors("commands", envelope["command_type"], envelope["data"])

    async def _handle(self, message: AbstractIncomingMessage, cmd: Command, registration: Registration) -> None:
        claim = await self.store.claim(cmd.command_id, cmd.command_type, self.handler_timeout_s + 30.0, self.worker_id)
        if claim.answers is not None:
            await self._publish(claim.answers, cmd.trace_headers)
            await message.ack()
            self._count(cmd.command_type, "repeated")
            log.info("command answered before; its answers published again", answers=len(claim.answers))
            return
        if not claim.claimed:  # another worker is executing it right now: hand it back for later
            await asyncio.sleep(min(claim.held_s, 1.0))
            await message.nack(requeue=True)
            self._count(cmd.command_type, "redelivered")
            return
        outcome = "answered"
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.handler_timeout_s):
                result = await registration.handler(cmd)
            answers = _as_list(result)
        except asyncio.CancelledError:  # stopped mid-handler: a redelivery may execute it at once
            with contextlib.suppress(Exception):
                await self.store.release(cmd.command_id)
            raise
        except Exception as exc:
            error_code, retryable, text = self.policy.classify(exc)
            log.warning("handler failed", error_code=error_code, retryable=retryable, error=text)
            if registration.failure is None:
                await self.store.release(cmd.command_id)
                await self._without_failure_event(message, cmd, retryable, text)
                return
            answers = [cmd.failure(registration.failure, error_code, retryable, text)]
            outcome = "failed"
        finally:
            self.metrics.handler_seconds.labels(cmd.command_type).observe(time.monotonic() - started)
        self._checkpoint("executed")
        try:
            for a in answers:
                validate_event(a, self.schemas)
        except InvalidEvent as exc:
            await self.store.release(cmd.command_id)
            await self._dead_letter(message, WorkerDeadReason.INVALID_ANSWER, str(exc), cmd.command_type)
            return
        stored = await self.store.record(cmd.command_id, answers)
        self._checkpoint("recorded")
        await self._publish(stored, cmd.trace_headers)
        self._checkpoint("published")
        await message.ack()
        self._count(cmd.command_type, outcome)

    async def _without_failure_event(
        self, message: AbstractIncomingMessage, cmd: Command, retryable: bool, text: str
    ) -> None:
        """A handler without a failure event failed: redeliver it with a back-off while that may help, else
        dead-letter it (`sfworkflow dead-letters redrive` re-publishes it once the cause is fixed)."""
        deliveries = _delivery_count(message)
        if retryable and deliveries < self.max_redeliveries:
            await asyncio.sleep(min(30.0, 0.5 * 2**deliveries))
            await message.nack(requeue=True)
            self._count(cmd.command_type, "redelivered")
            return
        why = "fatal" if not retryable else f"still failing after {deliveries + 1} deliveries"
        await self._dead_letter(message, WorkerDeadReason.HANDLER_FAILED, f"{why}: {text}", cmd.command_type)

    def _count(self, command_type: str, outcome: str) -> None:
        self.outcomes[(command_type, outcome)] += 1
        self.metrics.commands.labels(command_type, outcome).inc()

    def _checkpoint(self, name: str) -> None:
        """A named point of a delivery's handling (executed, recorded, published): tests stop a worker here."""

    # ---- publishing -----------------------------------------------------------------------------------------
    async def _publish(self, answers: Sequence[Answer], trace_headers: Mapping[str, str]) -> None:
        """Publish answers in order with confirms, with the command's trace context; raises unless the broker
        confirmed every one."""
        if not answers:
            return
        batch = [
            amqp.Outgoing(
                orjson.dumps(a), EVENTS_EXCHANGE, a["event_type"], True,
                Basic.Properties(content_type="application/json", delivery_mode=amqp.PERSISTENT,
                                 message_id=a["event_id"], app_id=self.source,
                                 headers={**trace_headers, **wire.event_headers(a)}),
            )
            for a in answers
        ]  # fmt: skip
        await self._confirmed(batch)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: WorkerDeadReason, detail: str, command_type: str
    ) -> None:
        """Copy the command to sfworkflow.dead with the reason, confirmed, then ack it."""
        log.error("command dead-lettered", reason=str(reason), detail=detail[:MAX_DETAIL], command_type=command_type)
        headers = dict(message.headers or {})
        headers.update(
            wire.dead_letter_headers(
                str(reason), detail[:MAX_DETAIL], routing_key=message.routing_key or "",
                exchange=message.exchange or "", content_type=message.content_type, message_id=message.message_id,
            )
        )  # fmt: skip
        properties = Basic.Properties(
            content_type=message.content_type, delivery_mode=amqp.PERSISTENT,
            message_id=message.message_id or str(uuid.uuid4()), headers=headers, app_id=self.source,
        )  # fmt: skip
        await self._confirmed([amqp.Outgoing(message.body, DEFAULT_EXCHANGE, DEAD_QUEUE, True, properties)])
        await message.ack()
        self._count(command_type, "dead_lettered")

    async def _confirmed(self, batch: list[amqp.Outgoing]) -> None:
        """Publish `batch` in order and return once the broker confirmed every message of it; raise otherwise.
        What the handlers of one turn of the event loop publish goes out together (one write, one lock), each
        handler waiting for its own messages' confirms: with many commands in flight a publish per command was
        a fifth of the worker's CPU."""
        assert self._publish_channel is not None, "start() first"
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[object]] = loop.create_future()
        self._outgoing.append((batch, done))
        if len(self._outgoing) == 1:
            loop.call_soon(self._publish_together)
        for outcome in await done:
            if isinstance(outcome, BaseException):
                raise outcome
            if not isinstance(outcome, Basic.Ack):
                raise RuntimeError(f"the broker did not confirm a message: {outcome!r}")

    def _publish_together(self) -> None:
        taken, self._outgoing = self._outgoing, []
        task = asyncio.ensure_future(self._publish_wave(taken))
        self._waves.add(task)
        task.add_done_callback(self._waves.discard)

    async def _publish_wave(self, taken: list[tuple[list[amqp.Outgoing], asyncio.Future[list[object]]]]) -> None:
        assert self._publish_channel is not None
        try:
            channel = await self._publish_channel.get_underlay_channel()
            outcomes = await amqp.publish_many(channel, [m for batch, _ in taken for m in batch])
        except Exception as exc:
            for _, done in taken:
                if not done.done():
                    done.set_exception(exc)
            return
        i = 0
        for batch, done in taken:
            if not done.done():
                done.set_result(outcomes[i : i + len(batch)])
            i += len(batch)


def _as_list(result: Answer | Sequence[Answer] | None) -> list[Answer]:
    if result is None:
        return []
    if isinstance(result, dict):
        return [result]
    return list(result)


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """Deliveries before this one: a quorum queue's x-delivery-count; a classic queue only says redelivered."""
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int):
        return count
    return 1 if message.redelivered else 0
