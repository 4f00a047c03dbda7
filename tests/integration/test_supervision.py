"""Supervision, against the real PostgreSQL and RabbitMQ: a background task that dies takes /readyz down, the
process stops gracefully and exits 70 without acking anything it did not apply; a start that fails stops what
it had started."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from sfworkflow.errors import StoreUnavailable
from sfworkflow.runtime import service as service_module
from sfworkflow.runtime.service import Service
from sfworkflow.runtime.supervisor import EXIT_TASK_DIED, TASK_PREFIX
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.fuzz_support import http_get
from tests.integration.helpers_extra import events_depth, quick, wait_state
from tests.support import Amqp, enrolled_data, event, running_service, terminate

REPO = Path(__file__).resolve().parents[2]
PREFETCH = 4  # per consumer channel: bounds what each channel holds unacked
FREE = 8  # events published once one channel is blocked: more than the blocked channel can hold


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Run:
    """`python -m sfworkflow run` in a subprocess; what it wrote is in `output` once it exited."""

    def __init__(self, settings: Settings, **extra: str) -> None:
        self.port = _free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")}
        self.env.update(
            SFWORKFLOW_DATABASE_URL=settings.database_url,
            SFWORKFLOW_AMQP_URL=settings.amqp_url,
            SFWORKFLOW_HTTP_HOST="127.0.0.1",
            SFWORKFLOW_HTTP_PORT=str(self.port),
            SFWORKFLOW_QUEUE_TYPE="classic",
            SFWORKFLOW_PROCESSES="1",
            SFWORKFLOW_LOG_FORMAT="json",
            **extra,
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.output = ""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Run]:
        with tempfile.TemporaryFile() as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sfworkflow", "run", cwd=REPO, env=self.env, stdout=log, stderr=log
            )
            try:
                await wait_for(self._ready, timeout=60, interval=0.1, what="the service ready")
                yield self
            finally:
                await terminate(self.proc, 30)
                log.seek(0)
                self.output = log.read().decode("utf-8", "replace")

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        status, text = await http_get(self.port, "/readyz")
        return status, orjson.loads(text)

    async def _ready(self) -> bool:
        try:
            return (await self.readyz())[0] == 200
        except OSError:
            return False

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out


async def _waiting_on_a_lock(pg: asyncpg.Connection) -> bool:
    """A session of the service is blocked on a row lock (the one the test holds)."""
    return bool(
        await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    )


async def _inbox(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM sfworkflow.inbox"))


# ---- (a) a background task that dies --------------------------------------------------------------
async def test_a_dead_batch_loop_takes_readiness_down_and_the_process_exits_70_acking_nothing_unapplied(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """Two consumer channels. The test holds the row lock of instance `held`, so the channel that takes its
    event blocks mid-batch; the other channel applies a batch, acks it, then its batch loop raises (a
    test-only fault point: runtime/hooks.py). The blocked batch keeps the graceful stop open while /readyz is
    read; once the lock is let go it is applied and acked, and the process exits 70. Every event is then in
    the inbox (applied) or back on the queue (the dead loop's unapplied deliveries, never acked)."""
    run = Run(
        settings,
        SFWORKFLOW_CONSUMERS="2",
        SFWORKFLOW_PREFETCH=str(PREFETCH),
        SFWORKFLOW_BATCH_SIZE=str(PREFETCH),
        SFWORKFLOW_SHUTDOWN_TIMEOUT_S="60",  # the drain waits for the blocked batch up to half of it
        SFWORKFLOW_FAULT_POINT="after_batch_acked:raise",
        SFWORKFLOW_FAULT_AFTER="2",  # the first batch (E1) passes; the second batch acked raises
    )
    published: list[dict[str, Any]] = []
    async with run.running(), Amqp(settings.amqp_url) as mq:
        published.append(await mq.publish(event("sequence.enrolled", "held", enrolled_data(steps=1, delay_s=3600))))
        await wait_state(pg, "held", "waiting")  # batch 1 applied and acked

        lock = await asyncpg.connect(settings.database_url)
        try:
            held = lock.transaction()
            await held.start()
            await lock.execute("SELECT 1 FROM sfworkflow.instance WHERE entity_id = 'held' FOR UPDATE")
            published.append(await mq.publish(event("sequence.paused", "held", {})))
            await wait_for(lambda: _waiting_on_a_lock(pg), timeout=30, what="the batch of `held` blocked")
            # The blocked channel holds at most PREFETCH deliveries; the other one takes the rest, applies a
            # batch (acked) and its loop dies right after.
            for i in range(FREE):
                published.append(
                    await mq.publish(event("sequence.enrolled", f"free-{i}", enrolled_data(steps=1, delay_s=3600)))
                )

            async def not_ready() -> dict[str, Any] | None:
                status, body = await run.readyz()
                return body if status == 503 and "background_tasks" in body.get("failed", []) else None

            body = await wait_for(not_ready, timeout=30, interval=0.05, what="/readyz 503 naming the dead task")
            reason = body["checks"]["background_tasks"]["error"]
            assert reason.startswith(f"{TASK_PREFIX}consumer-") and "raised FaultInjected" in reason, reason
            assert f"exits {EXIT_TASK_DIED}" in reason
            _status, metrics = await http_get(run.port, "/metrics")
            assert 'sfworkflow_background_task_exits_total{task="consumer"} 1.0' in metrics
            assert 'sfworkflow_background_task_exits_total{task="relay"} 0.0' in metrics
            assert run.proc is not None and run.proc.returncode is None  # still draining the blocked batch
            await held.rollback()
        finally:
            await lock.close()
        assert run.proc is not None
        rc = await asyncio.wait_for(run.proc.wait(), 60)

    assert rc == EXIT_TASK_DIED, run.output[-3000:]
    died = [line for line in run.log_lines() if line.get("event") == "background task died; stopping the service"]
    assert len(died) == 1, run.output[-3000:]
    assert died[0]["task"].startswith(f"{TASK_PREFIX}consumer-") and died[0]["level"] == "error"
    (raised,) = died[0]["exception"]  # the traceback as a structured field: type, value, frames
    assert raised["exc_type"] == "FaultInjected" and raised["frames"]
    assert any(line.get("event") == "stopped" for line in run.log_lines())

    # Nothing acked without being applied: each event is an inbox row or still on the queue.
    n = len(published)

    async def accounted() -> tuple[int, int] | None:
        ready, consumers = await events_depth(settings.amqp_url)
        applied = await _inbox(pg)
        return (applied, ready) if consumers == 0 and applied + ready == n else None

    applied, left = await wait_for(accounted, timeout=30, what="inbox rows + queued events == published")
    # At most E1, one batch of the dead channel and what the blocked channel held were applied: some are left.
    assert left >= 1, (applied, left)
    assert await pg.fetchval("SELECT state FROM sfworkflow.instance WHERE entity_id = 'held'") == "paused"

    # A restarted service applies the rest, each once.
    async with running_service(quick(settings)):
        await wait_for(lambda: _all_applied(pg, settings.amqp_url, n), timeout=30, what="every event applied")
    inbox = {r["event_id"] for r in await pg.fetch("SELECT event_id::text FROM sfworkflow.inbox")}
    assert inbox == {e["event_id"] for e in published}
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE entity_id LIKE 'free-%'") == FREE


async def _all_applied(pg: asyncpg.Connection, amqp_url: str, n: int) -> bool:
    return await _inbox(pg) == n and (await events_depth(amqp_url))[0] == 0


async def test_sigterm_still_exits_0(settings: Settings) -> None:
    run = Run(settings)
    async with run.running():
        assert run.proc is not None
        run.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(run.proc.wait(), 30)
    assert rc == 0, run.output[-3000:]


# ---- (b) a start that fails cleans up ---------------------------------------------------------------
def _sfworkflow_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(TASK_PREFIX) and not t.done())


async def test_a_start_that_fails_at_the_http_port_stops_everything_it_had_started(settings: Settings) -> None:
    """Pool, AMQP, relay, timers, consumer and stats are up when the HTTP port turns out to be taken."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        service = Service(quick(settings, http_port=taken.getsockname()[1]))
        with pytest.raises(OSError):
            async with service:
                pytest.fail("the start should have failed")
    assert service.consumer is not None and service.relay is not None and service.timers is not None
    assert _sfworkflow_tasks() == []
    assert service.supervisor.failure is None  # stopping them was orderly, not a death
    assert service.pool is not None and service.pool.is_closing()
    assert service.amqp is not None and service.amqp.is_closed
    assert await events_depth(settings.amqp_url) == (0, 0)  # no consumer left on the queue
    assert service.stopped.is_set()
    await service.stop()  # a stop after the failed start has nothing left to do


async def test_a_start_that_fails_at_rabbitmq_closes_the_pool(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "STARTUP_RETRY_S", 0.5)
    service = Service(dataclasses.replace(settings, amqp_url="amqp://guest:guest@127.0.0.1:1/"))
    with pytest.raises(StoreUnavailable, match=re.escape("RabbitMQ at amqp://guest:***@127.0.0.1:1/ is not reachable")):
        await service.start()
    assert service.pool is not None and service.pool.is_closing()
    assert service.amqp is None and service.relay is None
    assert _sfworkflow_tasks() == []
    assert service.stopped.is_set()
