"""What the operator tools, the admin API, the status page, the service's gauges and the demo read and write.

Each function runs the block of the same name in sql/operations.sql (or, for the gauges the event path's file
already had, in sql/queries.sql) and returns records or small values; callers never hold SQL. Filters that may
be absent are NULL-able parameters of one static query (`($1::text IS NULL OR workflow = $1)`): every filter
is a plain equality on an indexed or leading column, so the one plan serves every combination.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import asyncpg

from sfworkflow.db.pool import q


# ---- readiness and the service's gauges -----------------------------------------------------------------------
async def ping(conn: asyncpg.Connection) -> None:
    """One round trip; raises when PostgreSQL does not answer."""
    await conn.fetchval(q("ping"))


async def active_instances_by_state(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """(workflow, state, n) of the instances that have not ended."""
    return list(await conn.fetch(q("active_instances_by_state")))


async def try_lead_cluster_stats(conn: asyncpg.Connection) -> bool:
    """Take the lead of the cluster gauges for this session, when no other session holds it."""
    return bool(await conn.fetchval(q("try_lead_cluster_stats")))


async def parked_count(conn: asyncpg.Connection) -> int:
    """Events waiting in the parked table."""
    return int(await conn.fetchval(q("parked_count")))


async def parked_nearest_deadline(conn: asyncpg.Connection) -> float | None:
    """Seconds until the nearest parked event's deadline (negative once past); None when nothing is parked."""
    value = await conn.fetchval(q("parked_nearest_deadline"))
    return None if value is None else float(value)


# ---- stuck instances (ops/stuck.py) -------------------------------------------------------------------------
async def stuck_candidates(
    conn: asyncpg.Connection,
    *,
    workflow: str | None,
    tenant_id: str | None,
    state: str | None,
    entity_id: str | None,
    min_age_s: float,
    timer_grace_s: float,
    operator_workflows: Sequence[str],
    operator_states: Sequence[str],
    limit: int,
    state_ages: tuple[Sequence[str], Sequence[int], Sequence[str], Sequence[float | None]] = ((), (), (), ()),
) -> list[asyncpg.Record]:
    """Active instances that may be stuck, the longest in their state first (core/stuck.py decides which are).
    `state_ages`: (workflows, versions, states, ages) each loaded state's own no-progress age (core/stuck.py
    state_ages); a state not named there is judged by `min_age_s`."""
    return list(
        await conn.fetch(
            q("stuck_candidates"),
            workflow,
            tenant_id,
            state,
            entity_id,
            min_age_s,
            timer_grace_s,
            list(operator_workflows),
            list(operator_states),
            limit,
            *(list(a) for a in state_ages),
        )
    )


async def stuck_instance(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, workflow: str, entity_id: str
) -> asyncpg.Record | None:
    """One named instance with its earliest timer and latest command; None when there is none."""
    return await conn.fetchrow(q("stuck_instance"), tenant_id, workflow, entity_id)


@lru_cache(maxsize=1)
def settled_condition() -> str:
    """The SQL condition "settled" ($1, $2: the parallel lists of core.stuck.operator_states()), without its
    description, for statements written outside the package (bench/); the package's own use static queries."""
    lines = q("settled_condition").splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("--")).strip()


# ---- one instance (ops/inspect.py, the admin API) -----------------------------------------------------------
async def instance_by_key(
    conn: asyncpg.Connection, tenant_id: str, workflow: str, entity_id: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(q("instance_by_key"), tenant_id, workflow, entity_id)


async def parked_of_key(
    conn: asyncpg.Connection, tenant_id: str, workflow: str, entity_id: str
) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("parked_of_key"), tenant_id, workflow, entity_id))


async def history_of_instance(conn: asyncpg.Connection, instance_id: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("history_of_instance"), instance_id))


async def timers_of_instance(conn: asyncpg.Connection, instance_id: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("timers_of_instance"), instance_id))


async def outbox_of_instance(conn: asyncpg.Connection, instance_id: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("outbox_of_instance"), instance_id))


# ---- lists (the admin API, `sfworkflow parked list`) ------------------------------------------------------------
async def list_instances_page(
    conn: asyncpg.Connection,
    *,
    workflow: str | None,
    tenant_id: str | None,
    state: str | None,
    terminal: bool | None,
    after: int,
    limit: int,
) -> list[asyncpg.Record]:
    """Instances with an id above `after`, in id order, `limit` at most."""
    return list(await conn.fetch(q("list_instances_page"), workflow, tenant_id, state, terminal, after, limit))


async def list_parked(
    conn: asyncpg.Connection, workflow: str | None, tenant_id: str | None, limit: int
) -> list[asyncpg.Record]:
    """Parked events, the nearest deadline first, with `time_left` (the database's clock) and `total`."""
    return list(await conn.fetch(q("list_parked"), workflow, tenant_id, limit))


# ---- dead letters (`sfworkflow dead-letters redrive`) ---------------------------------------------------------
@dataclass(frozen=True)
class EventKey:
    """What finds an event in the inbox (tenant, event id) and in its instance's history (workflow, entity)."""

    tenant_id: str
    event_id: str
    workflow: str
    entity_id: str


@dataclass(frozen=True)
class InboxState:
    in_inbox: bool  # the inbox has the event: a redelivery of it would be dropped as a duplicate
    taken: bool  # history or parked rows name it: it was applied (or is waiting), not only received


async def inbox_state_of_event(conn: asyncpg.Connection, event: EventKey) -> InboxState:
    row = await conn.fetchrow(
        q("inbox_state_of_event"), event.tenant_id, event.event_id, event.workflow, event.entity_id
    )
    return InboxState(in_inbox=bool(row["in_inbox"]), taken=bool(row["taken"]))


async def release_inbox_entry(conn: asyncpg.Connection, tenant_id: str, event_id: str) -> None:
    await conn.execute(q("release_inbox_entry"), tenant_id, event_id)


# ---- the status page --------------------------------------------------------------------------------------------
async def instances_by_state_and_end(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """(workflow, state, terminal, n) of every instance."""
    return list(await conn.fetch(q("instances_by_state_and_end")))


async def dead_letters_by_reason(conn: asyncpg.Connection, within_s: float) -> list[asyncpg.Record]:
    """(reason, n, last) of the dead-letter outbox rows of the last `within_s` seconds, the most frequent first."""
    return list(await conn.fetch(q("dead_letters_by_reason"), within_s))


async def outbox_backlog_by_kind(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """(kind, n, oldest_s) of the unpublished outbox rows."""
    return list(await conn.fetch(q("outbox_backlog_by_kind")))


# ---- the demo's checks and summary ----------------------------------------------------------------------------
async def demo_settled_count(
    conn: asyncpg.Connection, tenant_id: str, operator_workflows: Sequence[str], operator_states: Sequence[str]
) -> int:
    return int(await conn.fetchval(q("demo_settled_count"), tenant_id, list(operator_workflows), list(operator_states)))


async def demo_unsettled(
    conn: asyncpg.Connection, tenant_id: str, operator_workflows: Sequence[str], operator_states: Sequence[str]
) -> list[asyncpg.Record]:
    """(workflow, entity_id, state, updated_at) of the first 20 instances that did not settle."""
    return list(await conn.fetch(q("demo_unsettled"), tenant_id, list(operator_workflows), list(operator_states)))


async def demo_unpublished_count(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(q("demo_unpublished_count")))


async def demo_states(conn: asyncpg.Connection, tenant_id: str) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("demo_states"), tenant_id))


async def demo_commands_over_attempts(conn: asyncpg.Connection, tenant_id: str) -> int:
    return int(await conn.fetchval(q("demo_commands_over_attempts"), tenant_id))


async def demo_command_retries(conn: asyncpg.Connection, tenant_id: str) -> int:
    return int(await conn.fetchval(q("demo_command_retries"), tenant_id))


async def demo_outbox_by_kind(conn: asyncpg.Connection, tenant_id: str) -> dict[str, int]:
    return {r["kind"]: r["n"] for r in await conn.fetch(q("demo_outbox_by_kind"), tenant_id)}


# ---- rate limits (ops/limits.py) ----------------------------------------------------------------------------
async def limit_overrides(conn: asyncpg.Connection, tenant_id: str | None) -> list[asyncpg.Record]:
    """The tenants' limit overrides (one tenant's when given), by tenant and limit."""
    return list(await conn.fetch(q("limit_overrides"), tenant_id))


async def upsert_limit_override(
    conn: asyncpg.Connection,
    tenant_id: str,
    limit_name: str,
    per_s: float | None,
    burst: int | None,
    reason: str,
    by: str,
    slots: int | None = None,
    daily_cap: int | None = None,
) -> asyncpg.Record:
    """Set a tenant's rate and/or daily cap (or, for a concurrency limit, its slots) for a limit, replacing its earlier
    override; the stored row."""
    return await conn.fetchrow(
        q("upsert_limit_override"), tenant_id, limit_name, per_s, burst, reason, by, slots, daily_cap
    )


async def slots_of_tenant(conn: asyncpg.Connection, tenant_id: str) -> list[asyncpg.Record]:
    """Per concurrency limit, a tenant's slots held and commands queued for one."""
    return list(await conn.fetch(q("slots_of_tenant"), tenant_id))


async def delete_limit_override(conn: asyncpg.Connection, tenant_id: str, limit_name: str) -> asyncpg.Record | None:
    """Remove a tenant's override of a limit; the removed row, or None when it had none."""
    return await conn.fetchrow(q("delete_limit_override"), tenant_id, limit_name)


async def rate_buckets_of_tenant(conn: asyncpg.Connection, tenant_id: str) -> list[asyncpg.Record]:
    """A tenant's rate-limit buckets: key, limit, the time its slots are booked until, and its daily count."""
    return list(await conn.fetch(q("rate_buckets_of_tenant"), tenant_id))


async def deferred_of_tenant(conn: asyncpg.Connection, tenant_id: str) -> list[asyncpg.Record]:
    """Per limit, a tenant's commands deferred to a time still ahead: how many, and the last one's slot."""
    return list(await conn.fetch(q("deferred_of_tenant"), tenant_id))


# ---- definition-change safety (ops/compat.py) ------------------------------------------------------------------
async def compat_instances(
    conn: asyncpg.Connection, workflow: str, ended_too: bool, since: datetime | None, limit: int | None, sample: bool
) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("compat_instances"), workflow, ended_too, since, limit, sample))


async def corpus_instances(
    conn: asyncpg.Connection, per_state: int, workflows: list[str] | None
) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("corpus_instances"), per_state, workflows))


async def histories_with_bodies(conn: asyncpg.Connection, ids: Sequence[int]) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("histories_with_bodies"), list(ids)))


async def instances_by_ids(conn: asyncpg.Connection, ids: Sequence[int]) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("instances_by_ids"), list(ids)))
