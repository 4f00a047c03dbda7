"""RabbitMQ stopped and started under the running service: it reconnects by itself, nothing is lost."""

from __future__ import annotations

import asyncio
import subprocess

import aiohttp
import asyncpg
import pytest

from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import Amqp, enrolled_data, event, running_service


def _rabbit(action: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", action], check=True, capture_output=True, timeout=120)


async def _ready(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.slow
async def test_service_survives_rabbitmq_restart(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(settings) as service:
        assert service.http_port
        async with Amqp(settings.amqp_url) as mq:
            for i in range(30):
                await mq.publish(event("sequence.enrolled", f"before-{i}", enrolled_data(steps=1)))
        await wait_for(lambda: _count(pg, "sending"), what="30 instances sending")
        try:
            _rabbit("stop_app")
            await wait_for(lambda: _not(_ready(service.http_port)), timeout=20, what="/readyz 503")
        finally:
            _rabbit("start_app")
        await wait_for(lambda: _ready(service.http_port), timeout=60, what="/readyz 200 again")
        async with Amqp(settings.amqp_url) as mq:
            for i in range(30):
                await mq.publish(event("sequence.enrolled", f"after-{i}", enrolled_data(steps=1)))
            await wait_for(lambda: _count(pg, "sending", 60), timeout=30, what="60 instances sending")
            await wait_for(
                lambda: pg.fetchval("SELECT count(*) = 0 FROM sfworkflow.outbox WHERE published_at IS NULL"),
                timeout=30,
                what="outbox drained after the restart",
            )
            commands = await wait_for(lambda: mq.drain_json("sfworkflow.commands.sequence"), what="commands")
    entities = {c["entity_id"] for c in commands}
    assert {f"before-{i}" for i in range(30)} | {f"after-{i}" for i in range(30)} <= entities


async def _count(pg: asyncpg.Connection, state: str, n: int = 30) -> bool:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE state = $1", state) >= n


async def _not(coro: asyncio.Future[bool] | object) -> bool:
    return not await coro  # type: ignore[misc]
