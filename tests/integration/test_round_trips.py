"""Round trips per batch: a constant number of statements whatever the batch's size (db/repository.py's
docstring lists them). Counted with asyncpg's query logger on the one connection the store uses."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from sfworkflow.core.engine import Engine
from sfworkflow.db.pool import queries
from sfworkflow.db.repository import Store
from sfworkflow.workflows import DEFINITIONS
from tests.integration.storekit import delivery
from tests.support import enrolled_data, event


class OneConnection:
    """A pool of one connection whose statements are counted."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements: list[str] = []
        names = {text: name for name, text in queries().items()}
        # Only sfworkflow's statements: asyncpg's own type introspection on a fresh connection is not a round
        # trip of the batch.
        conn.add_query_logger(lambda q: q.query in names and self.statements.append(names[q.query]))

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        yield self.conn


async def _counted(database_url: str, n: int) -> tuple[list[str], list[str]]:
    from sfworkflow import db

    conn = await asyncpg.connect(database_url)
    try:
        await db.init_connection(conn)
        pool = OneConnection(conn)
        # As the service makes it: the rows queued go to the relay in-process after the commit (no NOTIFY statement).
        store = Store(pool, Engine(DEFINITIONS), park_timeout_s=3600, on_commit=lambda queued: None)  # type: ignore[arg-type]
        entities = [f"rt-{n}-{i}" for i in range(n)]
        await store.apply_deliveries(
            [delivery(event("sequence.enrolled", e, enrolled_data(steps=2, delay_s=0))) for e in entities]
        )  # each fires its first step at once: effect keys are claimed in the same transaction
        enrolled = list(pool.statements)
        pool.statements.clear()
        report = await store.apply_deliveries(
            [delivery(event("sequence.step_sent", e, {"step": 0, "provider_message_id": f"p-{e}"})) for e in entities]
        )
        assert report.events[("sequence", "applied")] == n
        return enrolled, list(pool.statements)
    finally:
        await conn.close()


async def test_statements_per_batch_do_not_grow_with_the_batch(database_url: str, pg: Any) -> None:
    one = await _counted(database_url, 1)
    many = await _counted(database_url, 40)
    assert one == many
    enrolled, step_sent = one
    # Enrolment: inbox, create + lock instances (which say whether events were parked under a new instance's
    # key before it existed: none here, so no parked events are read), the first step's effect key (its timer
    # is due at once), the sends' slots under their rate limit (one statement for every key of the batch), then
    # the writes. step_sent: the same, the second step's effect key and slot, the writes.
    assert enrolled == [
        "insert_inbox", "create_instances", "lock_instances", "insert_effects", "take_rates", "write_batch",
    ]  # fmt: skip
    assert step_sent == [
        "insert_inbox", "create_instances", "lock_instances", "insert_effects", "take_rates",
        "write_batch",
    ]  # fmt: skip
    # Two steps each, for 1 + 40 instances.
    assert (await pg.fetchval("SELECT count(*) FROM sfworkflow.effect")) == 2 * 41


async def test_a_connection_goes_back_to_the_pool_without_a_round_trip(database_url: str) -> None:
    """asyncpg's default release sends a reset (advisory locks, cursors, LISTEN, settings: ~0.4 ms on a busy
    machine) on every release, i.e. after every batch and relay round, before the batch is acked. The service's
    pool connections carry no session state (advisory locks and LISTEN live on connections of their own), so
    the pool only rolls back a transaction left open."""
    from sfworkflow import db

    pool = await db.create_pool(database_url, 1)
    try:
        sent: list[str] = []
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda q: sent.append(q.query))
            async with conn.transaction():
                await conn.fetchval("SELECT 1")
        assert sent == ["BEGIN;", "SELECT 1", "COMMIT;"]
        async with pool.acquire() as conn:
            assert conn.is_in_transaction() is False
            tx = conn.transaction()
            await tx.start()
            await conn.execute("CREATE TEMP TABLE left_open (x int)")
        # A transaction left open is still rolled back when the connection goes back.
        async with pool.acquire() as conn:
            assert conn.is_in_transaction() is False
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None
    finally:
        await pool.close()
