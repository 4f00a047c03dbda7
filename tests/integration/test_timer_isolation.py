"""Timers fail one at a time: what a failing timer did is undone with it, the timer that failed is the one
put back (a minute later), and no timer that cannot be fired — a definition action that raises, a command
that cannot be written, 256 and more due timers of instances on a definition version no replica has —
holds back the healthy timers of other instances. Against the real PostgreSQL, through Store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg
import pytest

from sfworkflow.core.definition import Step, Transition, WorkflowDefinition
from sfworkflow.core.plan import RETRY_FAILED_TIMER
from sfworkflow.db.repository import Store
from sfworkflow.workflows import DEFINITIONS
from tests.integration.storekit import direct_store
from tests.support import TENANT


class T(StrEnum):
    NEW = "new"
    WAITING = "waiting"
    FIRED = "fired"
    DONE = "done"


def send_and_follow_up(step: Step) -> None:
    step.command("do", {"n": 1}, idempotency_key=f"{step.key}/do")
    step.set_timer_in("follow_up", 0)  # already due: fired in the same transaction


def explode(step: Step) -> None:
    raise RuntimeError("a definition action that raises")


def unwritable(step: Step) -> None:
    step.command("do", {"not json": object()}, idempotency_key=f"{step.key}/bad")  # fails when written


def finish(step: Step) -> None:
    step.command("do", {"n": 2}, idempotency_key=f"{step.key}/finish")


TICKER = WorkflowDefinition(
    name="ticker",
    version=1,
    states=T,
    initial=T.NEW,
    terminal=frozenset({T.DONE}),
    start_events=frozenset({"started"}),
    events=frozenset({"started"}),
    internal_events=frozenset({"timer_a", "timer_follow_up", "timer_poison", "timer_bad_write", "timer_ok"}),
    commands=frozenset({"do"}),
    compensations=frozenset(),
    transitions=(
        Transition("started", T.NEW, T.WAITING),
        Transition("timer_a", T.WAITING, T.FIRED, action=send_and_follow_up),
        Transition("timer_follow_up", T.FIRED, T.DONE, action=explode),
        Transition("timer_poison", T.WAITING, T.DONE, action=explode),
        Transition("timer_bad_write", T.WAITING, T.DONE, action=unwritable),
        Transition("timer_ok", T.WAITING, T.DONE, action=finish),
    ),
)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with direct_store(database_url, (*DEFINITIONS, TICKER)) as s:
        yield s


async def _instance(pg: asyncpg.Connection, entity: str, timer: str, due_ago_s: float, version: int = 1) -> int:
    iid = await pg.fetchval(
        "INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, version) "
        "VALUES ($1, 'ticker', $2, $3, 'waiting', 1) RETURNING id",
        TENANT, entity, version,
    )  # fmt: skip
    await pg.execute(
        "INSERT INTO sfworkflow.timer (instance_id, name, due_at) VALUES ($1, $2, now() - make_interval(secs => $3))",
        iid, timer, due_ago_s,
    )  # fmt: skip
    return int(iid)


async def _row(pg: asyncpg.Connection, iid: int) -> dict[str, Any]:
    r = await pg.fetchrow("SELECT state, version FROM sfworkflow.instance WHERE id = $1", iid)
    timers = {
        t["name"]: t["due_at"] for t in await pg.fetch("SELECT * FROM sfworkflow.timer WHERE instance_id = $1", iid)
    }
    commands = await pg.fetchval(
        "SELECT count(*) FROM sfworkflow.outbox WHERE instance_id = $1 AND kind = 'command'", iid
    )
    outcomes = [h["outcome"] for h in await pg.fetch("SELECT outcome FROM sfworkflow.history WHERE instance_id = $1 "
                                                       "ORDER BY id", iid)]  # fmt: skip
    return {"state": r["state"], "version": r["version"], "timers": timers, "commands": commands, "outcomes": outcomes}


async def _fire_until_quiet(store: Store, rounds: int = 5) -> int:
    fired = 0
    for _ in range(rounds):
        report = await store.fire_due_timers(256)
        fired += report.timers_fired
    return fired


async def test_a_timer_whose_follow_up_raises_is_undone_with_it_and_put_back(
    store: Store, pg: asyncpg.Connection
) -> None:
    iid = await _instance(pg, "x", "a", 1)
    started = datetime.now(UTC)
    await store.fire_due_timers(256)
    row = await _row(pg, iid)
    # The follow-up timer raised inside the same transition chain: timer a's transition is not kept ...
    assert (row["state"], row["version"], row["commands"]) == ("waiting", 1, 0)
    # ... and it is timer a, the one that was taken, that comes back a minute later; nothing fired twice.
    assert list(row["timers"]) == ["a"]
    assert started + RETRY_FAILED_TIMER <= row["timers"]["a"] <= datetime.now(UTC) + RETRY_FAILED_TIMER
    assert row["outcomes"] == ["failed"]
    assert await store.fire_due_timers(256) is not None and (await _row(pg, iid))["commands"] == 0


async def test_a_poisoned_timer_never_holds_back_the_healthy_ones(store: Store, pg: asyncpg.Connection) -> None:
    poisoned = [await _instance(pg, f"poison-{i}", "poison", 60 + i) for i in range(3)]
    unwritable = await _instance(pg, "bad-write", "bad_write", 50)
    healthy = await _instance(pg, "healthy", "ok", 1)  # due last of all
    await _fire_until_quiet(store, rounds=2)
    assert (await _row(pg, healthy))["state"] == "done"
    assert (await _row(pg, healthy))["commands"] == 1
    for iid in [*poisoned, unwritable]:
        row = await _row(pg, iid)
        assert (row["state"], row["commands"]) == ("waiting", 0)
        assert list(row["timers"]) and min(row["timers"].values()) > datetime.now(UTC)  # put back for later
        assert row["outcomes"] == ["failed"]


async def test_due_timers_of_a_version_no_replica_has_never_hold_back_the_others(
    store: Store, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        "INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, version) "
        "SELECT $1, 'ticker', 'v9-' || g, 9, 'waiting', 1 FROM generate_series(1, 300) g",
        TENANT,
    )
    await pg.execute(
        "INSERT INTO sfworkflow.timer (instance_id, name, due_at) "
        "SELECT id, 'ok', now() - interval '1 hour' FROM sfworkflow.instance WHERE definition_version = 9"
    )
    healthy = await _instance(pg, "healthy", "ok", 1)
    fired = await _fire_until_quiet(store, rounds=2)
    assert fired == 1
    assert (await _row(pg, healthy))["state"] == "done"
    assert (
        await pg.fetchval("SELECT count(*) FROM sfworkflow.timer WHERE due_at < now() - interval '59 minutes'") == 300
    )
    assert await store.unfireable_due_timers() == 300  # what this replica cannot fire is counted


def test_retry_delay_is_a_minute() -> None:
    assert timedelta(seconds=60) == RETRY_FAILED_TIMER
