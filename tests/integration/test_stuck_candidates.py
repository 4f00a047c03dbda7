"""Which rows the stuck query ships to the service. An instance with a pending timer that is not overdue is
not stuck however long it has been in its state (core/stuck.py: a pending timer's rule replaces the age
rule), so the query must not return it: with a million instances waiting days for their next step, every
one of them was shipped to Python and classified every 30 s, and the drain rate fell to a quarter."""

from __future__ import annotations

import asyncpg

from sfworkflow.db import operations
from tests.support import TENANT


async def _waiting(pg: asyncpg.Connection, entity: str, entered_ago_s: float, due_in_s: float | None) -> None:
    iid = await pg.fetchval(
        "INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, version,"
        " state_entered_at) VALUES ($1, 'sequence', $2, 1, 'waiting', 1, now() - make_interval(secs => $3))"
        " RETURNING id",
        TENANT, entity, entered_ago_s,
    )  # fmt: skip
    if due_in_s is not None:
        await pg.execute(
            "INSERT INTO sfworkflow.timer (instance_id, name, due_at) VALUES ($1, 'step_due',"
            " now() + make_interval(secs => $2))",
            iid, due_in_s,
        )  # fmt: skip


async def test_an_instance_whose_timer_is_not_due_yet_is_no_candidate(pg: asyncpg.Connection) -> None:
    await _waiting(pg, "timer-ahead", entered_ago_s=86400, due_in_s=30 * 86400)
    await _waiting(pg, "timer-overdue", entered_ago_s=86400, due_in_s=-3600)
    await _waiting(pg, "no-timer-old", entered_ago_s=86400, due_in_s=None)
    await _waiting(pg, "no-timer-young", entered_ago_s=1, due_in_s=None)
    rows = await operations.stuck_candidates(
        pg, workflow=None, tenant_id=None, state=None, entity_id=None, min_age_s=900, timer_grace_s=60,
        operator_workflows=[], operator_states=[], limit=100,
    )  # fmt: skip
    assert sorted(r["entity_id"] for r in rows) == ["no-timer-old", "timer-overdue"]
