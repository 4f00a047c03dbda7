"""The schedule loop: fires due schedules' ticks (db/schedules.py fire_due; what to fire is core/schedules.py's).

Every replica runs one. A round locks due rows FOR UPDATE SKIP LOCKED, so replicas share the work and never fire a
tick twice; its messages go out through the outbox (the relays publish them), so a replica killed mid-round loses
nothing. It polls at the timer poll; a round that took a full batch goes again at once.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from sfworkflow.db import schedules
from sfworkflow.db.pool import is_connection_error, is_transient
from sfworkflow.runtime import hooks
from sfworkflow.runtime.consumer import Health
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.supervisor import Supervisor

log = structlog.get_logger("sfworkflow.schedules")

SCHEDULE_BATCH = 100  # schedules fired per transaction


class ScheduleLoop:
    def __init__(
        self, pool: asyncpg.Pool, metrics: Metrics, health: Health, poll_ms: float, supervisor: Supervisor
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.health = health
        self.poll = poll_ms / 1000.0
        self.supervisor = supervisor
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = self.supervisor.spawn("schedules", self._run())

    async def stop(self, timeout: float = 5.0) -> None:
        """Let the round in progress finish (within `timeout`, else it is cancelled: its transaction rolls back and
        the ticks fire in a later round, with the same ids), then stop."""
        if self._task:
            self.supervisor.stopping(self._task)
        self._stop.set()
        if self._task:
            await self.supervisor.stop(self._task, timeout)

    async def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                done = await schedules.fire_due(
                    self.pool, SCHEDULE_BATCH, lambda: hooks.fault_point("schedule_before_commit")
                )
                if done.fired:
                    hooks.fault_point("schedule_after_commit_before_publish")
                self._record(done)
                backoff = 0.2
            except Exception as exc:
                if is_connection_error(exc):
                    self.health.db_failed(exc)
                level = log.warning if is_transient(exc) else log.error
                level("schedule round failed; retrying", error=repr(exc)[:300], retry_in_s=backoff)
                await self._wait(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            if done.due < SCHEDULE_BATCH:
                await self._wait(self.poll)

    def _record(self, done: schedules.Round) -> None:
        for name, n in done.fired.items():
            self.metrics.schedule_ticks.labels(name, "fired").inc(n)
        for name, n in done.missed.items():
            self.metrics.schedule_ticks.labels(name, "missed").inc(n)
            log.warning("schedule ticks missed (catch-up policy)", schedule=name, missed=n)
        for name, seconds in done.lateness:
            self.metrics.schedule_lateness.labels(name).observe(seconds)
        for tenant, name, why in done.broken:
            self.metrics.schedules_paused_broken.inc()
            log.error("schedule paused: its row describes no schedule", tenant=tenant, schedule=name, why=why)
        if done.fired:
            log.info("schedule ticks fired", fired=dict(done.fired))

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
