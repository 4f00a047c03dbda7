"""Definition-change safety against the real service: histories recorded by sequence v1 replayed, read-only, through
v2 (tests/unit/test_versions.py: the last send now goes to `confirming`). A completed instance diverges with a
readable diff; one in flight that has not reached its last send does not; v1 itself reproduces both; the
`migrate-instances --dry-run` of the in-flight one says it would not break."""

from __future__ import annotations

import asyncpg

from sfworkflow.core.engine import Engine
from sfworkflow.ops import compat, versions
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS
from tests.conftest import wait_for
from tests.support import Amqp, all_published, enrolled_data, event, running_service, state_of
from tests.unit.test_versions import V2

RELEASE_2 = Engine((*DEFINITIONS, V2))


async def _state_is(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    return await state_of(pg, entity) == state


async def record_done_and_going(settings: Settings, pg: asyncpg.Connection) -> None:
    """`done`: a one-step sequence, sent and completed; `going`: a two-step one whose first step was sent."""
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "done", enrolled_data(steps=1)))
        await mq.publish(event("sequence.enrolled", "going", enrolled_data(steps=2, delay_s=3600)))
        await wait_for(lambda: _state_is(pg, "done", "sending"), what="done: sending")
        await mq.publish(event("sequence.step_sent", "done", {"step": 0, "provider_message_id": "p0"}))
        await wait_for(lambda: _state_is(pg, "done", "completed"), what="done: completed")
        await wait_for(lambda: _state_is(pg, "going", "waiting"), what="going: waiting")
        await wait_for(lambda: all_published(pg), what="outbox drained")


async def test_a_change_that_treats_a_recorded_history_differently_is_reported_with_its_diff(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    await record_done_and_going(settings, pg)
    report = await compat.check_definition(pg, RELEASE_2, "sequence", 2, sample=None, ended_too=True)
    assert len(report.checked) == 2
    [bad] = report.diverged
    assert bad.key.entity_id == "done" and bad.divergence is not None
    text = bad.divergence.text(bad.key, bad.against)
    assert "v2 against v1 diverges at step 3, sequence.step_sent" in text, text
    assert "state: completed -> confirming" in text, text
    assert "timers set: [] -> ['confirm_due']" in text, text
    assert "1 diverging" in report.lines()[-1]

    same = await compat.check_definition(pg, RELEASE_2, "sequence", 1, sample=None, ended_too=True)
    assert same.diverged == [] and sum(c.steps for c in same.checked) == 4  # done: 3 steps, going: 1 (enrolled)
    in_flight = await compat.check_definition(pg, RELEASE_2, "sequence", 2, sample=None)
    assert [c.key.entity_id for c in in_flight.checked] == ["going"] and in_flight.diverged == []


async def test_migrate_instances_dry_run_says_which_instances_the_migration_would_break(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    await record_done_and_going(settings, pg)
    report = await versions.migrate_instances(pg, RELEASE_2, "sequence", 1, 2, dry_run=True)
    assert [(r.entity_id, r.outcome, r.replay) for r in report.results] == [("going", "migrated", None)]
    # An in-flight instance whose history v2 would treat differently: `done`, brought back to life by hand.
    await pg.execute("UPDATE sfworkflow.instance SET terminal = false WHERE entity_id = 'done'")
    report = await versions.migrate_instances(pg, RELEASE_2, "sequence", 1, 2, {"completed": "waiting"}, dry_run=True)
    broken = {r.entity_id: r.replay for r in report.results if r.replay}
    assert list(broken) == ["done"] and "state: completed -> confirming" in (broken["done"] or "")
    assert "would break 1" in report.summary()[0]
