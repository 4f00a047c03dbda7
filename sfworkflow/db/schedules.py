"""Schedules in PostgreSQL: the round that fires due ones, code-declared ones upserted, the operator's changes.

Each function runs the block of the same name in sql/schedules.sql; what to fire and where a schedule waits next is
decided by core/schedules.py (pure). A round is one transaction: lock due rows (FOR UPDATE SKIP LOCKED), queue each
tick's message in the outbox (write: a message id queued before is skipped), move each row on. A replica killed
before the commit leaves the rows due (another fires the same tick ids); one killed after it leaves the messages in
the outbox, which any relay publishes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from sfworkflow.core.batch import OutboxRow, WriteSet
from sfworkflow.core.schedules import (
    CatchUp,
    Fire,
    Kind,
    Schedule,
    Spec,
    TickMessage,
    due_at,
    fire,
    first_tick,
)
from sfworkflow.db.pool import q
from sfworkflow.db.repository import write

KIND = "schedule"  # the outbox kind of what schedules publish


@dataclass
class Round:
    """What a round fired, for metrics and logs."""

    due: int = 0  # schedules taken
    fired: Counter[str] = field(default_factory=Counter)  # schedule name -> ticks queued now (not queued before)
    missed: Counter[str] = field(default_factory=Counter)  # schedule name -> ticks passed over (catch-up policy)
    lateness: list[tuple[str, float]] = field(default_factory=list)  # (schedule name, seconds past due)
    broken: list[tuple[str, str, str]] = field(default_factory=list)  # (tenant, name, why): paused by the round


TENANT_LABEL = "(tenant)"  # the metrics' schedule label of every run-time schedule: tenants' names are unbounded


def metric_label(r: Any) -> str:
    """A schedule's `schedule` label: its name when code-declared (a bounded set), else TENANT_LABEL."""
    return str(r["name"]) if r["source"] == "code" else TENANT_LABEL


def from_row(r: Any) -> Schedule:
    """The schedule a row describes; ValueError when it describes none (a zone this machine does not know)."""
    spec = Spec(
        cron=r["cron"], every_s=r["every_s"], anchor=r["anchor"], timezone=r["timezone"], jitter_s=r["jitter_s"],
        catch_up=CatchUp(r["catch_up"]), max_catch_up=r["max_catch_up"],
    )  # fmt: skip
    return Schedule(
        r["name"], Kind(r["kind"]), r["event_type"], spec, r["entity_id"], r["data"] or {}, r["description"],
        str(r["tenant_id"]),
    )  # fmt: skip


def outbox_row(m: TickMessage) -> OutboxRow:
    return OutboxRow(m.message_id, KIND, m.exchange, m.routing_key, None, orjson.dumps(m.body), m.headers, m.mandatory)


async def fire_due(pool: asyncpg.Pool, limit: int, before_commit: Callable[[], None] | None = None) -> Round:
    """Fire the ticks of up to `limit` due schedules, in one transaction (`before_commit`: a test's fault point)."""
    out = Round()
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(q("lock_due_schedules"), limit)
        out.due = len(rows)
        if not rows:
            return out
        now: datetime = rows[0]["now"]
        fires: list[tuple[Any, Fire]] = []
        for r in rows:
            try:
                fires.append((r, fire(from_row(r), r["next_tick_at"], now)))
            except Exception as exc:  # one bad row must not stall every schedule behind it (rows come by due_at)
                why = (f"paused by sfworkflow: firing it failed ({type(exc).__name__}: {str(exc)[:200]}); fix it "
                       "and resume")  # fmt: skip
                await conn.execute(q("pause_broken_schedule"), r["tenant_id"], r["name"], why)
                out.broken.append((str(r["tenant_id"]), r["name"], why))
        owner = {m.message_id: (str(r["tenant_id"]), r["name"]) for r, f in fires for m in f.messages}
        queued: Counter[tuple[str, str]] = Counter()
        if owner:  # a tick queued before (a round that committed, then a clock moved back) is skipped
            rows_out = [outbox_row(m) for _r, f in fires for m in f.messages]
            for x in await write(conn, WriteSet(outbox=rows_out)):  # wakes every relay (NOTIFY) once committed
                queued[owner[x.row.message_id]] += 1
        moves = []
        for r, f in fires:
            key = (str(r["tenant_id"]), r["name"])
            label = metric_label(r)
            moves.append(
                {"tenant_id": key[0], "name": key[1], "next_tick_at": f.next_tick_at, "due_at": f.due_at,
                 "last_tick_at": f.ticks[-1] if f.ticks else None, "fired_at": now, "fired": queued[key],
                 "missed": f.missed}
            )  # fmt: skip
            out.fired[label] += queued[key]
            out.missed[label] += f.missed
            if f.ticks:
                out.lateness.append((label, f.lateness_s))
        if moves:
            await conn.execute(q("advance_schedules"), _json(moves))
        if before_commit is not None:
            before_commit()
    out.fired, out.missed = +out.fired, +out.missed  # drop the zeros
    return out


async def upsert_declared(conn: asyncpg.Connection, declared: Sequence[tuple[str, Schedule]], now: datetime) -> None:
    """Store the (workflow, schedule) pairs the definitions declare (source code, the nil tenant)."""
    if not declared:
        return
    rows = []
    for workflow, s in declared:
        nxt = first_tick(s, now)
        rows.append(
            {"tenant_id": s.tenant_id, "name": s.name, "kind": str(s.kind), "event_type": s.event_type,
             "entity_id": s.entity_id, "data": dict(s.data), "cron": s.spec.cron, "every_s": s.spec.every_s,
             "anchor": s.spec.anchor, "timezone": s.spec.timezone, "jitter_s": s.spec.jitter_s,
             "catch_up": str(s.spec.catch_up), "max_catch_up": s.spec.max_catch_up, "next_tick_at": nxt,
             "due_at": due_at(s, nxt), "workflow": workflow, "description": s.description}
        )  # fmt: skip
    await conn.execute(q("upsert_code_schedules"), _json(rows))


async def pause_undeclared(conn: asyncpg.Connection, declared: Sequence[str]) -> list[str]:
    """Pause the code-declared schedules no loaded definition declares any more; their names."""
    return [r["name"] for r in await conn.fetch(q("pause_undeclared_schedules"), list(declared))]


def _json(rows: list[dict[str, Any]]) -> str:
    """Rows for jsonb_to_recordset, as JSON text: the same on a pool connection (jsonb as Python objects) and on a
    bare one (the start-up's, jsonb as text)."""
    return orjson.dumps(rows).decode()


async def list_all(conn: asyncpg.Connection, tenant: str | None) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("list_schedules"), tenant))


async def get(conn: asyncpg.Connection, tenant: str, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow(q("get_schedule"), tenant, name)


async def lock(conn: asyncpg.Connection, tenant: str, name: str) -> asyncpg.Record | None:
    """The row, locked until the transaction ends, with the database's `now`."""
    return await conn.fetchrow(q("lock_schedule"), tenant, name)


async def insert(conn: asyncpg.Connection, s: Schedule, next_tick_at: datetime, by: str, reason: str) -> Any:
    """A run-time schedule; None when the tenant has one of that name."""
    return await conn.fetchrow(
        q("insert_schedule"), s.tenant_id, s.name, str(s.kind), s.event_type, s.entity_id, dict(s.data), s.spec.cron,
        s.spec.every_s, s.spec.anchor, s.spec.timezone, s.spec.jitter_s, str(s.spec.catch_up), s.spec.max_catch_up,
        next_tick_at, due_at(s, next_tick_at), s.description, by, reason,
    )  # fmt: skip


async def set_paused(
    conn: asyncpg.Connection, tenant: str, name: str, paused: bool, next_at: datetime | None,
    due: datetime | None, by: str, reason: str,
) -> asyncpg.Record | None:  # fmt: skip
    return await conn.fetchrow(q("set_schedule_paused"), tenant, name, paused, next_at, due, by, reason)


async def delete(conn: asyncpg.Connection, tenant: str, name: str, declared: Sequence[str]) -> asyncpg.Record | None:
    """Remove a run-time schedule, or a code-declared one not in `declared` (what the loaded definitions declare)."""
    return await conn.fetchrow(q("delete_schedule"), tenant, name, list(declared))


async def queue_manual(conn: asyncpg.Connection, tenant: str, name: str, m: TickMessage) -> bool:
    """Queue a tick fired by hand and count it; False when that request's tick was queued before."""
    queued = await write(conn, WriteSet(outbox=[outbox_row(m)]))
    if queued:
        await conn.execute(q("count_schedule_fired"), tenant, name)
    return bool(queued)


async def database_now(conn: asyncpg.Connection) -> datetime:
    """The database's clock: where a new schedule starts waiting, as the loop would see it."""
    now: datetime = await conn.fetchval(q("database_now"))
    return now
