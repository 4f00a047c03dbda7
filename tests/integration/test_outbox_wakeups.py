"""Who wakes the relay. The service's own batches wake their relay in-process and send no NOTIFY: PostgreSQL
commits NOTIFYing transactions one at a time (a cluster-wide lock held through the WAL flush), so a NOTIFY
per batch would make every replica's batches commit in turn. A write from a process without a relay (an
operator's command: replay, migrate-instances) NOTIFYs, so the service's relays publish its rows at once."""

from __future__ import annotations

import asyncio

import asyncpg

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
    heard: list[str] = []
    woken: list[bool] = []
    listener = await _listening(database_url, heard)
    try:
        async with direct_store(database_url) as plain:
            store = Store(plain.pool, plain.engine, 3600.0, on_commit=lambda: woken.append(True))
            report = await store.apply_deliveries([delivery(event("sequence.enrolled", "w1", enrolled_data()))])
        assert report.outbox_rows > 0 and woken == [True]
        await _drain(listener)
        assert heard == []
    finally:
        await listener.close()


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
