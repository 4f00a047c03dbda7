"""Helpers for tests that talk to the running service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from sfworkflow.client.producer import EventPublisher, build_event
from sfworkflow.contract.topology import event_queues
from sfworkflow.runtime.service import Service
from sfworkflow.settings import DEFAULT_EVENT_SHARDS, Settings

# .ci/run sets it: there a missing test tool (promtool, chromium) fails the test instead of skipping it.
REQUIRE_TOOLS = os.environ.get("SFWORKFLOW_TEST_REQUIRE_TOOLS") == "1"


def require_tool(name: str, install: str) -> str:
    """The path of the command-line tool `name`. Missing, the test is skipped on a developer's machine and
    fails under CI (SFWORKFLOW_TEST_REQUIRE_TOOLS=1), saying how to install it (`install`)."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not on PATH (install it: {install})"
        if REQUIRE_TOOLS:
            pytest.fail(why + "; SFWORKFLOW_TEST_REQUIRE_TOOLS=1 makes that a failure")
        pytest.skip(why)
    return path


TENANT = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
OTHER_TENANT = "9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"


@contextlib.asynccontextmanager
async def running_service(settings: Settings, consume: bool = True, **service: Any) -> AsyncIterator[Service]:
    """A started Service (`service`: more arguments for it, e.g. tracer_provider)."""
    running = Service(settings, **service)
    await running.start(consume=consume)
    try:
        yield running
    finally:
        if not running.stopped.is_set():
            await running.stop()


def enrolled_data(
    steps: int = 2, delay_s: int = 0, address: str | None = None, template_prefix: str = "tpl"
) -> dict[str, Any]:
    return {
        "sequence_id": "seq-1",
        "lead_id": "lead-1",
        "recipient": {"channel": "email", "address": address or f"{uuid.uuid4().hex[:8]}@example.com"},
        "steps": [{"template_id": f"{template_prefix}-{i}", "delay_seconds": delay_s} for i in range(steps)],
    }


def event(
    event_type: str, entity_id: str, data: dict[str, Any] | None = None, tenant: str = TENANT, **kw: Any
) -> dict[str, Any]:
    return build_event(event_type, tenant_id=tenant, entity_id=entity_id, data=data or {}, source="tests", **kw)


class Amqp:
    """A test-side AMQP client: publish events, read queues."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.publisher: EventPublisher | None = None
        self.connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Amqp:
        self.publisher = await EventPublisher.connect(self.url)
        self.connection = await aio_pika.connect(self.url)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.publisher:
            await self.publisher.close()
        if self.connection:
            await self.connection.close()

    async def publish(self, ev: dict[str, Any], times: int = 1) -> dict[str, Any]:
        assert self.publisher is not None
        for _ in range(times):
            await self.publisher.publish(ev)
        return ev

    async def publish_raw(self, body: bytes, routing_key: str = "sequence.enrolled", **kw: Any) -> None:
        assert self.publisher is not None
        await self.publisher.publish_raw(body, routing_key=routing_key, **kw)

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Every message currently in `queue` (removed from it)."""
        assert self.connection is not None
        channel = await self.connection.channel()
        q = await channel.get_queue(queue)
        out = []
        while True:
            m = await q.get(no_ack=True, fail=False)
            if m is None:
                break
            out.append(m)
        await channel.close()
        return out

    async def drain_json(self, queue: str) -> list[dict[str, Any]]:
        return [orjson.loads(m.body) for m in await self.drain(queue)]

    async def drain_events(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Every message currently in the event shard queues (removed from them), shard by shard."""
        return [m for queue in event_queues(DEFAULT_EVENT_SHARDS) for m in await self.drain(queue)]

    async def drain_events_json(self) -> list[dict[str, Any]]:
        return [orjson.loads(m.body) for m in await self.drain_events()]


async def instance(
    pg: asyncpg.Connection, entity_id: str, tenant: str = TENANT, workflow: str = "sequence"
) -> asyncpg.Record | None:
    return await pg.fetchrow(
        "SELECT * FROM sfworkflow.instance WHERE tenant_id = $1 AND workflow = $2 AND entity_id = $3",
        tenant,
        workflow,
        entity_id,
    )


async def state_of(pg: asyncpg.Connection, entity_id: str, tenant: str = TENANT) -> str | None:
    row = await instance(pg, entity_id, tenant)
    return None if row is None else row["state"]


async def history(pg: asyncpg.Connection, entity_id: str, tenant: str = TENANT) -> list[asyncpg.Record]:
    return await pg.fetch(
        "SELECT h.* FROM sfworkflow.history h JOIN sfworkflow.instance i ON i.id = h.instance_id "
        "WHERE i.tenant_id = $1 AND i.entity_id = $2 ORDER BY h.id",
        tenant,
        entity_id,
    )


async def outbox(
    pg: asyncpg.Connection, entity_id: str, kind: str | None = None, tenant: str = TENANT
) -> list[dict[str, Any]]:
    rows = await pg.fetch(
        "SELECT o.kind, o.routing_key, o.body, o.published_at FROM sfworkflow.outbox o "
        "JOIN sfworkflow.instance i ON i.id = o.instance_id "
        "WHERE i.tenant_id = $1 AND i.entity_id = $2 AND ($3::text IS NULL OR o.kind = $3) ORDER BY o.id",
        tenant,
        entity_id,
        kind,
    )
    return [
        {
            "kind": r["kind"],
            "routing_key": r["routing_key"],
            "body": orjson.loads(r["body"]),
            "published": r["published_at"] is not None,
        }
        for r in rows
    ]


async def all_published(pg: asyncpg.Connection) -> bool:
    return await pg.fetchval("SELECT count(*) = 0 FROM sfworkflow.outbox WHERE published_at IS NULL")


async def terminate(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    """SIGTERM a service process still running and wait for it to exit; kill it after `timeout` seconds."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
