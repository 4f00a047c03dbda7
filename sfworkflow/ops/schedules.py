"""Schedules for operators (`sfworkflow schedules`, `/v1/schedules`): list, add, pause, resume, delete, trigger.

A schedule publishes at each tick of a cron expression (in an IANA time zone) or an interval: an event into
sfworkflow (kind event; a start event starts an instance per tick) or a tick for SalesFlow's own job (kind tick, on
sfworkflow.schedules). Code-declared schedules belong to the nil tenant and come back at every start: pause them,
do not delete them. A change applies to the next round of every replica (the loop reads the rows each round).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from sfworkflow.contract import schemas
from sfworkflow.contract.storable import clean_json
from sfworkflow.core.engine import Engine
from sfworkflow.core.schedules import (
    NIL_TENANT,
    CatchUp,
    Kind,
    Schedule,
    Spec,
    due_at,
    first_tick,
    manual_tick_id,
    message,
)
from sfworkflow.db import schedules as store
from sfworkflow.errors import UsageError

# Intervals count from a round instant unless told otherwise: every 15m ticks at :00, :15, :30 and :45 (UTC), the
# same for every schedule of that interval, as the code-declared ones do.
ANCHOR = Spec(every_s=1).anchor


def declared(engine: Engine) -> list[tuple[str, Schedule]]:
    """(workflow, schedule) for every schedule the loaded definitions declare (the latest version's of each name)."""
    out: dict[str, tuple[str, Schedule]] = {}
    for (_w, _v), compiled in sorted(engine.compiled.items()):
        for s in compiled.definition.schedules:
            out[s.name] = (compiled.definition.name, s)
    return [out[k] for k in sorted(out)]


def check_tenant(tenant: str | None) -> str:
    """A tenant id as stored (the nil tenant's when None: code-declared schedules)."""
    if tenant is None:
        return NIL_TENANT
    try:
        return str(uuid.UUID(tenant))
    except ValueError:
        raise UsageError(f"{tenant!r} is not a tenant id (a UUID)") from None


def build(
    engine: Engine,
    *,
    tenant: str | None,
    name: str,
    kind: str,
    event_type: str,
    entity_id: str | None = None,
    data: dict[str, Any] | None = None,
    cron: str | None = None,
    every_s: int | None = None,
    timezone: str = "UTC",
    jitter_s: float = 0.0,
    catch_up: str = "once",
    max_catch_up: int = 10,
    description: str = "",
    anchor: datetime | None = None,
) -> Schedule:
    """A run-time schedule checked as the loop will use it: its expression, zone and template, and (kind event) its
    event type known to this deployment with data its schema accepts. UsageError says what is wrong."""
    try:
        spec = Spec(
            cron=cron, every_s=every_s, anchor=anchor or ANCHOR, timezone=timezone, jitter_s=jitter_s,
            catch_up=CatchUp(catch_up), max_catch_up=max_catch_up,
        )  # fmt: skip
        s = Schedule(name, Kind(kind), event_type, spec, entity_id, data or {}, description, check_tenant(tenant))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if s.tenant_id == NIL_TENANT:
        raise UsageError("the nil tenant is the code-declared schedules': name the tenant the schedule is for")
    if clean_json(dict(s.data))[1]:
        raise UsageError("data holds characters PostgreSQL cannot store (NUL, unpaired surrogates): remove them")
    if s.kind is Kind.EVENT:
        known = engine.event_types()
        if s.event_type not in known:
            raise UsageError(
                f"{s.event_type!r} is not an event this deployment's workflows take; known: {', '.join(sorted(known))}"
            )
        errors = schemas.default().errors("events", s.event_type, dict(s.data))
        if errors:
            raise UsageError(f"data for {s.event_type}: " + "; ".join(errors))
    return s


async def list_(conn: asyncpg.Connection, tenant: str | None = None) -> list[dict[str, Any]]:
    """Every schedule (of one tenant when given), with its next and last ticks."""
    return [as_json(r) for r in await store.list_all(conn, None if tenant is None else check_tenant(tenant))]


async def show(conn: asyncpg.Connection, tenant: str | None, name: str) -> dict[str, Any]:
    r = await store.get(conn, check_tenant(tenant), name)
    if r is None:
        raise UsageError(_missing(tenant, name))
    return as_json(r)


async def add(conn: asyncpg.Connection, s: Schedule, by: str, reason: str) -> dict[str, Any]:
    """Store a run-time schedule; it waits for its first tick after now. UsageError when the tenant has one of
    that name (delete it first, or pick another name)."""
    if not reason.strip():
        raise UsageError("say why (a reason): it is kept with the schedule")
    row = await store.insert(conn, s, first_tick(s, await store.database_now(conn)), by, reason)
    if row is None:
        raise UsageError(f"tenant {s.tenant_id} has a schedule {s.name!r} already: delete it first or pick a name")
    return as_json(row)


async def pause(conn: asyncpg.Connection, tenant: str | None, name: str, by: str, reason: str) -> dict[str, Any]:
    """Stop firing it until resumed (a tick being fired now still goes out)."""
    return await _set_paused(conn, tenant, name, True, by, reason)


async def resume(conn: asyncpg.Connection, tenant: str | None, name: str, by: str, reason: str) -> dict[str, Any]:
    """Fire it again from its first tick after now: the ticks that fell while it was paused are not fired."""
    return await _set_paused(conn, tenant, name, False, by, reason)


async def _set_paused(
    conn: asyncpg.Connection, tenant: str | None, name: str, paused: bool, by: str, reason: str
) -> dict[str, Any]:
    if not reason.strip():
        raise UsageError("say why (a reason): it is kept with the schedule")
    t = check_tenant(tenant)
    async with conn.transaction():
        r = await store.lock(conn, t, name)
        if r is None:
            raise UsageError(_missing(tenant, name))
        if r["paused"] == paused:  # already so: nothing moves (a retried resume must not skip a due tick)
            return as_json(r)
        next_at = due = None
        if not paused:
            try:
                s = store.from_row(r)
            except ValueError as exc:
                raise UsageError(f"schedule {name} cannot be resumed: {exc}; delete it and add it again") from None
            next_at = first_tick(s, r["now"])
            due = due_at(s, next_at)
        row = await store.set_paused(conn, t, name, paused, next_at, due, by, reason)
    return as_json(row)


async def delete(conn: asyncpg.Connection, engine: Engine, tenant: str | None, name: str) -> dict[str, Any]:
    """Remove a run-time schedule, or a code-declared one the loaded definitions no longer declare (its ticks already
    queued still go out)."""
    t = check_tenant(tenant)
    r = await store.get(conn, t, name)
    if r is None:
        raise UsageError(_missing(tenant, name))
    names = [s.name for _w, s in declared(engine)]
    if r["source"] == "code" and name in names:
        raise UsageError(
            f"schedule {name} is declared by the workflow {r['workflow']} and comes back at the next start: "
            "pause it instead"
        )
    removed = await store.delete(conn, t, name, names)
    if removed is None:
        raise UsageError(_missing(tenant, name))
    return as_json(removed)


async def trigger(conn: asyncpg.Connection, tenant: str | None, name: str, request_id: str | None) -> dict[str, Any]:
    """Fire one extra tick now (paused or not), besides the schedule's own. Its id is the request's: a retried
    trigger with the same --request-id queues nothing more."""
    t = check_tenant(tenant)
    request_id = request_id or str(uuid.uuid4())
    async with conn.transaction():
        r = await store.lock(conn, t, name)
        if r is None:
            raise UsageError(_missing(tenant, name))
        try:
            s = store.from_row(r)
        except ValueError as exc:
            raise UsageError(f"schedule {name} cannot fire: {exc}") from None
        m = message(s, r["now"], manual_tick_id(s.key, request_id), manual=True)
        queued = await store.queue_manual(conn, t, name, m)
    return {"tenant": t, "schedule": name, "message_id": m.message_id, "request_id": request_id, "queued": queued,
            "exchange": m.exchange, "routing_key": m.routing_key}  # fmt: skip


def _missing(tenant: str | None, name: str) -> str:
    whose = f"tenant {tenant}'s" if tenant else "the code-declared ones (no tenant given)"
    return f"no schedule {name!r} among {whose}; list them to see which there are"


def as_json(r: Any) -> dict[str, Any]:
    return {
        "tenant": str(r["tenant_id"]), "name": r["name"], "kind": r["kind"], "event_type": r["event_type"],
        "entity_id": r["entity_id"], "data": r["data"], "cron": r["cron"], "every_s": r["every_s"],
        "timezone": r["timezone"], "jitter_s": r["jitter_s"], "catch_up": r["catch_up"],
        "max_catch_up": r["max_catch_up"], "paused": r["paused"], "next_tick_at": r["next_tick_at"],
        "last_tick_at": r["last_tick_at"], "last_fired_at": r["last_fired_at"], "fired": r["fired"],
        "missed": r["missed"], "source": r["source"], "workflow": r["workflow"], "description": r["description"],
        "updated_by": r["updated_by"], "reason": r["reason"], "updated_at": r["updated_at"],
    }  # fmt: skip
