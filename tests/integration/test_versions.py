"""Definition versions against the real service, PostgreSQL and RabbitMQ.

A release with sequence v1 starts instances; a release with v1 and v2 (tests/unit/test_versions.py:
v2 drops `paused` and goes through `confirming` before `completed`) replaces it. New instances start on
v2; an in-flight v1 instance either finishes on v1 or is moved to v2 by `sfworkflow migrate-instances`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest

from sfworkflow.cli import versions as versions_cmd
from sfworkflow.cli.main import build_parser
from sfworkflow.core.definition import WorkflowDefinition
from sfworkflow.ops.versions import os_user
from sfworkflow.runtime.service import Service
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS
from tests.conftest import wait_for
from tests.support import TENANT, Amqp, enrolled_data, event, history, instance, outbox
from tests.unit.test_versions import V2

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")  # the running service's log lines (stdout)
RELEASE_1 = DEFINITIONS  # sequence v1 only
RELEASE_2 = (*DEFINITIONS, V2)  # sequence v1 and v2: new instances start on v2


@contextlib.asynccontextmanager
async def release(settings: Settings, definitions: Sequence[WorkflowDefinition]) -> AsyncIterator[Service]:
    service = Service(settings, definitions=definitions)
    await service.start()
    try:
        yield service
    finally:
        if not service.stopped.is_set():
            await service.stop()


async def _in(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    row = await instance(pg, entity)
    return row is not None and row["state"] == state


async def _transitions(pg: asyncpg.Connection, entity: str) -> list[tuple[str, str, str]]:
    return [(h["outcome"], h["from_state"], h["to_state"]) for h in await history(pg, entity)]


async def _migrate(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    """Run `sfworkflow migrate-instances --workflow sequence --from 1 --to 2 ARGV` with release 2's definitions."""
    args = build_parser().parse_args(["migrate-instances", "--workflow", "sequence", "--from", "1", "--to", "2", *argv])
    capsys.readouterr()  # drop what came before
    rc = await versions_cmd._cmd_migrate_instances(settings, args)
    return rc, [line for line in capsys.readouterr().out.splitlines() if not _LOG_LINE.match(line)]


async def _snapshot(pg: asyncpg.Connection) -> dict[str, Any]:
    return {
        "instances": [dict(r) for r in await pg.fetch("SELECT * FROM sfworkflow.instance ORDER BY id")],
        "history": await pg.fetchval("SELECT count(*) FROM sfworkflow.history"),
        "timers": [dict(r) for r in await pg.fetch("SELECT * FROM sfworkflow.timer ORDER BY instance_id, name")],
    }


async def test_in_flight_v1_instance_finishes_on_v1_while_new_instances_start_on_v2(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with release(settings, RELEASE_1), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "enr-old", enrolled_data(steps=1)))
        await wait_for(lambda: _in(pg, "enr-old", "sending"), what="enr-old sending on v1")

    async with release(settings, RELEASE_2), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "enr-new", enrolled_data(steps=1)))
        await wait_for(lambda: _in(pg, "enr-new", "sending"), what="enr-new sending")
        assert (await instance(pg, "enr-old"))["definition_version"] == 1
        assert (await instance(pg, "enr-new"))["definition_version"] == 2
        for entity in ("enr-old", "enr-new"):
            await mq.publish(event("sequence.step_sent", entity, {"step": 0, "provider_message_id": f"p-{entity}"}))
        await wait_for(lambda: _in(pg, "enr-old", "completed"), what="enr-old completed")
        await wait_for(lambda: _in(pg, "enr-new", "completed"), what="enr-new completed")

    assert await _transitions(pg, "enr-old") == [
        ("applied", "new", "waiting"),
        ("applied", "waiting", "sending"),
        ("applied", "sending", "completed"),  # v1's transition
    ]
    assert await _transitions(pg, "enr-new") == [
        ("applied", "new", "waiting"),
        ("applied", "waiting", "sending"),
        ("applied", "sending", "confirming"),  # v2's transitions
        ("applied", "confirming", "completed"),
    ]
    assert (await instance(pg, "enr-old"))["definition_version"] == 1
    lifecycle = {e: await outbox(pg, e, "lifecycle") for e in ("enr-old", "enr-new")}
    assert {m["body"]["definition_version"] for m in lifecycle["enr-old"]} == {1}
    assert {m["body"]["definition_version"] for m in lifecycle["enr-new"]} == {2}


async def test_migrate_instances_moves_in_flight_instances_to_v2(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(versions_cmd, "loaded_definitions", lambda: RELEASE_2)
    async with release(settings, RELEASE_1), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "enr-a", enrolled_data(steps=1)))
        await mq.publish(event("sequence.enrolled", "enr-w", enrolled_data(steps=1, delay_s=3600)))
        await mq.publish(event("sequence.enrolled", "enr-p", enrolled_data(steps=1, delay_s=3600)))
        await wait_for(lambda: _in(pg, "enr-a", "sending"), what="enr-a sending")
        await wait_for(lambda: _in(pg, "enr-p", "waiting"), what="enr-p waiting")
        await mq.publish(event("sequence.paused", "enr-p", {"reason": "lead asked"}))
        await wait_for(lambda: _in(pg, "enr-p", "paused"), what="enr-p paused")
        await wait_for(lambda: _in(pg, "enr-w", "waiting"), what="enr-w waiting")
        await mq.publish(event("sequence.enrolled", "enr-done", enrolled_data(steps=1)))
        await wait_for(lambda: _in(pg, "enr-done", "sending"), what="enr-done sending")
        await mq.publish(event("sequence.cancelled", "enr-done", {}))
        await wait_for(lambda: _in(pg, "enr-done", "cancelled"), what="enr-done cancelled")

    ref = f"{TENANT}/sequence"
    async with release(settings, RELEASE_2), Amqp(settings.amqp_url) as mq:
        before = await _snapshot(pg)

        # --dry-run: says exactly what it would do, changes nothing; exits 1 because enr-p would be refused.
        rc, out = await _migrate(settings, capsys, "--dry-run")
        assert rc == 1
        assert sorted(out[:-1]) == [
            f"would migrate {ref}/enr-a: v1 sending -> v2 sending",
            f"would migrate {ref}/enr-w: v1 waiting -> v2 waiting",
            f"would refuse {ref}/enr-p (paused): state 'paused' does not exist in sequence v2 and no --map "
            "paused=STATE was given",
        ]
        assert out[-1] == (
            "sequence v1 -> v2 (dry run: nothing changed): would migrate 2, refused 1, skipped 0, would break 0 "
            "(their histories replay differently)"
        )
        full = out
        rc, out = await _migrate(settings, capsys, "--dry-run", "--limit", "2", "--batch-size", "1")
        assert out[:-1] == full[:2]  # the first two by id, in batches of one
        assert rc == (1 if any(line.startswith("would refuse") for line in out[:-1]) else 0)
        assert await _snapshot(pg) == before
        assert await _snapshot(pg) == before

        # A row someone else holds is skipped, not waited for; a refused instance stays on v1 untouched.
        holder = await asyncpg.connect(settings.database_url)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM sfworkflow.instance WHERE entity_id = 'enr-w' FOR UPDATE")
            rc, out = await _migrate(settings, capsys, "--reason", "v2 rollout")
            await tx.rollback()
        finally:
            await holder.close()
        assert rc == 1
        assert sorted(out[:3]) == [
            f"migrated {ref}/enr-a: v1 sending -> v2 sending",
            f"refused {ref}/enr-p (paused): state 'paused' does not exist in sequence v2 and no --map "
            "paused=STATE was given",
            f"skipped {ref}/enr-w (waiting): busy (row locked)",
        ]
        assert out[3:] == [
            "sequence v1 -> v2: migrated 1, refused 1, skipped 1",
            "skipped instances were busy or changed meanwhile: run the command again to take them",
        ]

        # A mapping whose target state would not accept the pending timer is refused.
        rc, out = await _migrate(settings, capsys, "--map", "waiting=sending")
        assert rc == 1
        assert (
            f"refused {ref}/enr-w (waiting): pending timer 'step_due': state 'sending' of sequence v2 does not "
            "accept timer_step_due"
        ) in out
        assert out[-1] == "sequence v1 -> v2: migrated 0, refused 2, skipped 0"

        # Run again: what was skipped is taken now; what was migrated is not selected again.
        w_before = await instance(pg, "enr-w")
        rc, out = await _migrate(settings, capsys, "--reason", "v2 rollout")
        assert rc == 1
        assert f"migrated {ref}/enr-w: v1 waiting -> v2 waiting" in out
        assert len(out) == 3
        assert out[-1] == "sequence v1 -> v2: migrated 1, refused 1, skipped 0"

        a, w, p = [await instance(pg, e) for e in ("enr-a", "enr-w", "enr-p")]
        assert (a["definition_version"], w["definition_version"], p["definition_version"]) == (2, 2, 1)
        assert w["context"] == w_before["context"] and w["version"] == w_before["version"] + 1
        assert w["state_entered_at"] == w_before["state_entered_at"]  # same state: not re-entered
        timers = await pg.fetch("SELECT name, due_at FROM sfworkflow.timer WHERE instance_id = $1", w["id"])
        assert [(t["name"], t["due_at"]) for t in timers] == [
            (t["name"], t["due_at"]) for t in before["timers"] if t["instance_id"] == w["id"]
        ]
        assert dict(p) == next(r for r in before["instances"] if r["entity_id"] == "enr-p")  # untouched
        migrated = (await history(pg, "enr-a"))[-1]
        assert (migrated["outcome"], migrated["event_type"]) == ("migrated", "sequence.migrated")
        assert (migrated["from_state"], migrated["to_state"], migrated["seq"]) == ("sending", "sending", a["version"])
        assert migrated["detail"] == {"from_version": 1, "to_version": 2, "reason": "v2 rollout", "by": os_user()}

        # enr-a finishes on v2's transitions now; enr-p, left on v1, still runs on v1.
        await mq.publish(event("sequence.step_sent", "enr-a", {"step": 0, "provider_message_id": "p-a"}))
        await wait_for(lambda: _in(pg, "enr-a", "completed"), what="enr-a completed on v2")
        await mq.publish(event("sequence.resumed", "enr-p", {}))
        await wait_for(lambda: _in(pg, "enr-p", "waiting"), what="enr-p resumed on v1")

    assert await _transitions(pg, "enr-a") == [
        ("applied", "new", "waiting"),
        ("applied", "waiting", "sending"),
        ("migrated", "sending", "sending"),
        ("applied", "sending", "confirming"),
        ("applied", "confirming", "completed"),
    ]
    completed = (await outbox(pg, "enr-a", "lifecycle"))[-1]["body"]
    assert (completed["event_type"], completed["definition_version"]) == ("workflow.completed", 2)
    assert (await instance(pg, "enr-done"))["definition_version"] == 1  # terminal instances are never selected


async def test_migrate_instances_with_a_map_moves_a_state_v2_does_not_have(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(versions_cmd, "loaded_definitions", lambda: RELEASE_2)
    async with release(settings, RELEASE_1), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "enr-p", enrolled_data(steps=1)))
        await wait_for(lambda: _in(pg, "enr-p", "sending"), what="enr-p sending")
        await mq.publish(event("sequence.paused", "enr-p", {}))
        await wait_for(lambda: _in(pg, "enr-p", "paused"), what="enr-p paused")

    async with release(settings, RELEASE_2), Amqp(settings.amqp_url) as mq:
        rc, out = await _migrate(settings, capsys, "--map", "paused=sending")
        assert rc == 0
        assert out == [
            f"migrated {TENANT}/sequence/enr-p: v1 paused -> v2 sending",
            "sequence v1 -> v2: migrated 1, refused 0, skipped 0",
        ]
        await mq.publish(event("sequence.step_sent", "enr-p", {"step": 0, "provider_message_id": "p-p"}))
        await wait_for(lambda: _in(pg, "enr-p", "completed"), what="enr-p completed on v2")
    assert (await _transitions(pg, "enr-p"))[-3:] == [
        ("migrated", "paused", "sending"),
        ("applied", "sending", "confirming"),
        ("applied", "confirming", "completed"),
    ]
