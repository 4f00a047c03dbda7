"""The follow_up workflow end to end against the real service, PostgreSQL and RabbitMQ.

The test plays the sending worker itself: it reads sfworkflow.commands.follow_up and publishes answers."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import (
    Inbox,
    history_for_event,
    outcomes,
    parked_rows,
    quick,
    wait_all_published,
)
from tests.support import TENANT, Amqp, event, instance, outbox, running_service

WORKFLOW = "follow_up"
COMMANDS_Q = "sfworkflow.commands.follow_up"
COMPENSATIONS_Q = "sfworkflow.compensations.follow_up"


def scheduled(*delays: int) -> dict[str, Any]:
    return {
        "owner_id": "user-17",
        "steps": [{"template": f"tpl-{i}", "delay_seconds": d} for i, d in enumerate(delays)],
    }


async def state(pg: asyncpg.Connection, entity: str) -> str | None:
    row = await instance(pg, entity, workflow=WORKFLOW)
    return None if row is None else row["state"]


async def wait_state(pg: asyncpg.Connection, entity: str, wanted: str, timeout: float = 15.0) -> None:
    async def check() -> bool:
        return await state(pg, entity) == wanted

    await wait_for(check, timeout=timeout, what=f"{entity} in state {wanted!r}")


async def timers_of(pg: asyncpg.Connection, entity: str) -> list[asyncpg.Record]:
    row = await instance(pg, entity, workflow=WORKFLOW)
    assert row is not None
    return await pg.fetch("SELECT * FROM sfworkflow.timer WHERE instance_id = $1", row["id"])


def sends(bodies: list[dict[str, Any]], entity: str) -> list[tuple[int, int, int]]:
    """(step, reset, attempt) of each send command for `entity`."""
    return [(b["data"]["step"], b["data"]["reset"], b["attempt"]) for b in bodies if b["entity_id"] == entity]


async def test_happy_path_sends_every_step_on_its_timer(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("follow_up.scheduled", "lead-1", scheduled(0, 1)))
        first = (await commands.wait(1, what="send step 0"))[0]
        assert first["command_type"] == "follow_up.send"
        assert first["data"] == {"step": 0, "template": "tpl-0", "reset": 0}
        assert first["idempotency_key"] == f"{TENANT}:follow_up:lead-1:step:0"
        await mq.publish(event("follow_up.sent", "lead-1", {"step": 0, "attempt": 1, "reset": 0}))
        await wait_state(pg, "lead-1", "waiting")
        assert [t["name"] for t in await timers_of(pg, "lead-1")] == ["step_due"]  # a durable timer
        second = (await commands.wait(2, what="send step 1"))[1]
        assert second["data"] == {"step": 1, "template": "tpl-1", "reset": 0}
        await mq.publish(event("follow_up.sent", "lead-1", {"step": 1, "attempt": 1, "reset": 0}))
        await wait_state(pg, "lead-1", "completed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert sends(bodies, "lead-1") == [(0, 0, 1), (1, 0, 1)]
    assert await outcomes(pg, "lead-1") == [
        ("follow_up.scheduled", "applied", "new", "waiting"),
        ("follow_up.timer.step_due", "applied", "waiting", "sending"),
        ("follow_up.sent", "applied", "sending", "waiting"),
        ("follow_up.timer.step_due", "applied", "waiting", "sending"),
        ("follow_up.sent", "applied", "sending", "completed"),
    ]
    effects = {r["effect_key"] for r in await pg.fetch("SELECT effect_key FROM sfworkflow.effect")}
    assert effects == {f"follow_up.send:{TENANT}:lead-1:0", f"follow_up.send:{TENANT}:lead-1:1"}
    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "lead-1", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.completed"]
    assert await timers_of(pg, "lead-1") == []


async def test_a_duplicate_event_is_applied_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        start = event("follow_up.scheduled", "lead-dup", scheduled(0, 0, 3600))
        await mq.publish(start, times=3)
        await commands.wait(1)
        sent = event("follow_up.sent", "lead-dup", {"step": 0})
        await mq.publish(sent, times=3)
        await commands.wait(2)
        await wait_state(pg, "lead-dup", "sending")
        await wait_all_published(pg)
        bodies = await commands.settle(0.5)

    assert sends(bodies, "lead-dup") == [(0, 0, 1), (1, 0, 1)]
    assert len(await history_for_event(pg, start["event_id"])) == 1
    assert len(await history_for_event(pg, sent["event_id"])) == 1
    row = await instance(pg, "lead-dup", workflow=WORKFLOW)
    assert row["context"]["cursor"] == 1 and row["context"]["sent"] == 1


async def test_a_step_sent_before_is_suppressed_by_its_effect_key(settings: Settings, pg: asyncpg.Connection) -> None:
    # Step 0 of lead-s was sent by an earlier instance for this lead (its row was purged; the effect stays).
    await pg.execute(
        "INSERT INTO sfworkflow.effect (effect_key, tenant_id, instance_id, command_id, idempotency_key) "
        "VALUES ($1, $2, 0, $3, $4)",
        f"follow_up.send:{TENANT}:lead-s:0",
        TENANT,
        str(uuid.uuid4()),
        f"{TENANT}:follow_up:lead-s:step:0",
    )
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("follow_up.scheduled", "lead-s", scheduled(0, 0)))
        await commands.wait(1)
        await wait_state(pg, "lead-s", "sending")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert sends(bodies, "lead-s") == [(1, 0, 1)]  # step 0 is not sent twice
    assert await outcomes(pg, "lead-s") == [
        ("follow_up.scheduled", "applied", "new", "waiting"),
        ("follow_up.timer.step_due", "applied", "waiting", "sending"),
        ("follow_up.send", "suppressed", "sending", "sending"),
        ("follow_up.effect_suppressed", "applied", "sending", "waiting"),
        ("follow_up.timer.step_due", "applied", "waiting", "sending"),
    ]
    row = await instance(pg, "lead-s", workflow=WORKFLOW)
    assert row["context"]["suppressed"] == 1 and row["context"]["cursor"] == 1


async def test_retries_exhausted_reset_the_step_notify_the_owner_then_resume(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("follow_up.scheduled", "lead-f", scheduled(0, 0)))
        await commands.wait(1)
        await mq.publish(event("follow_up.sent", "lead-f", {"step": 0, "attempt": 1}))
        for attempt in (1, 2, 3):
            await commands.wait(1 + attempt, timeout=10)
            failed = {"step": 1, "error_code": "provider_timeout", "retryable": True, "attempt": attempt, "reset": 0}
            await mq.publish(event("follow_up.failed", "lead-f", failed))
        await wait_state(pg, "lead-f", "needs_attention")
        compensations = await Inbox(mq, COMPENSATIONS_Q).wait(2)
        row = await instance(pg, "lead-f", workflow=WORKFLOW)
        assert not row["terminal"] and row["context"]["cursor"] == 1
        assert await timers_of(pg, "lead-f") == []

        # a late report about the reset round is ignored; the operator resumes: step 1 again, under new keys
        late = event("follow_up.failed", "lead-f", {"step": 1, "error_code": "x", "retryable": False})
        await mq.publish(late)
        await wait_for(lambda: history_for_event(pg, late["event_id"]), what="late report recorded")
        await mq.publish(event("follow_up.resume_requested", "lead-f", {"requested_by": "user-17"}))
        resent = (await commands.wait(5, timeout=10))[4]
        await mq.publish(event("follow_up.sent", "lead-f", {"step": 1, "attempt": 1, "reset": 1}))
        await wait_state(pg, "lead-f", "completed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert sends(bodies, "lead-f") == [(0, 0, 1), (1, 0, 1), (1, 0, 2), (1, 0, 3), (1, 1, 1)]
    retries = [b for b in bodies if b["data"]["step"] == 1 and b["data"]["reset"] == 0]
    assert {b["idempotency_key"] for b in retries} == {f"{TENANT}:follow_up:lead-f:step:1"}
    assert resent["idempotency_key"] == f"{TENANT}:follow_up:lead-f:step:1:reset:1"
    assert [c["command_type"] for c in compensations] == ["follow_up.reset_step", "follow_up.notify_owner"]
    assert all(c["kind"] == "compensation" and c["entity_id"] == "lead-f" for c in compensations)
    assert compensations[0]["data"] == {"step": 1}
    assert compensations[1]["data"]["owner_id"] == "user-17"
    assert "after 3 attempts (provider_timeout)" in compensations[1]["data"]["reason"]
    effects = {r["effect_key"] for r in await pg.fetch("SELECT effect_key FROM sfworkflow.effect")}
    assert f"follow_up.send:{TENANT}:lead-f:1:reset:1" in effects
    hist = await outcomes(pg, "lead-f")
    assert ("follow_up.failed", "ignored", "needs_attention", "needs_attention") in hist
    assert ("follow_up.resume_requested", "applied", "needs_attention", "sending") in hist
    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "lead-f", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.compensated", "workflow.completed"]


async def test_a_fatal_failure_resets_at_once_and_a_reply_ends_it(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("follow_up.scheduled", "lead-x", scheduled(0)))
        await commands.wait(1)
        fatal = {"step": 0, "error_code": "template_rejected", "retryable": False, "attempt": 1}
        await mq.publish(event("follow_up.failed", "lead-x", fatal))
        await wait_state(pg, "lead-x", "needs_attention")
        compensations = await Inbox(mq, COMPENSATIONS_Q).wait(2)
        await mq.publish(event("follow_up.reply_received", "lead-x", {"channel": "email"}))
        await wait_state(pg, "lead-x", "replied")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert sends(bodies, "lead-x") == [(0, 0, 1)]
    assert [(c["command_type"], c["data"].get("step")) for c in compensations] == [
        ("follow_up.reset_step", 0),
        ("follow_up.notify_owner", None),
    ]
    assert compensations[1]["data"]["reason"].startswith("follow-up step 0 (tpl-0) failed: template_rejected")


async def test_a_reply_cancels_the_long_timer(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("follow_up.scheduled", "lead-r", scheduled(86400, 259200, 604800)))
        await wait_state(pg, "lead-r", "waiting")
        assert [t["name"] for t in await timers_of(pg, "lead-r")] == ["step_due"]
        await mq.publish(event("follow_up.reply_received", "lead-r", {}))
        await wait_state(pg, "lead-r", "replied")
        await wait_all_published(pg)
        assert await mq.drain_json(COMMANDS_Q) == []

    assert await timers_of(pg, "lead-r") == []


async def test_a_report_for_a_later_step_is_parked_then_applied(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("follow_up.scheduled", "lead-o", scheduled(0, 0)))
        await commands.wait(1)
        early = event("follow_up.sent", "lead-o", {"step": 1})
        await mq.publish(early)
        await wait_for(lambda: parked_rows(pg), what="sent for step 1 parked")
        assert await state(pg, "lead-o") == "sending"
        await mq.publish(event("follow_up.sent", "lead-o", {"step": 0}))
        await wait_state(pg, "lead-o", "completed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert sends(bodies, "lead-o") == [(0, 0, 1), (1, 0, 1)]
    assert await parked_rows(pg) == []
    applied = await history_for_event(pg, early["event_id"])
    assert len(applied) == 1 and applied[0]["outcome"] == "applied" and applied[0]["detail"]["unparked"] is True
    assert (applied[0]["from_state"], applied[0]["to_state"]) == ("sending", "completed")
