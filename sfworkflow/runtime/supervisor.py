"""Supervised background tasks: every long-running task of the service is started here and watched.

A supervised task ends in one of two ways:

- an orderly stop: its owner said it is stopping (`stop`, `cancel`, `stopping`) and then it returned or
  the supervisor cancelled it;
- a failure: anything else. It raised (at any time, during a stop too), it returned on its own, or it was
  cancelled by someone other than the supervisor.

A failure is logged once as an error (task name, exception, traceback), counted in
`sfworkflow_background_task_exits_total{task=...}`, remembered in `failure` (the first one: /readyz
names it) and reported to `on_failure`, which is called once per supervisor however many tasks fail.

What the service does then is its choice, not the supervisor's: sfworkflow stops gracefully and exits
non-zero (EXIT_TASK_DIED) rather than restarting the task in-process. A task that died may have left
state behind it (a consumer channel with unacked deliveries, a half-read buffer) that a restart inside
the process would have to reason about; a fresh process has none, and an orchestrator (Kubernetes
restarts the pod, systemd the unit) already knows how to restart a process that exited, with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter

log = structlog.get_logger("sfworkflow.supervisor")

EXIT_TASK_DIED = 70  # the process exit code after a background task died: EX_SOFTWARE (sysexits.h)
TASK_PREFIX = "sfworkflow-"  # every supervised task's name starts with it


@dataclass(frozen=True, slots=True)
class TaskExit:
    """How a supervised task ended when it should not have."""

    name: str  # the task's name, e.g. sfworkflow-consumer-0
    kind: str  # what it is, without its index (the metric label), e.g. consumer
    how: str  # raised | returned | cancelled
    error: BaseException | None = None

    def describe(self) -> str:
        """One sentence for /readyz and the logs, e.g. `sfworkflow-consumer-0 raised RuntimeError: boom`."""
        if self.how == "raised" and self.error is not None:
            return f"{self.name} raised {type(self.error).__name__}: {str(self.error)[:200]}"
        if self.how == "cancelled":
            return f"{self.name} was cancelled while it should have kept running"
        return f"{self.name} returned while it should have kept running"


class Supervisor:
    """Starts named background tasks and watches them until they end (see the module docstring)."""

    def __init__(self, on_failure: Callable[[TaskExit], None] | None = None, exits: Counter | None = None) -> None:
        self.on_failure = on_failure
        self.exits = exits
        self.failure: TaskExit | None = None  # the first failure seen
        self.failures = 0
        self._kinds: dict[asyncio.Task[None], str] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def spawn(self, kind: str, coro: Coroutine[Any, Any, None], *, index: int | None = None) -> asyncio.Task[None]:
        """Start `coro` as the task `sfworkflow-<kind>[-<index>]` and watch it."""
        name = f"{TASK_PREFIX}{kind}" if index is None else f"{TASK_PREFIX}{kind}-{index}"
        task = asyncio.create_task(coro, name=name)
        self._kinds[task] = kind
        task.add_done_callback(self._ended)
        return task

    @property
    def running(self) -> list[asyncio.Task[None]]:
        """The supervised tasks that have not ended yet."""
        return [t for t in self._kinds if not t.done()]

    def stopping(self, task: asyncio.Task[None]) -> None:
        """The owner asked `task` to stop: from now on its returning is an orderly end."""
        self._stopping.add(task)

    def cancel(self, task: asyncio.Task[None]) -> None:
        """Cancel `task` as an orderly stop."""
        self._stopping.add(task)
        task.cancel()

    async def stop(self, task: asyncio.Task[None], timeout: float) -> None:
        """Wait up to `timeout` seconds for `task` (already asked to stop) to end; cancel it after that.
        Never raises what the task raised: that was reported as a failure when it happened."""
        self._stopping.add(task)
        if not task.done():
            await asyncio.wait({task}, timeout=max(0.0, timeout))
        if not task.done():
            log.warning("background task did not stop in time; cancelling it", task=task.get_name())
            task.cancel()
            await asyncio.wait({task})

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task still running (a start that failed half-way) and wait up to `timeout` for them."""
        tasks = self.running
        for task in tasks:
            self.cancel(task)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def _ended(self, task: asyncio.Task[None]) -> None:
        kind = self._kinds.get(task, "unknown")
        orderly = task in self._stopping
        self._stopping.discard(task)
        if task.cancelled():
            if orderly:
                return
            exit_ = TaskExit(task.get_name(), kind, "cancelled")
        elif (error := task.exception()) is not None:  # retrieving it also keeps asyncio from logging it again
            exit_ = TaskExit(task.get_name(), kind, "raised", error)
        elif orderly:
            return
        else:
            exit_ = TaskExit(task.get_name(), kind, "returned")
        self._failed(exit_)

    def _failed(self, exit_: TaskExit) -> None:
        self.failures += 1
        if self.exits is not None:
            self.exits.labels(exit_.kind).inc()
        exc_info: Any = exit_.error if exit_.error is not None else False
        log.error(
            "background task died; stopping the service",
            task=exit_.name,
            how=exit_.how,
            error=repr(exit_.error)[:300] if exit_.error is not None else None,
            exc_info=exc_info,
        )
        if self.failure is not None:
            return  # the service was already told
        self.failure = exit_
        if self.on_failure is not None:
            try:
                self.on_failure(exit_)
            except Exception as exc:  # a callback that fails must not hide the failure it reports
                log.error("reacting to a dead background task failed", error=repr(exc)[:300], exc_info=exc)
