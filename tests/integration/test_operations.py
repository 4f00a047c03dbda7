"""Operating the service: tenant isolation, outbox publishing, HTTP endpoints, graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import (
    COMMANDS_Q,
    COMPENSATIONS_Q,
    DEAD_Q,
    LIFECYCLE_EXCHANGE,
    Inbox,
    bind_capture_queue,
    events_depth,
    outcomes,
    quick,
    wait_all_published,
    wait_state,
)
from tests.support import OTHER_TENANT, TENANT, Amqp, enrolled_data, event, instance, require_tool, running_service

REPO = Path(__file__).resolve().parents[2]


# ---- tenants -------------------------------------------------------------------------------------
async def test_same_entity_under_two_tenants_is_two_instances(settings: Settings, pg: asyncpg.Connection) -> None:
    address = "shared@example.com"  # same recipient and template: effect keys are per tenant, both send
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish(event("sequence.enrolled", "shared-1", enrolled_data(steps=2, address=address)))
        await mq.publish(
            event("sequence.enrolled", "shared-1", enrolled_data(steps=2, address=address), tenant=OTHER_TENANT)
        )
        sends = await commands.wait(2)
        assert sorted(c["tenant_id"] for c in sends) == sorted([TENANT, OTHER_TENANT])
        await wait_state(pg, "shared-1", "sending", TENANT)
        await wait_state(pg, "shared-1", "sending", OTHER_TENANT)
        a_before = await instance(pg, "shared-1", TENANT)

        # Tenant B's events never touch tenant A's instance.
        await mq.publish(
            event("sequence.step_sent", "shared-1", {"step": 0, "provider_message_id": "b0"}, tenant=OTHER_TENANT)
        )
        await wait_for(lambda: _cursor_is(pg, OTHER_TENANT, 1), what="tenant B on step 1")
        await mq.publish(event("sequence.cancelled", "shared-1", {}, tenant=OTHER_TENANT))
        await wait_state(pg, "shared-1", "cancelled", OTHER_TENANT)
        await wait_all_published(pg)
        a_after = await instance(pg, "shared-1", TENANT)
        assert dict(a_after) == dict(a_before)

        # Tenant A carries on by itself.
        await mq.publish(event("sequence.step_sent", "shared-1", {"step": 0, "provider_message_id": "a0"}))
        await wait_for(lambda: _cursor_is(pg, TENANT, 1), what="tenant A on step 1")
        await mq.publish(event("sequence.step_sent", "shared-1", {"step": 1, "provider_message_id": "a1"}))
        await wait_state(pg, "shared-1", "completed", TENANT)
        await wait_all_published(pg)
        sends = await commands.settle(0.3)

    a = await instance(pg, "shared-1", TENANT)
    b = await instance(pg, "shared-1", OTHER_TENANT)
    assert a["id"] != b["id"]
    assert (a["state"], b["state"]) == ("completed", "cancelled")
    assert a["context"]["sent"] == 2 and b["context"]["sent"] == 1
    mine = [(c["tenant_id"], c["data"]["step"]) for c in sends if c["tenant_id"] == TENANT]
    assert mine == [(TENANT, 0), (TENANT, 1)]
    assert [(c["tenant_id"], c["data"]["step"]) for c in sends if c["tenant_id"] == OTHER_TENANT] == [
        (OTHER_TENANT, 0),
        (OTHER_TENANT, 1),
    ]
    assert all(h[1] == "applied" for h in await outcomes(pg, "shared-1", TENANT))
    assert [h[0] for h in await outcomes(pg, "shared-1", OTHER_TENANT)][-1] == "sequence.cancelled"
    assert await pg.fetchval("SELECT count(DISTINCT tenant_id) FROM sfworkflow.effect") == 2


async def _cursor_is(pg: asyncpg.Connection, tenant: str, cursor: int) -> bool:
    row = await instance(pg, "shared-1", tenant)
    return row is not None and row["context"].get("cursor") == cursor


# ---- outbox --------------------------------------------------------------------------------------
async def test_every_outbox_row_is_published_with_amqp_properties(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        await bind_capture_queue(settings.amqp_url, LIFECYCLE_EXCHANGE, "test.lifecycle")
        commands = Inbox(mq, COMMANDS_Q)
        compensations = Inbox(mq, COMPENSATIONS_Q)
        lifecycle = Inbox(mq, "test.lifecycle")
        dead = Inbox(mq, DEAD_Q)
        await mq.publish(event("sequence.enrolled", "ok-1", enrolled_data(steps=1)))
        await mq.publish(event("sequence.enrolled", "bad-1", enrolled_data(steps=1)))
        await commands.wait(2)
        await mq.publish(event("sequence.step_sent", "ok-1", {"step": 0, "provider_message_id": "p"}))
        await mq.publish(
            event("sequence.step_failed", "bad-1", {"step": 0, "error_code": "template_rejected", "retryable": False})
        )
        await mq.publish_raw(b"{not json")
        await wait_state(pg, "ok-1", "completed")
        await wait_state(pg, "bad-1", "compensated")
        await wait_all_published(pg)
        await compensations.wait_raw(2)
        await lifecycle.wait_raw(6)  # started x2, failed, compensated, completed x2 (every ending's last)
        await dead.wait_raw(1)
        await asyncio.sleep(0.3)
        for box in (commands, compensations, lifecycle, dead):
            await box.poll()

    rows = await pg.fetch("SELECT kind, message_id, published_at, publish_attempts, last_error FROM sfworkflow.outbox")
    assert sorted(r["kind"] for r in rows) == sorted(
        ["command"] * 2 + ["compensation"] * 2 + ["lifecycle"] * 6 + ["dead_letter"]
    )
    assert all(r["published_at"] is not None for r in rows)
    assert all(r["publish_attempts"] == 1 and r["last_error"] is None for r in rows)
    ids_by_kind = {
        k: {str(r["message_id"]) for r in rows if r["kind"] == k}
        for k in ("command", "compensation", "lifecycle", "dead_letter")
    }

    for kind, box, id_field in (
        ("command", commands, "command_id"),
        ("compensation", compensations, "command_id"),
        ("lifecycle", lifecycle, "event_id"),
    ):
        assert len(box.messages) == len(ids_by_kind[kind])
        for m, body in zip(box.messages, box.bodies, strict=True):
            assert m.message_id == body[id_field]
            assert m.content_type == "application/json"
            assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert m.app_id == "sfworkflow"
        assert {m.message_id for m in box.messages} == ids_by_kind[kind]
    for m, body in zip(commands.messages, commands.bodies, strict=True):
        assert m.type == body["command_type"] == "sequence.send_step"
        assert body["kind"] == "command"
    (letter,) = dead.messages
    assert letter.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert letter.message_id in ids_by_kind["dead_letter"]


# ---- HTTP ----------------------------------------------------------------------------------------
async def test_http_health_readiness_and_metrics(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "http-1", enrolled_data(steps=1)))
        await wait_state(pg, "http-1", "sending")
        await wait_all_published(pg)

        async def exporting_cluster_gauges() -> bool:  # the only replica takes the lead at its first stats round
            return service.metrics.cluster_exported

        await wait_for(exporting_cluster_gauges, what="the service exporting the cluster gauges")
        base = f"http://127.0.0.1:{service.http_port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
                assert (await r.json())["status"] == "ok"
            async with http.get(f"{base}/readyz") as r:
                ready = await r.json()
                assert r.status == 200, ready
            async with http.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()

    assert ready["status"] == "ready"
    assert ready["failed"] == []  # always there, so `body.failed.length` works on a 200 too
    assert {k: v["ok"] for k, v in ready["checks"].items()} == {
        "postgres": True,
        "rabbitmq": True,
        "consumer": True,
        "migrations": True,
    }
    for name in (
        "sfworkflow_events_total",
        "sfworkflow_transitions_total",
        "sfworkflow_batch_processing_seconds_bucket",
        "sfworkflow_outbox_backlog",
        "sfworkflow_instances",
        "sfworkflow_cluster_stats_leader",
    ):
        assert name in text, name
    assert 'sfworkflow_events_total{outcome="applied",workflow="sequence"} 1.0' in text
    assert 'sfworkflow_transitions_total{workflow="sequence"} 2.0' in text

    promtool = require_tool("promtool", "apt-get install prometheus")
    proc = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


async def test_readyz_reports_a_stopped_consumer(settings: Settings) -> None:
    async with (
        running_service(quick(settings), consume=False) as service,
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{service.http_port}/readyz") as r,
    ):
        body = await r.json()
        assert r.status == 503
    assert body["failed"] == ["consumer"]


async def _readyz(port: int | None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
        return r.status, await r.json()


async def _ready(port: int | None) -> bool:
    return (await _readyz(port))[0] == 200


async def _timer_loop_waiting(pg: asyncpg.Connection) -> int | None:
    return await pg.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
        "AND query LIKE '%FROM sfworkflow.timer t %due_at <= now()%' LIMIT 1"
    )


async def test_readyz_recovers_after_a_transient_timer_loop_error_without_traffic(
    settings: Settings, pg: asyncpg.Connection, database_url: str
) -> None:
    """One failed timer round (its query cancelled, as after a PostgreSQL restart at a quiet time)."""
    async with running_service(quick(settings)) as service:
        assert await _ready(service.http_port)
        locker = await asyncpg.connect(database_url)
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute("LOCK TABLE sfworkflow.timer IN ACCESS EXCLUSIVE MODE")
            pid = await wait_for(lambda: _timer_loop_waiting(pg), timeout=5, what="the timer loop waiting")
            assert await pg.fetchval("SELECT pg_cancel_backend($1)", pid)
            await tx.rollback()
        finally:
            await locker.close()
        # PostgreSQL is fine again; the timer loop's next rounds succeed.
        await asyncio.sleep(1.0)
        assert (await pg.fetchval("SELECT count(*) FROM sfworkflow.timer")) == 0
        status, body = await _readyz(service.http_port)
        if status != 200:
            await wait_for(lambda: _ready(service.http_port), timeout=5, what=f"/readyz 200 again (was {body})")


# ---- shutdown ------------------------------------------------------------------------------------
async def test_idle_service_stops_promptly(settings: Settings) -> None:
    async with running_service(settings) as service:
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await service.stop()
        took = time.monotonic() - started
    assert took < 1.5, f"an idle service took {took:.2f}s to stop (shutdown_timeout_s={settings.shutdown_timeout_s})"


SLOW_DEAD_LETTER_MARK = """
CREATE FUNCTION public.test_slow_dead_letter_mark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'dead_letter' AND OLD.published_at IS NULL AND NEW.published_at IS NOT NULL THEN
        PERFORM pg_sleep(2);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_slow_dead_letter_mark BEFORE UPDATE ON sfworkflow.outbox
    FOR EACH ROW EXECUTE FUNCTION public.test_slow_dead_letter_mark();
"""


async def test_stop_flushes_rows_committed_during_the_last_relay_round(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """Service.stop() promises to flush the relay. Here a relay round is made slow (the test's own
    database sleeps 2 s when a dead letter is marked published) and, while it runs, the consumer
    commits an enrollment's command; then the service stops. The command must still be published."""
    await pg.execute(SLOW_DEAD_LETTER_MARK)
    s = quick(settings, shutdown_timeout_s=8.0)
    async with running_service(s) as service, Amqp(settings.amqp_url) as mq:
        dead = Inbox(mq, DEAD_Q)
        commands = Inbox(mq, COMMANDS_Q)
        await mq.publish_raw(b"{not json")
        await dead.wait_raw(1, what="the dead letter published (its relay round now sleeps in the mark)")
        assert not await all_published_now(pg), "the relay round already ended; the test did not set up the race"
        await mq.publish(event("sequence.enrolled", "flush-1", enrolled_data(steps=1)))
        await wait_state(pg, "flush-1", "sending")  # committed while the relay round is in progress
        assert not await all_published_now(pg), "the relay round already ended; the test did not set up the race"
        await service.stop()
        sends = await commands.settle(0.2)
        left = await pg.fetch("SELECT kind, routing_key FROM sfworkflow.outbox WHERE published_at IS NULL")

    assert [dict(r) for r in left] == []
    assert [c["entity_id"] for c in sends] == ["flush-1"]


async def all_published_now(pg: asyncpg.Connection) -> bool:
    return await pg.fetchval("SELECT count(*) = 0 FROM sfworkflow.outbox WHERE published_at IS NULL")


async def _consuming(url: str) -> bool:
    try:
        _ready, consumers = await events_depth(url)
    except aio_pika.exceptions.AMQPError:  # the queue is not declared yet
        return False
    return consumers > 0


async def test_sigterm_drains_and_loses_nothing(settings: Settings, pg: asyncpg.Connection, tmp_path: Path) -> None:
    n = 300
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_") or k.startswith("SFWORKFLOW_TEST_")}
    env.update(
        SFWORKFLOW_DATABASE_URL=settings.database_url,
        SFWORKFLOW_AMQP_URL=settings.amqp_url,
        SFWORKFLOW_HTTP_PORT="0",
        SFWORKFLOW_HTTP_HOST="127.0.0.1",
        SFWORKFLOW_QUEUE_TYPE="classic",
        SFWORKFLOW_LOG_FORMAT="console",
        SFWORKFLOW_PROCESSES="1",
    )
    log_path = tmp_path / "service.log"
    events = [event("sequence.enrolled", f"term-{i:03d}", enrolled_data(steps=1)) for i in range(n)]
    log = await asyncio.to_thread(log_path.open, "wb")
    with log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sfworkflow", "run", cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            await wait_for(
                lambda: _consuming(settings.amqp_url),
                timeout=20,
                interval=0.1,
                what="the subprocess consuming sfworkflow.events",
            )
            async with Amqp(settings.amqp_url) as mq:
                for ev in events[: n // 2]:
                    await mq.publish(ev)
                applied_at_term = await pg.fetchval("SELECT count(*) FROM sfworkflow.instance")
                proc.send_signal(signal.SIGTERM)
                terminated = time.monotonic()
                for ev in events[n // 2 :]:
                    await mq.publish(ev)
            rc = await asyncio.wait_for(proc.wait(), 10)
            took = time.monotonic() - terminated
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    output = log_path.read_text(errors="replace")
    assert rc == 0, output[-3000:]
    assert took < 10
    assert "stopped" in output
    left_in_queue, consumers = await events_depth(settings.amqp_url)
    assert consumers == 0
    applied_at_exit = await pg.fetchval("SELECT count(*) FROM sfworkflow.inbox")
    assert applied_at_exit + left_in_queue == n, (applied_at_exit, left_in_queue)  # none lost, none unacked
    # The relay flushed on the way out: everything committed before exit was published, but for sends its rate
    # limit deferred (300 enrollments of one sender at 50 a second): those wait for their slot, and the next
    # replica's relay publishes them (below).
    unflushed = await pg.fetchval(
        "SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL AND deferred_until IS NULL"
    )
    assert unflushed == 0, f"{unflushed} committed outbox rows were left unpublished at exit"

    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        commands = Inbox(mq, COMMANDS_Q)
        await wait_for(
            lambda: _count(pg, "SELECT count(*) FROM sfworkflow.instance WHERE state = 'sending'", n),
            timeout=30,
            what=f"{n} instances sending",
        )
        await wait_all_published(pg)
        await commands.wait(n, timeout=15)
        sends = await commands.settle(0.5)

    assert await events_depth(settings.amqp_url) == (0, 0)
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.instance") == n
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.inbox") == n
    assert set(await pg.fetchval("SELECT array_agg(event_id::text) FROM sfworkflow.inbox")) == {
        e["event_id"] for e in events
    }
    assert (
        await pg.fetch(
            "SELECT event_id, count(*) FROM sfworkflow.history WHERE event_id IS NOT NULL "
            "GROUP BY 1 HAVING count(*) > 1"
        )
        == []
    )
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.history WHERE event_type = 'sequence.enrolled'") == n
    assert len(sends) == n and len({c["entity_id"] for c in sends}) == n  # each enrollment sent exactly once
    print(
        f"instances at SIGTERM: {applied_at_term}; applied before exit: {applied_at_exit}; "
        f"left in queue: {left_in_queue}; outbox rows left unpublished: {unflushed}; exit took {took:.2f}s"
    )


async def _count(pg: asyncpg.Connection, sql: str, n: int) -> bool:
    return await pg.fetchval(sql) == n
