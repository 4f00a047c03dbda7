"""Timers scale out: replicas firing at the same moment take different due timers, so a burst of due timers
(a tenant's campaign due at one minute) is fired by all of them at once. Before, every replica chose the
same oldest due timers and all but one found them locked, took nothing and slept a poll interval."""

from __future__ import annotations

import asyncpg

from sfworkflow import db
from sfworkflow.db.pool import q
from tests.support import TENANT

LIMIT = 5


async def _due(pg: asyncpg.Connection, n: int) -> None:
    await pg.execute(
        "WITH i AS (INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state,"
        " version) SELECT $1, 'sequence', 'due-' || g, 1, 'waiting', 1 FROM generate_series(1, $2) g RETURNING id)"
        " INSERT INTO sfworkflow.timer (instance_id, name, due_at) SELECT id, 'step_due',"
        " now() - make_interval(secs => id) FROM i",
        TENANT, n,
    )  # fmt: skip


async def test_two_replicas_take_different_due_timers(pg: asyncpg.Connection, database_url: str) -> None:
    await _due(pg, 3 * LIMIT)
    other = await asyncpg.connect(database_url)
    await db.init_connection(other)
    try:
        async with pg.transaction():
            first = {r["id"] for r in await pg.fetch(q("lock_due_timer_instances"), LIMIT, ["sequence"], [1], [])}
            async with other.transaction():
                rows = await other.fetch(q("lock_due_timer_instances"), LIMIT, ["sequence"], [1], [])
                second = {r["id"] for r in rows}
    finally:
        await other.close()
    assert len(first) == LIMIT
    assert len(second) == LIMIT, "the second replica found only timers the first one holds"
    assert not first & second


async def test_an_instance_with_two_due_timers_comes_once_per_timer(pg: asyncpg.Connection, database_url: str) -> None:
    await _due(pg, 1)
    await pg.execute(
        "INSERT INTO sfworkflow.timer (instance_id, name, due_at) SELECT id, 'retry_due', now() - interval '1 s'"
        " FROM sfworkflow.instance"
    )
    rows = await pg.fetch(q("lock_due_timer_instances"), LIMIT, ["sequence"], [1], [])
    assert len(rows) == 2 and len({r["id"] for r in rows}) == 1  # the repository keeps one (fire_due_timers)
