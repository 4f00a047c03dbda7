"""Stuck instances and the replay tool, against the real service, PostgreSQL and RabbitMQ."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sfworkflow import db
from sfworkflow.cli import replay as replay_cmd
from sfworkflow.cli import stuck as stuck_cmd
from sfworkflow.cli.main import build_parser
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import Filters
from sfworkflow.db.repository import Store
from sfworkflow.ops import replay
from sfworkflow.ops.stuck import find_stuck
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS
from tests.conftest import wait_for
from tests.support import TENANT, Amqp, enrolled_data, event, running_service, state_of

ENGINE = Engine(DEFINITIONS)
COMMANDS = "sfworkflow.commands.sequence"


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


async def _age_state(pg: asyncpg.Connection, entity: str, minutes: int) -> None:
    """Time passes: the instance entered its state `minutes` ago."""
    await pg.execute(
        "UPDATE sfworkflow.instance SET state_entered_at = now() - make_interval(mins => $2) WHERE entity_id = $1",
        entity,
        minutes,
    )


async def _stuck(pg: asyncpg.Connection, **kw: object) -> list:
    return await find_stuck(pg, ENGINE, Filters(**kw))  # type: ignore[arg-type]


async def test_an_unanswered_command_is_stuck_and_replay_reissues_it_once(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "hung", enrolled_data(steps=1)))
        first = await wait_for(lambda: mq.drain_json(COMMANDS), what="the first send_step")
        assert await _stuck(pg) == []  # just issued: not stuck yet
        await _age_state(pg, "hung", 20)
        [s] = await _stuck(pg)
        assert (s.entity_id, s.state, s.why, s.pending_command, s.attempt) == (
            "hung", "sending", "no_progress", "sequence.send_step", 1,
        )  # fmt: skip
        assert await _stuck(pg, older_than_s=3600) == []  # stuck for 5 min, not an hour

        # the CLI commands: stuck as JSON, then a dry run that changes nothing
        outbox_before = await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox")
        capsys.readouterr()  # what the service logged so far
        assert await stuck_cmd.run(settings, _args("stuck", "--json")) == 0
        listed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [x["instance"] for x in listed] == [f"{TENANT}/sequence/hung"]
        assert await replay_cmd.run(settings, _args("replay", "--all-stuck", "--dry-run")) == 0
        assert "would reissue_command" in capsys.readouterr().out
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox") == outbox_before
        # two replays at once on the same selection: one re-issues, the other sees the version moved
        pool = await db.create_pool(settings.database_url, 2)
        try:
            store = Store(pool, ENGINE, 60)
            plan = replay.plan_for(s, ENGINE)
            results = await asyncio.gather(
                replay.execute(pool, store, plan, "worker hung", "oncall"),
                replay.execute(pool, store, plan, "worker hung", "oncall"),
            )
        finally:
            await pool.close()
        assert sorted(r.status for r in results) == ["done", "skipped"]
        again = await wait_for(lambda: mq.drain_json(COMMANDS), what="the re-issued send_step")
        assert len(again) == 1
        assert again[0]["idempotency_key"] == first[0]["idempotency_key"]
        assert again[0]["attempt"] == 2 and again[0]["command_id"] != first[0]["command_id"]
        assert await _stuck(pg) == []  # a new episode starts: not stuck again at once

        history = await pg.fetch(
            "SELECT outcome, detail FROM sfworkflow.history WHERE outcome = 'replayed' AND event_type = $1",
            "sequence.replayed",
        )
        assert len(history) == 1
        d = history[0]["detail"]
        assert (d["action"], d["by"], d["reason"], d["attempt"]) == ("reissue_command", "oncall", "worker hung", 2)

        await mq.publish(event("sequence.step_sent", "hung", {"step": 0, "attempt": 2, "provider_message_id": "p"}))
        await wait_for(lambda: _is(pg, "hung", "completed"), what="completed after the replay")


async def test_an_overdue_timer_is_stuck_and_replay_fires_it(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "late-timer", enrolled_data(steps=1, delay_s=3600)))
        await wait_for(lambda: _is(pg, "late-timer", "waiting"), what="waiting for its step")
    # the service is down; meanwhile the step fell due ten minutes ago and nobody fired it
    await pg.execute("UPDATE sfworkflow.timer SET due_at = now() - interval '10 minutes'")
    [s] = await _stuck(pg)
    assert (s.why, s.pending_timer) == ("timer_overdue", "step_due")
    pool = await db.create_pool(settings.database_url, 2)
    try:
        result = await replay.execute(pool, Store(pool, ENGINE, 60), replay.plan_for(s, ENGINE), "timers down", "me")
    finally:
        await pool.close()
    assert result.status == "done"
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await wait_for(lambda: mq.drain_json(COMMANDS), what="the step sent once the service runs again")


async def test_a_waiting_for_operator_state_is_stuck_and_replay_names_the_decision(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(
            event(
                "prospecting.started",
                "run-1",
                {"lead_id": "lead-1", "steps": ["qualification", "email_outreach"]},
            )
        )
        cmds = await wait_for(lambda: mq.drain_json("sfworkflow.commands.prospecting"), what="run_step")
        await mq.publish(event("prospecting.step_completed", "run-1", {"step": cmds[0]["data"]["step"], "attempt": 1}))
        await wait_for(
            lambda: pg.fetchval(
                "SELECT state = 'awaiting_approval' FROM sfworkflow.instance WHERE entity_id = 'run-1'"
            ),
            what="awaiting approval",
        )
    [s] = await _stuck(pg, workflow="prospecting")
    assert s.why == "operator"
    plan = replay.plan_for(s, ENGINE)
    assert plan.action == "needs_operator" and "prospecting.approval_granted" in plan.detail


async def _is(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    return await state_of(pg, entity) == state


# ---- replay --instance on an instance that is not stuck (yet) ---------------------------------------------------
async def test_replay_of_a_named_instance_not_stuck_explains_why_and_force_does_it_once(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{TENANT}/sequence/early"
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "early", enrolled_data(steps=1)))
        first = await wait_for(lambda: mq.drain_json(COMMANDS), what="the first send_step")
        await wait_for(lambda: _is(pg, "early", "sending"), what="sending")
        version = await pg.fetchval("SELECT version FROM sfworkflow.instance WHERE entity_id = 'early'")
        outbox_before = await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox")
        capsys.readouterr()

        # named, not stuck yet: an explanation (state, since, the rule and its moment, the plan), exit 3
        assert await replay_cmd.run(settings, _args("replay", "--instance", ref, "--reason", "check")) == 3
        out = capsys.readouterr().out
        assert "nothing to replay: no stuck instance matches" not in out
        assert f"{ref} is not stuck" in out and "in sending for" in out, out
        assert "counts as stuck 15m after entering sending (at 20" in out, out
        assert "reissue_command" in out and "attempt 2" in out and "--force" in out, out
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox") == outbox_before

        # --force --dry-run: what would be done, nothing done
        assert await replay_cmd.run(settings, _args("replay", "--instance", ref, "--force", "--dry-run")) == 0
        assert "would reissue_command" in capsys.readouterr().out
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox") == outbox_before

        # --force: done now, recorded as forced, the version bumped
        argv = ("replay", "--instance", ref, "--force", "--reason", "worker restarted", "--by", "oncall")
        assert await replay_cmd.run(settings, _args(*argv)) == 0
        assert "done" in capsys.readouterr().out
        again = await wait_for(lambda: mq.drain_json(COMMANDS), what="the forced re-issue")
        assert [(c["idempotency_key"], c["attempt"]) for c in again] == [(first[0]["idempotency_key"], 2)]
        [h] = await pg.fetch("SELECT detail FROM sfworkflow.history WHERE outcome = 'replayed'")
        assert (h["detail"]["action"], h["detail"]["forced"], h["detail"]["by"]) == ("reissue_command", True, "oncall")
        assert await pg.fetchval("SELECT version FROM sfworkflow.instance WHERE entity_id = 'early'") == version + 1

        # the same once-per-episode safety when forced: two replays of one selection, one does it
        async with pg_pool(settings) as pool:
            selected = await replay.select_instance(pool, ENGINE, _key("early"), Filters(), force=True)
            assert selected is not None and not selected.explanation.stuck
            [plan] = selected.plans
            assert plan.forced and plan.action == "reissue_command"
            store = Store(pool, ENGINE, 60)
            results = await asyncio.gather(
                replay.execute(pool, store, plan, "twice", "a"), replay.execute(pool, store, plan, "twice", "b")
            )
        assert sorted(r.status for r in results) == ["done", "skipped"]
        assert len(await wait_for(lambda: mq.drain_json(COMMANDS), what="one more re-issue")) == 1

    # an instance that does not exist: said so, exit 3; nothing stuck for --all-stuck: exit 3
    capsys.readouterr()
    assert await replay_cmd.run(settings, _args("replay", "--instance", f"{TENANT}/sequence/nobody")) == 3
    assert f"no instance {TENANT}/sequence/nobody" in capsys.readouterr().err
    assert await replay_cmd.run(settings, _args("replay", "--all-stuck")) == 3
    assert "no stuck instance matches" in capsys.readouterr().out


async def test_replay_of_a_named_instance_that_waits_for_a_person_or_ended_has_nothing_to_do(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "held", enrolled_data(steps=1, delay_s=3600)))
        await wait_for(lambda: _is(pg, "held", "waiting"), what="waiting for its step")
        await mq.publish(event("sequence.paused", "held", {}))
        await wait_for(lambda: _is(pg, "held", "paused"), what="paused")
        await mq.publish(event("sequence.enrolled", "done", enrolled_data(steps=1, delay_s=3600)))
        await wait_for(lambda: _is(pg, "done", "waiting"), what="waiting")
        await mq.publish(event("sequence.cancelled", "done", {}))
        await wait_for(lambda: _is(pg, "done", "cancelled"), what="cancelled")
    capsys.readouterr()
    paused = f"{TENANT}/sequence/held"
    assert await replay_cmd.run(settings, _args("replay", "--instance", paused, "--force", "--reason", "x")) == 3
    out = capsys.readouterr().out
    assert "never by age" in out and "sequence.resumed" in out, out
    ended = f"{TENANT}/sequence/done"
    assert await replay_cmd.run(settings, _args("replay", "--instance", ended, "--force", "--reason", "x")) == 3
    assert "has ended" in capsys.readouterr().out
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.history WHERE outcome = 'replayed'") == 0


def _key(entity: str) -> InstanceKey:
    return InstanceKey(TENANT, "sequence", entity)


@contextlib.asynccontextmanager
async def pg_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(settings.database_url, 2)
    try:
        yield pool
    finally:
        await pool.close()
