"""Exactly-once application: duplicate deliveries (inbox dedupe) and duplicate effects (effect keys)."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import (
    COMMANDS_Q,
    Inbox,
    counter,
    history_for_event,
    outcomes,
    quick,
    same_utc_day_for,
    state_of,
    wait_all_published,
    wait_state,
)
from tests.support import Amqp, enrolled_data, event, instance, running_service


async def _inbox_rows(pg: asyncpg.Connection, event_id: str) -> int:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.inbox WHERE event_id = $1", event_id)


async def test_same_event_published_twice_is_applied_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        ev = event("sequence.enrolled", "dup-1", enrolled_data(steps=1))
        await mq.publish(ev)
        await wait_state(pg, "dup-1", "sending")
        await commands.wait(1)
        # The same event again, well after the first was applied: the inbox drops it.
        await mq.publish(ev)
        await wait_for(lambda: _metric_at_least(service, "duplicate", 1), what="duplicate counted")
        await wait_all_published(pg)
        bodies = await commands.settle(0.5)
        version = (await instance(pg, "dup-1"))["version"]

    assert len(bodies) == 1, bodies
    assert bodies[0]["command_type"] == "sequence.send_step"
    assert len(await history_for_event(pg, ev["event_id"])) == 1
    assert await _inbox_rows(pg, ev["event_id"]) == 1
    assert version == 2  # new -> waiting -> sending, nothing more
    assert counter(service.metrics.events, "sequence", "duplicate") == 1
    assert counter(service.metrics.events, "sequence", "applied") == 1


async def test_same_event_in_a_quick_burst_is_applied_once(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        ev = event("sequence.enrolled", "burst-1", enrolled_data(steps=1))
        await asyncio.gather(*(mq.publish(ev) for _ in range(5)))
        await wait_for(lambda: _metric_at_least(service, "duplicate", 4), what="4 duplicates counted")
        await wait_state(pg, "burst-1", "sending")
        await wait_all_published(pg)
        bodies = await commands.settle(0.5)
        # The step's report, also sent twice in a burst: applied once.
        sent = event("sequence.step_sent", "burst-1", {"step": 0, "provider_message_id": "p0"})
        await mq.publish(sent, times=3)
        await wait_state(pg, "burst-1", "completed")
        await wait_for(lambda: _metric_at_least(service, "duplicate", 6), what="6 duplicates counted")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)

    assert len(bodies) == 1, bodies
    assert len(await history_for_event(pg, ev["event_id"])) == 1
    assert len(await history_for_event(pg, sent["event_id"])) == 1
    assert await _inbox_rows(pg, ev["event_id"]) == 1
    assert await _inbox_rows(pg, sent["event_id"]) == 1
    assert counter(service.metrics.events, "sequence", "duplicate") == 6
    assert counter(service.metrics.events, "sequence", "applied") == 2
    assert b'sfworkflow_events_total{outcome="duplicate",workflow="sequence"} 6.0' in service.metrics.render()


async def _metric_at_least(service: object, outcome: str, n: int) -> bool:
    return counter(service.metrics.events, "sequence", outcome) >= n  # type: ignore[attr-defined]


async def test_same_send_twice_on_one_day_is_suppressed(settings: Settings, pg: asyncpg.Connection) -> None:
    """Two enrollments, same recipient, same templates: each template is sent once per day."""
    address = "same-person@example.com"
    await same_utc_day_for(60)  # every send below on one UTC day: the day is part of the effect key
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "enr-a", enrolled_data(steps=2, address=address)))
        await wait_state(pg, "enr-a", "sending")
        first = await commands.wait(1)
        assert [(c["entity_id"], c["data"]["template_id"]) for c in first] == [("enr-a", "tpl-0")]

        # B asks for tpl-0 to the same address today: suppressed, B moves on to tpl-1 (not sent yet: sent).
        await mq.publish(event("sequence.enrolled", "enr-b", enrolled_data(steps=2, address=address)))
        second = await commands.wait(2)
        assert [(c["entity_id"], c["data"]["template_id"], c["data"]["step"]) for c in second[1:]] == [
            ("enr-b", "tpl-1", 1)
        ]
        assert await state_of(pg, "enr-b") == "sending"

        # A's step 0 is sent; A's tpl-1 was already sent by B today: suppressed, and it was A's last step.
        await mq.publish(event("sequence.step_sent", "enr-a", {"step": 0, "provider_message_id": "pa0"}))
        await wait_state(pg, "enr-a", "completed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.5)
        suppressed = counter(service.metrics.suppressed, "sequence")

    assert [(c["entity_id"], c["data"]["template_id"]) for c in bodies] == [("enr-a", "tpl-0"), ("enr-b", "tpl-1")]
    assert suppressed == 2
    assert b'sfworkflow_effects_suppressed_total{workflow="sequence"} 2.0' in service.metrics.render()

    hist_b = await outcomes(pg, "enr-b")
    assert ("sequence.send_step", "suppressed", "sending", "sending") in hist_b
    assert hist_b[hist_b.index(("sequence.send_step", "suppressed", "sending", "sending")) + 1] == (
        "sequence.effect_suppressed",
        "applied",
        "sending",
        "waiting",
    )
    b_row = await instance(pg, "enr-b")
    assert b_row["context"]["cursor"] == 1 and b_row["context"]["suppressed"] == 1

    hist_a = await outcomes(pg, "enr-a")
    assert hist_a[-2:] == [
        ("sequence.send_step", "suppressed", "sending", "sending"),
        ("sequence.effect_suppressed", "applied", "sending", "completed"),
    ]
    suppressed_rows = await pg.fetch(
        "SELECT h.detail FROM sfworkflow.history h WHERE h.outcome = 'suppressed' ORDER BY h.id"
    )
    keys = [r["detail"]["effect_key"] for r in suppressed_rows]
    hashed = hashlib.sha256(address.encode()).hexdigest()[:20]  # the address enters the key hashed
    assert len(keys) == 2 and "tpl-0" in keys[0] and "tpl-1" in keys[1] and all(hashed in k for k in keys)
    assert not any(address in k for k in keys)
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.effect") == 2  # tpl-0 by A, tpl-1 by B
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE kind = 'command'") == 2


async def test_same_send_in_one_batch_is_suppressed(settings: Settings, pg: asyncpg.Connection) -> None:
    """Both enrollments in one batch (queued before the consumer starts): one send per template."""
    address = "batch-person@example.com"
    await same_utc_day_for(60)  # both sends on one UTC day: the day is part of the effect key
    async with running_service(quick(settings, consumers=1), consume=False) as service, Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "one-a", enrolled_data(steps=1, address=address)))
        await mq.publish(event("sequence.enrolled", "one-b", enrolled_data(steps=1, address=address)))
        assert service.consumer is not None
        await service.consumer.start()
        await wait_for(lambda: _states(pg, {"one-a": "sending", "one-b": "completed"}), what="a sending, b completed")
        await wait_all_published(pg)
        bodies = await commands.settle(0.3)
        suppressed = counter(service.metrics.suppressed, "sequence")

    assert [c["entity_id"] for c in bodies] == ["one-a"]
    assert suppressed == 1
    assert (await instance(pg, "one-b"))["context"]["suppressed"] == 1
    assert await outcomes(pg, "one-b") == [
        ("sequence.enrolled", "applied", "new", "waiting"),
        ("sequence.timer.step_due", "applied", "waiting", "sending"),
        ("sequence.send_step", "suppressed", "sending", "sending"),
        ("sequence.effect_suppressed", "applied", "sending", "completed"),
    ]


async def _states(pg: asyncpg.Connection, want: dict[str, str]) -> bool:
    return all([await state_of(pg, e) == s for e, s in want.items()])
