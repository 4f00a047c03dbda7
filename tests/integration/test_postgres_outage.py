"""PostgreSQL stopped and started under the running service: nothing is acked while it is down,
/readyz says so, and every event published before, during and after the outage is applied once.

This stops the machine's shared PostgreSQL cluster for a few seconds; it is always started again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Collection
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import asyncpg
import pytest

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import COMMANDS_Q, EVENT_QUEUES, Inbox, events_depth, quick
from tests.support import Amqp, enrolled_data, event, running_service

N = 20  # events per phase: before, during, after


def _pg_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".") if x.isdigit()])
    return versions[-1]


def _pg_ctl(action: str) -> None:
    cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", action]
    if action == "stop":
        cmd += ["-m", "fast"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _pg_online() -> bool:
    out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, timeout=30, check=False).stdout
    return any(line.split()[:2] == [_pg_version(), "main"] and "online" in line.split() for line in out.splitlines())


def _queue_messages(amqp_url: str, queues: Collection[str]) -> tuple[int, int, int]:
    """(messages, ready, unacked) summed over `queues`, as RabbitMQ counts them (each must be listed)."""
    vhost = unquote(urlsplit(amqp_url).path.lstrip("/")) or "/"
    out = subprocess.run(
        [
            "rabbitmqctl",
            "-q",
            "list_queues",
            "-p",
            vhost,
            "name",
            "messages",
            "messages_ready",
            "messages_unacknowledged",
            "--no-table-headers",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = {
        p[0]: tuple(map(int, p[1:]))
        for p in (line.split("\t") for line in out.splitlines())
        if len(p) == 4 and all(x.isdigit() for x in p[1:])
    }
    missing = set(queues) - set(rows)
    assert not missing, f"queues {sorted(missing)} not listed: {out!r}"
    return (sum(rows[q][0] for q in queues), sum(rows[q][1] for q in queues), sum(rows[q][2] for q in queues))


async def _readyz(port: int | None) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        return r.status, await r.json()


async def _count(url: str, sql: str) -> int | None:
    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return None
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


@pytest.mark.slow
async def test_postgres_outage_loses_nothing(settings: Settings, database_url: str) -> None:
    before = [event("sequence.enrolled", f"before-{i}", enrolled_data(steps=1)) for i in range(N)]
    during = [event("sequence.enrolled", f"during-{i}", enrolled_data(steps=1)) for i in range(N)]
    after = [event("sequence.enrolled", f"after-{i}", enrolled_data(steps=1)) for i in range(N)]
    sending = "SELECT count(*) FROM sfworkflow.instance WHERE state = 'sending'"
    assert _pg_online(), "PostgreSQL must be running before this test"

    async with running_service(quick(settings, shutdown_timeout_s=8.0)) as service, Amqp(settings.amqp_url) as mq:
        port = service.http_port
        commands = Inbox(mq, COMMANDS_Q)
        for ev in before:
            await mq.publish(ev)
        await wait_for(lambda: _is(_count(database_url, sending), N), what=f"{N} instances before the outage")
        assert (await _readyz(port))[0] == 200

        try:
            await asyncio.to_thread(_pg_ctl, "stop")
            down: dict[str, Any] = {}

            async def not_ready() -> bool:
                status, body = await _readyz(port)
                down.update(body)
                return status == 503 and "postgres" in body.get("failed", [])

            await wait_for(not_ready, timeout=20, interval=0.2, what="/readyz 503 with postgres failed")
            assert down["checks"]["postgres"]["ok"] is False

            for ev in during:
                await mq.publish(ev)
            await asyncio.sleep(3.0)  # the consumer takes them and retries its batch; nothing may be acked
            messages, ready, unacked = await asyncio.to_thread(_queue_messages, settings.amqp_url, EVENT_QUEUES)
            assert messages == N, (messages, ready, unacked)
            assert unacked > 0, "the consumer should hold (not ack) deliveries while PostgreSQL is down"
            status, body = await _readyz(port)
            assert status == 503 and "postgres" in body["failed"], body
        finally:
            if not _pg_online():
                await asyncio.to_thread(_pg_ctl, "start")
        assert _pg_online()

        for ev in after:
            await mq.publish(ev)
        await wait_for(
            lambda: _is(_count(database_url, sending), 3 * N), timeout=30, what=f"{3 * N} instances after the outage"
        )
        await wait_for(
            lambda: _is(_count(database_url, "SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL"), 0),
            what="outbox drained",
        )
        await wait_for(lambda: _is_ready(port), timeout=30, interval=0.2, what="/readyz 200 after the outage")
        await commands.wait(3 * N)
        sends = await commands.settle(0.5)

    assert await events_depth(settings.amqp_url) == (0, 0)
    conn = await asyncpg.connect(database_url)
    try:
        ids = {e["event_id"] for e in before + during + after}
        inbox = {str(r["event_id"]) for r in await conn.fetch("SELECT event_id FROM sfworkflow.inbox")}
        assert inbox == ids
        assert await conn.fetchval("SELECT count(*) FROM sfworkflow.instance") == 3 * N
        assert (
            await conn.fetch(
                "SELECT event_id, count(*) FROM sfworkflow.history WHERE event_id IS NOT NULL "
                "GROUP BY 1 HAVING count(*) > 1"
            )
            == []
        )
        assert (
            await conn.fetchval("SELECT count(*) FROM sfworkflow.history WHERE event_type = 'sequence.enrolled'")
            == 3 * N
        )
    finally:
        await conn.close()
    # The relay is at-least-once (a publish whose mark was cut off by the outage is repeated with the same
    # message id); one command per enrollment, each entity's copies being the same command.
    assert len({c["command_id"] for c in sends}) == 3 * N
    assert len({c["entity_id"] for c in sends}) == 3 * N


async def _is(value: Any, want: int) -> bool:
    return (await value) == want


async def _is_ready(port: int | None) -> bool:
    try:
        return (await _readyz(port))[0] == 200
    except aiohttp.ClientError:
        return False
