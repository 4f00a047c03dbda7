"""Limits for operators (`sfworkflow limits`, `/v1/limits`): what is declared, what is in force for a tenant, and
a tenant's overrides: its own rate and/or daily cap for a rate limit, its own slots for a concurrency limit.

The rate in force for a (tenant, limit) is, first to last: the tenant's override (sfworkflow.limit_override, set here),
the deployment's setting (SFWORKFLOW_RATE_LIMITS), the definition's; the same for its daily cap, each on its own (an
override of the rate alone keeps the cap in force, and the other way round). An override applies from the next batch
on, on every replica (take_rates reads it in the statement that reserves the slots); commands already deferred keep
their slots. A limit the deployment turned off (`=off`) is not enforced for anyone, overrides included.

The slots in force for a (tenant, concurrency limit) are the tenant's override, else the definition's; the gate loop
reads them at every grant, so raising them lets queued commands out within a round, on every replica; lowering them
takes no slot back (the runs in flight finish).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from sfworkflow.core.engine import Engine
from sfworkflow.core.limits import ConcurrencyLimit, Rate, check_cap, check_rate, check_slots
from sfworkflow.db import operations
from sfworkflow.errors import UsageError


@dataclass(frozen=True)
class Declared:
    """One declared limit and the rate the deployment enforces (None: turned off by SFWORKFLOW_RATE_LIMITS)."""

    name: str  # sequence.send_step/per_sender
    workflow: str
    command: str  # sequence.send_step
    description: str
    definition: Rate
    in_force: Rate | None

    def as_json(self) -> dict[str, Any]:
        return {
            "limit": self.name, "workflow": self.workflow, "command": self.command, "description": self.description,
            "definition": _rate_json(self.definition), "in_force": _rate_json(self.in_force),
            "source": "off" if self.in_force is None else (
                "definition" if self.in_force == self.definition else "SFWORKFLOW_RATE_LIMITS"),
        }  # fmt: skip


def declared(engine: Engine) -> list[Declared]:
    """Every rate limit the loaded definitions declare (the latest version's declaration of each name)."""
    out: dict[str, Declared] = {}
    for (_w, _v), compiled in sorted(engine.compiled.items()):
        for command, limits in compiled.rate_limits.items():
            for name, lim in limits:
                in_force = engine.rate_in_force(name, lim)
                out[name] = Declared(name, compiled.definition.name, command, lim.description, lim.rate, in_force)
    return [out[k] for k in sorted(out)]


def declared_concurrency(engine: Engine) -> list[dict[str, Any]]:
    """Every concurrency limit the loaded definitions declare, with its slots."""
    limits = engine.concurrency_limits()
    return [
        {"limit": name, "workflow": workflow, "command": command, "description": limits[name].description,
         "slots": limits[name].slots, "held_in": sorted(limits[name].held_in)}
        for workflow, command, name in engine.concurrency_labels()
    ]  # fmt: skip


def check_limit(engine: Engine, name: str) -> Declared | ConcurrencyLimit:
    """The declared limit `name` (a rate limit's Declared, or the concurrency limit), or UsageError naming them."""
    known: dict[str, Declared | ConcurrencyLimit] = {d.name: d for d in declared(engine)}
    known.update(engine.concurrency_limits())
    if name not in known:
        raise UsageError(f"no limit {name!r}; declared: {', '.join(sorted(known)) or 'none'}")
    return known[name]


def check_tenant(tenant: str) -> str:
    try:
        return str(uuid.UUID(tenant))
    except ValueError:
        raise UsageError(f"{tenant!r} is not a tenant id (a UUID)") from None


async def overrides(conn: asyncpg.Connection, tenant: str | None = None) -> list[dict[str, Any]]:
    """The tenants' overrides (of one tenant when given), by tenant and limit."""
    return [_override_json(r) for r in await operations.limit_overrides(conn, tenant)]


async def set_override(
    conn: asyncpg.Connection,
    engine: Engine,
    tenant: str,
    limit: str,
    per_s: float | None,
    burst: int | None,
    reason: str,
    by: str,
    slots: int | None = None,
    daily_cap: int | None = None,
) -> dict[str, Any]:
    """Give `tenant` its own rate (`per_s`, `burst`: the rate in force's when None) and/or its own `daily_cap` for a
    rate limit, or its own `slots` for a concurrency limit, replacing an earlier override; the stored override, with
    a `note` when the deployment has the limit off (then it has no effect)."""
    tenant = check_tenant(tenant)
    d = check_limit(engine, limit)
    if not reason.strip():
        raise UsageError("say why (--reason): it is kept with the override")
    if isinstance(d, ConcurrencyLimit):
        if slots is None or per_s is not None or burst is not None or daily_cap is not None:
            raise UsageError(f"{limit} is a concurrency limit: give its slots (--slots N), not a rate")
        try:
            check_slots(limit, slots)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return _override_json(
            await operations.upsert_limit_override(conn, tenant, limit, None, None, reason, by, slots)
        )
    if (per_s is None and daily_cap is None) or slots is not None:
        raise UsageError(f"{limit} is a rate limit: give its rate (--per-s, and --burst) and/or --daily-cap, not slots")
    if per_s is None and burst is not None:
        raise UsageError(f"{limit}: a burst goes with a rate: give --per-s too")
    if per_s is not None:
        burst = burst if burst is not None else (d.in_force or d.definition).burst
    try:
        if per_s is not None:
            check_rate(limit, per_s, burst)
        if daily_cap is not None:
            check_cap(limit, daily_cap)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    row = await operations.upsert_limit_override(
        conn, tenant, limit, None if per_s is None else float(per_s), None if burst is None else int(burst), reason,
        by, None, daily_cap,
    )  # fmt: skip
    out = _override_json(row)
    if d.in_force is None:
        out["note"] = f"{limit} is off in this deployment (SFWORKFLOW_RATE_LIMITS): the override has no effect"
    return out


async def unset_override(conn: asyncpg.Connection, engine: Engine, tenant: str, limit: str) -> dict[str, Any] | None:
    """Remove `tenant`'s override of `limit` (it goes back to the deployment's rate); the removed one, or None."""
    tenant = check_tenant(tenant)
    check_limit(engine, limit)
    row = await operations.delete_limit_override(conn, tenant, limit)
    return None if row is None else _override_json(row)


async def tenant_view(conn: asyncpg.Connection, engine: Engine, tenant: str) -> dict[str, Any]:
    """Each declared limit as it applies to `tenant`: the rate in force and where it comes from, and its buckets
    (one per key: how far ahead its slots are booked) and deferred commands."""
    tenant = check_tenant(tenant)
    own = {o["limit"]: o for o in await overrides(conn, tenant)}
    buckets = await operations.rate_buckets_of_tenant(conn, tenant)
    deferred = {r["deferred_by"]: r for r in await operations.deferred_of_tenant(conn, tenant)}
    now = datetime.now(UTC)
    limits = []
    for d in declared(engine):
        o = own.get(d.name)
        if d.in_force is None:
            rate, source = None, "off (SFWORKFLOW_RATE_LIMITS)"
        elif o is not None:
            rate = Rate(
                d.in_force.per_s if o["per_s"] is None else o["per_s"],
                d.in_force.burst if o["burst"] is None else o["burst"],
                d.in_force.daily_cap if o["daily_cap"] is None else o["daily_cap"],
            )
            source = _override_source(o)
        else:
            rate, source = d.in_force, d.as_json()["source"]
        keys = [
            {"key": b["bucket_key"].split("|", 2)[2], "booked_until": b["tat"],
             "booked_ahead_s": round(max(0.0, (b["tat"] - now).total_seconds()), 3),
             **({"day": b["cap_day"], "booked_that_day": b["cap_used"]} if b["cap_day"] is not None else {})}
            for b in buckets if b["limit_name"] == d.name
        ]  # fmt: skip
        waiting = deferred.get(d.name)
        limits.append(
            {
                "limit": d.name, "command": d.command, "rate": _rate_json(rate), "source": source, "override": o,
                "keys": keys, "deferred": waiting["n"] if waiting else 0,
                "deferred_until": waiting["last"] if waiting else None,
            }
        )  # fmt: skip
    concurrency = []
    held = {r["limit_name"]: r for r in await operations.slots_of_tenant(conn, tenant)}
    for c in declared_concurrency(engine):
        o = own.get(c["limit"])
        mine = held.get(c["limit"])
        concurrency.append(
            {"limit": c["limit"], "command": c["command"], "slots": o["slots"] if o else c["slots"],
             "source": _override_source(o) if o else "definition",
             "override": o, "held": mine["held"] if mine else 0, "waiting": mine["waiting"] if mine else 0}
        )  # fmt: skip
    return {"tenant": tenant, "limits": limits, "concurrency": concurrency}


def _override_source(o: dict[str, Any]) -> str:
    """Where a limit in force for a tenant comes from, when it is the tenant's own override."""
    return f"override by {o['updated_by']} at {o['updated_at']:%Y-%m-%d %H:%M:%S} UTC: {o['reason']}"


def _rate_json(rate: Rate | None) -> dict[str, Any] | None:
    return None if rate is None else {"per_s": rate.per_s, "burst": rate.burst, "daily_cap": rate.daily_cap}


def _override_json(r: Any) -> dict[str, Any]:
    return {
        "tenant": str(r["tenant_id"]), "limit": r["limit_name"], "per_s": r["per_s"], "burst": r["burst"],
        "daily_cap": r["daily_cap"], "slots": r["slots"], "reason": r["reason"], "updated_by": r["updated_by"],
        "updated_at": r["updated_at"],
    }  # fmt: skip
