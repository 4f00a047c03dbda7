"""Failed sends: retry with backoff, retries exhausted, non-retryable failures, missing consent."""

from __future__ import annotations

import time

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import (
    COMMANDS_Q,
    COMPENSATIONS_Q,
    LIFECYCLE_EXCHANGE,
    Inbox,
    bind_capture_queue,
    history_for_event,
    outcomes,
    quick,
    timers_of,
    wait_all_published,
    wait_state,
)
from tests.support import Amqp, enrolled_data, event, history, instance, outbox, running_service


def _failed(step: int, retryable: bool, attempt: int | None = None, code: str = "provider_timeout") -> dict:
    data: dict = {"step": step, "error_code": code, "retryable": retryable}
    if attempt is not None:
        data["attempt"] = attempt
    return data


async def test_retryable_failure_is_retried_with_same_idempotency_key(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "retry-1", enrolled_data(steps=1)))
        first = (await commands.wait(1))[0]
        assert first["attempt"] == 1

        failed_at = time.monotonic()
        first_failure = event("sequence.step_failed", "retry-1", _failed(0, True, attempt=1))
        await mq.publish(first_failure)
        await wait_state(pg, "retry-1", "retry_wait")
        assert [t["name"] for t in await timers_of(pg, "retry-1")] == ["retry_due"]
        second = (await commands.wait(2, timeout=10))[1]
        waited = time.monotonic() - failed_at
        await wait_state(pg, "retry-1", "sending")
        # A late report about attempt 1 (another event id) is stale: ignored, it does not fail attempt 2.
        late = event("sequence.step_failed", "retry-1", _failed(0, True, attempt=1))
        await mq.publish(late)
        await wait_for(lambda: history_for_event(pg, late["event_id"]), what="late report recorded")

        await mq.publish(event("sequence.step_sent", "retry-1", {"step": 0, "provider_message_id": "p", "attempt": 2}))
        await wait_state(pg, "retry-1", "completed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert len(bodies) == 2
    # The backoff the failure scheduled: base 1 s, jitter +-20 % (from the history, not a wall-clock reading,
    # which a loaded machine stretches); the retry is never sent before it (commands.wait bounds it above).
    (failure,) = await history_for_event(pg, first_failure["event_id"])
    delay = failure["detail"]["retry_in_s"]
    assert 0.8 <= delay <= 1.2, delay
    assert waited >= delay - 0.01, (waited, delay)
    assert second["command_type"] == "sequence.send_step"
    assert second["idempotency_key"] == first["idempotency_key"]
    assert second["attempt"] == 2
    assert second["command_id"] != first["command_id"]
    assert second["data"] == first["data"]
    hist = await outcomes(pg, "retry-1")
    assert hist == [
        ("sequence.enrolled", "applied", "new", "waiting"),
        ("sequence.timer.step_due", "applied", "waiting", "sending"),
        ("sequence.step_failed", "applied", "sending", "retry_wait"),
        ("sequence.timer.retry_due", "applied", "retry_wait", "sending"),
        ("sequence.step_failed", "ignored", "sending", "sending"),
        ("sequence.step_sent", "applied", "sending", "completed"),
    ]
    assert "superseded" in (await history_for_event(pg, late["event_id"]))[0]["detail"]["reason"]
    retry_row = (await history(pg, "retry-1"))[3]
    assert retry_row["detail"] == {"retry_attempt": 2, "trigger": "timer_retry_due", "data": {}}
    assert await timers_of(pg, "retry-1") == []


async def test_retries_exhausted_compensates(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        await bind_capture_queue(settings.amqp_url, LIFECYCLE_EXCHANGE, "test.lifecycle")
        commands = Inbox(mq, COMMANDS_Q)
        compensations = Inbox(mq, COMPENSATIONS_Q)
        lifecycle = Inbox(mq, "test.lifecycle")
        await mq.publish(event("sequence.enrolled", "exh-1", enrolled_data(steps=2)))
        for attempt in (1, 2, 3):
            sends = await commands.wait(attempt, timeout=10, what=f"send_step attempt {attempt}")
            assert sends[-1]["attempt"] == attempt
            await mq.publish(event("sequence.step_failed", "exh-1", _failed(0, True, attempt=attempt)))
        await wait_state(pg, "exh-1", "compensated")
        comp = await compensations.wait(2)
        await wait_all_published(pg)
        comp = await compensations.settle(0.3)
        life = await lifecycle.settle(0.2)
        sends = await commands.settle(0.2)

    assert len(sends) == 3
    assert len({c["idempotency_key"] for c in sends}) == 1
    assert sorted(c["command_type"] for c in comp) == ["sequence.disable_sequence", "sequence.raise_alert"]
    by_type = {c["command_type"]: c for c in comp}
    for c in comp:
        assert c["kind"] == "compensation"
        assert c["entity_id"] == "exh-1"
        assert c["workflow"] == "sequence"
    disable = by_type["sequence.disable_sequence"]["data"]
    assert disable["sequence_id"] == "seq-1"
    assert "after 3 attempts" in disable["reason"] and "provider_timeout" in disable["reason"]
    alert = by_type["sequence.raise_alert"]["data"]
    assert alert["severity"] == "warning"
    assert alert["error_code"] == "provider_timeout" and alert["step"] == 0
    assert "seq-1" in alert["message"]

    rows = await outbox(pg, "exh-1", "lifecycle")
    assert [r["body"]["event_type"] for r in rows] == [
        "workflow.started",
        "workflow.failed",
        "workflow.compensated",
        "workflow.completed",
    ]
    assert all(r["published"] for r in rows)
    assert [m["event_type"] for m in life] == [
        "workflow.started",
        "workflow.failed",
        "workflow.compensated",
        "workflow.completed",
    ]
    row = await instance(pg, "exh-1")
    assert row["terminal"] and row["context"]["attempt"] == 3
    assert await timers_of(pg, "exh-1") == []


async def test_non_retryable_failure_compensates_at_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        compensations = Inbox(mq, COMPENSATIONS_Q)
        await mq.publish(event("sequence.enrolled", "fatal-1", enrolled_data(steps=3)))
        await commands.wait(1)
        await mq.publish(event("sequence.step_failed", "fatal-1", _failed(0, False, code="template_rejected")))
        await wait_state(pg, "fatal-1", "compensated")
        await compensations.wait(2)
        await wait_all_published(pg)
        comp = await compensations.settle(0.3)
        sends = await commands.settle(0.3)

    assert len(sends) == 1
    assert sorted(c["command_type"] for c in comp) == ["sequence.disable_sequence", "sequence.raise_alert"]
    disable = next(c for c in comp if c["command_type"] == "sequence.disable_sequence")["data"]
    assert disable == {"sequence_id": "seq-1", "reason": "step 0 failed: template_rejected"}
    assert (await outcomes(pg, "fatal-1"))[-1] == ("sequence.step_failed", "applied", "sending", "compensated")
    assert [r["body"]["event_type"] for r in await outbox(pg, "fatal-1", "lifecycle")] == [
        "workflow.started",
        "workflow.failed",
        "workflow.compensated",
        "workflow.completed",
    ]


async def test_consent_missing_skips_the_step(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        compensations = Inbox(mq, COMPENSATIONS_Q)
        await mq.publish(event("sequence.enrolled", "consent-1", enrolled_data(steps=2)))
        await commands.wait(1)
        await mq.publish(event("sequence.step_failed", "consent-1", _failed(0, False, code="consent_missing")))
        sends = await commands.wait(2)
        assert [c["data"]["step"] for c in sends] == [0, 1]
        await wait_state(pg, "consent-1", "sending")
        # The last step without consent: skipped as well, and the sequence completes.
        await mq.publish(event("sequence.step_failed", "consent-1", _failed(1, False, code="consent_missing")))
        await wait_state(pg, "consent-1", "completed")
        await wait_all_published(pg)
        comp = await compensations.settle(0.3)

    assert comp == []
    rows = [h for h in await history(pg, "consent-1") if h["event_type"] == "sequence.step_failed"]
    assert [(h["from_state"], h["to_state"]) for h in rows] == [("sending", "waiting"), ("sending", "completed")]
    assert rows[0]["detail"]["skipped_step"] == 0 and rows[0]["detail"]["error_code"] == "consent_missing"
    assert rows[1]["detail"]["skipped_step"] == 1
    ctx = (await instance(pg, "consent-1"))["context"]
    assert ctx["skipped"] == 2 and ctx["sent"] == 0
    assert [r["body"]["event_type"] for r in await outbox(pg, "consent-1", "lifecycle")] == [
        "workflow.started",
        "workflow.completed",
    ]
