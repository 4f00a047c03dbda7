"""The operator CLI as an operator runs it: `sfworkflow migrate` and `sfworkflow inspect`, as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from sfworkflow.cli import main as cli
from sfworkflow.cli import versions as versions_cmd
from sfworkflow.db import migrate
from sfworkflow.settings import Settings, redact_url
from tests.conftest import PG_SERVER, wait_for
from tests.support import TENANT, Amqp, enrolled_data, event, running_service, state_of

REPO = Path(__file__).resolve().parents[2]
SFWORKFLOW = Path(sys.executable).parent / "sfworkflow"  # the installed entry point, as an operator runs it


def _cli(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")} | env
    return subprocess.run(
        [sys.executable, "-m", "sfworkflow", *argv], cwd=REPO, env=full, capture_output=True, text=True, timeout=60
    )


async def test_migrate_creates_the_database_and_is_idempotent() -> None:
    name = f"sfw_cli_{uuid.uuid4().hex[:10]}"
    url = f"{PG_SERVER}/{name}"
    try:
        first = await asyncio.to_thread(_cli, "migrate", SFWORKFLOW_DATABASE_URL=url)
        assert first.returncode == 0, first.stderr
        every = [v for v, _ in migrate.available()]  # 1, 2, ... as shipped under db/migrations/
        assert every[:6] == [1, 2, 3, 4, 5, 6]
        assert "created the database" in first.stdout and f"applied migrations {every}" in first.stdout
        second = await asyncio.to_thread(_cli, "migrate", SFWORKFLOW_DATABASE_URL=url)
        assert second.returncode == 0 and "schema is up to date" in second.stdout
    finally:
        conn = await asyncpg.connect(f"{PG_SERVER}/postgres")
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def test_inspect_shows_state_history_timers_and_outbox(settings: Settings, pg: asyncpg.Connection) -> None:
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "seen-1", enrolled_data(steps=2, delay_s=0)))
        await wait_for(lambda: _sending(pg, "seen-1"), what="sending")
        await wait_for(
            lambda: pg.fetchval("SELECT count(*) = 0 FROM sfworkflow.outbox WHERE published_at IS NULL"),
            what="published",
        )
    ref = f"{TENANT}/sequence/seen-1"
    text = await asyncio.to_thread(_cli, "inspect", ref, SFWORKFLOW_DATABASE_URL=settings.database_url)
    assert text.returncode == 0, text.stderr
    assert "state=sending" in text.stdout and "sequence.enrolled" in text.stdout
    assert "send_step" in text.stdout and "attempt=1" in text.stdout
    as_json = await asyncio.to_thread(_cli, "inspect", ref, "--json", SFWORKFLOW_DATABASE_URL=settings.database_url)
    doc = json.loads(as_json.stdout)
    assert doc["instance"]["state"] == "sending" and len(doc["history"]) == 2
    assert [o["kind"] for o in doc["outbox"]] == ["lifecycle", "command"]
    missing = await asyncio.to_thread(
        _cli, "inspect", f"{TENANT}/sequence/nope", SFWORKFLOW_DATABASE_URL=settings.database_url
    )
    assert (missing.returncode, missing.stdout) == (1, "") and "no instance" in missing.stderr


async def _sending(pg: asyncpg.Connection, entity: str) -> bool:
    return await state_of(pg, entity) == "sending"


# ---- filters naming an unknown workflow or state: a usage error naming the known ones ----------------------------
SEQUENCE_ONLY = "paused"  # a state of sequence and of no other workflow
ELSEWHERE = "awaiting_approval"  # a state of prospecting, not of sequence


UNKNOWN_FILTERS = [
    (["stuck", "--workflow", "sequense"], ["no workflow 'sequense'", "did you mean sequence?", "prospecting"], []),
    (["stuck", "--workflow", "zzz"], ["no workflow 'zzz'", "self_improvement, sequence"], ["did you mean"]),
    (["stuck", "--state", "sendng"], ["no state 'sendng' in any workflow", "did you mean sending?", ELSEWHERE], []),
    (
        ["stuck", "--workflow", "sequence", "--state", "sendng"],
        ["no state 'sendng' in workflow sequence", "did you mean sending?", SEQUENCE_ONLY],
        [ELSEWHERE],
    ),
    (["replay", "--all-stuck", "--workflow", "sequense"], ["no workflow 'sequense'", "did you mean sequence?"], []),
    (["replay", "--all-stuck", "--state", "sendng"], ["no state 'sendng'", "did you mean sending?"], []),
    (["replay", "--instance", f"{TENANT}/sequense/e"], ["no workflow 'sequense'", "did you mean sequence?"], []),
    (
        ["replay", "--instance", f"{TENANT}/sequence/e", "--state", "sendng"],
        ["no state 'sendng' in workflow sequence", "did you mean sending?"],
        [],
    ),
    (["parked", "list", "--workflow", "sequense"], ["no workflow 'sequense'", "did you mean sequence?"], []),
]


@pytest.mark.parametrize(
    ("argv", "words", "absent"),
    [pytest.param(*case, id=" ".join(case[0]).replace(TENANT, "T")) for case in UNKNOWN_FILTERS],
)
async def test_an_unknown_workflow_or_state_is_a_usage_error_naming_the_known_ones(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    words: list[str],
    absent: list[str],
) -> None:
    monkeypatch.setenv("SFWORKFLOW_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SFWORKFLOW_AMQP_URL", settings.amqp_url)
    monkeypatch.setenv("SFWORKFLOW_USE_UVLOOP", "false")
    rc = await asyncio.to_thread(cli.main, argv)
    out, err = capsys.readouterr()
    assert (rc, out) == (2, ""), (rc, out, err)
    [line] = err.splitlines()
    assert line.startswith(f"sfworkflow {argv[0]}: "), line
    for word in words:
        assert word in line, (word, line)
    for word in absent:
        assert word not in line, (word, line)


# ---- PostgreSQL or RabbitMQ unreachable: one line saying which, never a traceback or a password ------------------
PASSWORD = "pw-n0t-for-your-eyes"
DOWN_PG = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"  # nothing listens on port 1
DOWN_AMQP = f"amqp://guest:{PASSWORD}@127.0.0.1:1/"
# what cannot be reached, where (the URL without its password), and the setting to check
PG = ("PostgreSQL", redact_url(DOWN_PG), "SFWORKFLOW_DATABASE_URL")
MQ = ("RabbitMQ", redact_url(DOWN_AMQP), "SFWORKFLOW_AMQP_URL")
UNREACHABLE = [
    (["stuck"], PG),
    (["stuck", "--json"], PG),
    (["replay", "--all-stuck", "--dry-run"], PG),
    (["replay", "--instance", f"{TENANT}/sequence/e", "--reason", "x"], PG),
    (["inspect", f"{TENANT}/sequence/e"], PG),
    (["parked", "list"], PG),
    (["migrate"], PG),
    (["dead-letters", "list"], MQ),
    (["dead-letters", "show", "some-id"], MQ),
    (["dead-letters", "redrive", "--dry-run"], MQ),
    (["dead-letters", "purge", "--older-than", "7d"], MQ),
    (["worker", "--seconds", "1"], MQ),
]


def _entry_point(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")} | env
    return subprocess.run([str(SFWORKFLOW), *argv], env=full, capture_output=True, text=True, timeout=60)


async def test_every_command_says_in_one_line_which_service_it_cannot_reach() -> None:
    """The real `sfworkflow` entry point, PostgreSQL and RabbitMQ URLs pointing at a closed port. (`run` and `demo`
    wait for their dependencies first: tests/integration/test_security.py holds `run` to the same line.)"""
    env = {"SFWORKFLOW_DATABASE_URL": DOWN_PG, "SFWORKFLOW_AMQP_URL": DOWN_AMQP}
    runs = await asyncio.gather(*(asyncio.to_thread(_entry_point, argv, **env) for argv, _ in UNREACHABLE))
    for (argv, said), proc in zip(UNREACHABLE, runs, strict=True):
        command = " ".join(argv)
        assert proc.returncode == 1, (command, proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr and PASSWORD not in proc.stderr + proc.stdout, (command, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, (command, proc.stderr[-3000:])
        assert lines[0].startswith("sfworkflow: ") and all(w in lines[0] for w in said), (command, lines[0])


async def test_migrate_instances_says_in_one_line_that_it_cannot_reach_postgresql(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process: only a release with two versions of a workflow gets as far as connecting."""
    from tests.integration.test_versions import RELEASE_2

    monkeypatch.setattr(versions_cmd, "loaded_definitions", lambda: RELEASE_2)
    monkeypatch.setenv("SFWORKFLOW_DATABASE_URL", DOWN_PG)
    monkeypatch.setenv("SFWORKFLOW_AMQP_URL", DOWN_AMQP)
    argv = ["migrate-instances", "--workflow", "sequence", "--from", "1", "--to", "2", "--dry-run"]
    rc = await asyncio.to_thread(cli.main, argv)
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err and PASSWORD not in out + err, err[-3000:]
    [line] = err.splitlines()
    assert line.startswith("sfworkflow: ") and all(w in line for w in PG), line


async def test_a_refused_login_or_a_missing_database_is_one_line_saying_so(amqp_url: str) -> None:
    """Reachable, but unusable as configured: the line says what to fix instead of "is it running?"."""
    wrong = amqp_url.replace("guest:guest@", f"guest:{PASSWORD}@")
    assert wrong != amqp_url
    missing_db = f"{PG_SERVER}/sfw_no_such_db_{uuid.uuid4().hex[:8]}"
    login, database = await asyncio.gather(
        asyncio.to_thread(_entry_point, ["worker", "--seconds", "1"], SFWORKFLOW_AMQP_URL=wrong),
        asyncio.to_thread(_entry_point, ["stuck"], SFWORKFLOW_DATABASE_URL=missing_db),
    )
    for proc, words in (
        (login, ["RabbitMQ", redact_url(wrong), "refused the login", "SFWORKFLOW_AMQP_URL"]),
        (database, ["PostgreSQL", missing_db, "has no such database", "sfworkflow migrate"]),
    ):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert PASSWORD not in proc.stderr + proc.stdout
        [line] = proc.stderr.splitlines()
        assert all(w in line for w in words), (words, line)


async def test_no_progress_for_finds_what_a_hung_worker_left_before_the_definition_s_threshold(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    """`scripts/demo --hang 2` then `sfworkflow stuck --no-progress-for 5s`: a sequence waits 15 minutes in
    `sending` before its definition calls it stuck; the operator who knows the worker hung asks for less."""
    async with running_service(settings), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "hung-1", enrolled_data(steps=1)))
        await wait_for(lambda: _state_is(pg, "hung-1", "sending"), what="hung-1 sending")
    await pg.execute("UPDATE sfworkflow.instance SET state_entered_at = now() - interval '1 minute'")
    env = {"SFWORKFLOW_DATABASE_URL": settings.database_url, "SFWORKFLOW_AMQP_URL": settings.amqp_url}
    plain = await asyncio.to_thread(_entry_point, ["stuck"], **env)
    assert (plain.returncode, plain.stderr) == (0, "") and "hung-1" not in plain.stdout, plain.stdout
    asked = await asyncio.to_thread(_entry_point, ["stuck", "--no-progress-for", "30s"], **env)
    assert asked.returncode == 0 and "hung-1" in asked.stdout and "no_progress" in asked.stdout, asked
    replay = ["replay", "--all-stuck", "--no-progress-for", "30s", "--reason", "worker hung"]
    done = await asyncio.to_thread(_entry_point, replay, **env)
    assert done.returncode == 0 and "reissue_command" in done.stdout and "hung-1" in done.stdout, done
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.history WHERE outcome = 'replayed'") == 1


async def _state_is(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    return await state_of(pg, entity) == state


def test_schedules_next_prints_the_ticks_across_a_dst_change_and_refuses_what_cannot_tick() -> None:
    done = _cli("schedules", "next", "--cron", "30 2 * * *", "--tz", "Europe/Berlin", "--from", "2027-03-27T12:00:00Z",
                "--count", "2", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    ticks = json.loads(done.stdout)["ticks"]
    # 02:30 does not exist on 2027-03-28 in Berlin (02:00 -> 03:00): the next tick is the 29th, in summer time.
    assert [t["utc"] for t in ticks] == ["2027-03-29T00:30:00+00:00", "2027-03-30T00:30:00+00:00"]
    assert ticks[0]["local"] == "2027-03-29T02:30:00+02:00"
    bad = _cli("schedules", "next", "--cron", "0 8 * * *", "--tz", "Asia/Riyad")
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
    assert "'Asia/Riyad' is not an IANA time zone" in bad.stderr
