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

from sfworkflow.settings import Settings
from tests.conftest import PG_SERVER, wait_for
from tests.support import TENANT, Amqp, enrolled_data, event, running_service, state_of

REPO = Path(__file__).resolve().parents[2]


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
        assert "created the database" in first.stdout and "applied migrations [1, 2, 3]" in first.stdout
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
    assert missing.returncode == 1 and "no instance" in missing.stdout


async def _sending(pg: asyncpg.Connection, entity: str) -> bool:
    return await state_of(pg, entity) == "sending"
