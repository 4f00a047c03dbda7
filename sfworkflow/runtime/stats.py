"""The cluster gauges: database-wide figures (outbox backlog and age, outbox rows given up, active instances by
state, parked events and their nearest deadline, stuck instances) computed by one replica of the cluster at a time.

Every replica runs this task; the one that holds a PostgreSQL advisory lock (taken with
pg_try_advisory_lock on a connection of its own, outside the pool) computes the figures and exports them;
the others only retry the lock each round and export none of these series. So the database reads them once
per round whatever the replica count, and a dashboard's max() (or sum()) over the replicas counts each figure once
(max() also while a leader whose connection died silently has not yet noticed, and two replicas export).
When the leader stops or loses its connection, PostgreSQL releases the lock with the session, and another
replica takes it within a round. `sfworkflow_cluster_stats_leader` is 1 on the replica that exports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter

import asyncpg
import structlog

from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import Filters
from sfworkflow.db import operations, outbox
from sfworkflow.db.pool import init_connection
from sfworkflow.ops.stuck import find_stuck
from sfworkflow.runtime.metrics import Metrics

log = structlog.get_logger("sfworkflow.stats")

EVERY_S = 5.0  # seconds between rounds
STUCK_EVERY = 6  # rounds between refreshes of the stuck gauge (a heavier query): every 30 s
STUCK_LIMIT = 100_000  # stuck instances counted at most


class ClusterStats:
    def __init__(
        self,
        database_url: str,
        engine: Engine,
        metrics: Metrics,
        stuck_after_s: float,
        *,
        every_s: float = EVERY_S,
        stuck_every: int = STUCK_EVERY,
    ) -> None:
        self.database_url = database_url
        self.engine = engine
        self.metrics = metrics
        self.stuck_after_s = stuck_after_s
        self.every_s = every_s
        self.stuck_every = stuck_every
        self._conn: asyncpg.Connection | None = None
        self._rounds_led = 0

    @property
    def leading(self) -> bool:
        return self.metrics.cluster_exported

    async def run(self) -> None:
        """Rounds until cancelled; a round that fails (PostgreSQL away) drops the connection, and with it the
        lead, and the next round starts over."""
        try:
            while True:
                try:
                    await self.round()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("cluster stats round failed", error=type(exc).__name__)
                    await self._drop()
                await asyncio.sleep(self.every_s)
        finally:
            await self._drop()

    async def round(self) -> bool:
        """Take the lead if it is free, and refresh the gauges when leading. True when this replica leads."""
        if self._conn is None or self._conn.is_closed():
            await self._drop()  # a lost session lost its lock with it: lead again only by taking it anew
            self._conn = await asyncpg.connect(
                self.database_url,
                command_timeout=30,
                server_settings={"application_name": "sfworkflow-stats", "jit": "off"},
            )
            await init_connection(self._conn)
        if not self.leading:
            if not await operations.try_lead_cluster_stats(self._conn):
                return False
            log.info("exporting the cluster gauges", role="leader")
            self._rounds_led = 0
        await self._refresh(self._conn)
        self.metrics.export_cluster(True)
        self._rounds_led += 1
        return True

    async def _refresh(self, conn: asyncpg.Connection) -> None:
        m = self.metrics
        row = await outbox.backlog(conn)
        m.outbox_backlog.set(row["backlog"])
        m.outbox_oldest.set(row["oldest_s"])
        m.outbox_deferred.set(row["deferred"])
        m.outbox_deferred_until.set(row["deferred_until_s"])
        m.outbox_failed.set(await outbox.failed_count(conn))
        for name in self.engine.concurrency_limits():  # a limit with nothing held or queued reads 0, not its last value
            m.slots_held.labels(name).set(0)
            m.slots_waiting.labels(name).set(0)
        for r in await outbox.slots_by_limit(conn):
            m.slots_held.labels(r["limit_name"]).set(r["held"])
            m.slots_waiting.labels(r["limit_name"]).set(r["waiting"])
        rows = await operations.active_instances_by_state(conn)
        m.instances.clear()
        for r in rows:
            m.instances.labels(r["workflow"], r["state"]).set(r["n"])
        m.parked.set(await operations.parked_count(conn))
        nearest = await operations.parked_nearest_deadline(conn)
        m.parked_deadline.set(math.inf if nearest is None else nearest)
        if self._rounds_led % self.stuck_every == 0:
            found = await find_stuck(conn, self.engine, Filters(limit=STUCK_LIMIT, default_after_s=self.stuck_after_s))
            counts = Counter(s.workflow for s in found)
            for name in self.engine.latest:
                m.stuck.labels(name).set(counts.get(name, 0))

    async def _drop(self) -> None:
        """Give up the lead (closing the session releases the advisory lock) and the connection."""
        if self.leading:
            log.info("no longer exporting the cluster gauges")
        self.metrics.export_cluster(False)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
            if not conn.is_closed():
                conn.terminate()
