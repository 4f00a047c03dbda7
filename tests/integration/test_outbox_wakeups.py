"""Who wakes the relay. The service's own batches wake their relay in-process and send no NOTIFY: PostgreSQL
commits NOTIFYing transactions one at a time (a cluster-wide lock held through the WAL flush), so a NOTIFY
per batch would make every replica's batches commit in turn. A write from a process without a relay (an
operator's command: replay, migrate-instances) NOTIFYs, so the service's relays publish its rows at once."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from sfworkflow.db.outbox import Queued
from sfworkflow.db.repository import Store
from sfworkflow.runtime.relay import NOTIFY_CHANNEL
from tests.integration.storekit import delivery, direct_store
from tests.support import enrolled_data, event


async def _listening(database_url: str, heard: list[str]) -> asyncpg.Connection:
    conn = await asyncpg.connect(database_url)
    await conn.add_listener(NOTIFY_CHANNEL, lambda *args: heard.append(args[2]))
    return conn


async def _drain(listener: asyncpg.Connection) -> None:
    """Notifications of transactions committed before this call have reached the listener's callbacks."""
    await listener.execute("SELECT 1")  # the server sends pending notifications before this answer
    await asyncio.sleep(0)  # asyncpg runs the callbacks soon after


async def test_the_service_batches_wake_their_relay_in_process_not_by_notify(database_url: str) -> None:
    """...and hand it the rows they queued, with their ids, once committed: the relay publishes them from memory."""
    heard: list[str] = []
    handed: list[list[Queued]] = []
    listener = await _listening(database_url, heard)
    try:
        async with direct_store(database_url) as plain:
            store = Store(plain.pool, plain.engine, 3600.0, on_commit=handed.append)
            report = await store.apply_deliveries([delivery(event("sequence.enrolled", "w1", enrolled_data()))])
            stored = await plain.pool.fetch(
                "SELECT id, message_id, routing_key, body FROM sfworkflow.outbox ORDER BY id"
            )
        assert report.outbox_rows == len(stored) > 0 and len(handed) == 1
        assert [(q.id, q.row.message_id, q.row.routing_key, q.row.body) for q in handed[0]] == [
            tuple(r) for r in stored
        ]
        await _drain(listener)
        assert heard == []
    finally:
        await listener.close()


async def test_a_transaction_that_fails_hands_nothing_over(database_url: str) -> None:
    handed: list[list[Queued]] = []
    async with direct_store(database_url) as plain:
        store = Store(plain.pool, plain.engine, 3600.0, on_commit=handed.append)

        async def failing_write(unit: Any, ws: Any) -> None:
            await Store._write(store, unit, ws)
            raise RuntimeError("after the writes, before the commit")

        store._write = failing_write  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await store.apply_deliveries([delivery(event("sequence.enrolled", "w3", enrolled_data()))])
        assert await plain.pool.fetchval("SELECT count(*) FROM sfworkflow.outbox") == 0
    assert handed == []


async def test_a_process_without_a_relay_notifies(database_url: str) -> None:
    heard: list[str] = []
    listener = await _listening(database_url, heard)
    try:
        async with direct_store(database_url) as store:  # no on_commit: an operator's command
            await store.apply_deliveries([delivery(event("sequence.enrolled", "w2", enrolled_data()))])
        await _drain(listener)
        assert heard == [NOTIFY_CHANNEL]
    finally:
        await listener.close()
