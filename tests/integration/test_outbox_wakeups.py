"""Who wakes the relay. The service's own batches wake their relay in-process and send no NOTIFY: PostgreSQL
commits NOTIFYing transactions one at a time (a cluster-wide lock held through the WAL flush), so a NOTIFY
per batch would make every replica's batches commit in turn. A write from a process without a relay (an
operator's command: replay, migrate-instances) NOTIFYs, so the service's relays publish its rows at once."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import aio_pika
import asyncpg
import pytest

from sfworkflow import db
from sfworkflow.db import outbox
from sfworkflow.db.outbox import Queued, claim_due
from sfworkflow.db.repository import Store
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.relay import NOTIFY_CHANNEL, Relay
from sfworkflow.settings import Settings
from tests.conftest import wait_for
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


async def test_a_relay_polls_the_outbox_once_per_poll_interval_whatever_its_number_of_rounds(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SFWORKFLOW_RELAY_POLL_MS is the relay's polling interval, not each of its SFWORKFLOW_RELAY_ROUNDS loops':
    an idle replica with 4 rounds searched the outbox 4 times an interval (12 ms a search 20 s into a drain, the
    outbox's due index full of rows published since the last vacuum). Timers only fire late, so an idle relay
    can poll at most once per interval (and once more at its start) however slow the machine is."""
    polls: list[float] = []

    async def counted(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
        polls.append(asyncio.get_running_loop().time())
        return await claim_due(conn, limit)

    monkeypatch.setattr(outbox, "claim_due", counted)
    s = dataclasses.replace(settings, relay_rounds=4, relay_poll_ms=100)
    pool = await db.create_pool(s.database_url, 6)
    amqp = await aio_pika.connect_robust(s.amqp_url)
    relay = Relay(s, pool, amqp, Metrics())
    await relay.start()
    try:

        async def polled_a_while() -> bool:
            return len(polls) >= 6

        await wait_for(polled_a_while, what="the relay's first polls")
        start = asyncio.get_running_loop().time()
        await asyncio.sleep(1.0)
        window = [t for t in polls if t >= start]
        assert len(window) <= 1.0 / 0.1 + 1, f"{len(window)} searches of the outbox in 1 s at one per 100 ms"
    finally:
        await relay.stop(timeout=2.0)
        await amqp.close()
        await pool.close()
