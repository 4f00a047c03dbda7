"""The notification workflow end to end against the real service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

from typing import Any

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import Inbox, quick, wait_all_published
from tests.support import TENANT, Amqp, event, history, outbox, running_service

COMMANDS_Q = "sfworkflow.commands.notification"
COMPENSATIONS_Q = "sfworkflow.compensations.notification"


def requested(channel: str = "email", recipient: str = "ana@example.com") -> dict[str, Any]:
    return {
        "channel": channel,
        "recipient": recipient,
        "template": "tpl-demo-reminder",
        "body": "Hi Ana, your demo starts in one hour.",
    }


def claim_key(external_id: str, channel: str = "email") -> str:
    return f"notification.external_id:{TENANT}:{channel}:{external_id}"


async def state_of(pg: asyncpg.Connection, entity: str) -> str | None:
    return await pg.fetchval(
        "SELECT state FROM sfworkflow.instance WHERE tenant_id = $1 AND workflow = 'notification' AND entity_id = $2",
        TENANT,
        entity,
    )


async def wait_state(pg: asyncpg.Connection, entity: str, state: str, timeout: float = 15.0) -> None:
    async def check() -> bool:
        return await state_of(pg, entity) == state

    await wait_for(check, timeout=timeout, what=f"{entity} in state {state!r}")


async def claims(pg: asyncpg.Connection) -> dict[str, str]:
    return {r["claim_key"]: r["entity_id"] for r in await pg.fetch("SELECT claim_key, entity_id FROM sfworkflow.claim")}


async def history_of_event(pg: asyncpg.Connection, event_id: str) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM sfworkflow.history WHERE event_id = $1 ORDER BY id", event_id)


async def parked(pg: asyncpg.Connection, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == n


async def deliver(mq: Amqp, pg: asyncpg.Connection, entity: str, external_id: str, attempt: int = 1) -> None:
    """The provider accepts the current send under `external_id` and then delivers it."""
    await mq.publish(event("notification.provider_accepted", entity, {"external_id": external_id, "attempt": attempt}))
    await wait_state(pg, entity, "accepted")
    await mq.publish(event("notification.delivered", entity, {"external_id": external_id, "attempt": attempt}))


async def test_happy_path_reaches_delivered_and_holds_the_external_id(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("notification.requested", "n-1", requested()))
        (cmd,) = await commands.wait(1)
        assert cmd["command_type"] == "notification.send" and cmd["kind"] == "command"
        assert cmd["data"] == requested()
        assert (cmd["idempotency_key"], cmd["attempt"]) == (f"{TENANT}:notification:n-1:send", 1)
        await deliver(mq, pg, "n-1", "EXT-1")
        await wait_state(pg, "n-1", "delivered")
        await wait_all_published(pg)

    transitions = [(h["event_type"], h["from_state"], h["to_state"]) for h in await history(pg, "n-1")]
    assert transitions == [
        ("notification.requested", "new", "sending"),
        ("notification.provider_accepted", "sending", "checking"),
        ("notification.lookup_result", "checking", "accepted"),
        ("notification.delivered", "accepted", "delivered"),
    ]
    assert await claims(pg) == {claim_key("EXT-1"): "n-1"}
    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "n-1", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.completed"]


async def test_duplicate_events_are_applied_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        req = event("notification.requested", "n-2", requested())
        await mq.publish(req, times=2)
        await commands.wait(1)
        accepted = event("notification.provider_accepted", "n-2", {"external_id": "EXT-2", "attempt": 1})
        await mq.publish(accepted, times=2)
        await wait_state(pg, "n-2", "accepted")
        # the same acceptance reported again under another event id: stale, ignored
        again = event("notification.provider_accepted", "n-2", {"external_id": "EXT-2", "attempt": 1})
        await mq.publish(again)
        await wait_for(lambda: history_of_event(pg, again["event_id"]), what="second acceptance recorded")
        delivered = event("notification.delivered", "n-2", {"attempt": 1})
        await mq.publish(delivered, times=3)
        await wait_state(pg, "n-2", "delivered")
        await wait_all_published(pg)
        assert len(await commands.settle(0.3)) == 1

    for e in (req, accepted, delivered):
        assert len(await history_of_event(pg, e["event_id"])) == 1
    (h,) = await history_of_event(pg, again["event_id"])
    assert (h["outcome"], h["detail"]) == ("ignored", {"reason": "attempt 1 was already accepted as EXT-2"})


async def test_an_external_id_held_by_another_notification_is_suppressed(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        compensations = Inbox(mq, COMPENSATIONS_Q)
        for entity, channel in (("n-a", "email"), ("n-b", "email"), ("n-c", "sms")):
            await mq.publish(event("notification.requested", entity, requested(channel)))
        for entity in ("n-a", "n-b", "n-c"):
            await wait_state(pg, entity, "sending")
        await deliver(mq, pg, "n-a", "DUP-1")
        await wait_state(pg, "n-a", "delivered")
        # n-b gets the same external id on the same channel: the claim is refused
        await mq.publish(event("notification.provider_accepted", "n-b", {"external_id": "DUP-1", "attempt": 1}))
        await wait_state(pg, "n-b", "duplicate_suppressed")
        late = event("notification.delivered", "n-b", {"external_id": "DUP-1", "attempt": 1})
        await mq.publish(late)
        # n-c has it on another channel: no conflict
        await deliver(mq, pg, "n-c", "DUP-1")
        await wait_state(pg, "n-c", "delivered")
        (comp,) = await compensations.wait(1)
        await wait_for(lambda: history_of_event(pg, late["event_id"]), what="late delivery recorded")
        await wait_all_published(pg)
        assert len(await compensations.settle(0.3)) == 1

    assert comp["command_type"] == "notification.skip_duplicate" and comp["kind"] == "compensation"
    assert comp["entity_id"] == "n-b"
    assert comp["data"] == {"external_id": "DUP-1", "original_entity_id": "n-a"}
    assert comp["idempotency_key"] == f"{TENANT}:notification:n-b:skip_duplicate"
    assert [(h["outcome"], h["to_state"]) for h in await history_of_event(pg, late["event_id"])] == [
        ("ignored", "duplicate_suppressed")
    ]
    assert await claims(pg) == {claim_key("DUP-1"): "n-a", claim_key("DUP-1", "sms"): "n-c"}
    lifecycle = [m["body"] for m in await outbox(pg, "n-b", "lifecycle")]
    assert [b["event_type"] for b in lifecycle] == ["workflow.started", "workflow.compensated", "workflow.completed"]
    assert lifecycle[2]["data"] == {"final_state": "duplicate_suppressed"}


async def test_delivered_before_accepted_is_parked_then_applied(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("notification.requested", "n-4", requested()))
        await wait_state(pg, "n-4", "sending")
        await mq.publish(event("notification.delivered", "n-4", {"external_id": "EXT-4", "attempt": 1}))
        await wait_for(lambda: parked(pg, 1), what="delivered parked")
        await mq.publish(event("notification.provider_accepted", "n-4", {"external_id": "EXT-4", "attempt": 1}))
        await wait_state(pg, "n-4", "delivered")
        await wait_for(lambda: parked(pg, 0), what="parked event gone")
        await wait_all_published(pg)

    rows = [(h["event_type"], h["to_state"], (h["detail"] or {}).get("unparked")) for h in await history(pg, "n-4")]
    assert rows == [
        ("notification.requested", "sending", None),
        ("notification.provider_accepted", "checking", None),
        ("notification.lookup_result", "accepted", None),
        ("notification.delivered", "delivered", True),
    ]


async def test_a_parked_delivery_of_a_duplicate_is_not_counted(settings: Settings, pg: asyncpg.Connection) -> None:
    """The delivery report arrives first and is parked; applied in the same transaction as the duplicate
    acceptance, it must not end the instance `delivered` before the claim is refused."""
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        compensations = Inbox(mq, COMPENSATIONS_Q)
        for entity in ("n-5a", "n-5b"):
            await mq.publish(event("notification.requested", entity, requested()))
            await wait_state(pg, entity, "sending")
        await deliver(mq, pg, "n-5a", "DUP-5")
        await wait_state(pg, "n-5a", "delivered")  # applied before n-5b's events are published: n-5a holds DUP-5
        await mq.publish(event("notification.delivered", "n-5b", {"attempt": 1}))
        await wait_for(lambda: parked(pg, 1), what="delivered parked")
        await mq.publish(event("notification.provider_accepted", "n-5b", {"external_id": "DUP-5", "attempt": 1}))
        await wait_state(pg, "n-5b", "duplicate_suppressed")
        (comp,) = await compensations.wait(1)
        await wait_for(lambda: parked(pg, 0), what="parked event resolved")
        await wait_all_published(pg)

    assert comp["data"] == {"external_id": "DUP-5", "original_entity_id": "n-5a"}
    assert await state_of(pg, "n-5a") == "delivered"


async def test_retry_then_non_retryable_failure_ends_failed(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        compensations = Inbox(mq, COMPENSATIONS_Q)
        await mq.publish(event("notification.requested", "n-6", requested()))
        first = (await commands.wait(1))[0]
        failed = {"error_code": "provider_unavailable", "retryable": True, "attempt": 1}
        await mq.publish(event("notification.failed", "n-6", failed))
        second = (await commands.wait(2, timeout=10))[1]
        assert second["idempotency_key"] == first["idempotency_key"] == f"{TENANT}:notification:n-6:send"
        assert (second["attempt"], second["data"]) == (2, first["data"])
        assert second["command_id"] != first["command_id"]
        fatal = {"error_code": "invalid_recipient", "retryable": False, "attempt": 2}
        await mq.publish(event("notification.failed", "n-6", fatal))
        await wait_state(pg, "n-6", "failed")
        await wait_all_published(pg)
        assert await compensations.settle(0.3) == []  # the issue names no compensation for a failed send

    lifecycle = [m["body"] for m in await outbox(pg, "n-6", "lifecycle")]
    assert [b["event_type"] for b in lifecycle] == ["workflow.started", "workflow.failed", "workflow.completed"]
    assert lifecycle[1]["data"] == {"reason": "send failed: invalid_recipient", "error_code": "invalid_recipient"}
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.timer") == 0
