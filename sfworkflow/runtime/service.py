"""The sfworkflow process: consumer, outbox relay, timer loop, stats and HTTP, with one lifecycle.

start: create database if missing -> migrate -> pool -> RabbitMQ (robust) -> declare topology
       -> relay, timers, consumer, stats, HTTP
stop (SIGTERM/SIGINT): stop consuming, apply and ack what was delivered, flush the relay,
       stop timers, close everything; within SFWORKFLOW_SHUTDOWN_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from sfworkflow import db
from sfworkflow.contract import schemas
from sfworkflow.contract.envelope import EventParser
from sfworkflow.core.definition import WorkflowDefinition
from sfworkflow.core.engine import Engine
from sfworkflow.db import migrate, operations, outbox
from sfworkflow.db.repository import Store
from sfworkflow.errors import ConfigurationError, StoreUnavailable
from sfworkflow.http.app import build_app
from sfworkflow.ops.stuck import Filters, find_stuck
from sfworkflow.runtime import hooks
from sfworkflow.runtime.consumer import Consumer, Health
from sfworkflow.runtime.declare import declare
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.relay import Relay
from sfworkflow.runtime.timers import TimerLoop
from sfworkflow.settings import Settings, redact_url
from sfworkflow.workflows import DEFINITIONS

log = structlog.get_logger("sfworkflow.service")

STATS_INTERVAL_S = 5.0  # seconds between refreshes of the gauges read from PostgreSQL
STARTUP_RETRY_S = 30.0  # seconds start-up keeps retrying a dependency that is not up yet
STUCK_EVERY = 6  # stats rounds between refreshes of the stuck gauge (a heavier query)


def known_event_types(engine: Engine) -> set[str]:
    return {cw.definition.event_type(e) for cw in engine.compiled.values() for e in cw.definition.events}


class Service:
    def __init__(
        self, settings: Settings, *, http: bool = True, definitions: Iterable[WorkflowDefinition] = DEFINITIONS
    ) -> None:
        self.settings = settings
        self.http_enabled = http
        self.engine = Engine(definitions)  # every (workflow, version) loaded; new instances start on the latest
        self.metrics = Metrics(sorted({n for n, _v in self.engine.compiled}))
        self.health = Health()
        self.schemas = schemas.default()
        self.parser = EventParser(self.schemas, known_event_types(self.engine), settings.max_message_bytes)
        self.pool: asyncpg.Pool | None = None
        self.amqp: AbstractRobustConnection | None = None
        self.store: Store | None = None
        self.consumer: Consumer | None = None
        self.relay: Relay | None = None
        self.timers: TimerLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self.stopped = asyncio.Event()
        self.http_port: int | None = None

    async def start(self, consume: bool = True) -> None:
        try:
            await self._start(consume)
        except ValueError as exc:  # a malformed URL: the drivers' messages may quote it, password included
            raise ConfigurationError(
                f"cannot use the connection settings ({type(exc).__name__}); check SFWORKFLOW_DATABASE_URL "
                f"({redact_url(self.settings.database_url)}) and SFWORKFLOW_AMQP_URL "
                f"({redact_url(self.settings.amqp_url)}): special characters in a password must be %-encoded"
            ) from None

    async def _start(self, consume: bool) -> None:
        s = self.settings
        hooks.install_fault_points()
        await _retry("PostgreSQL", s.database_url, lambda: db.ensure_database(s.database_url))
        conn = await asyncpg.connect(s.database_url)
        try:
            applied = await migrate.migrate(conn)
        finally:
            await conn.close()
        if applied:
            log.info("migrations applied", versions=applied)
        self.pool = await db.create_pool(s.database_url, s.pool_size)
        self.amqp = await _retry("RabbitMQ", s.amqp_url, lambda: aio_pika.connect_robust(s.amqp_url))
        await declare(self.amqp, sorted({cw.definition.name for cw in self.engine.compiled.values()}), s.queue_type)
        self.relay = Relay(s, self.pool, self.amqp, self.metrics)
        await self.relay.start()
        self.store = Store(self.pool, self.engine, s.park_timeout_s, on_commit=self.relay.wake.set)
        self.timers = TimerLoop(self.store, self.metrics, self.health, s.timer_poll_ms, s.retention_days)
        self.timers.start()
        self.consumer = Consumer(s, self.amqp, self.store, self.parser, self.metrics, self.health)
        if consume:
            await self.consumer.start()
        self._stats_task = asyncio.create_task(self._stats(), name="sfworkflow-stats")
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
        """Graceful stop: drain the consumer, flush the relay, close connections."""
        started = time.monotonic()
        deadline = started + self.settings.shutdown_timeout_s  # one budget for every step below

        def left(share: float = 1.0) -> float:
            return max(0.1, (deadline - time.monotonic()) * share)

        log.info("stopping")
        if self.consumer:
            await self.consumer.stop(timeout=left(0.5))
        if self.timers:
            await self.timers.stop(timeout=left(0.2))
        if self.relay:
            await self.relay.stop(timeout=left(0.7))
        if self._stats_task:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        if self._runner:
            await self._runner.cleanup()
        if self.amqp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.amqp.close(), left(0.5))
        if self.pool:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), left())
            if not self.pool.is_closing():
                self.pool.terminate()
        log.info("stopped", seconds=round(time.monotonic() - started, 2))
        self.stopped.set()

    async def run_until_signal(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()

    async def readiness(self, timeout: float) -> dict[str, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {}
        try:
            assert self.pool is not None
            async with asyncio.timeout(timeout):
                async with self.pool.acquire() as conn:
                    await operations.ping(conn)
            checks["postgres"] = {"ok": True}
            self.metrics.up.labels("postgres").set(1)
        except Exception as exc:
            checks["postgres"] = {"ok": False, "error": type(exc).__name__}
            self.metrics.up.labels("postgres").set(0)
        amqp_ok = self.amqp is not None and not self.amqp.is_closed and self.amqp.connected.is_set()
        checks["rabbitmq"] = {"ok": amqp_ok} if amqp_ok else {"ok": False, "error": "not connected"}
        self.metrics.up.labels("rabbitmq").set(1 if amqp_ok else 0)
        checks["consumer"] = {"ok": True} if self.health.consuming else {"ok": False, "error": "not consuming"}
        if self.health.consuming and not self.health.db_ok:
            checks["consumer"] = {"ok": False, "error": f"batches failing: {self.health.db_error}"}
        try:
            assert self.pool is not None
            async with asyncio.timeout(timeout), self.pool.acquire() as conn:
                pending = await migrate.pending(conn)
            checks["migrations"] = {"ok": not pending} if not pending else {"ok": False, "pending": pending}
        except Exception as exc:
            checks["migrations"] = {"ok": False, "error": type(exc).__name__}
        return checks

    async def _stats(self) -> None:
        rounds = 0
        while True:
            try:
                assert self.pool is not None
                async with self.pool.acquire() as conn:
                    row = await outbox.backlog(conn)
                    self.metrics.outbox_backlog.set(row["backlog"])
                    self.metrics.outbox_oldest.set(row["oldest_s"])
                    self.metrics.instances.clear()
                    for r in await operations.instances_by_state(conn):
                        self.metrics.instances.labels(r["workflow"], r["state"]).set(r["n"])
                    self.metrics.parked.set(await operations.parked_count(conn))
                    if rounds % STUCK_EVERY == 0:
                        counts = Counter(
                            s.workflow
                            for s in await find_stuck(
                                conn, self.engine, Filters(limit=100_000, default_after_s=self.settings.stuck_after_s)
                            )
                        )
                        for name in self.engine.latest:
                            self.metrics.stuck.labels(name).set(counts.get(name, 0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("stats refresh failed", error=type(exc).__name__)
            rounds += 1
            await asyncio.sleep(STATS_INTERVAL_S)


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
