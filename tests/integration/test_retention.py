"""Retention prunes an ended instance with everything it owns: history, timers, effect keys, claims and
parked events go in the same statement as the instance, whatever slice size the sweep uses, so nothing is
left orphaned (an effect key or claim without a date in it would otherwise stay held for ever). A sweep
(runtime/retention.py) slices until nothing is due and skips rows other transactions hold."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sfworkflow.db.repository import Store
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.retention import RetentionLoop
from tests.integration.storekit import direct_store
from tests.support import TENANT

OWNED = {
    "history": "SELECT count(*) FROM sfworkflow.history x WHERE NOT EXISTS "
    "(SELECT 1 FROM sfworkflow.instance i WHERE i.id = x.instance_id)",
    "timer": "SELECT count(*) FROM sfworkflow.timer x WHERE NOT EXISTS "
    "(SELECT 1 FROM sfworkflow.instance i WHERE i.id = x.instance_id)",
    "effect": "SELECT count(*) FROM sfworkflow.effect x WHERE NOT EXISTS "
    "(SELECT 1 FROM sfworkflow.instance i WHERE i.id = x.instance_id)",
    "claim": "SELECT count(*) FROM sfworkflow.claim x WHERE NOT EXISTS "
    "(SELECT 1 FROM sfworkflow.instance i WHERE i.id = x.instance_id)",
    "parked": "SELECT count(*) FROM sfworkflow.parked x WHERE NOT EXISTS (SELECT 1 FROM sfworkflow.instance i "
    "WHERE (i.tenant_id, i.workflow, i.entity_id) = (x.tenant_id, x.workflow, x.entity_id))",
}


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with direct_store(database_url) as s:
        yield s


async def _ended_instance(pg: asyncpg.Connection, entity: str, days_ago: float) -> int:
    iid = await pg.fetchval(
        "INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, version, terminal,"
        " updated_at) VALUES ($1, 'notification', $2, 1, 'sent', 2, true, now() - make_interval(secs => $3))"
        " RETURNING id",
        TENANT, entity, days_ago * 86400,
    )  # fmt: skip
    await pg.execute(
        "INSERT INTO sfworkflow.history (instance_id, seq, event_type, outcome) VALUES ($1, 1, 'x', 'applied')", iid
    )
    for i in range(3):
        await pg.execute(
            "INSERT INTO sfworkflow.effect (effect_key, tenant_id, instance_id, command_id, idempotency_key) "
            "VALUES ($1, $2, $3, gen_random_uuid(), 'k')",
            f"{entity}/effect-{i}", TENANT, iid,
        )  # fmt: skip
    await pg.execute(
        "INSERT INTO sfworkflow.claim (claim_key, tenant_id, workflow, entity_id, instance_id) "
        "VALUES ($1, $2, 'notification', $3, $4)",
        f"{entity}/claim", TENANT, entity, iid,
    )  # fmt: skip
    await pg.execute(
        "INSERT INTO sfworkflow.parked (tenant_id, workflow, entity_id, event_id, event_type, body, reason, deadline)"
        " VALUES ($1, 'notification', $2, gen_random_uuid(), 'notification.x', '\\x7b7d', 'r', now() + interval '1h')",
        TENANT, entity,
    )  # fmt: skip
    return int(iid)


async def test_an_instance_is_pruned_with_everything_it_owns_in_any_slice_size(
    store: Store, pg: asyncpg.Connection
) -> None:
    for i in range(5):
        await _ended_instance(pg, f"old-{i}", days_ago=30)
    recent = await _ended_instance(pg, "recent", days_ago=1)
    for _ in range(4):
        await store.prune(retention_days=14, limit=2)  # slices smaller than what one instance owns
        assert {name: await pg.fetchval(sql) for name, sql in OWNED.items()} == dict.fromkeys(OWNED, 0)
    left = [r["id"] for r in await pg.fetch("SELECT id FROM sfworkflow.instance")]
    assert left == [recent]
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.effect") == 3  # the recent one's, untouched
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.claim") == 1
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == 1


async def test_fractions_of_a_day_count(store: Store, pg: asyncpg.Connection) -> None:
    await _ended_instance(pg, "a", days_ago=7.4)
    await _ended_instance(pg, "b", days_ago=7.6)
    await store.prune(retention_days=7.5)
    assert [r["entity_id"] for r in await pg.fetch("SELECT entity_id FROM sfworkflow.instance")] == ["a"]


async def test_the_inbox_is_never_pruned_inside_the_redelivery_window(store: Store) -> None:
    with pytest.raises(ValueError, match="redelivery window"):
        await store.prune(retention_days=0)


async def _old_inbox_and_outbox(pg: asyncpg.Connection, inbox: int, outbox: int) -> None:
    await pg.execute(
        "INSERT INTO sfworkflow.inbox (tenant_id, event_id, event_type, entity_id, received_at)"
        " SELECT $1, gen_random_uuid(), 'sequence.step_sent', 'e' || g, now() - interval '30 days'"
        " FROM generate_series(1, $2) g",
        TENANT, inbox,
    )  # fmt: skip
    await pg.execute(
        "INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, body, published_at)"
        " SELECT gen_random_uuid(), 'lifecycle', 'sfworkflow.lifecycle', 'workflow.started.sequence', '\\x7b7d',"
        " now() - interval '30 days' FROM generate_series(1, $1) g",
        outbox,
    )  # fmt: skip


async def test_a_sweep_keeps_going_until_nothing_is_due(store: Store, pg: asyncpg.Connection) -> None:
    """One round deletes everything past the retention period, however many slices that takes: a sweep that
    deleted one slice per round could not keep up with the ingest."""
    for i in range(7):
        await _ended_instance(pg, f"old-{i}", days_ago=30)
    recent = await _ended_instance(pg, "recent", days_ago=1)
    await _old_inbox_and_outbox(pg, inbox=25, outbox=11)
    metrics = Metrics()
    sweep = RetentionLoop(store, metrics, retention_days=14, slice_rows=3, pause_s=0.0)
    assert await sweep.sweep() == {"instances": 7, "inbox": 25, "outbox": 11}
    assert [r["id"] for r in await pg.fetch("SELECT id FROM sfworkflow.instance")] == [recent]
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.inbox") == 0
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox") == 0
    deleted = {t: metrics.retention_deleted.labels(t)._value.get() for t in ("instances", "inbox", "outbox")}
    assert deleted == {"instances": 7, "inbox": 25, "outbox": 11}
    assert await sweep.sweep() == {}  # nothing left: one slice per table, all short


async def test_a_slice_skips_rows_another_transaction_holds(store: Store, pg: asyncpg.Connection) -> None:
    """An ended instance locked right now (a late event for it, another replica's sweep) is left for a later
    slice instead of holding the sweep until that transaction ends."""
    held = await _ended_instance(pg, "held", days_ago=30)
    free = await _ended_instance(pg, "free", days_ago=30)
    async with pg.transaction():
        await pg.execute("SELECT 1 FROM sfworkflow.instance WHERE id = $1 FOR UPDATE", held)
        async with asyncio.timeout(10):
            deleted = await store.prune(retention_days=14)
    assert deleted["instances"] == 1
    assert [r["id"] for r in await pg.fetch("SELECT id FROM sfworkflow.instance")] == [held]
    assert free != held
    assert (await store.prune(retention_days=14))["instances"] == 1  # released: taken by the next slice
