"""Every lock a batch takes is taken in one global order, so two batches whose first events cross never
deadlock (40P01) and never pay `deadlock_timeout`.

The crossing is forced, not hoped for: a third connection holds instance P's row, so batch B (an event
for an instance Q that does not exist yet, then one for P) and then batch A (Q's start event, then an
event for P) both queue behind it; when it lets go, B holds P and must create Q's row, while A has
created Q and waits for P. Taking every instance row (created or not) in key order before any row lock
removes the cycle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sfworkflow.db.repository import Store
from tests.conftest import wait_for
from tests.integration.storekit import delivery, direct_store
from tests.support import enrolled_data, event, instance


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with direct_store(database_url, pool_size=4) as s:
        yield s


async def _waiting(pg: asyncpg.Connection) -> int:
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    )


async def _deadlocks(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))


async def test_batches_with_crossed_first_events_do_not_deadlock(
    store: Store, pg: asyncpg.Connection, database_url: str
) -> None:
    await store.apply_deliveries([delivery(event("sequence.enrolled", "P", enrolled_data(delay_s=3600)))])
    before = await _deadlocks(pg)
    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM sfworkflow.instance WHERE entity_id = 'P' FOR UPDATE")
        b = asyncio.create_task(
            store.apply_deliveries(
                [
                    delivery(event("sequence.step_sent", "Q", {"step": 0, "provider_message_id": "p"})),
                    delivery(event("sequence.paused", "P", {"reason": "b"})),
                ]
            )
        )
        await wait_for(lambda: _is(pg, 1), what="batch B waiting")
        a = asyncio.create_task(
            store.apply_deliveries(
                [
                    delivery(event("sequence.enrolled", "Q", enrolled_data(delay_s=3600))),
                    delivery(event("sequence.paused", "P", {"reason": "a"})),
                ]
            )
        )
        await wait_for(lambda: _is(pg, 2), what="batch A waiting too")
        await tx.rollback()
        results = await asyncio.gather(a, b, return_exceptions=True)
    finally:
        await holder.close()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert await _deadlocks(pg) == before
    assert (await instance(pg, "Q"))["state"] == "waiting"  # A's start event applied
    assert (await instance(pg, "P"))["state"] == "paused"
    # B's event for Q (not there yet when B ran) waits in the parked table, as it should.
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked WHERE entity_id = 'Q'") == 1


async def _is(pg: asyncpg.Connection, n: int) -> bool:
    return await _waiting(pg) == n
