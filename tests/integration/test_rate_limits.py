"""A rate limit holds across replicas: two real service processes share one bucket in PostgreSQL, so together they
never give a key more slots than its burst and rate allow; a command over the limit is deferred (a `deferred`
history entry, the outbox row due at its slot), published at its slot and not before, exactly once, and the
instance's later messages wait behind it. Nothing is dropped: every instance finishes."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import COMMANDS_Q, Inbox
from tests.integration.replicas import Replica, replicas, start_all
from tests.support import TENANT, Amqp, event

N = 40  # enrollments, one send each: published in well under a second, far faster than the limit lets them out
RATE, BURST = 5, 2  # sends a second per (tenant, channel, sender), and the burst: the last send ~8 s after the first
LIMIT = "sequence.send_step/per_sender"
SENDER = "+15550100"


@pytest.fixture
def pair(settings: Settings, tmp_path: Path) -> Iterator[list[Replica]]:
    env = {
        "SFWORKFLOW_RATE_LIMITS": f"{LIMIT}={RATE}/{BURST}",
        # small prefetch: RabbitMQ spreads the burst over both replicas instead of filling one
        "SFWORKFLOW_PREFETCH": "8",
        "SFWORKFLOW_BATCH_SIZE": "8",
    }
    with replicas(settings, tmp_path, **env) as made:
        yield made


def enrollment(i: int) -> dict[str, Any]:
    return {
        "sequence_id": "seq-rl",
        "lead_id": f"lead-{i}",
        "recipient": {"channel": "whatsapp", "address": f"+1555{i:07d}", "sender": SENDER},
        "steps": [{"template_id": "tpl-0", "delay_seconds": 0}],
    }


async def _answer(mq: Amqp, commands: Inbox, answered: set[str]) -> None:
    for m in await commands.poll():
        body = orjson.loads(m.body)
        if body["command_type"] == "sequence.send_step" and body["command_id"] not in answered:
            answered.add(body["command_id"])
            data = {"step": body["data"]["step"], "provider_message_id": f"p-{body['command_id']}"}
            await mq.publish(event("sequence.step_sent", body["entity_id"], data, causation_id=body["command_id"]))


def _most_in_a_window(slots: list[datetime]) -> float:
    """The largest excess of slots over what the limit allows in any window: count - (burst + rate * width)."""
    worst = float("-inf")
    for i, j in itertools.combinations_with_replacement(range(len(slots)), 2):
        worst = max(worst, (j - i + 1) - (BURST + RATE * (slots[j] - slots[i]).total_seconds()))
    return worst


async def test_two_replicas_share_a_limit_defer_what_is_over_it_and_lose_nothing(
    settings: Settings, pg: asyncpg.Connection, pair: list[Replica]
) -> None:
    await start_all(pair)
    async with Amqp(settings.amqp_url) as mq:
        for i in range(N):
            await mq.publish(event("sequence.enrolled", f"rl-{i}", enrollment(i)))
            if i % 4 == 0:  # cancelled at once: its workflow.completed is queued behind its (deferred) send
                await mq.publish(event("sequence.cancelled", f"rl-{i}", {"reason": "test"}))
        commands, answered = Inbox(mq, COMMANDS_Q), set[str]()

        async def settled() -> bool:
            await _answer(mq, commands, answered)
            ended = await pg.fetchval(
                "SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $1 AND terminal", TENANT
            )
            unpublished = await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL")
            return bool(ended == N and unpublished == 0)

        await wait_for(settled, timeout=60, what=f"{N} instances ended and every message published")

    sends = await pg.fetch(
        "SELECT id, instance_id, message_id, created_at, deferred_until, deferred_by, published_at"
        " FROM sfworkflow.outbox WHERE routing_key = 'sequence.send_step' ORDER BY id"
    )
    assert len(sends) == N and len({r["message_id"] for r in sends}) == N  # each queued once
    assert len(answered) == N  # each reached the worker; once: the queue held N of them (below)
    assert len(commands.messages) == N
    # The limit, across both replicas: the slots (a send not deferred went at its batch's clock: created_at).
    slots = sorted(r["deferred_until"] or r["created_at"] for r in sends)
    assert _most_in_a_window(slots) <= 1, "more sends in a window than the burst and the rate allow"
    deferred = [r for r in sends if r["deferred_until"] is not None]
    assert deferred and {r["deferred_by"] for r in deferred} == {LIMIT}
    assert all(r["published_at"] >= r["deferred_until"] for r in deferred), "a deferred send went before its slot"
    # Each replica deferred some: the bucket is shared, not one per process.
    for r in pair:
        assert await r.counter("sfworkflow_commands_deferred_total", limit=LIMIT) > 0, r.log.read_text()[-2000:]
    # History says so, and the instance's later messages (a cancelled one's workflow.completed) waited behind it.
    entries = await pg.fetchval("SELECT count(*) FROM sfworkflow.history WHERE outcome = 'deferred'")
    assert entries == len(deferred)
    rows = await pg.fetch(
        "SELECT instance_id, id, kind, published_at FROM sfworkflow.outbox WHERE instance_id IS NOT NULL ORDER BY id"
    )
    by_instance: dict[int, list[asyncpg.Record]] = {}
    for row in rows:
        by_instance.setdefault(row["instance_id"], []).append(row)
    for iid, own in by_instance.items():
        times = [row["published_at"] for row in own]
        assert times == sorted(times), f"instance {iid}: its messages were published out of order: {own}"


CAP = 12  # a day's sends per key in the test below
CAPPED_N = 30


@pytest.fixture
def capped_pair(settings: Settings, tmp_path: Path) -> Iterator[list[Replica]]:
    env = {
        "SFWORKFLOW_RATE_LIMITS": f"{LIMIT}=1000/1000/daily:{CAP}",  # the rate out of the way: the cap alone counts
        "SFWORKFLOW_PREFETCH": "4",
        "SFWORKFLOW_BATCH_SIZE": "4",
    }
    with replicas(settings, tmp_path, **env) as made:
        yield made


async def test_two_replicas_share_a_daily_cap_and_book_what_is_past_it_on_the_next_utc_day(
    settings: Settings, pg: asyncpg.Connection, capped_pair: list[Replica]
) -> None:
    await start_all(capped_pair)
    async with Amqp(settings.amqp_url) as mq:
        for i in range(CAPPED_N):
            await mq.publish(event("sequence.enrolled", f"cap-{i}", enrollment(i)))

        async def booked() -> bool:
            n = await pg.fetchval(
                "SELECT count(*) FROM sfworkflow.outbox WHERE routing_key = 'sequence.send_step'"
                " AND (published_at IS NOT NULL OR deferred_until > now())"
            )
            return bool(n == CAPPED_N)

        await wait_for(booked, timeout=60, what=f"{CAPPED_N} sends published or booked on a later day")
    sends = await pg.fetch(
        "SELECT created_at, deferred_until, published_at FROM sfworkflow.outbox"
        " WHERE routing_key = 'sequence.send_step' ORDER BY id"
    )
    slots = [r["deferred_until"] or r["created_at"] for r in sends]
    per_day: dict[Any, int] = {}
    for slot in slots:
        day = slot.astimezone(UTC).date()
        per_day[day] = per_day.get(day, 0) + 1
    # Both replicas booked on one count: no UTC day holds more than the cap (this holds across a midnight too).
    assert max(per_day.values()) <= CAP, per_day
    assert sum(per_day.values()) == CAPPED_N  # none dropped
    # What waits for a later day waits for its first instant, and was not published before it.
    later = [r for r in sends if r["deferred_until"] is not None and r["deferred_until"] > r["created_at"]]
    assert later and all(r["deferred_until"] == datetime.combine(r["deferred_until"].date(), time(), UTC)
                         for r in later)  # fmt: skip
    assert all(r["published_at"] is None or r["published_at"] >= r["deferred_until"] for r in later)
    capped = 0
    for r in capped_pair:
        capped += await r.counter("sfworkflow_commands_capped_total", limit=LIMIT)
    entries = await pg.fetchval(
        "SELECT count(*) FROM sfworkflow.history WHERE outcome = 'deferred' AND detail->>'cause' = 'daily_cap'"
    )
    assert capped == entries == len(later), (capped, entries, len(later))
