"""Finding stuck instances: reads candidate rows and measures them against the definitions' rules
(core/stuck.py). `find_stuck` lists them for `sfworkflow stuck`, the admin API and the status page;
`explain` measures one named instance, stuck or not, for `sfworkflow replay --instance` and the admin API.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from sfworkflow.core.definition import DEFAULT_STUCK_AFTER_S, TIMER_GRACE_S, InstanceKey
from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import (
    Explanation,
    Filters,
    StuckInstance,
    classify,
    min_age_s,
    operator_states,
    state_ages,
    stuck_instance,
    stuck_rule,
)
from sfworkflow.db import operations


async def explain(
    conn: asyncpg.Connection | asyncpg.Pool,
    engine: Engine,
    key: InstanceKey,
    default_after_s: float = DEFAULT_STUCK_AFTER_S,
    no_progress_s: float | None = None,
) -> Explanation | None:
    """How one instance stands against its definition's stuck rule; None when there is no such instance."""
    row = await operations.stuck_instance(conn, key.tenant_id.lower(), key.workflow, key.entity_id)
    if row is None:
        return None
    rule = stuck_rule(engine, row, default_after_s, no_progress_s)
    entered = row["state_entered_at"]
    s = stuck_instance(row, rule.why, rule.since or entered, rule.detail)
    return Explanation(s, bool(row["terminal"]), entered, rule, datetime.now(UTC))


async def find_stuck(conn: asyncpg.Connection, engine: Engine, f: Filters) -> list[StuckInstance]:
    """Stuck instances matching the filters, longest stuck first."""
    ws, ss = operator_states(cw.definition for cw in engine.compiled.values())
    rows = await operations.stuck_candidates(
        conn,
        workflow=f.workflow,
        tenant_id=f.tenant,
        state=f.state,
        entity_id=f.entity,
        min_age_s=min_age_s(engine, f.default_after_s, f.no_progress_s),
        timer_grace_s=TIMER_GRACE_S,
        operator_workflows=ws,
        operator_states=ss,
        limit=max(f.limit * 4, f.limit),
        state_ages=state_ages(engine, f.default_after_s, f.no_progress_s),
    )
    now = datetime.now(UTC)
    out = []
    for r in rows:
        s = classify(engine, r, now, f.default_after_s, f.no_progress_s)
        if s is not None and (now - s.stuck_since).total_seconds() >= f.older_than_s:
            out.append(s)
    out.sort(key=lambda s: s.stuck_since)
    return out[: f.limit]
