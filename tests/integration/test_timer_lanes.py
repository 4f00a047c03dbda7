"""Timers fall due fairly across tenants (migration 0012, lock_due_timer_instances_by_lane): a round of the timer
loop takes an equal share from each of the 64 timer lanes (a hash of the tenant) before it fills up oldest first,
so one tenant's thousands of due timers (a campaign due at one minute) do not hold back another tenant's timer,
and a tenant alone still fills whole rounds. Against the real PostgreSQL, through Store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest

from sfworkflow.db.pool import q
from sfworkflow.db.repository import Store
from sfworkflow.workflows import DEFINITIONS
from tests.integration.storekit import delivery, direct_store
from tests.integration.test_agent_flow import submitted
from tests.integration.test_index_use import _nodes
from tests.integration.test_timer_isolation import TICKER
from tests.support import OTHER_TENANT, TENANT, event

A, B = TENANT, OTHER_TENANT  # lanes 0 and 29


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with direct_store(database_url, (*DEFINITIONS, TICKER)) as s:
        yield s


async def _due(pg: asyncpg.Connection, tenant: str, n: int, due_ago_s: float) -> None:
    """`n` ticker instances of `tenant` waiting, each with its timer `ok` due `due_ago_s` seconds ago and earlier."""
    await pg.execute(
        "WITH i AS (INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state,"
        " version) SELECT $1::uuid, 'ticker', $1 || '-' || g, 1, 'waiting', 1 FROM generate_series(1, $2) g"
        " RETURNING id, tenant_id)"
        " INSERT INTO sfworkflow.timer (instance_id, name, due_at, lane) SELECT id, 'ok',"
        " now() - make_interval(secs => $3 + id), sfworkflow.tenant_lane(tenant_id) FROM i",
        tenant, n, due_ago_s,
    )  # fmt: skip


async def _fired(pg: asyncpg.Connection, tenant: str) -> int:
    return int(await pg.fetchval(
        "SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $1 AND state = 'done'", tenant
    ))  # fmt: skip


async def test_the_lane_is_the_tenant_id_s_last_byte_modulo_64(pg: asyncpg.Connection) -> None:
    for tenant in (A, B, *(str(uuid.uuid4()) for _ in range(200))):
        assert await pg.fetchval("SELECT sfworkflow.tenant_lane($1)", tenant) == uuid.UUID(tenant).bytes[15] & 63
    assert {await pg.fetchval("SELECT sfworkflow.tenant_lane($1)", t) for t in (A, B)} == {0, 29}


async def test_a_timer_the_service_sets_is_in_its_tenant_s_lane(pg: asyncpg.Connection, store: Store) -> None:
    await store.apply_deliveries([delivery(event("agent.task_submitted", "lane-1", submitted(), tenant=B))])
    # The run's timeout starts when its concurrency slot is granted (the gate loop's round, here by hand).
    (granted,), _ = await store.grant_slots(store.engine.concurrency_limits())
    assert granted == ("agent.run_task/per_tenant", 1)
    lanes = await pg.fetch(
        "SELECT t.lane, sfworkflow.tenant_lane(i.tenant_id) AS want FROM sfworkflow.timer t"
        " JOIN sfworkflow.instance i ON i.id = t.instance_id"
    )
    assert lanes, "submitting a task set no run timeout: nothing checked"
    assert all(r["lane"] == r["want"] == 29 for r in lanes), lanes


async def test_another_tenant_s_timer_fires_in_the_round_a_tenant_s_thousands_fill(
    pg: asyncpg.Connection, store: Store
) -> None:
    """Before, a round took the 256 oldest due timers whoever owned them: tenant B's timer, due after tenant A's
    5,000, waited for 20 rounds."""
    await _due(pg, A, 5000, due_ago_s=600)
    await _due(pg, B, 1, due_ago_s=0)
    report = await store.fire_due_timers(256)
    assert await _fired(pg, B) == 1, "B's due timer waited behind A's"
    assert report.timers_fired == 256 and await _fired(pg, A) == 255, "A did not fill the rest of the round"


async def test_a_tenant_alone_fills_whole_rounds(pg: asyncpg.Connection, store: Store) -> None:
    await _due(pg, A, 600, due_ago_s=60)
    assert (await store.fire_due_timers(256)).timers_fired == 256
    assert (await store.fire_due_timers(256)).timers_fired == 256
    assert (await store.fire_due_timers(256)).timers_fired == 88
    assert await _fired(pg, A) == 600


async def test_two_replicas_firing_at_once_share_the_burst_and_both_serve_the_other_tenant_first(
    pg: asyncpg.Connection, store: Store, database_url: str
) -> None:
    """Two stores on their own pools (two replicas' sessions): each one's first round takes a fair share, so
    B's timer has fired once both first rounds are done, whichever took it, and the two took different timers."""
    await _due(pg, A, 5000, due_ago_s=600)
    await _due(pg, B, 1, due_ago_s=0)
    async with direct_store(database_url, (*DEFINITIONS, TICKER)) as other:
        first, second = await asyncio.gather(store.fire_due_timers(256), other.fire_due_timers(256))
    assert await _fired(pg, B) == 1
    assert await _fired(pg, A) + 1 == first.timers_fired + second.timers_fired > 256


@pytest.mark.parametrize("tenants", [1, 200])
async def test_each_lane_is_probed_through_its_own_index(pg: asyncpg.Connection, tenants: int) -> None:
    """A lane probe read timer_due_idx filtered by lane, the due timers of every lane for each lane: with one
    tenant's campaign due (ANALYZE saw one lane value), 0.5 s a round at 100,000; spread over 200 tenants, 75 ms,
    against 1.5 ms before lanes (bench/timers.py: 962 and 1,816 against 2,692 timers/s). timer_due_idx is now a
    partial index a probe of one lane cannot use."""
    await pg.execute(
        "WITH i AS (INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state,"
        " version) SELECT md5('tenant-' || (g % $1))::uuid, 'ticker', 'e-' || g, 1, 'waiting', 1"
        " FROM generate_series(1, 20000) g RETURNING id, tenant_id)"
        " INSERT INTO sfworkflow.timer (instance_id, name, due_at, lane) SELECT id, 'ok', now() - interval '1 minute',"
        " sfworkflow.tenant_lane(tenant_id) FROM i",
        tenants,
    )  # fmt: skip
    await pg.execute("ANALYZE sfworkflow.timer, sfworkflow.instance")
    text = await pg.fetchval(f"EXPLAIN (FORMAT JSON) {q('lock_due_timer_instances_by_lane')}", 4, ["ticker"], [1])
    used = {n.get("Index Name") for n in _nodes(orjson.loads(text)[0]["Plan"])}
    assert "timer_lane_due_idx" in used and "timer_due_idx" not in used, used
