"""A tenant's own rate for a limit, as an operator sets it at 3 a.m.: `sfworkflow limits` (a subprocess, as run from
a shell) and the admin API's /v1/limits, against PostgreSQL; the next batch takes its slots at the new rate."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from datetime import UTC, datetime, time, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson

from sfworkflow import db
from sfworkflow.db import outbox
from sfworkflow.settings import Settings
from tests.integration.storekit import delivery, direct_store
from tests.integration.test_admin_api import TOKEN, _call
from tests.integration.test_cli import _cli
from tests.support import OTHER_TENANT, TENANT, event, running_service

AGENT = "agent.run_task/per_tenant"
LIMIT = "sequence.send_step/per_sender"
ADDRESSES = itertools.count()


def enrollment(i: int, sender: str = "+15550100") -> dict[str, Any]:
    """A lead with an address of its own (the same template to the same address twice a day is one send)."""
    return {
        "sequence_id": "seq-ops",
        "lead_id": f"lead-{i}",
        "recipient": {"channel": "whatsapp", "address": f"+1777{next(ADDRESSES):07d}", "sender": sender},
        "steps": [{"template_id": "tpl-0", "delay_seconds": 0}],
    }


async def _sends(database_url: str, tenant: str, n: int, prefix: str, sender: str = "+15550100") -> list[float]:
    """Enroll `n` leads of `tenant` in one batch; how long each send was deferred past its batch, in order."""
    async with direct_store(database_url) as store:
        events = [event("sequence.enrolled", f"{prefix}-{i}", enrollment(i, sender), tenant=tenant) for i in range(n)]
        await store.apply_deliveries([delivery(e) for e in events])
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT o.created_at, o.deferred_until FROM sfworkflow.outbox o JOIN sfworkflow.instance i"
            " ON i.id = o.instance_id WHERE o.routing_key = 'sequence.send_step' AND i.entity_id LIKE $1 || '-%'"
            " ORDER BY o.id",
            prefix,
        )
    finally:
        await conn.close()
    return [round(((r["deferred_until"] or r["created_at"]) - r["created_at"]).total_seconds(), 3) for r in rows]


async def test_an_operator_raises_a_tenant_s_rate_from_the_shell_and_the_next_batch_takes_it(
    settings: Settings, database_url: str
) -> None:
    env = {"SFWORKFLOW_DATABASE_URL": database_url}
    listed = await asyncio.to_thread(_cli, "limits", "list", **env)
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if LIMIT in x)
    assert "50/s burst 50" in line and "(definition)" in line
    # The shipped rate: 50 at once, then one every 20 ms.
    assert (await _sends(database_url, TENANT, 52, "before"))[-3:] == [0.0, 0.02, 0.04]

    got = await asyncio.to_thread(
        _cli, "limits", "set", TENANT, LIMIT, "--per-s", "5", "--burst", "2", "--reason", "INC-42 provider quota",
        "--by", "oncall", **env,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert "is 5/s burst 2 from the next batch on (by oncall: INC-42 provider quota)" in got.stdout
    shown = await asyncio.to_thread(_cli, "limits", "show", TENANT, "--json", **env)
    view = orjson.loads(shown.stdout)
    (mine,) = [lim for lim in view["limits"] if lim["limit"] == LIMIT]
    assert mine["rate"] == {"per_s": 5.0, "burst": 2, "daily_cap": 100_000}  # the rate overridden, the cap kept
    assert mine["source"].startswith("override by oncall")
    assert mine["keys"] and mine["keys"][0]["key"] == "whatsapp:+15550100"
    # Another sender of the same tenant: a fresh key at the tenant's new rate; another tenant keeps the shipped one.
    new_sender = await _sends(database_url, TENANT, 4, "after", "+15550199")
    assert new_sender == [0.0, 0.0, 0.2, 0.4]
    assert await _sends(database_url, OTHER_TENANT, 4, "other") == [0.0, 0.0, 0.0, 0.0]

    removed = await asyncio.to_thread(_cli, "limits", "unset", TENANT, LIMIT, **env)
    assert removed.returncode == 0 and "was 5/s burst 2" in removed.stdout
    again = await asyncio.to_thread(_cli, "limits", "unset", TENANT, LIMIT, **env)
    assert again.returncode == 1 and "has no override" in again.stdout
    typo = await asyncio.to_thread(_cli, "limits", "set", TENANT, "sequence.send_step/per_sendr", "--per-s", "1",
                                   "--reason", "x", **env)  # fmt: skip
    assert typo.returncode == 2 and "declared: agent.run_task/per_tenant, sequence.send_step/per_sender" in typo.stderr
    bad = await asyncio.to_thread(_cli, "limits", "set", TENANT, LIMIT, "--per-s", "0", "--reason", "x", **env)
    assert bad.returncode == 2 and "per_s must be a number > 0" in bad.stderr

    # A concurrency limit takes slots, a rate limit a rate; each refuses the other's.
    slots = await asyncio.to_thread(_cli, "limits", "set", TENANT, AGENT, "--slots", "8", "--reason", "INC-9 plan",
                                    "--by", "oncall", **env)  # fmt: skip
    assert slots.returncode == 0 and f"{AGENT} for tenant {TENANT} is 8 slots" in slots.stdout, slots.stderr
    shown = await asyncio.to_thread(_cli, "limits", "show", TENANT, "--json", **env)
    (mine,) = orjson.loads(shown.stdout)["concurrency"]
    assert (mine["limit"], mine["slots"], mine["held"], mine["waiting"]) == (AGENT, 8, 0, 0)
    wrong = await asyncio.to_thread(_cli, "limits", "set", TENANT, AGENT, "--per-s", "3", "--reason", "x", **env)
    assert wrong.returncode == 2 and "is a concurrency limit: give its slots" in wrong.stderr
    wrong = await asyncio.to_thread(_cli, "limits", "set", TENANT, LIMIT, "--slots", "3", "--reason", "x", **env)
    assert wrong.returncode == 2 and "is a rate limit: give its rate" in wrong.stderr
    removed = await asyncio.to_thread(_cli, "limits", "unset", TENANT, AGENT, **env)
    assert removed.returncode == 0 and "was 8 slots" in removed.stdout


async def test_a_tenant_s_daily_cap_set_from_the_shell_sends_what_is_past_it_the_next_utc_day(
    settings: Settings, database_url: str
) -> None:
    env = {"SFWORKFLOW_DATABASE_URL": database_url}
    got = await asyncio.to_thread(
        _cli, "limits", "set", TENANT, LIMIT, "--daily-cap", "3", "--reason", "INC-11 number on tier 1", "--by",
        "oncall", **env,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert f"{LIMIT} for tenant {TENANT} is 3 a day from the next batch on" in got.stdout
    await _sends(database_url, TENANT, 5, "capped")
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT o.created_at, o.deferred_until, i.entity_id FROM sfworkflow.outbox o JOIN sfworkflow.instance i"
            " ON i.id = o.instance_id WHERE o.routing_key = 'sequence.send_step' AND i.entity_id LIKE 'capped-%'"
            " ORDER BY o.id"
        )
        causes = await conn.fetch(
            "SELECT h.detail FROM sfworkflow.history h JOIN sfworkflow.instance i ON i.id = h.instance_id"
            " WHERE h.outcome = 'deferred' AND i.entity_id LIKE 'capped-%'"
        )
    finally:
        await conn.close()
    batch_day = rows[0]["created_at"].astimezone(UTC).date()
    next_midnight = datetime.combine(batch_day + timedelta(days=1), time(), UTC)
    # Three today (the burst lets them go at once), the two past the cap at the next UTC midnight: one batch, one
    # clock, so this holds at any time of day.
    assert [r["deferred_until"] for r in rows] == [None, None, None, next_midnight, next_midnight]
    details = [orjson.loads(c["detail"]) if isinstance(c["detail"], str) else c["detail"] for c in causes]
    assert sorted((d["cause"], d["daily_cap"]) for d in details) == [("daily_cap", 3)] * 2
    shown = await asyncio.to_thread(_cli, "limits", "show", TENANT, **env)
    assert f"2 booked on {next_midnight.date()} (UTC)" in shown.stdout, shown.stdout
    assert "50/s burst 50, 3/day" in shown.stdout
    ref = f"{TENANT}/sequence/{rows[3]['entity_id']}"
    inspected = await asyncio.to_thread(_cli, "inspect", ref, **env)
    assert inspected.returncode == 0, inspected.stderr
    assert f"DEFERRED until {next_midnight:%Y-%m-%d} 00:00:00.000000 UTC by {LIMIT} (its daily cap of 3 reached" in (
        inspected.stdout
    ), inspected.stdout


async def test_the_admin_api_sets_shows_and_removes_a_tenant_s_override(settings: Settings) -> None:
    on = dataclasses.replace(settings, admin_token=TOKEN)
    async with running_service(on) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}/v1/limits"
        status, body, _ = await _call(http, "GET", base)
        assert status == 200 and [d["limit"] for d in body["limits"]] == [LIMIT] and body["overrides"] == []
        assert [(c["limit"], c["slots"]) for c in body["concurrency"]] == [(AGENT, 4)]
        put = {"limit": LIMIT, "per_s": 80, "burst": 160, "reason": "INC-7 number upgraded", "by": "oncall"}
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json=put)
        assert status == 200 and (body["per_s"], body["burst"], body["updated_by"]) == (80, 160, "oncall"), body
        status, body, _ = await _call(http, "GET", f"{base}/{TENANT}")
        assert status == 200 and body["limits"][0]["rate"] == {"per_s": 80.0, "burst": 160, "daily_cap": 100_000}
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={**put, "limit": "sequence.send_step/x"})
        assert status == 404 and body["error"] == "unknown_limit" and LIMIT in body["message"]
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={**put, "per_s": 0})
        assert status == 400 and body["error"] == "bad_request"
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={"limit": LIMIT, "per_s": 1})
        assert status == 400 and "reason" in body["message"]
        status, body, _ = await _call(http, "DELETE", f"{base}/{TENANT}")
        assert status == 400 and body["message"].startswith("limit is required"), body
        status, body, _ = await _call(http, "DELETE", f"{base}/{TENANT}", params={"limit": LIMIT})
        assert status == 200 and body["per_s"] == 80
        status, body, _ = await _call(http, "DELETE", f"{base}/{TENANT}", params={"limit": LIMIT})
        assert status == 404 and "no override" in body["message"]
        slots = {"limit": AGENT, "slots": 2, "reason": "INC-8 model quota", "by": "oncall"}
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json=slots)
        assert status == 200 and (body["slots"], body["per_s"]) == (2, None), body
        status, body, _ = await _call(http, "GET", f"{base}/{TENANT}")
        assert status == 200 and body["concurrency"][0]["slots"] == 2
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={**slots, "per_s": 1})
        assert status == 400 and body["error"] == "bad_request", body  # both kinds' numbers: the schema refuses it
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={**put, "limit": AGENT})
        assert status == 404 and body["error"] == "wrong_kind_of_limit" and "give its slots" in body["message"], body
        # A daily cap alone: the rate in force stays.
        cap = {"limit": LIMIT, "daily_cap": 500, "reason": "INC-10 tier 1 number", "by": "oncall"}
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json=cap)
        assert status == 200 and (body["daily_cap"], body["per_s"], body["burst"]) == (500, None, None), body
        status, body, _ = await _call(http, "GET", f"{base}/{TENANT}")
        assert status == 200 and body["limits"][0]["rate"] == {"per_s": 50.0, "burst": 50, "daily_cap": 500}
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={**cap, "daily_cap": 0})
        assert status == 400 and body["error"] == "bad_request", body
        # A rate set later keeps the tenant's own cap (and a cap its own rate): each half stays until replaced.
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={**put, "per_s": 60, "burst": 60})
        assert status == 200 and (body["per_s"], body["burst"], body["daily_cap"]) == (60, 60, 500), body
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={**cap, "daily_cap": 700})
        assert status == 200 and (body["per_s"], body["daily_cap"]) == (60, 700), body
        both = {**put, "per_s": 5, "daily_cap": 0}  # both halves given, one wrong: the error names it
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json=both)
        assert status == 400 and "daily_cap" in body["message"] and "exactly one" not in body["message"], body
        status, body, _ = await _call(http, "PUT", f"{base}/{TENANT}", json={**cap, "limit": AGENT})
        assert status == 404 and body["error"] == "wrong_kind_of_limit", body
        status, body, _ = await _call(http, "GET", base, headers=None)
        assert status == 401


async def test_messages_held_behind_a_deferred_send_do_not_stall_the_relay_s_claim(database_url: str) -> None:
    """A throttled tenant's leads end while their sends wait (cancelled): each end queues a workflow.completed that
    must wait behind its instance's deferred send. Those rows were due at once, so they filled the polling claim's
    window of 2 x limit candidates, were all dropped as held, and the claim returned nothing: every row only the
    polling claim publishes (deferred sends, retries, other tenants' rows) waited behind them. Now a row queued
    behind its instance's deferred one is deferred to that slot too (and left out of the backlog's age)."""
    async with direct_store(database_url) as store:
        conn = await asyncpg.connect(database_url)
        try:
            await db.init_connection(conn)
            await conn.execute(
                "INSERT INTO sfworkflow.limit_override VALUES ($1, $2, 0.01, 1, 'test', 'test')", TENANT, LIMIT
            )
            leads = [event("sequence.enrolled", f"held-{i}", enrollment(i)) for i in range(30)]
            await store.apply_deliveries([delivery(e) for e in leads])  # 1 send now, 29 deferred by 100 s each
            await store.apply_deliveries([delivery(event("sequence.cancelled", f"held-{i}", {})) for i in range(30)])
            other = event("sequence.enrolled", "other-0", enrollment(99), tenant=OTHER_TENANT)
            await store.apply_deliveries([delivery(other)])
            # Everything before the other tenant's rows is published (the relay took what it was handed).
            await conn.execute(
                "UPDATE sfworkflow.outbox SET published_at = now() WHERE deferred_until IS NULL"
                " AND instance_id IN (SELECT id FROM sfworkflow.instance WHERE tenant_id = $1)"
                " AND NOT EXISTS (SELECT 1 FROM sfworkflow.outbox e WHERE e.instance_id = outbox.instance_id"
                " AND e.id < outbox.id AND e.deferred_until IS NOT NULL)",
                TENANT,
            )
            async with conn.transaction():
                claimed = await outbox.claim_due(conn, 5)  # a window of 10 candidates
            assert claimed, "the claim found nothing to publish"
            others = await conn.fetchval(
                "SELECT count(*) FROM sfworkflow.outbox o JOIN sfworkflow.instance i ON i.id = o.instance_id"
                " WHERE i.tenant_id = $1 AND o.id = ANY($2::bigint[])",
                OTHER_TENANT, [r["id"] for r in claimed],
            )  # fmt: skip
            assert others >= 1, "the other tenant's due rows were not claimed"
            held = await conn.fetch(
                "SELECT o.deferred_until, o.next_attempt_at FROM sfworkflow.outbox o"
                " WHERE o.routing_key = 'workflow.completed.sequence' AND o.published_at IS NULL"
            )
            assert len(held) == 29 and all(r["deferred_until"] == r["next_attempt_at"] for r in held)
            backlog = await outbox.backlog(conn)
            assert backlog["oldest_s"] < 60 and backlog["deferred"] >= 58
        finally:
            await conn.close()
