"""The cluster gauges (runtime/stats.py) are computed and exported by one replica at a time: the one holding
the advisory lock. The others export none of those series, so a sum() over replicas counts each figure once;
when the leader goes (stops, or its session is killed), another replica takes over. The instance gauge counts
active instances only, read through the partial index, not the ended ones that pile up until retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sfworkflow.core.engine import Engine
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.stats import ClusterStats
from sfworkflow.workflows import DEFINITIONS
from tests.conftest import wait_for
from tests.support import TENANT

CLUSTER_SERIES = (
    "sfworkflow_outbox_backlog",
    "sfworkflow_outbox_oldest_age_seconds",
    "sfworkflow_outbox_failed",
    "sfworkflow_parked_events",
    "sfworkflow_parked_nearest_deadline_seconds",
    "sfworkflow_stuck_instances",
    "sfworkflow_instances",
)


def replica(database_url: str) -> ClusterStats:
    engine = Engine(DEFINITIONS)
    return ClusterStats(
        database_url, engine, Metrics(sorted(engine.latest)), stuck_after_s=3600, every_s=0.05, stuck_every=1
    )


def exported(stats: ClusterStats) -> set[str]:
    text = stats.metrics.render().decode()
    return {name for name in CLUSTER_SERIES if f"\n# TYPE {name} gauge" in f"\n{text}"}


def leader_gauge(stats: ClusterStats) -> float:
    return stats.metrics.cluster_leader._value.get()


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[list[ClusterStats]]:
    three = [replica(database_url) for _ in range(3)]
    tasks = [asyncio.create_task(r.run()) for r in three]
    try:
        yield three
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def leaders(replicas: list[ClusterStats]) -> list[ClusterStats]:
    return [r for r in replicas if r.leading]


async def test_one_replica_of_three_exports_the_cluster_gauges(replicas: list[ClusterStats]) -> None:
    (lead,) = await wait_for(lambda: _async(leaders(replicas)), what="one replica leading")
    await asyncio.sleep(0.3)  # several rounds of every replica: the others keep trying and never take it
    assert leaders(replicas) == [lead]
    assert exported(lead) == set(CLUSTER_SERIES)
    assert leader_gauge(lead) == 1
    for other in replicas:
        if other is not lead:
            assert exported(other) == set()
            assert leader_gauge(other) == 0
            assert "sfworkflow_cluster_stats_leader 0.0" in other.metrics.render().decode()


async def test_another_replica_takes_over_when_the_leaders_session_dies(
    replicas: list[ClusterStats], pg: asyncpg.Connection
) -> None:
    (first,) = await wait_for(lambda: _async(leaders(replicas)), what="one replica leading")
    assert first._conn is not None
    pid = first._conn.get_server_pid()
    assert await pg.fetchval("SELECT pg_terminate_backend($1)", pid)

    async def new_session_leads() -> list[ClusterStats]:
        now = leaders(replicas)
        return now if len(now) == 1 and now[0]._conn is not None and now[0]._conn.get_server_pid() != pid else []

    (second,) = await wait_for(new_session_leads, what="a leader on a new session")
    assert exported(second) == set(CLUSTER_SERIES)
    assert sum(r.leading for r in replicas) == 1


async def test_a_stopped_leader_hands_over(database_url: str) -> None:
    a, b = replica(database_url), replica(database_url)
    task_a = asyncio.create_task(a.run())
    await wait_for(lambda: _async(a.leading), what="the first replica leading")
    task_b = asyncio.create_task(b.run())
    try:
        await asyncio.sleep(0.2)
        assert not b.leading
        task_a.cancel()
        await asyncio.gather(task_a, return_exceptions=True)
        assert not a.leading and exported(a) == set()
        await wait_for(lambda: _async(b.leading), what="the second replica leading once the first stopped")
    finally:
        task_b.cancel()
        await asyncio.gather(task_b, return_exceptions=True)


async def test_the_instance_gauge_counts_active_instances_only(database_url: str, pg: asyncpg.Connection) -> None:
    for i, (state, terminal) in enumerate(
        [("waiting", False), ("waiting", False), ("sending", False)] + [("completed", True)] * 5
    ):
        await pg.execute(
            "INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, terminal) "
            "VALUES ($1, 'sequence', $2, 1, $3, $4)",
            TENANT, f"e-{i}", state, terminal,
        )  # fmt: skip
    stats = replica(database_url)
    try:
        assert await stats.round()
        text = stats.metrics.render().decode()
    finally:
        await stats._drop()
    series = sorted(line for line in text.splitlines() if line.startswith("sfworkflow_instances{"))
    assert series == [
        'sfworkflow_instances{state="sending",workflow="sequence"} 1.0',
        'sfworkflow_instances{state="waiting",workflow="sequence"} 2.0',
    ]


async def _async(value: object) -> object:
    return value
