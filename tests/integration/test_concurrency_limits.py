"""A concurrency limit holds across replicas: two real service processes share the gate of `agent.run_task/per_tenant`
in PostgreSQL, so a tenant never has more runs in flight than its slots; the runs past them are queued (not dropped),
go out as slots free up, and their timeout starts when they go out. A slot whose instance ended outside a batch is
released by the sweep."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from sfworkflow.db import outbox as outbox_rows
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import quick
from tests.integration.replicas import Replica, replicas, start_all
from tests.support import TENANT, Amqp, event, running_service

COMMANDS_Q = "sfworkflow.commands.agent"
LIMIT = "agent.run_task/per_tenant"
SLOTS = 3  # the tenant's own number (limit_override), below the definition's 4
N = 12  # tasks submitted at once
TIMEOUT_S = 3  # each run's timeout: the queue holds the last runs longer than that


@pytest.fixture
def pair(settings: Settings, tmp_path: Path) -> Iterator[list[Replica]]:
    with replicas(settings, tmp_path) as made:
        yield made


def submitted() -> dict[str, Any]:
    return {"agent_type": "lead_researcher", "input": {"lead": "x"}, "timeout_seconds": TIMEOUT_S}


async def _started_at_grant(pg: asyncpg.Connection, command_id: str) -> bool:
    """The run's timeout counts from the grant: due exactly TIMEOUT_S after it (one transaction's clock)."""
    row = await pg.fetchrow(
        """SELECT o.granted_at, t.due_at FROM sfworkflow.outbox o
           JOIN sfworkflow.timer t ON t.instance_id = o.instance_id AND t.name = 'run_timeout'
           WHERE o.message_id = $1""",
        uuid.UUID(command_id),
    )
    return row is not None and (row["due_at"] - row["granted_at"]).total_seconds() == TIMEOUT_S


async def test_two_replicas_never_run_more_than_the_slots_and_every_task_finishes(
    settings: Settings, pg: asyncpg.Connection, pair: list[Replica]
) -> None:
    await start_all(pair)
    await pg.execute(
        """INSERT INTO sfworkflow.limit_override (tenant_id, limit_name, slots, reason, updated_by)
           VALUES ($1, $2, $3, 'test', 'test')""",
        uuid.UUID(TENANT), LIMIT, SLOTS,
    )  # fmt: skip
    in_flight: dict[str, dict[str, Any]] = {}
    received: list[str] = []
    most = 0
    async with Amqp(settings.amqp_url) as mq:
        for i in range(N):
            await mq.publish(event("agent.task_submitted", f"task-{i}", submitted()))
        deadline = asyncio.get_running_loop().time() + 90
        quiet_since = asyncio.get_running_loop().time()
        while len(received) < N:
            assert asyncio.get_running_loop().time() < deadline, f"{len(received)} of {N} runs arrived"
            for m in await mq.drain(COMMANDS_Q):
                cmd = orjson.loads(m.body)
                assert cmd["entity_id"] not in in_flight, "a run arrived twice"
                in_flight[cmd["entity_id"]] = cmd
                received.append(cmd["entity_id"])
                quiet_since = asyncio.get_running_loop().time()
                assert await _started_at_grant(pg, cmd["command_id"]), "the run's timeout did not start at its grant"
            assert len(in_flight) <= SLOTS, f"{len(in_flight)} runs in flight, the tenant has {SLOTS} slots"
            most = max(most, len(in_flight))
            # Answer once the slots are full, or nothing more came for a while (a last, partial round).
            if len(in_flight) == SLOTS or (in_flight and asyncio.get_running_loop().time() - quiet_since > 0.5):
                for entity, cmd in in_flight.items():
                    echo = {"attempt": cmd["attempt"], "run": cmd["data"]["run"]}
                    await mq.publish(event("agent.started", entity, echo))
                    await mq.publish(event("agent.succeeded", entity, {"output": "ok", **echo}))
                in_flight.clear()
            await asyncio.sleep(0.05)
        for entity, cmd in in_flight.items():
            echo = {"attempt": cmd["attempt"], "run": cmd["data"]["run"]}
            await mq.publish(event("agent.succeeded", entity, {"output": "ok", **echo}))

    async def all_succeeded() -> bool:
        return await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE state = 'succeeded'") == N

    await wait_for(all_succeeded, timeout=30, what=f"{N} tasks succeeded")
    assert sorted(received) == sorted(f"task-{i}" for i in range(N))  # each run once, none dropped
    assert most == SLOTS  # the slots were used in full, in parallel
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.slot") == 0  # every slot released
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.history WHERE event_type = 'timer_run_timeout'") == 0
    granted = sum([await r.counter("sfworkflow_slots_granted_total", limit=LIMIT) for r in pair])
    assert granted == N


async def test_a_slot_left_by_an_ended_instance_is_swept(
    settings: Settings, pg: asyncpg.Connection, pair: list[Replica]
) -> None:
    replica = pair[0]
    replica.start()
    await replica.ready()
    async with Amqp(settings.amqp_url) as mq:
        await mq.publish(event("agent.task_submitted", "swept", submitted()))

        async def dispatched() -> bool:
            return await pg.fetchval("SELECT count(*) FROM sfworkflow.slot") == 1

        await wait_for(dispatched, what="the run's slot granted")
        # What no batch sees: an operator ends the instance by hand. The sweep releases its slot.
        await pg.execute(
            "UPDATE sfworkflow.instance SET state = 'succeeded', terminal = true WHERE entity_id = 'swept'"
        )

        async def released() -> bool:
            return await pg.fetchval("SELECT count(*) FROM sfworkflow.slot") == 0

        await wait_for(released, timeout=20, what="the slot swept")
    assert await replica.counter("sfworkflow_slots_swept_total") == 1


async def _answer_all(mq: Amqp, cmds: list[dict[str, Any]]) -> None:
    for cmd in cmds:
        echo = {"attempt": cmd["attempt"], "run": cmd["data"]["run"]}
        await mq.publish(event("agent.succeeded", cmd["entity_id"], {"output": "ok", **echo}))


async def test_a_backlog_of_queued_runs_larger_than_the_relay_s_claim_does_not_stall_it(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """Found in review: each queued task's `workflow.started` was written due behind its gated run_task; with more of
    them than the relay's polling claim reads (2 x SFWORKFLOW_RELAY_BATCH), the claim found nothing it could publish,
    and the runs granted later were never sent. Fails on that code by timing out."""
    n, slots = 30, 2
    async with running_service(quick(settings, relay_batch=5)), Amqp(settings.amqp_url) as mq:
        await pg.execute(
            """INSERT INTO sfworkflow.limit_override (tenant_id, limit_name, slots, reason, updated_by)
               VALUES ($1, $2, $3, 'test', 'test')""",
            uuid.UUID(TENANT), LIMIT, slots,
        )  # fmt: skip
        for i in range(n):
            await mq.publish(event("agent.task_submitted", f"backlog-{i}", submitted()))

        async def queued() -> bool:
            return await pg.fetchval(
                "SELECT count(*) FROM sfworkflow.outbox WHERE gate_key IS NOT NULL AND next_attempt_at = 'infinity'"
            ) == n - slots  # fmt: skip

        await wait_for(queued, what=f"{n - slots} runs queued")
        # No row is due behind a queued run of its instance: the relay's claim, which reads due rows first, would
        # find it and skip it, round after round.
        due_behind = await pg.fetchval(
            """SELECT count(*) FROM sfworkflow.outbox o
               WHERE o.published_at IS NULL AND o.failed_at IS NULL AND o.next_attempt_at <= now()
                 AND EXISTS (SELECT 1 FROM sfworkflow.outbox g WHERE g.instance_id = o.instance_id AND g.id < o.id
                               AND g.gate_key IS NOT NULL AND g.next_attempt_at = 'infinity')"""
        )
        assert due_behind == 0, f"{due_behind} rows due behind a queued run"
        seen: set[str] = set()

        async def all_done() -> bool:
            cmds = [orjson.loads(m.body) for m in await mq.drain(COMMANDS_Q)]
            assert len(cmds) <= slots, f"{len(cmds)} runs out at once, {slots} slots"
            seen.update(c["entity_id"] for c in cmds)
            await _answer_all(mq, cmds)
            return await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE state = 'succeeded'") == n

        await wait_for(all_done, timeout=60, interval=0.1, what=f"{n} queued tasks run two at a time")
        await wait_for(lambda: _unpublished_is(pg, 0), what="every outbox row published")
    assert len(seen) == n


async def _unpublished_is(pg: asyncpg.Connection, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL") == n


async def test_a_queued_run_whose_task_moved_on_is_withdrawn_not_sent_and_not_counted_as_given_up(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        await pg.execute(
            """INSERT INTO sfworkflow.limit_override (tenant_id, limit_name, slots, reason, updated_by)
               VALUES ($1, $2, 1, 'test', 'test')""",
            uuid.UUID(TENANT), LIMIT,
        )  # fmt: skip
        await mq.publish(event("agent.task_submitted", "first", submitted()))
        (first,) = await wait_for(lambda: mq.drain_json(COMMANDS_Q), what="the first run")
        await mq.publish(event("agent.task_submitted", "second", submitted()))

        async def queued() -> bool:
            return await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE next_attempt_at = 'infinity'") >= 1

        await wait_for(queued, what="the second run queued")
        # What no batch sees: an operator moves the queued task on by hand. When the slot frees, the gate withdraws
        # its run instead of sending it.
        await pg.execute("UPDATE sfworkflow.instance SET state = 'retry_wait' WHERE entity_id = 'second'")
        await _answer_all(mq, [first])

        async def withdrawn() -> str | None:
            return await pg.fetchval(
                "SELECT last_error FROM sfworkflow.outbox"
                " WHERE failed_at IS NOT NULL AND routing_key = 'agent.run_task'"
            )

        assert "withdrawn: the instance left dispatched/running" in await wait_for(withdrawn, what="withdrawn")
        await wait_for(lambda: _unpublished_is(pg, 1), what="all but the withdrawn run published")
        assert await mq.drain(COMMANDS_Q) == []
        assert await outbox_rows.failed_count(pg) == 0  # not a row the relay gave up: no page
        assert await outbox_rows.republish_failed(pg, None, None) == 0  # `republish --all` leaves it alone


async def test_a_run_queued_by_this_process_is_granted_at_once_not_at_the_next_poll(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """The batch that queues a run wakes its process's gate loop: with the poll a minute apart, the run still goes
    out within seconds (and the next one as soon as the first one's answer releases its slot)."""
    async with running_service(quick(settings, timer_poll_ms=60_000)), Amqp(settings.amqp_url) as mq:
        await pg.execute(
            """INSERT INTO sfworkflow.limit_override (tenant_id, limit_name, slots, reason, updated_by)
               VALUES ($1, $2, 1, 'test', 'test')""",
            uuid.UUID(TENANT), LIMIT,
        )  # fmt: skip
        await asyncio.sleep(0.5)  # past the gate loop's first round at start: what follows waits for a wake
        await mq.publish(event("agent.task_submitted", "woken-1", submitted()))
        await mq.publish(event("agent.task_submitted", "woken-2", submitted()))
        (first,) = await wait_for(lambda: mq.drain_json(COMMANDS_Q), timeout=10, what="the first run, woken")
        await _answer_all(mq, [first])
        (second,) = await wait_for(lambda: mq.drain_json(COMMANDS_Q), timeout=10, what="the second run, woken")
    assert {first["entity_id"], second["entity_id"]} == {"woken-1", "woken-2"}
