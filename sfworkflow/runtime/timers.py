"""The timer loop: fires due timers as internal events and dead-letters expired parked events (the
retention sweep is a task of its own, runtime/retention.py, so a long sweep never delays a timer).

Timers are rows (sfworkflow.timer); any replica may fire them, claiming their instances with
FOR UPDATE SKIP LOCKED. No in-memory sleep holds workflow state: a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from sfworkflow.db.pool import is_connection_error, is_transient
from sfworkflow.db.repository import Store
from sfworkflow.runtime.consumer import Health
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.supervisor import Supervisor

log = structlog.get_logger("sfworkflow.timers")

TIMER_BATCH = 256  # timers fired per transaction
PARKED_SWEEP_S = 5.0  # seconds between sweeps for expired parked events


class TimerLoop:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        health: Health,
        poll_ms: float,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.supervisor = supervisor or Supervisor()  # the service's, which stops it when the loop dies
        self.store = store
        self.metrics = metrics
        self.health = health
        self.poll = poll_ms / 1000.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = self.supervisor.spawn("timers", self._run())

    async def stop(self, timeout: float = 5.0) -> None:
        """Let the round in progress finish (within `timeout`, else it is cancelled: its transaction rolls
        back and the timers fire later), then stop."""
        if self._task:
            self.supervisor.stopping(self._task)  # before the loop can see the stop and return
        self._stop.set()
        if self._task:
            await self.supervisor.stop(self._task, timeout)

    async def _run(self) -> None:
        next_sweep = 0.0
        backoff = 0.2
        while not self._stop.is_set():
            fired = 0
            try:
                report = await self.store.fire_due_timers(TIMER_BATCH)
                fired = report.timers_fired
                if fired or report.timer_failures:
                    self.metrics.record(report)
                if time.monotonic() >= next_sweep:
                    for reason, n in (await self.store.expire_parked()).items():
                        self.metrics.dead.labels(reason).inc(n)
                    unfireable = await self.store.unfireable_due_timers()
                    self.metrics.timers_unfireable.set(unfireable)
                    if unfireable:
                        log.warning("due timers of definition versions this replica has not loaded", timers=unfireable)
                    unparked = await self.store.redrive_awaiting_version()
                    if unparked:
                        log.info("events that waited for this replica's definition versions applied", applied=unparked)
                    next_sweep = time.monotonic() + PARKED_SWEEP_S
                backoff = 0.2
                if not self.health.db_ok:
                    self.health.db_recovered()
            except Exception as exc:
                if is_connection_error(exc):
                    self.health.db_failed(exc)
                level = log.warning if is_transient(exc) else log.error
                level("timer round failed; retrying", error=repr(exc)[:300], retry_in_s=backoff)
                await self._wait(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            if fired < TIMER_BATCH:
                await self._wait(self.poll)

    async def _wait(self, seconds: float) -> None:
        """Sleep, but wake at once on stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
