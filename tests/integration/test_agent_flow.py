"""The agent workflow end to end against the real service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

from typing import Any

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import Inbox, quick, wait_all_published
from tests.support import TENANT, Amqp, event, history, outbox, running_service

COMMANDS_Q = "sfworkflow.commands.agent"
COMPENSATIONS_Q = "sfworkflow.compensations.agent"
INPUT = {"lead_id": "lead-1093", "question": "Which CRM does this company use?"}


def submitted(timeout: int = 5) -> dict[str, Any]:
    return {"agent_type": "lead_researcher", "input": INPUT, "timeout_seconds": timeout}


def run_key(entity: str) -> str:
    return f"{TENANT}:agent:{entity}:run"


async def state_of(pg: asyncpg.Connection, entity: str) -> str | None:
    return await pg.fetchval(
        "SELECT state FROM sfworkflow.instance WHERE tenant_id = $1 AND workflow = 'agent' AND entity_id = $2",
        TENANT,
        entity,
    )


async def wait_state(pg: asyncpg.Connection, entity: str, state: str, timeout: float = 15.0) -> None:
    async def check() -> bool:
        return await state_of(pg, entity) == state

    await wait_for(check, timeout=timeout, what=f"{entity} in state {state!r}")


async def context_of(pg: asyncpg.Connection, entity: str) -> dict[str, Any]:
    return await pg.fetchval(
        "SELECT context FROM sfworkflow.instance WHERE tenant_id = $1 AND workflow = 'agent' AND entity_id = $2",
        TENANT,
        entity,
    )


async def timers(pg: asyncpg.Connection, entity: str) -> list[str]:
    rows = await pg.fetch(
        "SELECT t.name FROM sfworkflow.timer t JOIN sfworkflow.instance i ON i.id = t.instance_id "
        "WHERE i.tenant_id = $1 AND i.entity_id = $2 ORDER BY t.name",
        TENANT,
        entity,
    )
    return [r["name"] for r in rows]


async def test_happy_path_reaches_succeeded(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("agent.task_submitted", "task-1", submitted()))
        (cmd,) = await commands.wait(1)
        assert cmd["command_type"] == "agent.run_task" and cmd["kind"] == "command"
        assert (cmd["idempotency_key"], cmd["attempt"]) == (run_key("task-1"), 1)
        assert cmd["data"] == {
            "agent_type": "lead_researcher",
            "input": INPUT,
            "from_checkpoint_id": None,
            "run": 0,
            "timeout_seconds": 5,
        }
        assert await timers(pg, "task-1") == ["run_timeout"]
        echo = {"attempt": 1, "run": 0}
        await mq.publish(event("agent.started", "task-1", echo))
        await mq.publish(event("agent.checkpointed", "task-1", {"checkpoint_id": "ckpt-1", "step": 1, **echo}))
        await wait_for(lambda: _checkpoint_is(pg, "task-1", "ckpt-1"), what="checkpoint recorded")
        await mq.publish(event("agent.succeeded", "task-1", {"output": {"crm": "HubSpot"}, **echo}))
        await wait_state(pg, "task-1", "succeeded")
        await wait_all_published(pg)
        assert len(await commands.settle(0.3)) == 1

    transitions = [(h["from_state"], h["to_state"]) for h in await history(pg, "task-1")]
    assert transitions == [
        ("new", "dispatched"),
        ("dispatched", "running"),
        ("running", "running"),
        ("running", "succeeded"),
    ]
    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "task-1", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.completed"]
    assert await timers(pg, "task-1") == []


async def test_a_task_submitted_twice_runs_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        first = event("agent.task_submitted", "task-2", submitted())
        await mq.publish(first, times=2)  # the same event redelivered: dropped by the inbox
        await commands.wait(1)
        again = event("agent.task_submitted", "task-2", {**submitted(9), "input": "a different prompt"})
        await mq.publish(again)  # the same task submitted again (another event id): ignored
        await wait_for(lambda: _history_of_event(pg, again["event_id"]), what="second submission recorded")
        started = event("agent.started", "task-2", {"attempt": 1, "run": 0})
        await mq.publish(started, times=2)
        await wait_state(pg, "task-2", "running")
        await mq.publish(event("agent.succeeded", "task-2", {"output": "ok", "attempt": 1, "run": 0}))
        await wait_state(pg, "task-2", "succeeded")
        await wait_all_published(pg)
        bodies = await commands.settle(0.5)

    assert len(bodies) == 1  # one run
    assert [(h["outcome"], h["detail"]) for h in await _history_of_event(pg, again["event_id"])] == [
        ("ignored", {"reason": "instance already started"})
    ]
    assert len(await _history_of_event(pg, first["event_id"])) == 1
    assert len(await _history_of_event(pg, started["event_id"])) == 1
    assert (await context_of(pg, "task-2"))["timeout_seconds"] == 5


async def test_timeouts_retry_then_dead_letter_then_replay_from_the_checkpoint(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        compensations = Inbox(mq, COMPENSATIONS_Q)
        await mq.publish(event("agent.task_submitted", "task-3", submitted(timeout=1)))
        await commands.wait(1)
        await mq.publish(event("agent.started", "task-3", {"attempt": 1, "run": 0}))
        await mq.publish(
            event("agent.checkpointed", "task-3", {"checkpoint_id": "ckpt-7", "step": 7, "attempt": 1, "run": 0})
        )
        # attempt 1 never finishes: its timeout fires after 1 s, a retry follows the ~1 s backoff
        second = (await commands.wait(2, timeout=10))[1]
        assert (second["idempotency_key"], second["attempt"]) == (run_key("task-3"), 2)
        assert second["data"]["from_checkpoint_id"] == "ckpt-7"
        await mq.publish(
            event("agent.failed", "task-3", {"error_code": "model_overloaded", "retryable": True, "attempt": 2})
        )
        third = (await commands.wait(3, timeout=10))[2]
        assert (third["idempotency_key"], third["attempt"]) == (run_key("task-3"), 3)
        # attempt 3 times out too: retries are exhausted
        await wait_state(pg, "task-3", "dead_lettered", timeout=10)
        (comp,) = await compensations.wait(1)
        assert comp["command_type"] == "agent.dead_letter_task" and comp["kind"] == "compensation"
        assert comp["data"] == {"last_checkpoint_id": "ckpt-7", "error_code": "timeout", "attempts": 3, "run": 0}
        assert comp["idempotency_key"] == f"{TENANT}:agent:task-3:dead_letter:0"
        assert await timers(pg, "task-3") == []
        await wait_all_published(pg)
        lifecycle = [m["body"] for m in await outbox(pg, "task-3", "lifecycle")]
        assert [b["event_type"] for b in lifecycle] == ["workflow.started", "workflow.failed", "workflow.compensated"]
        assert lifecycle[1]["data"] == {"reason": "run 0 failed after 3 attempts (timeout)", "error_code": "timeout"}

        # a late report about the dead-lettered run changes nothing
        late = event("agent.succeeded", "task-3", {"output": "late", "attempt": 3, "run": 0})
        await mq.publish(late)
        await wait_for(lambda: _history_of_event(pg, late["event_id"]), what="late report recorded")
        assert await state_of(pg, "task-3") == "dead_lettered"

        await mq.publish(event("agent.replay_requested", "task-3", {"requested_by": "ops-1", "reason": "fixed"}))
        replay = (await commands.wait(4))[3]
        assert (replay["idempotency_key"], replay["attempt"]) == (f"{run_key('task-3')}:replay:1", 1)
        assert replay["data"]["from_checkpoint_id"] == "ckpt-7" and replay["data"]["run"] == 1
        await mq.publish(event("agent.succeeded", "task-3", {"output": "done", "attempt": 1, "run": 1}))
        await wait_state(pg, "task-3", "succeeded")
        await wait_all_published(pg)
        assert len(await compensations.settle(0.3)) == 1

    ignored = await _history_of_event(pg, late["event_id"])
    assert [(h["outcome"], h["detail"]["reason"]) for h in ignored] == [
        ("ignored", "run 0 was dead-lettered; succeeded reports on it")
    ]


async def test_non_retryable_failure_dead_letters_with_the_last_checkpoint(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        compensations = Inbox(mq, COMPENSATIONS_Q)
        await mq.publish(event("agent.task_submitted", "task-4", submitted()))
        await mq.publish(event("agent.checkpointed", "task-4", {"checkpoint_id": "ckpt-2", "step": 2, "attempt": 1}))
        await wait_state(pg, "task-4", "running")
        await mq.publish(event("agent.failed", "task-4", {"error_code": "tool_crashed", "retryable": False}))
        (comp,) = await compensations.wait(1)
        await wait_all_published(pg)

    assert comp["data"] == {"last_checkpoint_id": "ckpt-2", "error_code": "tool_crashed", "attempts": 1, "run": 0}
    assert comp["entity_id"] == "task-4" and comp["tenant_id"] == TENANT
    assert await state_of(pg, "task-4") == "dead_lettered"


async def test_reports_before_the_submission_are_parked_then_applied(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        started = event("agent.started", "task-5", {"attempt": 1, "run": 0})
        checkpoint = event("agent.checkpointed", "task-5", {"checkpoint_id": "ckpt-1", "step": 1, "attempt": 1})
        await mq.publish(started)
        await mq.publish(checkpoint)
        await wait_for(lambda: _parked(pg, 2), what="two parked events")
        await mq.publish(event("agent.task_submitted", "task-5", submitted()))
        await wait_for(lambda: _checkpoint_is(pg, "task-5", "ckpt-1"), what="parked checkpoint applied")
        await wait_for(lambda: _parked(pg, 0), what="parked events gone")
        await wait_all_published(pg)

    assert await state_of(pg, "task-5") == "running"
    rows = [(h["event_type"], h["outcome"], (h["detail"] or {}).get("unparked")) for h in await history(pg, "task-5")]
    # Published back to back, the two reports may be taken (and parked) by two consumer channels in either
    # order: sfworkflow promises one instance's events one at a time and parked ones retried in the order
    # they were parked, not an order across channels (README, "Order"). Either way the outcome is the same:
    # started first -> both applied; checkpointed first -> it starts the run, and started is then stale.
    assert rows[0] == ("agent.task_submitted", "applied", None)
    assert sorted(rows[1:]) in (
        [("agent.checkpointed", "applied", True), ("agent.started", "applied", True)],
        [("agent.checkpointed", "applied", True), ("agent.started", "ignored", None)],
    )
    if rows[1][0] == "agent.checkpointed":
        assert (await history(pg, "task-5"))[2]["detail"]["reason"] == "attempt 1 already started"
    else:
        assert rows[1:] == [("agent.started", "applied", True), ("agent.checkpointed", "applied", True)]


async def _checkpoint_is(pg: asyncpg.Connection, entity: str, checkpoint: str) -> bool:
    ctx = await context_of(pg, entity)
    return bool(ctx) and ctx.get("last_checkpoint_id") == checkpoint


async def _history_of_event(pg: asyncpg.Connection, event_id: str) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM sfworkflow.history WHERE event_id = $1 ORDER BY id", event_id)


async def _parked(pg: asyncpg.Connection, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == n
