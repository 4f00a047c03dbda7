"""Extra helpers for the integration tests (on top of tests/support.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import AbstractIncomingMessage

from sfworkflow.contract.topology import event_queues
from sfworkflow.settings import DEFAULT_EVENT_SHARDS, Settings
from tests.conftest import wait_for
from tests.support import TENANT, Amqp, history, instance, state_of

COMMANDS_Q = "sfworkflow.commands.sequence"
COMPENSATIONS_Q = "sfworkflow.compensations.sequence"
DEAD_Q = "sfworkflow.dead"
EVENT_QUEUES = event_queues(DEFAULT_EVENT_SHARDS)  # the event shard queues a service with default settings reads
LIFECYCLE_EXCHANGE = "sfworkflow.lifecycle"


class Inbox:
    """Accumulates the messages drained from one queue, so a test can wait for the n-th one."""

    def __init__(self, mq: Amqp, queue: str) -> None:
        self.mq = mq
        self.queue = queue
        self.messages: list[AbstractIncomingMessage] = []

    async def poll(self) -> list[AbstractIncomingMessage]:
        self.messages.extend(await self.mq.drain(self.queue))
        return self.messages

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [orjson.loads(m.body) for m in self.messages]

    async def wait(self, n: int, timeout: float = 15.0, what: str | None = None) -> list[dict[str, Any]]:
        """Wait until at least `n` messages arrived in total; return every (JSON) body so far."""
        await self.wait_raw(n, timeout, what)
        return self.bodies

    async def wait_raw(self, n: int, timeout: float = 15.0, what: str | None = None) -> list[AbstractIncomingMessage]:
        async def enough() -> bool:
            return len(await self.poll()) >= n

        await wait_for(enough, timeout=timeout, what=what or f"{n} message(s) in {self.queue}")
        return self.messages

    async def settle(self, quiet_s: float = 0.5) -> list[dict[str, Any]]:
        """Give late messages `quiet_s` to arrive, then return every (JSON) body so far."""
        await self.settle_raw(quiet_s)
        return self.bodies

    async def settle_raw(self, quiet_s: float = 0.5) -> list[AbstractIncomingMessage]:
        await asyncio.sleep(quiet_s)
        return await self.poll()


async def queue_depth(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of `queue`, read by a passive declare on a fresh connection."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        assert q.declaration_result is not None
        return q.declaration_result.message_count, q.declaration_result.consumer_count
    finally:
        await conn.close()


async def events_depth(url: str) -> tuple[int, int]:
    """(ready messages, consumers) summed over every event shard queue, read by passive declares on one fresh
    connection (see queue_depth)."""
    ready = consumers = 0
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        for queue in EVENT_QUEUES:
            q = await ch.declare_queue(queue, passive=True)
            assert q.declaration_result is not None
            ready += q.declaration_result.message_count
            consumers += q.declaration_result.consumer_count
    finally:
        await conn.close()
    return ready, consumers


async def bind_capture_queue(url: str, exchange: str, name: str, routing_key: str = "#") -> None:
    """Declare queue `name` bound to `exchange` (which must exist), to capture what is published there."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})
        await q.bind(exchange, routing_key)
    finally:
        await conn.close()


def counter(metric: Any, *labels: str) -> float:
    """The current value of a (labelled) prometheus_client counter or gauge."""
    child = metric.labels(*labels) if labels else metric
    return float(child._value.get())


async def state_is(pg: asyncpg.Connection, entity: str, state: str, tenant: str = TENANT) -> bool:
    return await state_of(pg, entity, tenant) == state


async def wait_state(
    pg: asyncpg.Connection, entity: str, state: str, tenant: str = TENANT, timeout: float = 15.0
) -> None:
    await wait_for(lambda: state_is(pg, entity, state, tenant), timeout=timeout, what=f"{entity} in state {state!r}")


async def all_published(pg: asyncpg.Connection) -> bool:
    return await pg.fetchval("SELECT count(*) = 0 FROM sfworkflow.outbox WHERE published_at IS NULL")


async def wait_all_published(pg: asyncpg.Connection, timeout: float = 15.0) -> None:
    await wait_for(lambda: all_published(pg), timeout=timeout, what="every outbox row published")


async def history_for_event(pg: asyncpg.Connection, event_id: str) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM sfworkflow.history WHERE event_id = $1 ORDER BY id", event_id)


async def parked_rows(pg: asyncpg.Connection) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM sfworkflow.parked ORDER BY id")


async def timers_of(pg: asyncpg.Connection, entity: str, tenant: str = TENANT) -> list[asyncpg.Record]:
    row = await instance(pg, entity, tenant)
    if row is None:
        return []
    return await pg.fetch("SELECT * FROM sfworkflow.timer WHERE instance_id = $1", row["id"])


async def outcomes(pg: asyncpg.Connection, entity: str, tenant: str = TENANT) -> list[tuple[str, str, str, str]]:
    """(event_type, outcome, from_state, to_state) of each history row of an instance, in order."""
    return [(h["event_type"], h["outcome"], h["from_state"], h["to_state"]) for h in await history(pg, entity, tenant)]


async def same_utc_day_for(seconds: float) -> None:
    """Return once the current UTC day has at least `seconds` left, waiting for the next day if need be.

    A sequence send is held once per (tenant, template, recipient, UTC day) by its effect key: a test that
    expects a second send of the same template to be suppressed needs both sends on one day, so it must
    not start in the last moments before midnight UTC.
    """
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    left = (midnight - now).total_seconds()
    if left < seconds:
        await asyncio.sleep(left + 1.0)


def quick(settings: Settings, **overrides: Any) -> Settings:
    """The test settings with a short shutdown budget, so a stop that hangs fails fast.

    Every test waits for the outbox to drain before stopping, so nothing is cut short.
    """
    return dataclasses.replace(settings, **{"shutdown_timeout_s": 2.0, **overrides})
