"""What the relay promises about order and about messages it cannot deliver.

Order: an instance's outbox rows reach the broker in the order they were committed. A row is not published
while an earlier row of the same instance is unpublished (backing off after a failure, or held by another
relay), and within a round an instance's rows are published one after the other, each confirmed before the
next. Bounded retries: a row the broker keeps refusing (returned as unroutable, or nacked) is given up after
SFWORKFLOW_RELAY_MAX_ATTEMPTS attempts: marked failed, counted, no longer retried nor holding back the
instance's later rows, until an operator republishes it (ops/outbox.py, `sfworkflow outbox republish`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from aio_pika.abc import AbstractQueue, AbstractRobustConnection

from sfworkflow import db
from sfworkflow.cli.main import build_parser
from sfworkflow.cli.outbox import outbox as outbox_cli
from sfworkflow.contract.topology import COMMANDS_EXCHANGE
from sfworkflow.core.batch import OutboxRow
from sfworkflow.db import outbox
from sfworkflow.db.outbox import Queued
from sfworkflow.ops import outbox as outbox_ops
from sfworkflow.runtime import relay as relay_module
from sfworkflow.runtime.declare import declare
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.runtime.relay import Relay
from sfworkflow.settings import Settings
from tests.conftest import wait_for

ROUTED = "ordertest.routed"
UNROUTED = "ordertest.unrouted"  # no queue is bound to it at first: the broker returns it (mandatory)


@dataclass
class Rig:
    relay: Relay
    pool: asyncpg.Pool
    amqp: AbstractRobustConnection
    queue: AbstractQueue
    metrics: Metrics


@pytest.fixture
async def rig(settings: Settings) -> AsyncIterator[Rig]:
    s = dataclasses.replace(settings, relay_max_attempts=3)
    pool = await db.create_pool(s.database_url, 4)
    amqp = await aio_pika.connect_robust(s.amqp_url)
    await declare(amqp, ["sequence"], s.queue_type, s.event_shards, amqp_url=s.amqp_url)
    channel = await amqp.channel()
    queue = await channel.declare_queue("ordertest", durable=True)
    await queue.bind(COMMANDS_EXCHANGE, ROUTED)
    metrics = Metrics(["sequence"])
    relay = Relay(s, pool, amqp, metrics)
    await relay.start_channel()  # publishes on demand (publish_round), no background loop
    try:
        yield Rig(relay, pool, amqp, queue, metrics)
    finally:
        await relay.stop(timeout=2.0)
        await amqp.close()
        await pool.close()


async def add_row(pg: asyncpg.Connection, instance_id: int | None, routing_key: str, body: str) -> int:
    return int(
        await pg.fetchval(
            "INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, instance_id, body) "
            "VALUES ($1, 'command', $2, $3, $4, $5) RETURNING id",
            str(uuid.uuid4()), COMMANDS_EXCHANGE, routing_key, instance_id, body.encode(),
        )
    )  # fmt: skip


async def published(pg: asyncpg.Connection, row_id: int) -> bool:
    return bool(await pg.fetchval("SELECT published_at IS NOT NULL FROM sfworkflow.outbox WHERE id = $1", row_id))


async def due_now(pg: asyncpg.Connection) -> None:
    """End every back-off at once (the test does not wait out the relay's delays)."""
    await pg.execute("UPDATE sfworkflow.outbox SET next_attempt_at = now() WHERE published_at IS NULL")


async def received(queue: AbstractQueue, n: int) -> list[str]:
    bodies: list[str] = []

    async def more() -> bool:
        m = await queue.get(fail=False, no_ack=True)
        if m is not None:
            bodies.append(m.body.decode())
        return len(bodies) >= n

    await wait_for(more, interval=0.01, what=f"{n} messages on the test queue")
    return bodies


@contextlib.asynccontextmanager
async def held_by_another_relay(rig: Rig, row_id: int) -> AsyncIterator[None]:
    """The row locked FOR UPDATE, as another relay's round holds it, until the block ends."""
    other_relay = await asyncpg.connect(rig.relay.settings.database_url)
    try:
        async with other_relay.transaction():
            await other_relay.execute("SELECT 1 FROM sfworkflow.outbox WHERE id = $1 FOR UPDATE", row_id)
            yield
    finally:
        await other_relay.close()


async def test_a_later_row_waits_while_an_earlier_row_of_its_instance_backs_off(
    rig: Rig, pg: asyncpg.Connection
) -> None:
    first = await add_row(pg, 1, UNROUTED, "first")
    second = await add_row(pg, 1, ROUTED, "second")
    other = await add_row(pg, 2, ROUTED, "other instance")
    await rig.relay.publish_round()
    assert not await published(pg, first)  # returned: unroutable
    assert not await published(pg, second)  # held back behind it
    assert await published(pg, other)  # another instance's row is not held back
    await rig.relay.publish_round()  # the first row backs off; the second is still not published
    assert not await published(pg, second)

    await rig.queue.bind(COMMANDS_EXCHANGE, UNROUTED)
    await due_now(pg)
    await rig.relay.publish_round()
    assert await published(pg, first) and await published(pg, second)
    assert await received(rig.queue, 3) == ["other instance", "first", "second"]


async def test_a_later_row_waits_while_another_relay_holds_the_earlier_one(rig: Rig, pg: asyncpg.Connection) -> None:
    await rig.queue.bind(COMMANDS_EXCHANGE, UNROUTED)
    first = await add_row(pg, 7, ROUTED, "first")
    second = await add_row(pg, 7, ROUTED, "second")
    async with held_by_another_relay(rig, first):
        await rig.relay.publish_round()
        assert not await published(pg, second)
    await rig.relay.publish_round()
    assert await received(rig.queue, 2) == ["first", "second"]


async def test_an_instances_rows_of_one_round_arrive_in_commit_order(rig: Rig, pg: asyncpg.Connection) -> None:
    for instance in range(20):
        for i in range(5):
            await add_row(pg, instance, ROUTED, f"{instance}/{i}")
    while await rig.relay.publish_round():
        pass
    bodies = await received(rig.queue, 100)
    for instance in range(20):
        assert [b for b in bodies if b.startswith(f"{instance}/")] == [f"{instance}/{i}" for i in range(5)]


async def test_a_row_refused_max_attempts_times_is_given_up_and_republished_on_demand(
    rig: Rig, pg: asyncpg.Connection, settings: Settings
) -> None:
    doomed = await add_row(pg, 3, UNROUTED, "doomed")
    after = await add_row(pg, 3, ROUTED, "after")
    for _ in range(3):
        await due_now(pg)
        await rig.relay.publish_round()
    row = await pg.fetchrow("SELECT * FROM sfworkflow.outbox WHERE id = $1", doomed)
    assert row["publish_attempts"] == 3 and row["failed_at"] is not None and row["published_at"] is None
    assert "NO_ROUTE" in row["last_error"] or "unroutable" in row["last_error"].lower()
    assert rig.metrics.publish_given_up.labels("command")._value.get() == 1
    # no longer retried, no longer holding the instance's later row back, not in the backlog
    await due_now(pg)
    await rig.relay.publish_round()
    assert await published(pg, after)
    assert await pg.fetchval("SELECT publish_attempts FROM sfworkflow.outbox WHERE id = $1", doomed) == 3
    async with rig.pool.acquire() as conn:
        assert (await outbox.backlog(conn))["backlog"] == 0
        assert await outbox.failed_count(conn) == 1

    failed = await outbox_ops.list_failed(settings, kind=None, limit=10)
    assert [(f["id"], f["routing_key"], f["publish_attempts"]) for f in failed] == [(doomed, UNROUTED, 3)]
    await rig.queue.bind(COMMANDS_EXCHANGE, UNROUTED)
    assert await outbox_ops.republish(settings, ids=[doomed]) == 1
    await rig.relay.publish_round()
    assert await published(pg, doomed)
    assert await received(rig.queue, 2) == ["after", "doomed"]
    assert await outbox_ops.list_failed(settings, kind=None, limit=10) == []


async def test_republish_all_takes_every_failed_row_of_a_kind(
    rig: Rig, pg: asyncpg.Connection, settings: Settings
) -> None:
    rows = [await add_row(pg, None, UNROUTED, f"r{i}") for i in range(4)]
    await pg.execute("UPDATE sfworkflow.outbox SET failed_at = now(), publish_attempts = 3 WHERE id = ANY($1)", rows)
    await pg.execute("UPDATE sfworkflow.outbox SET kind = 'compensation' WHERE id = $1", rows[0])
    assert await outbox_ops.republish(settings, kind="command") == 3
    assert await outbox_ops.republish(settings, kind="command") == 0
    assert len(await outbox_ops.list_failed(settings, kind=None, limit=10)) == 1


async def test_a_connection_failure_never_gives_a_row_up(rig: Rig, pg: asyncpg.Connection) -> None:
    row = await add_row(pg, 5, ROUTED, "x")
    await pg.execute("UPDATE sfworkflow.outbox SET publish_attempts = 10 WHERE id = $1", row)
    assert rig.relay._channel is not None
    await rig.relay._channel.close()
    with pytest.raises(ConnectionError):
        await rig.relay.publish_round()
    assert await pg.fetchval("SELECT failed_at FROM sfworkflow.outbox WHERE id = $1", row) is None


async def test_the_cli_lists_the_rows_given_up_and_republishes_one(
    rig: Rig, pg: asyncpg.Connection, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = await add_row(pg, 9, UNROUTED, "gone")
    await pg.execute(
        "UPDATE sfworkflow.outbox SET failed_at = now(), publish_attempts = 20, last_error = 'PublishError: NO_ROUTE' "
        "WHERE id = $1",
        gone,
    )

    async def cli(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = await outbox_cli(settings, build_parser().parse_args(["outbox", *argv]))
        out, err = capsys.readouterr()
        return rc, out + err  # a partial republish is an error: said on stderr

    rc, out = await cli("failed")
    assert rc == 0 and str(gone) in out and UNROUTED in out and "NO_ROUTE" in out
    rc, out = await cli("failed", "--json")
    assert rc == 0 and [(r["id"], r["attempts"]) for r in orjson.loads(out)] == [(gone, 20)]
    rc, out = await cli("republish", "--id", str(gone), "--id", "999999")
    assert rc == 1 and "republished 1 of 2" in out
    rc, out = await cli("failed")
    assert rc == 0 and "no outbox rows given up" in out
    await rig.queue.bind(COMMANDS_EXCHANGE, UNROUTED)
    await rig.relay.publish_round()
    assert await received(rig.queue, 1) == ["gone"]


async def test_a_round_waiting_for_its_confirms_does_not_hold_up_rows_committed_after_it(
    rig: Rig, pg: asyncpg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds overlap: a round holds its rows until the broker confirmed them, and rows a poll finds meanwhile go
    out in another round instead of queueing behind it (SFWORKFLOW_RELAY_ROUNDS)."""
    await rig.queue.bind(COMMANDS_EXCHANGE, UNROUTED)
    release, holding = hold_the_first_round(monkeypatch)
    relay = Relay(settings, rig.pool, rig.amqp, rig.metrics)
    await relay.start()
    try:
        first = await add_row(pg, 11, ROUTED, "first")
        ring(relay)
        await wait_for(holding, what="the first round publishing")
        second = await add_row(pg, 12, ROUTED, "second")
        ring(relay)
        await wait_for(lambda: published(pg, second), what="a row committed after a round that is still waiting")
        assert not await published(pg, first)
        release.set()
        await wait_for(lambda: published(pg, first), what="the first round's row")
    finally:
        release.set()
        await relay.stop(timeout=2.0)


def hold_the_first_round(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[asyncio.Event, Callable[[], Awaitable[bool]]]:
    """The relay's first round waits for its confirms until the test sets `release`; `holding` (for wait_for) is
    true once it publishes."""
    held, release = asyncio.Event(), asyncio.Event()
    publish = relay_module._publish_in_instance_order

    async def slow_first_round(
        channel: Any, rows: list[asyncpg.Record], headers: Any = None, **kw: Any
    ) -> dict[int, object]:
        if not held.is_set():
            held.set()
            await release.wait()
        return await publish(channel, rows, headers, **kw)

    async def holding() -> bool:
        return held.is_set()

    monkeypatch.setattr(relay_module, "_publish_in_instance_order", slow_first_round)
    return release, holding


def ring(relay: Relay) -> None:
    """What a commit of the service does: wake the relay."""
    relay.doorbell.ring()


async def handed_row(pg: asyncpg.Connection, instance_id: int | None, routing_key: str, body: str) -> Queued:
    """A row as a transaction of the service queues it, and as the store hands it to the relay after commit."""
    message_id = str(uuid.uuid4())
    row_id = await pg.fetchval(
        "INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, instance_id, body) "
        "VALUES ($1, 'command', $2, $3, $4, $5) RETURNING id",
        message_id, COMMANDS_EXCHANGE, routing_key, instance_id, body.encode(),
    )  # fmt: skip
    return Queued(row_id, OutboxRow(message_id, "command", COMMANDS_EXCHANGE, routing_key, instance_id,
                                    body.encode(), {}, True))  # fmt: skip


async def test_rows_handed_over_are_published_from_memory_without_searching_the_outbox(
    rig: Rig, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_search(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
        raise AssertionError("the outbox was searched for rows the relay was handed")

    rows = [await handed_row(pg, 20 + i % 3, ROUTED, f"handed {i}") for i in range(9)]
    monkeypatch.setattr(outbox, "claim_due", no_search)
    rig.relay.hand(rows)
    assert await rig.relay.publish_round(poll=False) == 9
    assert all([await published(pg, r.id) for r in rows])
    assert sorted(await received(rig.queue, 9)) == sorted(f"handed {i}" for i in range(9))
    assert await rig.relay.publish_round(poll=False) == 0  # nothing handed: a round without a poll does nothing


async def test_a_handed_row_behind_an_earlier_row_held_elsewhere_is_left_for_the_polling_claim(
    rig: Rig, pg: asyncpg.Connection
) -> None:
    first = await add_row(pg, 30, ROUTED, "first")  # committed by someone else, held by another relay
    second = await handed_row(pg, 30, ROUTED, "second")
    async with held_by_another_relay(rig, first):
        rig.relay.hand([second])
        assert await rig.relay.publish_round(poll=False) == 1
        assert not await published(pg, second.id)  # it would overtake the first row
    await rig.relay.publish_round()  # the polling claim finds both, in order
    assert await received(rig.queue, 2) == ["first", "second"]


async def test_a_handed_row_behind_its_instances_row_in_a_round_still_out_goes_without_searching_the_outbox(
    rig: Rig, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance's commands from consecutive batches: the second is handed over while the first waits for its
    confirm in another round of this relay. It cannot overtake it; it is set aside and taken again once that round
    is done, by id, instead of being left to the polling claim (a search of the outbox: 12-15 ms during a drain,
    its due index holding every row published since the last vacuum, and ~5 % of the drain's rows went that way)."""
    release, holding = hold_the_first_round(monkeypatch)

    async def no_search(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
        raise AssertionError("the outbox was searched for a row the relay was handed")

    monkeypatch.setattr(outbox, "claim_due", no_search)
    first = await handed_row(pg, 40, ROUTED, "first")
    rig.relay.hand([first])
    first_round = asyncio.create_task(rig.relay.publish_round(poll=False))
    try:
        await wait_for(holding, what="the first round publishing")
        second = await handed_row(pg, 40, ROUTED, "second")
        rig.relay.hand([second])
        assert await rig.relay.publish_round(poll=False) == 1  # taken, but not claimed: behind the first
        assert not await published(pg, second.id)
        release.set()
        assert await first_round == 1
        assert await rig.relay.publish_round(poll=False) == 1
        assert await published(pg, second.id)
        assert await received(rig.queue, 2) == ["first", "second"]
    finally:
        release.set()
        await first_round


async def test_a_deferred_row_falling_due_during_a_round_is_published_after_it_not_at_the_next_poll(
    rig: Rig, pg: asyncpg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row a rate limit deferred is not handed over: the relay wakes at its slot and polls. When the slot passes
    while the relay's one round is out waiting for its confirms, the round that ends after it polls at once; it
    waited for the next polling interval (here a minute) when a poll had been made shortly before."""
    release, holding = hold_the_first_round(monkeypatch)
    s = dataclasses.replace(settings, relay_rounds=1, relay_poll_ms=60_000)
    relay = Relay(s, rig.pool, rig.amqp, rig.metrics)
    await relay.start()
    try:

        async def polled_once() -> bool:
            return relay._next_poll > 0  # the first round searched the outbox: the next poll is a minute away

        await wait_for(polled_once, what="the relay's first poll")
        first = await handed_row(pg, 60, ROUTED, "first")
        relay.hand([first])
        await wait_for(holding, what="the round publishing the first row")
        deferred = await handed_row(pg, 61, ROUTED, "deferred")
        due = await pg.fetchval(
            "UPDATE sfworkflow.outbox SET next_attempt_at = now() + interval '300 ms', "
            "deferred_until = now() + interval '300 ms' WHERE id = $1 RETURNING deferred_until",
            deferred.id,
        )
        relay.hand([Queued(deferred.id, dataclasses.replace(deferred.row, deferred_until=due))])

        async def slot_passed() -> bool:
            return bool(await pg.fetchval("SELECT next_attempt_at <= now() FROM sfworkflow.outbox WHERE id = $1",
                                          deferred.id))  # fmt: skip

        await wait_for(slot_passed, what="the deferred row's slot")
        release.set()
        await wait_for(lambda: published(pg, deferred.id), timeout=10.0, what="the deferred row, after the round")
    finally:
        release.set()
        await relay.stop(timeout=2.0)
