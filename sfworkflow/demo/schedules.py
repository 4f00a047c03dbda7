"""The demo's schedules: SalesFlow's two per-tenant beat jobs, added for the demo's tenant at run time (the code
declares the other two: sequence.tick and follow_up.scan, every 300 s, in the workflow definitions).

- `daily-report`: a tick at 08:00 in the tenant's zone (Asia/Riyadh), routing key salesflow.daily_report, for
  SalesFlow's report job;
- `self-improvement`: every 900 s, a self_improvement.cycle_started event that starts a cycle `cycle-<tick>`.

The demo triggers the daily report once, shows the tick arriving on a queue of its own bound to sfworkflow.schedules
(as a SalesFlow job would bind one), lists the schedules, and removes its tenant's ones at the end.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import asyncpg
import orjson

from sfworkflow import db
from sfworkflow.client import amqp
from sfworkflow.contract.topology import SCHEDULES_EXCHANGE
from sfworkflow.core.engine import Engine
from sfworkflow.core.schedules import NIL_TENANT, Schedule
from sfworkflow.ops import schedules
from sfworkflow.settings import Settings

TICKS_QUEUE = "sfworkflow.demo.ticks"  # the demo's own queue of ticks (a SalesFlow job binds one like it)
REASON = "sfworkflow demo: SalesFlow's per-tenant beat jobs"


def for_tenant(engine: Engine, tenant: str) -> list[Schedule]:
    """The demo tenant's schedules, checked as `schedules add` checks them."""
    return [
        schedules.build(
            engine, tenant=tenant, name="daily-report", kind="tick", event_type="salesflow.daily_report",
            cron="0 8 * * *", timezone="Asia/Riyadh", catch_up="once", jitter_s=60.0,
            description="SalesFlow's daily report at 08:00 in the tenant's zone (was Celery beat's)",
        ),
        schedules.build(
            engine, tenant=tenant, name="self-improvement", kind="event",
            event_type="self_improvement.cycle_started", entity_id="cycle-{tick}", every_s=900,
            data={"requested_by": "scheduler"}, catch_up="skip",
            description="a self-improvement cycle every 15 minutes (was Celery beat's)",
        ),
    ]  # fmt: skip


class TickListener:
    """The demo's queue of ticks, bound to every routing key of sfworkflow.schedules; counts what arrives."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.arrived = asyncio.Event()

    async def start(self, amqp_url: str) -> None:
        self._connection = await amqp.connect_robust(amqp_url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=64)  # channels take every frame sent (client/amqp.py): bound what is
        exchange = await channel.declare_exchange(SCHEDULES_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(TICKS_QUEUE, auto_delete=True)
        await queue.bind(exchange, "#")
        await queue.consume(self._on_tick)

    async def _on_tick(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.received.append(orjson.loads(message.body))
        self.arrived.set()
        await message.ack()

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()


async def _connect(settings: Settings) -> asyncpg.Connection:
    conn = await asyncpg.connect(settings.database_url)
    await db.init_connection(conn)
    return conn


async def install(settings: Settings, engine: Engine, tenant: str) -> str:
    """Add the tenant's schedules and trigger its daily report once; the triggered tick's message id."""
    conn = await _connect(settings)
    try:
        for s in for_tenant(engine, tenant):
            await schedules.add(conn, s, "sfworkflow demo", REASON)
        return str((await schedules.trigger(conn, tenant, "daily-report", None))["message_id"])
    finally:
        await conn.close()


async def report(settings: Settings, engine: Engine, tenant: str, listener: TickListener, triggered: str) -> list[str]:
    """Lines for the demo's summary: the schedules in force (the code's and the tenant's) and the ticks that
    arrived on the demo's queue. Then the tenant's schedules are removed (the demo's tenant is a fresh one)."""
    try:
        await asyncio.wait_for(_arrived(listener, triggered), 10.0)
    except TimeoutError:
        pass
    conn = await _connect(settings)
    try:
        rows = [r for r in await schedules.list_(conn) if r["tenant"] in (NIL_TENANT, tenant)]
        for s in ("daily-report", "self-improvement"):
            await schedules.delete(conn, engine, tenant, s)
    finally:
        await conn.close()
    lines = ["schedules (sfworkflow schedules list):"]
    for r in rows:
        when = f"cron '{r['cron']}' {r['timezone']}" if r["cron"] else f"every {r['every_s']} s"
        owner = "code" if r["source"] == "code" else "tenant"
        lines.append(f"  {r['name']:<18}{owner:<8}{when:<31}{r['kind']:<6}{r['event_type']:<32}"
                     f"next {r['next_tick_at']:%Y-%m-%d %H:%M:%S} UTC")  # fmt: skip
    got = [t for t in listener.received if t.get("message_id") == triggered]
    lines.append(
        f"  daily-report triggered once by hand: {len(got)} tick(s) arrived on {TICKS_QUEUE}"
        + (f" (tick_at {got[0]['tick_at']})" if got else " (none within 10 s: see the outbox)")
    )
    lines.append("  the tenant's schedules were removed at the end (its tenant is the demo's, fresh each run)")
    return lines


async def _arrived(listener: TickListener, message_id: str) -> None:
    while not any(t.get("message_id") == message_id for t in listener.received):
        listener.arrived.clear()
        await listener.arrived.wait()
