"""The gate loop: grants concurrency slots (core/limits.py ConcurrencyLimit) to the commands queued for them.

A command under a concurrency limit is written gated (never due) by the batch that decides it. Every replica runs
this loop, every SFWORKFLOW_TIMER_POLL_MS, or at once when a transaction of its process queued such a command or
released a slot. Each round, per key with queued commands and in a transaction of its own under the key's row lock
(a key another replica is granting is skipped), it grants the key's free slots to its oldest queued commands whose
instance is still in the limit's states (and withdraws those whose instance moved on): they fall due, the relay
publishes them, and the timers their step set start now. A batch that moves an instance out of the limit's states
releases its slot in its own transaction; every SWEEP_S this loop also releases slots left by what no batch saw (an
operator's edit, retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping

import structlog

from sfworkflow.core.limits import ConcurrencyLimit
from sfworkflow.db.pool import is_transient
from sfworkflow.db.repository import Store
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.supervisor import Supervisor

log = structlog.get_logger("sfworkflow.gates")

SWEEP_S = 5.0  # seconds between sweeps for slots nobody holds


class GateLoop:
    def __init__(
        self,
        store: Store,
        limits: Mapping[str, ConcurrencyLimit],
        metrics: Metrics,
        poll_ms: float,
        on_grant: Callable[[], None],
        supervisor: Supervisor | None = None,
    ) -> None:
        """`limits`: the declared concurrency limits by full name; `on_grant`: wakes the relay for what was granted."""
        self.supervisor = supervisor or Supervisor()
        self.store = store
        self.limits = dict(limits)
        self.metrics = metrics
        self.poll = poll_ms / 1000.0
        self.on_grant = on_grant
        self._stop = asyncio.Event()
        self._woken = asyncio.Event()  # set by `wake` and by `stop`
        self._task: asyncio.Task[None] | None = None
        self._after = ""  # the key the next round starts after: every key gets its turn, however many wait

    def start(self) -> None:
        if self.limits:  # no definition declares one: nothing to grant
            self._task = self.supervisor.spawn("gates", self._run())

    def wake(self) -> None:
        """A transaction of this process queued a command for a slot or released one: grant now, not at the poll."""
        self._woken.set()

    async def stop(self, timeout: float = 5.0) -> None:
        if self._task:
            self.supervisor.stopping(self._task)
        self._stop.set()
        self._woken.set()
        if self._task:
            await self.supervisor.stop(self._task, timeout)

    async def _run(self) -> None:
        next_sweep = 0.0
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    swept = await self.store.sweep_slots()
                    if swept:
                        self.metrics.slots_swept.inc(swept)
                        log.info("concurrency slots released by the sweep", slots=swept)
                    next_sweep = time.monotonic() + SWEEP_S
                granted, self._after = await self.store.grant_slots(self.limits, self._after)
                for name, n in granted:
                    self.metrics.slots_granted.labels(name).inc(n)
                if granted:
                    self.on_grant()
                backoff = 0.2
            except Exception as exc:
                level = log.warning if is_transient(exc) else log.error
                level("gate round failed; retrying", error=repr(exc)[:300], retry_in_s=backoff)
                await self._wait(backoff)
                backoff = min(5.0, backoff * 2)
                continue
            if not self._after:  # went round every key: wait; else go on with the next keys at once
                await self._wait(self.poll)

    async def _wait(self, seconds: float) -> None:
        """Sleep `seconds`, or until woken or stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), seconds)
        self._woken.clear()
