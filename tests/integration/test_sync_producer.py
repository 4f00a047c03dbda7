"""The sync producer (pika, publisher confirms) from synchronous code, against the real service and RabbitMQ."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest

from sfworkflow.client.sync_producer import SyncEventPublisher
from sfworkflow.errors import InvalidEvent
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.support import Amqp, enrolled_data, event, running_service, state_of


async def test_an_event_published_from_sync_code_starts_its_instance(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    ev = event("sequence.enrolled", "enr-sync", enrolled_data(steps=1))

    def celery_task() -> None:
        with SyncEventPublisher.connect(settings.amqp_url) as pub:
            pub.publish(ev)

    async with running_service(settings):
        await asyncio.to_thread(celery_task)
        await wait_for(lambda: state_of(pg, "enr-sync"), what="the instance the sync producer started")


async def test_an_invalid_event_is_refused_before_it_is_published(settings: Settings) -> None:
    bad = event("sequence.enrolled", "enr-bad", {"lead_id": "no steps"})
    async with running_service(settings, consume=False), Amqp(settings.amqp_url) as mq:
        with SyncEventPublisher.connect(settings.amqp_url) as pub, pytest.raises(InvalidEvent, match="steps"):
            pub.publish(bad)
        assert await mq.drain_events() == []


async def test_a_connection_lost_before_a_publish_is_reopened_and_the_event_confirmed(settings: Settings) -> None:
    ev = event("sequence.enrolled", "enr-reconnect", enrolled_data(steps=1))
    vhost = unquote(urlsplit(settings.amqp_url).path.lstrip("/"))
    async with running_service(settings, consume=False):
        pub = SyncEventPublisher.connect(settings.amqp_url)
        try:
            # The broker closes every connection of the test's vhost (a RabbitMQ restart, a load balancer).
            closing = await asyncio.create_subprocess_exec(
                "rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test: connection lost"
            )
            assert await closing.wait() == 0
            await asyncio.to_thread(pub.publish, ev)
        finally:
            pub.close()
        async with Amqp(settings.amqp_url) as mq:
            got = await wait_for(lambda: mq.drain_events_json(), what="the event after the reconnect")
    assert [m["event_id"] for m in got] == [ev["event_id"]]


async def test_a_cluster_s_node_list_is_tried_in_turn_from_sync_code(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """Several URLs (a cluster's nodes): pika connects to the first one that answers."""
    ev = event("sequence.enrolled", "enr-sync-nodes", enrolled_data(steps=1))
    nodes = f"amqp://guest:guest@127.0.0.1:1/,{settings.amqp_url}"  # nothing listens on port 1

    def celery_task() -> None:
        with SyncEventPublisher.connect(nodes) as pub:
            pub.publish(ev)

    async with running_service(settings):
        await asyncio.to_thread(celery_task)
        await wait_for(lambda: state_of(pg, "enr-sync-nodes"), what="the instance published through the live node")
