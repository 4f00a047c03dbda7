"""The worker SDK (sfworkflow.client.worker) against the real service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
import structlog

from sfworkflow.client.worker import (
    ANSWER_NAMESPACE,
    Answer,
    Command,
    CommandWorker,
    Fatal,
    MemoryDedupe,
    PostgresDedupe,
)
from sfworkflow.contract.topology import DEAD_QUEUE, commands_queue
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.sdk_worker import KILLED
from tests.support import TENANT, Amqp, enrolled_data, event, history, outbox, running_service, state_of

ROOT = Path(__file__).resolve().parents[2]


def _send_step(step: int = 0, entity: str = "enr-direct") -> dict[str, Any]:
    return {
        "command_id": str(uuid.uuid4()), "command_type": "sequence.send_step", "tenant_id": TENANT,
        "entity_id": entity, "workflow": "sequence", "causation_id": None, "correlation_id": "corr-1",
        "idempotency_key": f"{TENANT}:{entity}:sequence.send_step:{step}", "issued_at": "2026-12-06T08:00:00Z",
        "attempt": 1, "kind": "command",
        "data": {"step": step, "template_id": "tpl", "recipient": {"channel": "email", "address": "a@example.com"},
                 "sequence_id": "seq", "lead_id": "lead"},
    }  # fmt: skip


async def _send_command(mq: Amqp, body: bytes, routing_key: str, message_id: str) -> None:
    """Publish straight to a command queue (through the default exchange), as sfworkflow's relay would."""
    assert mq.connection is not None
    channel = await mq.connection.channel(publisher_confirms=True)
    await channel.default_exchange.publish(
        aio_pika.Message(body, message_id=message_id, content_type="application/json"), routing_key=routing_key
    )
    await channel.close()


def _step_sent_worker(amqp_url: str, store: Any) -> tuple[CommandWorker, list[str]]:
    """A worker whose send_step handler answers step_sent and records the command ids it ran for."""
    worker = CommandWorker(amqp_url, store=store, source="tests.worker")
    runs: list[str] = []

    @worker.handler("sequence.send_step", failure="sequence.step_failed")
    async def send_step(cmd: Command) -> Answer:
        runs.append(cmd.command_id)
        return cmd.answer("sequence.step_sent", {"step": 0, "provider_message_id": "p"})

    return worker, runs


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresDedupe]:
    s = await PostgresDedupe.open(database_url)
    yield s
    await s.close()


async def test_a_worker_carries_a_sequence_to_completed(settings: Settings, pg: asyncpg.Connection, store: Any) -> None:
    worker = CommandWorker(settings.amqp_url, store=store, source="tests.worker")
    keys: list[str] = []

    @worker.handler("sequence.send_step", failure="sequence.step_failed")
    async def send_step(cmd: Command) -> Answer:
        keys.append(cmd.idempotency_key)
        return cmd.answer("sequence.step_sent", {"step": cmd.data["step"], "provider_message_id": f"p-{len(keys)}"})

    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await worker.start()
        try:
            await mq.publish(event("sequence.enrolled", "enr-sdk", enrolled_data(steps=2)))
            await wait_for(lambda: _state_is(pg, "enr-sdk", "completed"), what="completed through the worker")
        finally:
            await worker.stop()
    assert len(keys) == 2 == len(set(keys))
    commands = [m["body"] for m in await outbox(pg, "enr-sdk", "command")]
    applied = [h for h in await history(pg, "enr-sdk") if h["event_type"] == "sequence.step_sent"]
    # Each answer's id derives from the command it answers.
    assert [str(h["event_id"]) for h in applied] == [
        str(uuid.uuid5(ANSWER_NAMESPACE, f"{c['command_id']}/sequence.step_sent/0")) for c in commands
    ]


async def test_a_command_delivered_twice_runs_its_handler_once_and_is_answered_twice_alike(
    settings: Settings, store: Any
) -> None:
    worker, runs = _step_sent_worker(settings.amqp_url, store)

    cmd = _send_step()
    async with running_service(settings, consume=False), Amqp(settings.amqp_url) as mq:
        await worker.start()
        try:
            for _ in range(2):
                await _send_command(mq, orjson.dumps(cmd), commands_queue("sequence"), cmd["command_id"])
            answers: list[dict[str, Any]] = []

            async def both() -> bool:
                answers.extend(await mq.drain_events_json())
                return len(answers) >= 2

            await wait_for(both, what="two answers")
        finally:
            await worker.stop()
    assert runs == [cmd["command_id"]]
    assert answers[0] == answers[1]
    assert answers[0]["causation_id"] == cmd["command_id"]
    assert worker.outcomes[("sequence.send_step", "repeated")] == 1


async def test_handlers_running_at_once_each_log_with_their_own_command_s_context(settings: Settings) -> None:
    """The context a handler's log lines carry is its own command's, while other commands run beside it, and none
    of it is left in the context of the code that runs the worker."""
    worker = CommandWorker(settings.amqp_url, store=MemoryDedupe(), source="tests.worker")
    seen: dict[str, dict[str, Any]] = {}
    all_in = asyncio.Event()

    @worker.handler("sequence.send_step", failure="sequence.step_failed")
    async def send_step(cmd: Command) -> Answer:
        seen[cmd.command_id] = {}
        if len(seen) == 3:
            all_in.set()
        await all_in.wait()  # every command is being handled before any reads its context
        seen[cmd.command_id] = structlog.contextvars.get_contextvars()
        return cmd.answer("sequence.step_sent", {"step": cmd.data["step"], "provider_message_id": "p"})

    commands = [_send_step(step=k, entity=f"enr-ctx-{k}") for k in range(3)]
    async with running_service(settings, consume=False), Amqp(settings.amqp_url) as mq:
        await worker.start()
        try:
            for c in commands:
                await _send_command(mq, orjson.dumps(c), commands_queue("sequence"), c["command_id"])
            await wait_for(lambda: _answered(worker, 3), what="three commands answered")
        finally:
            await worker.stop()
    for c in commands:
        context = seen[c["command_id"]]
        assert {k: context.get(k) for k in ("command_id", "entity_id", "command_type", "correlation_id")} == {
            "command_id": c["command_id"], "entity_id": c["entity_id"], "command_type": "sequence.send_step",
            "correlation_id": "corr-1",
        }  # fmt: skip
    assert "command_id" not in structlog.contextvars.get_contextvars()


async def _answered(worker: CommandWorker, n: int) -> bool:
    return worker.outcomes[("sequence.send_step", "answered")] >= n


async def test_a_fatal_failure_is_answered_with_the_declared_failure_event(settings: Settings, store: Any) -> None:
    worker = CommandWorker(settings.amqp_url, store=store, source="tests.worker")

    @worker.handler("sequence.send_step", failure="sequence.step_failed")
    async def send_step(cmd: Command) -> Answer:
        raise Fatal("template_rejected", "the provider rejected the template")

    cmd = _send_step(step=2)
    async with running_service(settings, consume=False), Amqp(settings.amqp_url) as mq:
        await worker.start()
        try:
            await _send_command(mq, orjson.dumps(cmd), commands_queue("sequence"), cmd["command_id"])
            answers = await wait_for(lambda: mq.drain_events_json(), what="the failure event")
        finally:
            await worker.stop()
    assert [a["event_type"] for a in answers] == ["sequence.step_failed"]
    assert answers[0]["data"] == {
        "step": 2, "error_code": "template_rejected", "retryable": False,
        "message": "the provider rejected the template", "attempt": 1,
    }  # fmt: skip


async def test_bad_commands_are_dead_lettered_with_a_reason_and_the_queue_goes_on(
    settings: Settings, store: Any
) -> None:
    worker, handled = _step_sent_worker(settings.amqp_url, store)

    invalid = _send_step()
    del invalid["idempotency_key"]
    alert = {**_send_step(), "command_type": "sequence.raise_alert", "kind": "compensation",
             "data": {"severity": "critical", "message": "m", "error_code": "e", "step": 0}}  # fmt: skip
    good = _send_step()
    async with running_service(settings, consume=False), Amqp(settings.amqp_url) as mq:
        await worker.start()
        try:
            await _send_command(mq, b"{not json", commands_queue("sequence"), "m-garbage")
            await _send_command(mq, orjson.dumps(invalid), commands_queue("sequence"), "m-invalid")
            await _send_command(mq, orjson.dumps(alert), commands_queue("sequence"), "m-alert")
            await _send_command(mq, orjson.dumps(good), commands_queue("sequence"), good["command_id"])
            dead: list[aio_pika.abc.AbstractIncomingMessage] = []

            async def three() -> bool:
                dead.extend(await mq.drain(DEAD_QUEUE))
                return len(dead) >= 3

            await wait_for(three, what="three dead letters")
            await wait_for(lambda: asyncio.sleep(0, handled), what="the good command handled")
        finally:
            await worker.stop()
    reasons = {m.message_id: (m.headers or {}).get("x-sfworkflow-reason") for m in dead}
    assert reasons == {"m-garbage": "invalid_command", "m-invalid": "invalid_command", "m-alert": "no_handler"}
    assert {(m.headers or {}).get("x-sfworkflow-original-routing-key") for m in dead} == {commands_queue("sequence")}
    assert handled == [good["command_id"]]


@pytest.mark.parametrize("point", ["recorded", "published"])
async def test_a_worker_killed_between_executing_and_acking_neither_loses_the_answer_nor_executes_twice(
    point: str, settings: Settings, pg: asyncpg.Connection, database_url: str
) -> None:
    await pg.execute("CREATE TABLE sdk_execution (command_id uuid, idempotency_key text)")
    cmd = [sys.executable, "-m", "tests.integration.sdk_worker", settings.amqp_url, database_url]
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "enr-kill", enrolled_data(steps=1)))
        first = await asyncio.create_subprocess_exec(*cmd, point, cwd=ROOT)
        assert await asyncio.wait_for(first.wait(), 60) == KILLED
        assert await pg.fetchval("SELECT count(*) FROM sdk_execution") == 1
        second = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        try:
            await asyncio.wait_for(_line_with(second, b"answers published again"), 30)
            await wait_for(lambda: _state_is(pg, "enr-kill", "completed"), timeout=30, what="completed")
        finally:
            second.terminate()
            assert await asyncio.wait_for(second.wait(), 30) == 0
    assert await pg.fetchval("SELECT count(*) FROM sdk_execution") == 1  # executed once
    applied = [h for h in await history(pg, "enr-kill") if h["event_type"] == "sequence.step_sent"]
    assert len(applied) == 1
    # The redelivered command was answered from the store: the same event, dropped as a duplicate if it came twice.
    assert await pg.fetchval(
        "SELECT count(*) FROM sfworkflow.inbox WHERE event_type = 'sequence.step_sent'"
    ) == 1  # fmt: skip


async def _line_with(proc: asyncio.subprocess.Process, text: bytes) -> bytes:
    """The first line of the process's output that holds `text` (the log line of what the test waits for)."""
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        if text in line:
            return line
    raise AssertionError(f"the process ended without printing {text!r}")


async def _state_is(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    return await state_of(pg, entity) == state


class _RecordFailsOnce(MemoryDedupe):
    """A store whose first `record` fails, as PostgreSQL going away between the handler and the record."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def record(self, command_id: str, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.failed:
            self.failed = True
            raise ConnectionError("the store is away")
        return await super().record(command_id, answers)


async def test_a_command_whose_handling_failed_midway_is_handed_back_and_answered(settings: Settings) -> None:
    """Not left unacked on its channel (which would hold it until the channel closes): nacked, redelivered, and
    claimed again at once by the same worker, whose claim it still is."""
    store = _RecordFailsOnce()
    worker, runs = _step_sent_worker(settings.amqp_url, store)

    cmd = _send_step()
    async with running_service(settings, consume=False), Amqp(settings.amqp_url) as mq:
        await worker.start()
        try:
            await _send_command(mq, orjson.dumps(cmd), commands_queue("sequence"), cmd["command_id"])
            answers = await wait_for(lambda: mq.drain_events_json(), what="the answer after the hand-back")
        finally:
            await worker.stop()
    assert store.failed
    assert [a["causation_id"] for a in answers] == [cmd["command_id"]]
    # Nothing was recorded the first time, so the handler ran again (with the same idempotency key).
    assert runs == [cmd["command_id"]] * 2
    assert worker.outcomes[("sequence.send_step", "answered")] == 1
