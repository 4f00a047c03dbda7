"""Which rows the stuck query ships to the service. An instance with a pending timer that is not overdue is
not stuck however long it has been in its state (core/stuck.py: a pending timer's rule replaces the age
rule), so the query must not return it: with a million instances waiting days for their next step, every
one of them was shipped to Python and classified every 30 s, and the drain rate fell to a quarter.

The same holds for the age rule itself: an instance is no candidate before its own state's threshold. The query
once took every active instance older than the shortest threshold of any loaded definition (notification's
`checking`, 60 s), so 100,000 sequence instances a minute into `sending` (threshold 15 minutes) were read with
their latest command and shipped every 30 s: under the fairness benchmark's burst the query ran for minutes
on end beside the event path."""

from __future__ import annotations

import asyncpg
import pytest

from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import Filters
from sfworkflow.db import operations
from sfworkflow.ops.stuck import find_stuck
from sfworkflow.workflows import DEFINITIONS
from tests.support import TENANT


async def _waiting(
    pg: asyncpg.Connection, entity: str, entered_ago_s: float, due_in_s: float | None,
    state: str = "waiting", workflow: str = "sequence", definition_version: int = 1,
) -> None:  # fmt: skip
    iid = await pg.fetchval(
        "INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, version,"
        " state_entered_at) VALUES ($1, $4, $2, $6, $5, 1, now() - make_interval(secs => $3))"
        " RETURNING id",
        TENANT, entity, entered_ago_s, workflow, state, definition_version,
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


async def test_an_instance_is_no_candidate_before_its_own_states_threshold(
    pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _waiting(pg, "sending-2m", 120, None, state="sending")  # sequence's sending: 15 minutes
    await _waiting(pg, "sending-20m", 1200, None, state="sending")
    await _waiting(pg, "paused-10d", 10 * 86400, None, state="paused")  # never stuck by age
    await _waiting(pg, "checking-2m", 120, None, state="checking", workflow="notification")  # 60 s
    await _waiting(pg, "unknown-2m", 120, None, state="no_such_state")  # no loaded definition has it: the shortest
    # a version not loaded here (a rolling deploy): stuck at once by its rule, so a candidate from the shortest age,
    # whatever the loaded versions say of the same state
    await _waiting(pg, "unloaded-paused-2m", 120, None, state="paused", definition_version=99)
    shipped: list[str] = []
    candidates = operations.stuck_candidates

    async def spy(*args: object, **kwargs: object) -> list[asyncpg.Record]:
        rows = await candidates(*args, **kwargs)  # type: ignore[arg-type]
        shipped.extend(r["entity_id"] for r in rows)
        return rows

    monkeypatch.setattr(operations, "stuck_candidates", spy)
    stuck = await find_stuck(pg, Engine(DEFINITIONS), Filters(limit=100, default_after_s=900))
    assert sorted(shipped) == ["checking-2m", "sending-20m", "unknown-2m", "unloaded-paused-2m"]
    assert sorted(s.entity_id for s in stuck) == ["checking-2m", "sending-20m", "unloaded-paused-2m"]
