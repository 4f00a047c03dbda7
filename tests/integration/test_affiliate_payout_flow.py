"""The affiliate_payout workflow end to end against the real service, PostgreSQL and RabbitMQ.

The test plays the ledger and payment workers itself: it reads commands from
sfworkflow.commands.affiliate_payout and publishes their answers."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import Inbox, history_for_event, outcomes, parked_rows, quick, wait_all_published
from tests.support import TENANT, Amqp, event, instance, outbox, running_service

WORKFLOW = "affiliate_payout"
COMMANDS_Q = "sfworkflow.commands.affiliate_payout"
COMPENSATIONS_Q = "sfworkflow.compensations.affiliate_payout"


def opened(commissions: list[str], amount: str = "1250.50", currency: str = "USD") -> dict[str, Any]:
    return {"affiliate_id": "aff-204", "commission_ids": commissions, "amount": amount, "currency": currency}


def claim_key(commission: str) -> str:
    return f"affiliate_payout.commission:{TENANT}:{commission}"


async def state(pg: asyncpg.Connection, entity: str) -> str | None:
    row = await instance(pg, entity, workflow=WORKFLOW)
    return None if row is None else row["state"]


async def wait_state(pg: asyncpg.Connection, entity: str, wanted: str, timeout: float = 15.0) -> None:
    async def check() -> bool:
        return await state(pg, entity) == wanted

    await wait_for(check, timeout=timeout, what=f"{entity} in state {wanted!r}")


async def claims(pg: asyncpg.Connection) -> dict[str, str]:
    rows = await pg.fetch("SELECT claim_key, entity_id FROM sfworkflow.claim WHERE workflow = $1", WORKFLOW)
    return {r["claim_key"]: r["entity_id"] for r in rows}


def commands_of(bodies: list[dict[str, Any]], entity: str) -> list[tuple[str, int]]:
    return [(b["command_type"].partition(".")[2], b["attempt"]) for b in bodies if b["entity_id"] == entity]


async def test_happy_path_settles_with_one_ledger_entry_and_one_payout(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("affiliate_payout.batch_opened", "b-1", opened(["com-1", "com-2"])))
        ledger = (await commands.wait(1, what="post_ledger_entry"))[0]
        assert ledger["command_type"] == "affiliate_payout.post_ledger_entry"
        assert ledger["data"] == opened(["com-1", "com-2"])
        assert ledger["attempt"] == 1 and ledger["idempotency_key"] == f"{TENANT}:affiliate_payout:b-1:ledger"
        await wait_state(pg, "b-1", "posting")
        assert await claims(pg) == {claim_key("com-1"): "b-1", claim_key("com-2"): "b-1"}

        await mq.publish(event("affiliate_payout.ledger_posted", "b-1", {"entry_id": "le-1", "attempt": 1}))
        payout = (await commands.wait(2, what="send_payout"))[1]
        assert payout["command_type"] == "affiliate_payout.send_payout"
        assert payout["data"] == {"affiliate_id": "aff-204", "entry_id": "le-1", "amount": "1250.50", "currency": "USD"}
        await mq.publish(event("affiliate_payout.payout_sent", "b-1", {"payment_reference": "po-1", "attempt": 1}))
        await wait_state(pg, "b-1", "awaiting_settlement")
        await mq.publish(event("affiliate_payout.settled", "b-1", {"payment_reference": "po-1"}))
        await wait_state(pg, "b-1", "settled")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)
        assert await mq.drain_json(COMPENSATIONS_Q) == []

    assert commands_of(bodies, "b-1") == [("post_ledger_entry", 1), ("send_payout", 1)]
    assert await outcomes(pg, "b-1") == [
        ("affiliate_payout.batch_opened", "applied", "new", "claiming"),
        ("affiliate_payout.lookup_result", "applied", "claiming", "posting"),
        ("affiliate_payout.ledger_posted", "applied", "posting", "paying"),
        ("affiliate_payout.payout_sent", "applied", "paying", "awaiting_settlement"),
        ("affiliate_payout.settled", "applied", "awaiting_settlement", "settled"),
    ]
    # one effect row per command; the commissions stay claimed (paid); the batch is remembered as settled
    effects = {r["effect_key"] for r in await pg.fetch("SELECT effect_key FROM sfworkflow.effect")}
    assert effects == {f"affiliate_payout.ledger:{TENANT}:b-1", f"affiliate_payout.payout:{TENANT}:b-1"}
    assert await claims(pg) == {claim_key("com-1"): "b-1", claim_key("com-2"): "b-1"}
    value = await pg.fetchval(
        "SELECT value FROM sfworkflow.register WHERE key = $1", f"affiliate_payout.settled:{TENANT}:b-1"
    )
    assert value == {"entry_id": "le-1", "payment_reference": "po-1"}
    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "b-1", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.completed"]
    row = await instance(pg, "b-1", workflow=WORKFLOW)
    assert row["terminal"] and row["context"]["amount"] == "1250.50"


async def test_a_duplicate_event_is_applied_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        opened_ev = event("affiliate_payout.batch_opened", "b-dup", opened(["com-d"]))
        await mq.publish(opened_ev, times=3)
        await commands.wait(1)
        posted = event("affiliate_payout.ledger_posted", "b-dup", {"entry_id": "le-d"})
        await mq.publish(posted, times=3)
        await commands.wait(2)
        await wait_state(pg, "b-dup", "paying")
        await wait_all_published(pg)
        bodies = await commands.settle(0.5)

    assert commands_of(bodies, "b-dup") == [("post_ledger_entry", 1), ("send_payout", 1)]
    assert len(await history_for_event(pg, opened_ev["event_id"])) == 1
    assert len(await history_for_event(pg, posted["event_id"])) == 1


async def test_a_commission_in_another_open_batch_rejects_the_batch(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("affiliate_payout.batch_opened", "b-a", opened(["com-1", "com-2"])))
        await wait_state(pg, "b-a", "posting")
        # b-b shares com-2 with the open b-a: refused, rejected, nothing posted, com-3 not kept
        await mq.publish(event("affiliate_payout.batch_opened", "b-b", opened(["com-3", "com-2"])))
        await wait_state(pg, "b-b", "rejected")
        assert await claims(pg) == {claim_key("com-1"): "b-a", claim_key("com-2"): "b-a"}

        # b-a's payout fails for good: reversed, its claims are released; a new batch may take com-2
        await mq.publish(event("affiliate_payout.ledger_posted", "b-a", {"entry_id": "le-a"}))
        await commands.wait(2)
        await mq.publish(event("affiliate_payout.failed", "b-a", {"error_code": "account_closed", "retryable": False}))
        await wait_state(pg, "b-a", "reversed")
        assert await claims(pg) == {}
        await mq.publish(event("affiliate_payout.batch_opened", "b-c", opened(["com-2"])))
        await wait_state(pg, "b-c", "posting")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)
        compensations = await mq.drain_json(COMPENSATIONS_Q)

    assert commands_of(bodies, "b-b") == []
    assert commands_of(bodies, "b-c") == [("post_ledger_entry", 1)]
    assert await claims(pg) == {claim_key("com-2"): "b-c"}
    assert [c["entity_id"] for c in compensations] == ["b-a"]  # none for the rejected batch
    # the claims are resolved before the lookup: the lookup's answer finds the batch rejected (not recorded)
    assert await outcomes(pg, "b-b") == [
        ("affiliate_payout.batch_opened", "applied", "new", "claiming"),
        ("affiliate_payout.claim_refused", "applied", "claiming", "rejected"),
    ]
    lifecycle = [m["body"] for m in await outbox(pg, "b-b", "lifecycle")]
    assert [b["event_type"] for b in lifecycle] == ["workflow.started", "workflow.failed", "workflow.completed"]
    assert lifecycle[1]["data"]["error_code"] == "commission_in_open_batch"
    assert "b-a" in lifecycle[1]["data"]["reason"]


async def test_a_ledger_entry_asked_for_before_is_suppressed_by_its_effect_key(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    # An earlier instance of batch b-old asked for its ledger entry (its row was purged since; the effect stays).
    await pg.execute(
        "INSERT INTO sfworkflow.effect (effect_key, tenant_id, instance_id, command_id, idempotency_key) "
        "VALUES ($1, $2, 0, $3, $4)",
        f"affiliate_payout.ledger:{TENANT}:b-old",
        TENANT,
        str(uuid.uuid4()),
        f"{TENANT}:affiliate_payout:b-old:ledger",
    )
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("affiliate_payout.batch_opened", "b-old", opened(["com-o"])))
        await wait_state(pg, "b-old", "duplicate")
        await wait_all_published(pg)
        bodies = await commands.settle(0.5)

    assert bodies == []  # the ledger entry is not asked for twice
    assert await outcomes(pg, "b-old") == [
        ("affiliate_payout.batch_opened", "applied", "new", "claiming"),
        ("affiliate_payout.lookup_result", "applied", "claiming", "posting"),
        ("affiliate_payout.post_ledger_entry", "suppressed", "posting", "posting"),
        ("affiliate_payout.effect_suppressed", "applied", "posting", "duplicate"),
    ]
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE kind = 'command'") == 0


async def test_a_payout_failing_after_retries_reverses_the_ledger_entry(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("affiliate_payout.batch_opened", "b-r", opened(["com-r1", "com-r2"], "99.90", "EUR")))
        await commands.wait(1)
        await mq.publish(event("affiliate_payout.ledger_posted", "b-r", {"entry_id": "le-r"}))
        first = (await commands.wait(2))[1]
        failed_at = time.monotonic()
        retryable = {"error_code": "provider_timeout", "retryable": True, "command": "send_payout", "attempt": 1}
        first_failure = event("affiliate_payout.failed", "b-r", retryable)
        await mq.publish(first_failure)
        second = (await commands.wait(3, timeout=10))[2]
        waited = time.monotonic() - failed_at
        fatal = {"error_code": "account_closed", "retryable": False, "command": "send_payout", "attempt": 2}
        await mq.publish(event("affiliate_payout.failed", "b-r", fatal))
        await wait_state(pg, "b-r", "reversed")
        await wait_all_published(pg)
        compensations = await Inbox(mq, COMPENSATIONS_Q).wait(1)
        bodies = await commands.settle(0.3)

    # The backoff the failure scheduled: base 1 s, jitter +-20 % (from the history, not a wall-clock reading,
    # which a loaded machine stretches); the retry is never sent before it (commands.wait bounds it above).
    (failure,) = await history_for_event(pg, first_failure["event_id"])
    delay = failure["detail"]["retry_in_s"]
    assert 0.8 <= delay <= 1.2, delay
    assert waited >= delay - 0.01, (waited, delay)
    assert (second["idempotency_key"], second["attempt"]) == (first["idempotency_key"], 2)
    assert second["data"] == first["data"] and second["command_id"] != first["command_id"]
    assert commands_of(bodies, "b-r") == [("post_ledger_entry", 1), ("send_payout", 1), ("send_payout", 2)]
    (comp,) = compensations
    assert comp["command_type"] == "affiliate_payout.reverse_ledger_entry" and comp["kind"] == "compensation"
    assert comp["data"] == {"entry_id": "le-r", "amount": "99.90", "currency": "EUR"}
    assert comp["entity_id"] == "b-r" and comp["tenant_id"] == TENANT
    assert await claims(pg) == {}  # the batch ended unpaid: its commissions are free
    lifecycle = [m["body"] for m in await outbox(pg, "b-r", "lifecycle")]
    assert [b["event_type"] for b in lifecycle] == [
        "workflow.started",
        "workflow.failed",
        "workflow.compensated",
        "workflow.completed",
    ]
    assert lifecycle[2]["data"] == {"compensations": ["affiliate_payout.reverse_ledger_entry"]}
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.timer") == 0


async def test_a_ledger_entry_that_cannot_be_posted_ends_without_compensation(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("affiliate_payout.batch_opened", "b-l", opened(["com-l"])))
        await commands.wait(1)
        failed = {"error_code": "ledger_rejected", "retryable": False, "command": "post_ledger_entry", "attempt": 1}
        await mq.publish(event("affiliate_payout.failed", "b-l", failed))
        await wait_state(pg, "b-l", "ledger_failed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)
        compensations = await mq.drain_json(COMPENSATIONS_Q)

    assert commands_of(bodies, "b-l") == [("post_ledger_entry", 1)]
    assert compensations == []
    assert await claims(pg) == {}
    lifecycle = [m["body"]["event_type"] for m in await outbox(pg, "b-l", "lifecycle")]
    assert lifecycle == ["workflow.started", "workflow.failed", "workflow.completed"]


async def test_settled_before_payout_sent_is_parked_then_applied(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("affiliate_payout.batch_opened", "b-o", opened(["com-o1"])))
        await commands.wait(1)
        await mq.publish(event("affiliate_payout.ledger_posted", "b-o", {"entry_id": "le-o"}))
        await commands.wait(2)
        early = event("affiliate_payout.settled", "b-o", {"payment_reference": "po-o"})
        await mq.publish(early)
        await wait_for(lambda: parked_rows(pg), what="settled parked")
        assert await state(pg, "b-o") == "paying"
        await mq.publish(event("affiliate_payout.payout_sent", "b-o", {"payment_reference": "po-o"}))
        await wait_state(pg, "b-o", "settled")
        await wait_all_published(pg)

    assert await parked_rows(pg) == []
    applied = await history_for_event(pg, early["event_id"])
    assert len(applied) == 1 and applied[0]["outcome"] == "applied" and applied[0]["detail"]["unparked"] is True
    assert (applied[0]["from_state"], applied[0]["to_state"]) == ("awaiting_settlement", "settled")
