"""The sfworkflow process: consumer, outbox relay, timer, gate and schedule loops, retention sweep, stats and HTTP,
with one lifecycle.

start: create database if missing -> migrate, store the code-declared schedules -> pool -> RabbitMQ (robust)
       -> declare topology -> relay, timers, gates, schedules, retention, consumer, stats, HTTP
stop (SIGTERM/SIGINT): stop consuming, apply and ack what was delivered, flush the relay,
       stop timers and retention, close everything; within SFWORKFLOW_SHUTDOWN_TIMEOUT_S.
background task died (runtime/supervisor.py): /readyz 503 naming it, then the same graceful stop (its own
       unapplied deliveries stay unacked and are redelivered); run_until_signal returns 70, not 0.
failed start: what was started is stopped in reverse order (HTTP site, consumer, retention, timers, relay,
       AMQP, pool),
       then the error is raised.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Iterable
from typing import Any

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from sfworkflow import db
from sfworkflow.client import amqp, memory, tracing
from sfworkflow.contract import schemas
from sfworkflow.contract.envelope import EventParser
from sfworkflow.core.definition import WorkflowDefinition
from sfworkflow.core.engine import Engine
from sfworkflow.core.limits import parse_overrides
from sfworkflow.db import migrate, operations
from sfworkflow.db import schedules as db_schedules
from sfworkflow.db.repository import Store
from sfworkflow.errors import ConfigurationError, StoreUnavailable
from sfworkflow.http.app import build_app
from sfworkflow.ops.schedules import declared as declared_schedules
from sfworkflow.runtime import hooks
from sfworkflow.runtime.consumer import Consumer, Health
from sfworkflow.runtime.declare import declare
from sfworkflow.runtime.gates import GateLoop
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.relay import Relay
from sfworkflow.runtime.retention import RetentionLoop
from sfworkflow.runtime.schedules import ScheduleLoop
from sfworkflow.runtime.stats import ClusterStats
from sfworkflow.runtime.supervisor import EXIT_TASK_DIED, Supervisor, TaskExit
from sfworkflow.runtime.timers import TimerLoop
from sfworkflow.settings import Settings, redact_url
from sfworkflow.workflows import DEFINITIONS

log = structlog.get_logger("sfworkflow.service")

STARTUP_RETRY_S = 30.0  # seconds start-up keeps retrying a dependency that is not up yet


def known_event_types(engine: Engine) -> set[str]:
    return engine.event_types()


class Service:
    """One sfworkflow process. `async with Service(settings) as service:` starts it and stops it gracefully;
    `run_until_signal()` runs it until SIGTERM/SIGINT or a dead background task and returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        *,
        http: bool = True,
        definitions: Iterable[WorkflowDefinition] = DEFINITIONS,
        tracer_provider: Any = None,
    ) -> None:
        """`tracer_provider`: OpenTelemetry's, for spans (client/tracing.py); default: the global one, if set."""
        self.settings = settings
        self.tracer = tracing.tracer(tracer_provider)  # None: no spans (not installed, or not configured)
        self.http_enabled = http
        # every (workflow, version) loaded; new instances start on the latest
        self.engine = Engine(definitions, parse_overrides(settings.rate_limits))
        self.metrics = Metrics(
            sorted({n for n, _v in self.engine.compiled}),
            self.engine.limit_labels(),
            self.engine.concurrency_labels(),
            [s.name for _w, s in declared_schedules(self.engine)],
        )
        self.health = Health()
        self.schemas = schemas.default()
        self.parser = EventParser(self.schemas, known_event_types(self.engine), settings.max_message_bytes)
        self.pool: asyncpg.Pool | None = None
        self.amqp: AbstractRobustConnection | None = None
        self.store: Store | None = None
        self.consumer: Consumer | None = None
        self.relay: Relay | None = None
        self.timers: TimerLoop | None = None
        self.gates: GateLoop | None = None
        self.schedules: ScheduleLoop | None = None
        self.retention: RetentionLoop | None = None
        self._runner: web.AppRunner | None = None
        self.stats: ClusterStats | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._db_check: asyncio.Task[list[int]] | None = None  # readiness's database query, while it runs
        self.supervisor = Supervisor(self._task_died, self.metrics.task_exits)
        self.stop_requested = asyncio.Event()  # SIGTERM/SIGINT, or a background task died
        self.stopped = asyncio.Event()
        self.http_port: int | None = None

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def exit_code(self) -> int:
        """The process's exit code: 0, or EXIT_TASK_DIED (70) once a background task died."""
        return EXIT_TASK_DIED if self.supervisor.failure is not None else 0

    def request_stop(self) -> None:
        """Ask whoever runs the service (run_until_signal) to stop it."""
        self.stop_requested.set()

    def _task_died(self, exit_: TaskExit) -> None:
        # Stop the whole process and exit 70 rather than restart the task in-process (runtime/supervisor.py
        # says why): the orchestrator restarts it (Kubernetes restarts the pod). /readyz is 503 from now on.
        self.request_stop()

    async def start(self, consume: bool = True) -> None:
        """Start everything. A step that fails stops what was started before it, in reverse order (HTTP site,
        consumer, timers, relay, AMQP connection, pool), then its error is raised."""
        try:
            await self._start(consume)
        except BaseException as exc:
            log.error("start failed; stopping what was started", error=type(exc).__name__)
            await self._shutdown(failed_start=True)
            raise

    async def _start(self, consume: bool) -> None:
        try:
            await self._start_parts(consume)
        except ValueError as exc:  # a malformed URL: the drivers' messages may quote it, password included
            raise ConfigurationError(
                f"cannot use the connection settings ({type(exc).__name__}); check SFWORKFLOW_DATABASE_URL "
                f"({redact_url(self.settings.database_url)}) and SFWORKFLOW_AMQP_URL "
                f"({redact_url(self.settings.amqp_url)}): special characters in a password must be %-encoded"
            ) from None

    async def _start_parts(self, consume: bool) -> None:
        s = self.settings
        hooks.install_fault_points()
        await _retry("PostgreSQL", s.database_url, lambda: db.ensure_database(s.database_url))
        conn = await asyncpg.connect(s.database_url)
        try:
            applied = await migrate.migrate(conn)
            code = declared_schedules(self.engine)
            await db_schedules.upsert_declared(conn, code, await db_schedules.database_now(conn))
            gone = await db_schedules.pause_undeclared(conn, [s.name for _w, s in code])
            if gone:
                log.warning("code-declared schedules no definition declares any more: paused", schedules=gone)
        finally:
            await conn.close()
        if applied:
            log.info("migrations applied", versions=applied)
        self.pool = await db.create_pool(s.database_url, s.pool_size)
        self.amqp = await _retry("RabbitMQ", s.amqp_url, lambda: amqp.connect_robust(s.amqp_url))
        workflows = sorted({cw.definition.name for cw in self.engine.compiled.values()})
        event_queues = await declare(self.amqp, workflows, s.queue_type, s.event_shards, amqp_url=s.amqp_url)
        self.relay = Relay(s, self.pool, self.amqp, self.metrics, self.supervisor, tracer=self.tracer)
        await self.relay.start()
        self.store = Store(self.pool, self.engine, s.park_timeout_s, on_commit=self.relay.hand)
        self.timers = TimerLoop(self.store, self.metrics, self.health, s.timer_poll_ms, self.supervisor)
        self.timers.start()
        self.gates = GateLoop(self.store, self.engine.concurrency_limits(), self.metrics, s.timer_poll_ms,
                              lambda: self.relay.doorbell.ring() if self.relay else None, self.supervisor)  # fmt: skip
        self.store.on_gates = self.gates.wake
        self.gates.start()
        self.schedules = ScheduleLoop(self.pool, self.metrics, self.health, s.timer_poll_ms, self.supervisor)
        self.schedules.start()
        self.retention = RetentionLoop(self.store, self.metrics, s.retention_days, self.supervisor)
        self.retention.start()
        self.consumer = Consumer(
            s, self.amqp, self.store, self.parser, self.metrics, self.health, self.supervisor,
            queues=event_queues, tracer=self.tracer,
        )  # fmt: skip
        if consume:
            await self.consumer.start()
        self.stats = ClusterStats(s.database_url, self.engine, self.metrics, s.stuck_after_s)
        self._stats_task = self.supervisor.spawn("stats", self.stats.run())
        if self.http_enabled:
            self._runner = web.AppRunner(build_app(self), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, s.http_host, s.http_port)
            await site.start()
            self.http_port = self._runner.addresses[0][1]  # the bound port (SFWORKFLOW_HTTP_PORT=0: any free one)
        log.info(
            "sfworkflow started",
            database=redact_url(s.database_url),
            amqp=redact_url(s.amqp_url),
            http_port=s.http_port if self.http_enabled else None,
            workflows=sorted(f"{n}@v{v}" for n, v in self.engine.compiled),
            queue_type=s.queue_type,
        )

    async def stop(self) -> None:
        """Graceful stop: drain the consumer, flush the relay, close connections. Once only: a second call
        (or one after a start that failed and cleaned up) returns at once."""
        if not self.stopped.is_set():
            await self._shutdown(failed_start=False)

    async def _shutdown(self, *, failed_start: bool) -> None:
        """Stop what is running, within SFWORKFLOW_SHUTDOWN_TIMEOUT_S. A graceful stop keeps HTTP up to the
        end (/readyz says 503 meanwhile); a failed start undoes itself in reverse order, HTTP first."""
        started = time.monotonic()
        deadline = started + self.settings.shutdown_timeout_s  # one budget for every step below

        def left(share: float = 1.0) -> float:
            return max(0.1, (deadline - time.monotonic()) * share)

        log.info("stopping")
        if failed_start:
            await _step("http", self._close_http())
        if self._stats_task:
            self.supervisor.cancel(self._stats_task)
            await _step("stats", self.supervisor.stop(self._stats_task, left(0.1)))
        if self.consumer:
            await _step("consumer", self.consumer.stop(timeout=left(0.5)))
        if self.retention:
            await _step("retention", self.retention.stop(timeout=left(0.1)))
        if self.timers:
            await _step("timers", self.timers.stop(timeout=left(0.2)))
        if self.gates:
            await _step("gates", self.gates.stop(timeout=left(0.2)))
        if self.schedules:
            await _step("schedules", self.schedules.stop(timeout=left(0.2)))
        if self.relay:
            await _step("relay", self.relay.stop(timeout=left(0.7)))
        await _step("tasks", self.supervisor.close(left(0.2)))  # none is left; one cut short mid-start might be
        if not failed_start:
            await _step("http", self._close_http())
        if self.amqp:
            await _step("rabbitmq", asyncio.wait_for(self.amqp.close(), left(0.5)))
        if self._db_check is not None and not self._db_check.done():
            self._db_check.cancel()  # a readiness query PostgreSQL never answered; the pool is closing anyway
            await asyncio.gather(self._db_check, return_exceptions=True)
        if self.pool:
            await _step("postgres", asyncio.wait_for(self.pool.close(), left()))
            if not self.pool.is_closing():
                self.pool.terminate()
        log.info("stopped", seconds=round(time.monotonic() - started, 2))
        self.stopped.set()

    async def _close_http(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def run_until_signal(self) -> int:
        """Run until SIGTERM or SIGINT, or until a background task dies; stop gracefully either way. Returns
        the process's exit code: 0 after a signal, EXIT_TASK_DIED (70) after a dead task."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            async with self:
                memory.settle_heap()
                await self.stop_requested.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        if self.supervisor.failure is not None:
            log.info(  # the error line with the traceback came when it died (runtime/supervisor.py)
                "exiting after a background task died; the orchestrator should restart the process",
                task=self.supervisor.failure.name,
                exit_code=self.exit_code,
            )
        return self.exit_code

    async def readiness(self, timeout: float) -> dict[str, dict[str, Any]]:
        """The checks of GET /readyz, each `{"ok": bool, …}`; also sets sfworkflow_ready and
        sfworkflow_dependency_up (so each scrape of /metrics, which runs it, reports them fresh)."""
        checks: dict[str, dict[str, Any]] = {}
        try:
            pending = await self._check_database(timeout)
            checks["postgres"] = {"ok": True}
            checks["migrations"] = {"ok": not pending} if not pending else {"ok": False, "pending": pending}
        except TimeoutError:
            checks["postgres"] = {"ok": False, "error": f"no answer within {timeout:g} s"}
            checks["migrations"] = {"ok": False, "error": "unknown: PostgreSQL did not answer"}
        except Exception as exc:
            checks["postgres"] = {"ok": False, "error": type(exc).__name__}
            checks["migrations"] = {"ok": False, "error": "unknown: PostgreSQL did not answer"}
        self.metrics.up.labels("postgres").set(1 if checks["postgres"]["ok"] else 0)
        amqp_ok = self.amqp is not None and not self.amqp.is_closed and self.amqp.connected.is_set()
        checks["rabbitmq"] = {"ok": amqp_ok} if amqp_ok else {"ok": False, "error": "not connected"}
        if amqp_ok and self.relay is not None and (stalled := self.relay.confirms_stalled()) is not None:
            amqp_ok, checks["rabbitmq"] = False, {"ok": False, "error": stalled}
        self.metrics.up.labels("rabbitmq").set(1 if amqp_ok else 0)
        checks["consumer"] = {"ok": True} if self.health.consuming else {"ok": False, "error": "not consuming"}
        if self.health.consuming and not self.health.db_ok:
            checks["consumer"] = {"ok": False, "error": f"batches failing: {self.health.db_error}"}
        if (failure := self.supervisor.failure) is not None:  # present only once a task died (the process stops)
            checks["background_tasks"] = {
                "ok": False,
                "error": f"{failure.describe()}; the process is stopping and exits {EXIT_TASK_DIED}",
            }
        self.metrics.ready.set(1 if all(c["ok"] for c in checks.values()) else 0)
        return checks

    def record_buffers(self) -> None:
        """Set sfworkflow_events_buffered from the consumer's buffers (called at every scrape)."""
        if self.consumer is not None:
            for queue, n in zip(self.consumer.queues, self.consumer.buffered(), strict=True):
                self.metrics.events_buffered.labels(queue).set(n)

    async def _check_database(self, timeout: float) -> list[int]:
        """Ping PostgreSQL and read the pending migrations, waiting at most `timeout` (TimeoutError then).

        The query runs in a task of its own that the wait does not cancel: cancelling a query that PostgreSQL
        does not answer makes asyncpg wait for its cancel request (up to the pool's command_timeout, 30 s and
        more), so a check would take that long. Instead a check that finds the previous one still running
        waits for that one, and at most one query is ever outstanding, however often /metrics is scraped."""
        if self._db_check is None or self._db_check.done():
            self._db_check = asyncio.create_task(self._query_database(), name="sfworkflow-readiness")
        return await asyncio.wait_for(asyncio.shield(self._db_check), timeout)

    async def _query_database(self) -> list[int]:
        if self.pool is None:
            raise StoreUnavailable("the PostgreSQL pool is not open (the service is starting or stopping)")
        async with self.pool.acquire() as conn:
            await operations.ping(conn)
            return await migrate.pending(conn)


async def _step(part: str, step: Awaitable[Any]) -> None:
    """One step of a stop: a step that fails is logged and the stop goes on (after a failed start, the error
    raised is the start's own, never the clean-up's)."""
    try:
        await step
    except Exception as exc:
        log.warning("stopping a part failed; going on", part=part, error=repr(exc)[:200])


async def _retry(what: str, url: str, fn: Any) -> Any:
    """Start-up: wait for a dependency that is still starting, up to STARTUP_RETRY_S."""
    deadline = time.monotonic() + STARTUP_RETRY_S
    delay = 0.5
    while True:
        try:
            return await fn()
        except (
            OSError,
            ConnectionError,
            asyncpg.exceptions.CannotConnectNowError,
            aio_pika.exceptions.AMQPConnectionError,
        ) as exc:
            if time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"{what} at {redact_url(url)} is not reachable ({type(exc).__name__}); "
                    f"is it running? (see README: Configuration)"
                ) from exc
            log.warning("waiting for dependency", dependency=what, url=redact_url(url), error=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(3.0, delay * 1.5)
        except ConfigurationError:
            raise
