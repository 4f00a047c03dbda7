"""The partner_approval workflow end to end against the real service, PostgreSQL and RabbitMQ.

SLAs are tiny fractions of an hour here (0.0005 h = 1.8 s), so escalation and expiry happen in seconds.
"""

from __future__ import annotations

import uuid

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import Inbox, counter, history_for_event, quick, wait_all_published
from tests.support import TENANT, Amqp, event, history, instance, outbox, running_service

COMMANDS = "sfworkflow.commands.partner_approval"
COMPENSATIONS = "sfworkflow.compensations.partner_approval"
WORKFLOW = "partner_approval"
FAST = 0.0005  # hours: 1.8 s


async def row(pg: asyncpg.Connection, entity: str) -> asyncpg.Record | None:
    return await instance(pg, entity, TENANT, WORKFLOW)


async def wait_state(pg: asyncpg.Connection, entity: str, state: str, timeout: float = 15.0) -> asyncpg.Record:
    async def check() -> asyncpg.Record | None:
        r = await row(pg, entity)
        return r if r is not None and r["state"] == state else None

    return await wait_for(check, timeout=timeout, what=f"{entity} in state {state!r}")


async def timers(pg: asyncpg.Connection, entity: str) -> list[str]:
    r = await row(pg, entity)
    rows = [] if r is None else await pg.fetch("SELECT name FROM sfworkflow.timer WHERE instance_id = $1", r["id"])
    return sorted(t["name"] for t in rows)


def requested(*stages: str, hours: float = 1.0) -> dict:
    return {"partner_id": "partner-311", "stages": list(stages), "sla_hours": dict.fromkeys(stages, hours)}


def approved(stage: str) -> dict:
    return {"stage": stage, "approver_id": f"{stage}-1"}


async def lifecycle(pg: asyncpg.Connection, entity: str) -> list[str]:
    return [m["body"]["event_type"] for m in await outbox(pg, entity, "lifecycle")]


async def test_happy_path_every_stage_approves(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        await mq.publish(event("partner_approval.requested", "req-1", requested("manager", "legal")))
        (review,) = await commands.wait(1)
        assert await timers(pg, "req-1") == ["sla_due"]
        await mq.publish(event("partner_approval.approved", "req-1", approved("manager")))
        await commands.wait(2)
        await mq.publish(event("partner_approval.approved", "req-1", approved("legal")))
        await wait_state(pg, "req-1", "approved")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert [(b["command_type"], b["data"].get("stage")) for b in bodies] == [
        ("partner_approval.request_review", "manager"),
        ("partner_approval.request_review", "legal"),
        ("partner_approval.notify_outcome", None),
    ]
    assert review["data"]["sla_hours"] == 1.0
    assert bodies[2]["data"] == {
        "outcome": "approved",
        "partner_id": "partner-311",
        "stage": None,
        "reason": None,
        "approvals": [{"stage": "manager", "approver_id": "manager-1"}, {"stage": "legal", "approver_id": "legal-1"}],
    }
    assert await lifecycle(pg, "req-1") == ["workflow.started", "workflow.completed"]
    assert await timers(pg, "req-1") == []


async def test_duplicate_approval_is_applied_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        await mq.publish(event("partner_approval.requested", "req-dup", requested("manager", "legal", "executive")))
        await commands.wait(1)
        ev = event("partner_approval.approved", "req-dup", approved("manager"))
        await mq.publish(ev, times=2)
        await wait_for(lambda: _at_least(service, "duplicate", 1), what="duplicate counted")
        # The same decision under another event id is about a stage decided already: ignored.
        again = event("partner_approval.approved", "req-dup", approved("manager"))
        await mq.publish(again)
        await wait_for(lambda: history_for_event(pg, again["event_id"]), what="second approval recorded")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert [b["data"]["stage"] for b in bodies] == ["manager", "legal"]
    assert len(await history_for_event(pg, ev["event_id"])) == 1
    (ignored,) = await history_for_event(pg, again["event_id"])
    assert ignored["outcome"] == "ignored" and "decided already" in ignored["detail"]["reason"]
    r = await row(pg, "req-dup")
    assert (r["state"], r["context"]["cursor"], len(r["context"]["approvals"])) == ("in_review", 1, 1)


async def _at_least(service, outcome: str, n: int) -> bool:
    return counter(service.metrics.events, WORKFLOW, outcome) >= n


async def test_no_decision_escalates_once_then_expires_and_voids(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        compensations = Inbox(mq, COMPENSATIONS)
        await mq.publish(event("partner_approval.requested", "req-x", requested("manager", "legal", hours=FAST)))
        await commands.wait(1)
        escalated = await wait_state(pg, "req-x", "escalated", timeout=6)
        assert await timers(pg, "req-x") == ["expiry_due"]
        await wait_state(pg, "req-x", "expired", timeout=6)
        (void,) = await compensations.wait(1)
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert [b["command_type"] for b in bodies] == [
        "partner_approval.request_review",
        "partner_approval.escalate",
        "partner_approval.notify_outcome",
    ]
    esc = bodies[1]
    assert esc["data"]["stage"] == "manager" and esc["data"]["overdue_since"] < esc["data"]["expires_at"]
    assert esc["idempotency_key"] == f"{TENANT}:partner_approval:req-x:escalate:manager"
    assert escalated["context"]["escalated_stages"] == ["manager"]
    detail = "stage manager had no decision within twice its SLA of 0.0005 h (escalated at 0.0005 h)"
    assert (void["command_type"], void["kind"], void["entity_id"]) == (
        "partner_approval.void_request",
        "compensation",
        "req-x",
    )
    assert void["data"] == {"partner_id": "partner-311", "reason": "expired", "stage": "manager", "detail": detail}
    assert bodies[2]["data"]["outcome"] == "expired"
    assert await lifecycle(pg, "req-x") == [
        "workflow.started",
        "workflow.failed",
        "workflow.compensated",
        "workflow.completed",
    ]
    assert await timers(pg, "req-x") == []
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM sfworkflow.effect WHERE effect_key = $1",
            f"partner_approval.escalate:{TENANT}:req-x:manager",
        )
        == 1
    )
    events = [(h["event_type"], h["to_state"]) for h in await history(pg, "req-x")]
    assert events == [
        ("partner_approval.requested", "in_review"),
        ("partner_approval.timer.sla_due", "escalated"),
        ("partner_approval.timer.expiry_due", "expired"),
    ]


async def test_approval_after_escalation_moves_on_and_drops_the_expiry(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        sla = {"partner_id": "partner-311", "stages": ["manager", "legal"], "sla_hours": {"manager": FAST, "legal": 1}}
        await mq.publish(event("partner_approval.requested", "req-e", sla))
        await wait_state(pg, "req-e", "escalated", timeout=6)
        await mq.publish(event("partner_approval.approved", "req-e", approved("manager")))
        await wait_for(lambda: _review_of(pg, "req-e", 1), what="legal under review")
        assert await timers(pg, "req-e") == ["sla_due"]
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert [(b["command_type"], b["data"]["stage"]) for b in bodies] == [
        ("partner_approval.request_review", "manager"),
        ("partner_approval.escalate", "manager"),
        ("partner_approval.request_review", "legal"),
    ]


async def _review_of(pg: asyncpg.Connection, entity: str, cursor: int) -> bool:
    r = await row(pg, entity)
    return r is not None and r["state"] == "in_review" and r["context"]["cursor"] == cursor


async def test_rejection_voids_and_leaves_nothing_pending(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        compensations = Inbox(mq, COMPENSATIONS)
        await mq.publish(event("partner_approval.requested", "req-r", requested("manager", "legal")))
        await commands.wait(1)
        await mq.publish(event("partner_approval.approved", "req-r", approved("manager")))
        await commands.wait(2)
        reason = "Missing tax documents."
        await mq.publish(
            event("partner_approval.rejected", "req-r", {"stage": "legal", "approver_id": "legal-9", "reason": reason})
        )
        await wait_state(pg, "req-r", "rejected")
        (void,) = await compensations.wait(1)
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert void["command_type"] == "partner_approval.void_request"
    assert void["data"] == {
        "partner_id": "partner-311",
        "reason": "rejected",
        "stage": "legal",
        "detail": f"rejected at stage legal by legal-9: {reason}",
    }
    assert bodies[-1]["command_type"] == "partner_approval.notify_outcome"
    assert bodies[-1]["data"]["outcome"] == "rejected" and bodies[-1]["data"]["reason"] == reason
    assert len(bodies) == 3
    assert await timers(pg, "req-r") == []
    assert await lifecycle(pg, "req-r") == [
        "workflow.started",
        "workflow.failed",
        "workflow.compensated",
        "workflow.completed",
    ]


async def test_withdrawal_voids_the_request(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        compensations = Inbox(mq, COMPENSATIONS)
        await mq.publish(event("partner_approval.requested", "req-w", requested("manager")))
        await commands.wait(1)
        await mq.publish(event("partner_approval.withdrawn", "req-w", {"requested_by": "partner-portal"}))
        await wait_state(pg, "req-w", "withdrawn")
        (void,) = await compensations.wait(1)
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert void["data"] == {
        "partner_id": "partner-311",
        "reason": "withdrawn",
        "stage": "manager",
        "detail": "withdrawn at stage manager by partner-portal",
    }
    assert bodies[-1]["data"]["outcome"] == "withdrawn"
    assert await timers(pg, "req-w") == []
    assert await lifecycle(pg, "req-w") == ["workflow.started", "workflow.compensated", "workflow.completed"]


async def test_approval_of_a_later_stage_is_parked_then_applied(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        await mq.publish(event("partner_approval.requested", "req-o", requested("manager", "legal")))
        await commands.wait(1)
        early = event("partner_approval.approved", "req-o", approved("legal"))
        await mq.publish(early)
        await wait_for(lambda: pg.fetchval("SELECT count(*) FROM sfworkflow.parked"), what="legal approval parked")
        assert (await row(pg, "req-o"))["parked_count"] == 1
        await mq.publish(event("partner_approval.approved", "req-o", approved("manager")))
        await wait_state(pg, "req-o", "approved")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)
        unparked = counter(service.metrics.unparked, WORKFLOW)

    assert [b["command_type"] for b in bodies] == [
        "partner_approval.request_review",
        "partner_approval.request_review",
        "partner_approval.notify_outcome",
    ]
    (h,) = await history_for_event(pg, early["event_id"])
    assert (h["outcome"], h["from_state"], h["to_state"]) == ("applied", "in_review", "approved")
    assert h["detail"]["unparked"] is True
    assert unparked == 1
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == 0


async def test_escalation_already_made_is_suppressed_by_its_key(settings: Settings, pg: asyncpg.Connection) -> None:
    """The escalate effect key holds "once per stage" in the database: if it was claimed before (here written
    by hand, as a restored or replayed instance would find it), the escalation is not published again."""
    effect_key = f"partner_approval.escalate:{TENANT}:req-s:manager"
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS)
        await mq.publish(event("partner_approval.requested", "req-s", requested("manager", hours=0.001)))
        r = await wait_state(pg, "req-s", "in_review")
        await pg.execute(
            "INSERT INTO sfworkflow.effect (effect_key, tenant_id, instance_id, command_id, idempotency_key) "
            "VALUES ($1, $2, $3, $4, $5)",
            effect_key,
            uuid.UUID(TENANT),
            r["id"],
            uuid.uuid4(),
            f"{TENANT}:partner_approval:req-s:escalate:manager",
        )
        await wait_state(pg, "req-s", "escalated", timeout=8)
        await wait_for(lambda: _suppressed_noted(pg, "req-s"), what="suppression noted")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)
        suppressed = counter(service.metrics.suppressed, WORKFLOW)

    assert [b["command_type"] for b in bodies] == ["partner_approval.request_review"]
    assert suppressed == 1
    rows = [(h["event_type"], h["outcome"], h["to_state"]) for h in await history(pg, "req-s")]
    assert rows[1:] == [
        ("partner_approval.timer.sla_due", "applied", "escalated"),
        ("partner_approval.escalate", "suppressed", "escalated"),
        ("partner_approval.effect_suppressed", "applied", "escalated"),
    ]
    assert await timers(pg, "req-s") == ["expiry_due"]


async def _suppressed_noted(pg: asyncpg.Connection, entity: str) -> bool:
    return any(h["event_type"] == "partner_approval.effect_suppressed" for h in await history(pg, entity))
