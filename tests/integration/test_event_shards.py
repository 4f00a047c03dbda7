"""Fair admission across tenants: events are spread over shard queues by tenant (the consistent-hash exchange on the
`x-sfworkflow-tenant` header) and every batch takes a fair share of each shard (core/admission.py), so one tenant's
backlog does not hold another tenant's event behind it. Also: a producer that sets no tenant header still gets its
events applied (one fixed shard), `dead-letters redrive` keeps the header, and the one events queue of the layout
before shards is unbound and drained."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import asyncpg
import orjson
import pytest

from sfworkflow.contract.headers import TENANT
from sfworkflow.contract.topology import EVENT_SHARDS_EXCHANGE, EVENTS_EXCHANGE, LEGACY_EVENTS_QUEUE
from sfworkflow.runtime.declare import declare
from sfworkflow.settings import DEFAULT_EVENT_SHARDS, Settings
from sfworkflow.workflows import DEFINITIONS
from tests.conftest import wait_for
from tests.integration.helpers_extra import EVENT_QUEUES, events_depth, queue_depth, quick
from tests.integration.replicas import Replica, replicas, start_all
from tests.support import Amqp, enrolled_data, event, running_service

A_BACKLOG = 3000  # tenant A's enrollments, queued before any replica consumes


async def _declare(url: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        await declare(connection, sorted({d.name for d in DEFINITIONS}), "classic", DEFAULT_EVENT_SHARDS, amqp_url=url)
    finally:
        await connection.close()


async def shard_of(url: str, tenant: str) -> int:
    """The shard RabbitMQ routes `tenant`'s events to: publish a probe with its header (nobody consumes yet),
    then find it and take it away."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EVENT_SHARDS_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"probe", headers={TENANT: tenant}), routing_key="probe")
        for k, name in enumerate(EVENT_QUEUES):
            queue = await channel.get_queue(name)
            if await queue.get(no_ack=True, fail=False) is not None:
                return k
        raise AssertionError(f"the probe for {tenant} reached no shard")
    finally:
        await connection.close()


async def _tenants_on_two_shards(url: str) -> tuple[str, str]:
    a = str(uuid.uuid4())
    shard_a = await shard_of(url, a)
    while True:
        b = str(uuid.uuid4())
        if await shard_of(url, b) != shard_a:  # 15 in 16 candidates: a few tries at most
            return a, b


@pytest.fixture
def pair(settings: Settings, tmp_path: Path) -> Iterator[list[Replica]]:
    with replicas(settings, tmp_path) as made:
        yield made


async def test_a_tenants_backlog_does_not_hold_back_another_tenants_event(
    settings: Settings, pg: asyncpg.Connection, pair: list[Replica]
) -> None:
    await _declare(settings.amqp_url)
    tenant_a, tenant_b = await _tenants_on_two_shards(settings.amqp_url)
    async with Amqp(settings.amqp_url) as mq:
        events = [
            event("sequence.enrolled", f"a-{i}", enrolled_data(steps=1), tenant=tenant_a) for i in range(A_BACKLOG)
        ]
        for chunk in range(0, A_BACKLOG, 500):
            await asyncio.gather(*(mq.publish(ev) for ev in events[chunk : chunk + 500]))
        await mq.publish(event("sequence.enrolled", "b-0", enrolled_data(steps=1), tenant=tenant_b))  # the last one
    await start_all(pair)

    async def all_applied() -> bool:
        return await pg.fetchval("SELECT count(*) FROM sfworkflow.instance") == A_BACKLOG + 1

    await wait_for(all_applied, timeout=120, what=f"{A_BACKLOG + 1} instances")
    # `created_at` is the applying transaction's start. Published last, behind 3,000 of A's, B's enrollment was
    # applied while most of A's still waited: its shard had it at hand for the first batches of both replicas.
    a_before_b = await pg.fetchval(
        """SELECT count(*) FROM sfworkflow.instance a, sfworkflow.instance b
           WHERE a.tenant_id = $1 AND b.tenant_id = $2 AND a.created_at < b.created_at""",
        uuid.UUID(tenant_a),
        uuid.UUID(tenant_b),
    )
    assert a_before_b < A_BACKLOG // 3, f"{a_before_b} of tenant A's {A_BACKLOG} enrollments were applied before B's"
    assert await events_depth(settings.amqp_url) == (0, 4 * DEFAULT_EVENT_SHARDS)  # 2 replicas x 2 loops per shard


async def test_an_event_without_the_tenant_header_is_applied(settings: Settings, pg: asyncpg.Connection) -> None:
    """A producer that sets no header (not using the SDK) still reaches the service: on one fixed shard."""
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        for i in range(3):
            ev = event("sequence.enrolled", f"bare-{i}", enrolled_data(steps=1))
            await mq.publish_raw(orjson.dumps(ev), message_id=ev["event_id"])

        async def applied() -> bool:
            return await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE entity_id LIKE 'bare-%'") == 3

        await wait_for(applied, what="3 events without the tenant header applied")


async def test_the_events_queue_of_the_layout_before_shards_is_unbound_and_drained(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    connection = await aio_pika.connect(settings.amqp_url)  # what an earlier version declared
    try:
        channel = await connection.channel()
        events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        legacy = await channel.declare_queue(LEGACY_EVENTS_QUEUE, durable=True, arguments={"x-queue-type": "classic"})
        await legacy.bind(events, "#")
    finally:
        await connection.close()
    async with Amqp(settings.amqp_url) as mq:
        for i in range(3):
            await mq.publish(event("sequence.enrolled", f"old-{i}", enrolled_data(steps=1)))
        assert (await queue_depth(settings.amqp_url, LEGACY_EVENTS_QUEUE))[0] == 3
        async with running_service(quick(settings)):
            await mq.publish(event("sequence.enrolled", "new-0", enrolled_data(steps=1)))

            async def applied() -> bool:
                return await pg.fetchval("SELECT count(*) FROM sfworkflow.instance") == 4

            await wait_for(applied, what="the 3 events of the old queue and the new one applied")
            assert await queue_depth(settings.amqp_url, LEGACY_EVENTS_QUEUE) == (0, quick(settings).consumers)
        await mq.publish(event("sequence.enrolled", "new-1", enrolled_data(steps=1)))  # no service running
    assert (await queue_depth(settings.amqp_url, LEGACY_EVENTS_QUEUE))[0] == 0  # unbound: it reaches the shards only
    assert (await events_depth(settings.amqp_url))[0] == 1
