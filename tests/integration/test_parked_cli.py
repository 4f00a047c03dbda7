"""`sfworkflow parked list` against the real service and PostgreSQL."""

from __future__ import annotations

import json

import asyncpg
import pytest

from sfworkflow.cli.main import build_parser
from sfworkflow.cli.parked import EXPIRED, parked
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import quick, wait_state
from tests.support import OTHER_TENANT, TENANT, Amqp, enrolled_data, event, running_service


async def _cli(settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(["parked", "list", *argv])
    capsys.readouterr()
    rc = await parked(settings, args)
    return rc, capsys.readouterr().out


async def _parked_count(pg: asyncpg.Connection) -> int:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.parked")


async def test_parked_list_shows_a_parked_event_with_the_time_left(
    settings: Settings, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    early = event("sequence.step_sent", "waits", {"step": 1, "provider_message_id": "p1"})
    async with running_service(quick(settings, park_timeout_s=3600)), Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "waits", enrolled_data(steps=2)))
        await wait_state(pg, "waits", "sending")
        await mq.publish(early)
        await wait_for(lambda: _parked_count(pg), what="step_sent for step 1 parked")

    rc, out = await _cli(settings, capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "1 parked event(s), nearest deadline first"
    [row] = [line for line in lines if early["event_id"] in line]
    assert TENANT in row and "sequence" in row and "waits" in row and "sequence.step_sent" in row
    assert "59m" in row or "1h 00m" in row
    assert "not allowed yet" in row

    rc, out = await _cli(settings, capsys, "--json", "--workflow", "sequence", "--tenant", TENANT)
    [item] = json.loads(out)
    assert rc == 0
    assert (item["tenant_id"], item["workflow"], item["entity_id"]) == (TENANT, "sequence", "waits")
    assert (item["event_type"], item["event_id"], item["expired"]) == ("sequence.step_sent", early["event_id"], False)
    assert 3500 < item["seconds_left"] <= 3600
    assert item["deadline"] > item["parked_at"]

    assert json.loads((await _cli(settings, capsys, "--json", "--tenant", OTHER_TENANT))[1]) == []
    rc, out = await _cli(settings, capsys, "--workflow", "notification")
    assert rc == 0 and out.strip() == "no parked events for workflow notification"

    # Past its deadline (the service is stopped, so no sweep dead-letters it yet).
    await pg.execute("UPDATE sfworkflow.parked SET deadline = now() - interval '1 second'")
    rc, out = await _cli(settings, capsys)
    assert rc == 0 and EXPIRED in out
    [item] = json.loads((await _cli(settings, capsys, "--json"))[1])
    assert item["expired"] is True and item["time_left"] == EXPIRED


def test_parked_list_rejects_a_tenant_that_is_not_a_uuid(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["parked", "list", "--tenant", "acme"])
    assert "is not a tenant id" in capsys.readouterr().err
