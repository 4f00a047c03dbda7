"""RabbitMQ stopped and started under the running service: it reconnects by itself, nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from sfworkflow.runtime import relay as relay_module
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import Amqp, enrolled_data, event, running_service


def _rabbit(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def _memory_alarm() -> Iterator[None]:
    """A memory alarm (a high watermark of 1 byte): RabbitMQ blocks every publishing connection, confirms nothing."""
    _rabbit("set_vm_memory_high_watermark", "absolute", "1")
    try:
        yield
    finally:
        _rabbit("set_vm_memory_high_watermark", "0.4")


async def _ready(port: int) -> bool:
    try:
        return (await _readyz(port))[0] == 200
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


async def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
        return r.status, await r.json()


async def _enroll_send_due_soon(settings: Settings, entity: str) -> None:
    """An enrollment whose first send is due by a timer 2 s later: published by the relay after the test acts."""
    async with Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", entity, enrolled_data(steps=1, delay_s=2)))


@pytest.mark.slow
async def test_readyz_says_so_when_rabbitmq_holds_every_confirm(
    settings: Settings, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connected, but nothing confirmed: a cluster that lost its quorum (bench/chaos.py broker_node) or a broker
    alarm holds every publish. Here a memory alarm (a high watermark of 1 byte) blocks the relay's publishes; the
    service must not go on answering 200."""
    monkeypatch.setattr(relay_module, "CONFIRM_STALL_S", 1.0)
    async with running_service(settings) as service:
        assert service.http_port
        await _enroll_send_due_soon(settings, "held-1")
        with _memory_alarm():

            async def stalled() -> dict[str, Any] | None:
                status, body = await _readyz(service.http_port)
                return body if status == 503 and "rabbitmq" in body["failed"] else None

            body = await wait_for(stalled, timeout=30, what="/readyz 503 while confirms are held")
            assert "confirm" in body["checks"]["rabbitmq"]["error"]
        await wait_for(lambda: _ready(service.http_port), timeout=60, what="/readyz 200 once confirms flow")


@pytest.mark.slow
async def test_a_publish_rabbitmq_never_confirms_is_given_back_to_the_outbox_and_retried(
    settings: Settings, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confirm that never comes (a quorum queue that lost its leader may never answer a publish made meanwhile,
    seen under the chaos suite's broker_node) must not hold the relay's round, and the rows it claimed, forever: past
    CONFIRM_TIMEOUT_S the rows go back to the outbox with the reason, on a fresh channel they are published again."""
    monkeypatch.setattr(relay_module, "CONFIRM_STALL_S", 1.0)
    monkeypatch.setattr(relay_module, "CONFIRM_TIMEOUT_S", 2.0)
    async with running_service(settings) as service:
        assert service.http_port
        await _enroll_send_due_soon(settings, "never-confirmed")
        with _memory_alarm():
            error = await wait_for(
                lambda: pg.fetchval("SELECT last_error FROM sfworkflow.outbox WHERE last_error IS NOT NULL LIMIT 1"),
                timeout=30,
                what="the row given back with the reason while the confirm is held",
            )
            assert "confirm" in error
            status, body = await _readyz(service.http_port)
            assert status == 503 and "rabbitmq" in body["failed"]  # between attempts too
        await wait_for(
            lambda: pg.fetchval("SELECT count(*) = 0 FROM sfworkflow.outbox WHERE published_at IS NULL"),
            timeout=60,
            what="the row published once RabbitMQ confirms again",
        )
        await wait_for(lambda: _ready(service.http_port), timeout=60, what="/readyz 200 once confirms flow")
