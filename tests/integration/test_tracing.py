"""Trace propagation end to end, against the real service, PostgreSQL and RabbitMQ: one enrollment is one trace from
the producer's span to the worker's answer (spans read from OpenTelemetry's in-memory exporter), and without
OpenTelemetry the trace still travels in `traceparent` headers, envelopes and the history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sfworkflow.client.worker import Answer, Command, CommandWorker, PostgresDedupe
from sfworkflow.contract.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE, LIFECYCLE_EXCHANGE
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import TENANT, Amqp, enrolled_data, event, running_service

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresDedupe]:
    s = await PostgresDedupe.open(database_url)
    yield s
    await s.close()


def _recording() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider of the test's own (the process's global one stays unset), its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _worker(settings: Settings, store: PostgresDedupe, seen: list[Any], **kw: Any) -> CommandWorker:
    worker = CommandWorker(settings.amqp_url, store=store, source="tests.worker", **kw)

    @worker.handler("sequence.send_step", failure="sequence.step_failed")
    async def send_step(cmd: Command) -> Answer:
        seen.append((otel_trace.get_current_span().get_span_context(), cmd.trace_id, cmd.traceparent))
        return cmd.answer("sequence.step_sent", {"step": cmd.data["step"], "provider_message_id": "p-1"})

    return worker


async def _settled(pg: asyncpg.Connection, entity: str) -> bool:
    """Completed, and every message it queued published (so the relay's spans have ended)."""
    return bool(
        await pg.fetchval(
            "SELECT i.terminal AND NOT EXISTS (SELECT 1 FROM sfworkflow.outbox o WHERE o.instance_id = i.id "
            "AND o.published_at IS NULL) FROM sfworkflow.instance i WHERE i.tenant_id = $1 AND i.entity_id = $2",
            TENANT,
            entity,
        )
    )


async def _stored(pg: asyncpg.Connection, entity: str) -> tuple[Any, list[Any], list[Any]]:
    instance = await pg.fetchrow(
        "SELECT id, trace_id, traceparent FROM sfworkflow.instance WHERE tenant_id = $1 AND entity_id = $2",
        TENANT,
        entity,
    )
    history = await pg.fetch(
        "SELECT event_type, trace_id FROM sfworkflow.history WHERE instance_id = $1", instance["id"]
    )
    outbox = await pg.fetch(
        "SELECT routing_key, body, headers FROM sfworkflow.outbox WHERE instance_id = $1 ORDER BY id", instance["id"]
    )
    return instance, list(history), list(outbox)


def _named(spans: list[ReadableSpan], name: str, routing_key: str | None = None) -> ReadableSpan:
    found = [
        s
        for s in spans
        if s.name == name
        and (
            routing_key is None or (s.attributes or {}).get("messaging.rabbitmq.destination.routing_key") == routing_key
        )
    ]
    assert len(found) == 1, (name, routing_key, [s.name for s in spans])
    return found[0]


async def test_one_enrollment_is_one_trace_from_the_producer_to_the_worker_s_answer(
    settings: Settings, pg: asyncpg.Connection, store: PostgresDedupe
) -> None:
    provider, exporter = _recording()
    seen: list[Any] = []
    worker = _worker(settings, store, seen, tracer_provider=provider)
    batches = f"process {EVENTS_EXCHANGE}"

    def linked() -> set[int]:
        return {link.context.span_id for s in exporter.get_finished_spans() if s.name == batches for link in s.links}

    async def both_linked() -> bool:
        return len(linked()) >= 2

    async with running_service(settings, tracer_provider=provider), Amqp(settings.amqp_url) as mq:
        await worker.start()
        try:
            with provider.get_tracer("tests.salesflow").start_as_current_span("salesflow enroll") as root:
                await mq.publish(event("sequence.enrolled", "enr-trace", enrolled_data(steps=1)))
            await wait_for(lambda: _settled(pg, "enr-trace"), what="completed through the worker, all published")
            await wait_for(both_linked, what="both batches' spans ended")
        finally:
            await worker.stop()

    trace_id = root.get_span_context().trace_id
    spans = [s for s in exporter.get_finished_spans() if s.context is not None]
    ours = [s for s in spans if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in ours}
    # One connected trace: the producer's span is its only root, every other span's parent is in it.
    assert [s.name for s in ours if s.parent is None] == ["salesflow enroll"]
    assert all(s.parent.span_id in by_id for s in ours if s.parent is not None)

    root_id = root.get_span_context().span_id
    command = _named(ours, f"publish {COMMANDS_EXCHANGE}", "sequence.send_step")
    started = _named(ours, f"publish {LIFECYCLE_EXCHANGE}", "workflow.started.sequence")
    handled = _named(ours, "process sequence.send_step")
    completed = _named(ours, f"publish {LIFECYCLE_EXCHANGE}", "workflow.completed.sequence")
    assert command.parent is not None and command.parent.span_id == root_id  # the relay publishes under the event
    assert started.parent is not None and started.parent.span_id == root_id
    assert handled.parent is not None and handled.parent.span_id == command.context.span_id  # the worker under it
    assert completed.parent is not None and completed.parent.span_id == handled.context.span_id  # the answer's effect
    # The handler ran inside the worker's span and was handed its trace.
    ((context, cmd_trace, cmd_traceparent),) = seen
    assert context.span_id == handled.context.span_id
    assert cmd_trace == otel_trace.format_trace_id(trace_id)
    assert cmd_traceparent is not None and otel_trace.format_span_id(handled.context.span_id) in cmd_traceparent
    # A batch is a span of its own, linked to each message it applied: the enrollment and the worker's answer.
    assert {root_id, handled.context.span_id} <= linked()

    hex_trace = otel_trace.format_trace_id(trace_id)
    instance, history, outbox = await _stored(pg, "enr-trace")
    assert instance["trace_id"] == hex_trace
    assert {h["trace_id"] for h in history} == {hex_trace}
    assert {orjson.loads(o["body"])["trace_id"] for o in outbox} == {hex_trace}


async def test_without_opentelemetry_the_trace_travels_in_headers_envelopes_and_history(
    settings: Settings, pg: asyncpg.Connection, store: PostgresDedupe
) -> None:
    seen: list[Any] = []
    worker = _worker(settings, store, seen)
    assert worker.tracer is None  # no provider configured in this process: no spans
    async with running_service(settings) as service, Amqp(settings.amqp_url) as mq:
        assert service.tracer is None
        await worker.start()
        try:
            assert mq.publisher is not None
            await mq.publisher.publish(event("sequence.enrolled", "enr-plain", enrolled_data(steps=1)), traceparent=TP)
            await wait_for(lambda: _settled(pg, "enr-plain"), what="completed through the worker, all published")
        finally:
            await worker.stop()

    ((context, cmd_trace, cmd_traceparent),) = seen
    assert not context.is_valid  # no span around the handler
    assert (cmd_trace, cmd_traceparent) == (TRACE, TP)  # the command names the producer's span as its parent
    instance, history, outbox = await _stored(pg, "enr-plain")
    assert (instance["trace_id"], instance["traceparent"]) == (TRACE, TP)
    assert {h["trace_id"] for h in history} == {TRACE}
    assert {orjson.loads(o["body"])["trace_id"] for o in outbox} == {TRACE}
    assert {o["headers"]["traceparent"] for o in outbox} == {TP}  # the answer came back with the same context


async def test_an_instance_keeps_its_start_event_s_trace_and_history_names_each_event_s(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    other = "0af7651916cd43dd8448eb211c80319c"
    async with running_service(settings) as service, Amqp(settings.amqp_url) as mq:
        assert mq.publisher is not None
        await mq.publisher.publish(
            event("sequence.enrolled", "enr-two", enrolled_data(steps=1, delay_s=3600)), traceparent=TP
        )
        await mq.publisher.publish(event("sequence.paused", "enr-two", {}, trace_id=other))

        async def paused() -> bool:
            return bool(
                await pg.fetchval("SELECT state = 'paused' FROM sfworkflow.instance WHERE entity_id = 'enr-two'")
            )

        await wait_for(paused, what="the instance paused")
        assert service.tracer is None
    instance, history, _outbox = await _stored(pg, "enr-two")
    assert (instance["trace_id"], instance["traceparent"]) == (TRACE, TP)  # written by write_batch, kept
    assert [(h["event_type"], h["trace_id"]) for h in history] == [
        ("sequence.enrolled", TRACE),
        ("sequence.paused", other),
    ]


async def test_with_spans_on_a_trace_id_that_is_not_w3c_is_carried_not_replaced(
    settings: Settings, pg: asyncpg.Connection, store: PostgresDedupe
) -> None:
    provider, exporter = _recording()
    seen: list[Any] = []
    worker = _worker(settings, store, seen, tracer_provider=provider)
    async with running_service(settings, tracer_provider=provider), Amqp(settings.amqp_url) as mq:
        await worker.start()
        try:
            await mq.publish(event("sequence.enrolled", "enr-dd", enrolled_data(steps=1), trace_id="dd-42"))
            await wait_for(lambda: _settled(pg, "enr-dd"), what="completed through the worker, all published")
        finally:
            await worker.stop()
    ((_context, cmd_trace, cmd_traceparent),) = seen
    assert (cmd_trace, cmd_traceparent) == ("dd-42", None)  # the relay's span did not make itself its trace
    _instance, history, outbox = await _stored(pg, "enr-dd")
    assert {h["trace_id"] for h in history} == {"dd-42"}  # nor did the worker's, for the answer
    assert {orjson.loads(o["body"])["trace_id"] for o in outbox} == {"dd-42"}
    assert all("traceparent" not in (o["headers"] or {}) for o in outbox)
    assert any(s.name == f"publish {COMMANDS_EXCHANGE}" for s in exporter.get_finished_spans())  # spans, still
