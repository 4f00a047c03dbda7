"""The prospecting workflow end to end against the real service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import Inbox, counter, history_for_event, quick, wait_all_published
from tests.support import TENANT, Amqp, event, history, instance, outbox, running_service

COMMANDS = "sfworkflow.commands.prospecting"
COMPENSATIONS = "sfworkflow.compensations.prospecting"
WORKFLOW = "prospecting"


async def row(pg: asyncpg.Connection, entity: str) -> asyncpg.Record | None:
    return await instance(pg, entity, TENANT, WORKFLOW)


async def wait_state(pg: asyncpg.Connection, entity: str, state: str, timeout: float = 15.0) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        r = await row(pg, entity)
        return r if r is not None and r["state"] == state else None

    return await wait_for(check, timeout=timeout, what=f"{entity} in state {state!r}")


async def timers(pg: asyncpg.Connection, entity: str) -> list[asyncpg.Record]:
    r = await row(pg, entity)
    return [] if r is None else await pg.fetch("SELECT * FROM sfworkflow.timer WHERE instance_id = $1", r["id"])


def started(lead: str, *steps: str) -> dict:
    return {"lead_id": lead, "steps": list(steps)}


def done(step: str, attempt: int = 1) -> dict:
    return {"step": step, "attempt": attempt}


def failed(step: str, attempt: int, retryable: bool = True, code: str = "provider_timeout") -> dict:
    return {"step": step, "error_code": code, "retryable": retryable, "attempt": attempt}


def for_entity(bodies: list[dict], entity: str) -> list[dict]:
    return [b for b in bodies if b["entity_id"] == entity]


async def test_happy_path_with_approval_gate_reaches_completed(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        await mq.publish(event("prospecting.started", "run-1", started("lead-1", "qualification", "email_outreach")))
        (first,) = await commands.wait(1)
        assert first["data"] == {"step": "qualification", "lead_id": "lead-1"}
        await mq.publish(event("prospecting.step_completed", "run-1", done("qualification")))
        await wait_state(pg, "run-1", "awaiting_approval")
        await commands.settle(0.3)
        assert len(commands.bodies) == 1  # nothing is sent before a person approves
        await mq.publish(event("prospecting.approval_granted", "run-1", {"approval_token": "apr-9"}))
        second = (await commands.wait(2))[1]
        assert second["data"] == {"step": "email_outreach", "lead_id": "lead-1", "approval_token": "apr-9"}
        assert second["idempotency_key"] == f"{TENANT}:prospecting:run-1:step:email_outreach"
        await mq.publish(event("prospecting.step_completed", "run-1", done("email_outreach")))
        await wait_state(pg, "run-1", "completed")
        await wait_all_published(pg)

    assert [(h["from_state"], h["to_state"]) for h in await history(pg, "run-1")] == [
        ("new", "running"),
        ("running", "awaiting_approval"),
        ("awaiting_approval", "running"),
        ("running", "completed"),
    ]
    assert [m["body"]["event_type"] for m in await outbox(pg, "run-1", "lifecycle")] == [
        "workflow.started",
        "workflow.completed",
    ]
    assert await timers(pg, "run-1") == []


async def test_duplicate_event_is_applied_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        await mq.publish(event("prospecting.started", "run-dup", started("lead-d", "qualification", "crm_sync")))
        await commands.wait(1)
        ev = event("prospecting.step_completed", "run-dup", done("qualification"))
        await mq.publish(ev, times=2)
        await wait_for(lambda: _at_least(service, "duplicate", 1), what="duplicate counted")
        # The same report under another event id is about a step already done: ignored, not parked.
        again = event("prospecting.step_completed", "run-dup", done("qualification"))
        await mq.publish(again)
        await wait_for(lambda: history_for_event(pg, again["event_id"]), what="second report recorded")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert [b["data"]["step"] for b in bodies] == ["qualification", "crm_sync"]
    assert len(await history_for_event(pg, ev["event_id"])) == 1
    (ignored,) = await history_for_event(pg, again["event_id"])
    assert ignored["outcome"] == "ignored" and "already done" in ignored["detail"]["reason"]
    assert (await row(pg, "run-dup"))["state"] == "running"


async def _at_least(service, outcome: str, n: int) -> bool:
    return counter(service.metrics.events, WORKFLOW, outcome) >= n


async def test_crm_sync_of_a_lead_synced_before_is_skipped(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        await mq.publish(event("prospecting.started", "run-a", started("lead-x", "crm_sync")))
        await commands.wait(1)
        await mq.publish(event("prospecting.step_completed", "run-a", done("crm_sync")))
        await wait_state(pg, "run-a", "completed")
        # A later run for the same lead: the register says the lead is in the CRM, crm_sync counts as done.
        await mq.publish(event("prospecting.started", "run-b", started("lead-x", "qualification", "crm_sync")))
        await commands.wait(2, what="qualification of run-b")
        await mq.publish(event("prospecting.step_completed", "run-b", done("qualification")))
        b = await wait_state(pg, "run-b", "completed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert [(c["entity_id"], c["data"]["step"]) for c in bodies] == [("run-a", "crm_sync"), ("run-b", "qualification")]
    assert b["context"]["suppressed_steps"] == ["crm_sync"] and b["context"]["completed_steps"] == ["qualification"]
    rows = [(h["event_type"], h["outcome"], h["to_state"]) for h in await history(pg, "run-b")]
    assert rows[-1] == ("prospecting.lookup_result", "applied", "completed")
    value = await pg.fetchval(
        "SELECT value FROM sfworkflow.register WHERE key = $1", f"prospecting.crm_synced:{TENANT}:lead-x"
    )
    assert value is not None and "run-a" in str(value)


async def test_crm_sync_of_two_runs_in_flight_is_published_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        await mq.publish(event("prospecting.started", "run-c", started("lead-y", "crm_sync")))
        (sync,) = await commands.wait(1)
        # run-c's crm_sync is out (not reported yet): the register is empty, the effect key holds.
        await mq.publish(event("prospecting.started", "run-d", started("lead-y", "crm_sync")))
        d = await wait_state(pg, "run-d", "completed")
        await mq.publish(event("prospecting.step_completed", "run-c", done("crm_sync")))
        await wait_state(pg, "run-c", "completed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)
        suppressed = counter(service.metrics.suppressed, WORKFLOW)

    assert [(c["entity_id"], c["data"]["step"]) for c in bodies] == [("run-c", "crm_sync")]
    assert sync["idempotency_key"] == f"{TENANT}:prospecting:run-c:step:crm_sync"
    assert d["context"]["suppressed_steps"] == ["crm_sync"]
    rows = [(h["event_type"], h["outcome"], h["to_state"]) for h in await history(pg, "run-d")]
    assert ("prospecting.run_step", "suppressed", "running") in rows
    assert rows[-1] == ("prospecting.effect_suppressed", "applied", "completed")
    assert suppressed == 1
    key = f"prospecting.crm_sync:{TENANT}:lead-y"
    held = await pg.fetchval("SELECT idempotency_key FROM sfworkflow.effect WHERE effect_key = $1", key)
    assert held == sync["idempotency_key"]


async def test_retries_exhausted_then_cancelled_compensates(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        compensations = Inbox(mq, COMPENSATIONS)
        await mq.publish(event("prospecting.started", "run-f", started("lead-f", "qualification", "crm_sync")))
        await commands.wait(1)
        await mq.publish(event("prospecting.step_completed", "run-f", done("qualification")))
        for attempt in (1, 2, 3):
            sends = await commands.wait(1 + attempt, timeout=10, what=f"crm_sync attempt {attempt}")
            assert sends[-1]["attempt"] == attempt
            await mq.publish(event("prospecting.step_failed", "run-f", failed("crm_sync", attempt, code="crm_down")))
        r = await wait_state(pg, "run-f", "step_failed")
        assert await timers(pg, "run-f") == []
        retry_steps = await compensations.wait(2)
        await mq.publish(event("prospecting.cancel_requested", "run-f", {"requested_by": "ops-1"}))
        await wait_state(pg, "run-f", "cancelled")
        await wait_all_published(pg)
        comp = await compensations.settle(0.3)
        sends = await commands.settle(0.2)

    syncs = [c for c in sends if c["data"]["step"] == "crm_sync"]
    assert [c["attempt"] for c in syncs] == [1, 2, 3]
    assert len({c["idempotency_key"] for c in syncs}) == 1 and len({c["command_id"] for c in syncs}) == 3
    assert r["context"]["last_error"] == {"step": "crm_sync", "error_code": "crm_down", "attempt": 3}
    assert [c["command_type"] for c in comp] == [
        "prospecting.retry_step",
        "prospecting.retry_step",
        "prospecting.cancel_run",
    ]
    assert [c["data"] for c in retry_steps[:2]] == [
        {"step": "crm_sync", "attempt": 2, "error_code": "crm_down"},
        {"step": "crm_sync", "attempt": 3, "error_code": "crm_down"},
    ]
    cancel = comp[2]
    assert (cancel["kind"], cancel["entity_id"], cancel["workflow"]) == ("compensation", "run-f", WORKFLOW)
    assert cancel["data"] == {
        "lead_id": "lead-f",
        "requested_by": "ops-1",
        "step": "crm_sync",
        "completed_steps": ["qualification"],
        "reason": "step crm_sync failed (crm_down); cancelled by ops-1",
    }
    assert [m["body"]["event_type"] for m in await outbox(pg, "run-f", "lifecycle")] == [
        "workflow.started",
        "workflow.failed",
        "workflow.compensated",
        "workflow.completed",
    ]
    # crm_sync never happened: its effect key was freed for a later run of the same lead.
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.effect") == 0


async def test_retry_requested_runs_the_failed_step_again(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        compensations = Inbox(mq, COMPENSATIONS)
        await mq.publish(event("prospecting.started", "run-r", started("lead-r", "qualification")))
        await commands.wait(1)
        await mq.publish(
            event("prospecting.step_failed", "run-r", failed("qualification", 1, retryable=False, code="lead_invalid"))
        )
        await wait_state(pg, "run-r", "step_failed")
        await mq.publish(event("prospecting.retry_requested", "run-r", {"requested_by": "ops-2"}))
        second = (await commands.wait(2))[1]
        await mq.publish(event("prospecting.step_completed", "run-r", done("qualification", 2)))
        await wait_state(pg, "run-r", "completed")
        await wait_all_published(pg)
        comp = await compensations.settle(0.3)

    assert (second["attempt"], second["data"]["step"]) == (2, "qualification")
    assert second["idempotency_key"] == commands.bodies[0]["idempotency_key"]
    assert comp == []


async def test_approval_before_the_run_exists_is_parked_then_applied(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        early = event("prospecting.approval_granted", "run-o", {"approval_token": "apr-early"})
        await mq.publish(early)
        await wait_for(lambda: pg.fetchval("SELECT count(*) FROM sfworkflow.parked"), what="approval parked")
        await mq.publish(event("prospecting.started", "run-o", started("lead-o", "qualification", "email_outreach")))
        await commands.wait(1)
        await wait_for(lambda: history_for_event(pg, early["event_id"]), what="approval applied")
        await mq.publish(event("prospecting.step_completed", "run-o", done("qualification")))
        # Approved already: the outreach step runs without stopping at the gate.
        second = (await commands.wait(2))[1]
        await mq.publish(event("prospecting.step_completed", "run-o", done("email_outreach")))
        await wait_state(pg, "run-o", "completed")
        await wait_all_published(pg)
        unparked = counter(service.metrics.unparked, WORKFLOW)

    assert second["data"]["approval_token"] == "apr-early"
    (h,) = await history_for_event(pg, early["event_id"])
    assert (h["outcome"], h["from_state"], h["to_state"]) == ("applied", "running", "running")
    assert h["detail"]["unparked"] is True and h["detail"]["approved_early"] is True
    assert unparked == 1
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == 0
    assert "awaiting_approval" not in [x["to_state"] for x in await history(pg, "run-o")]


async def test_cancel_while_running_compensates_on_the_compensation_queue(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        compensations = Inbox(mq, COMPENSATIONS)
        await mq.publish(event("prospecting.started", "run-c", started("lead-c", "qualification", "crm_sync")))
        await commands.wait(1)
        await mq.publish(event("prospecting.cancel_requested", "run-c", {"requested_by": "sdr-4", "reason": "stop"}))
        await wait_state(pg, "run-c", "cancelled")
        (comp,) = await compensations.wait(1)
        # A late report for the cancelled run changes nothing.
        late = event("prospecting.step_completed", "run-c", done("qualification"))
        await mq.publish(late)
        await wait_for(lambda: history_for_event(pg, late["event_id"]), what="late report recorded")
        await wait_all_published(pg)
        sends = await commands.settle(0.3)

    assert comp["command_type"] == "prospecting.cancel_run"
    assert comp["data"] == {
        "lead_id": "lead-c",
        "requested_by": "sdr-4",
        "step": "qualification",
        "completed_steps": [],
        "reason": "stop",
    }
    assert len(sends) == 1
    assert (await history_for_event(pg, late["event_id"]))[0]["outcome"] == "ignored"
    assert [m["body"]["event_type"] for m in await outbox(pg, "run-c", "lifecycle")] == [
        "workflow.started",
        "workflow.compensated",
        "workflow.completed",
    ]
