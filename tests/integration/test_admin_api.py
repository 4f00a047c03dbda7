"""The admin HTTP API under /v1/, against the running service, PostgreSQL and RabbitMQ (and schemathesis)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from typing import Any

import aiohttp
import asyncpg
import pytest

from sfworkflow.contract.topology import EVENTS_EXCHANGE, SCHEDULES_EXCHANGE
from sfworkflow.core.schedules import NIL_TENANT
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS
from tests.conftest import wait_for
from tests.integration.test_check_definition import record_done_and_going
from tests.support import TENANT, Amqp, enrolled_data, event, running_service, state_of
from tests.unit.test_versions import V2

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COMMANDS = "sfworkflow.commands.sequence"


def _on(settings: Settings) -> Settings:
    return dataclasses.replace(settings, admin_token=TOKEN)


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, *, headers: dict[str, str] | None = AUTH, **kw: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.request(method, url, headers=headers, **kw) as r:
        body = await r.json(content_type=None) if r.content_type == "application/json" else await r.text()
        return r.status, body, r.headers


async def _age_state(pg: asyncpg.Connection, entity: str, minutes: int) -> None:
    """Time passes: the instance entered its state `minutes` ago (it is stuck: its command went unanswered)."""
    await pg.execute(
        "UPDATE sfworkflow.instance SET state_entered_at = now() - make_interval(mins => $2) WHERE entity_id = $1",
        entity,
        minutes,
    )


async def _sending(pg: asyncpg.Connection, entity: str) -> bool:
    return await state_of(pg, entity) == "sending"


# ---- on, off, tokens ------------------------------------------------------------------------------------------
async def test_without_a_token_configured_every_v1_route_is_404_saying_how_to_turn_it_on(settings: Settings) -> None:
    async with running_service(settings) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}"
        for method, path in [
            ("GET", "/v1/instances"), ("GET", "/v1/openapi.json"), ("POST", "/v1/replay"), ("GET", "/v1/nope"),
            ("GET", f"/v1/instances/{TENANT}/sequence/x"), ("GET", "/v1/definitions"),
        ]:  # fmt: skip
            status, body, _ = await _call(http, method, base + path)
            assert status == 404, (method, path)
            assert body["error"] == "admin_api_off"
            assert "SFWORKFLOW_ADMIN_TOKEN" in body["message"] and "Bearer" in body["message"]
        assert (await _call(http, "GET", base + "/healthz"))[0] == 200  # the rest of the HTTP surface is unchanged


async def test_a_missing_or_wrong_token_is_401_with_www_authenticate(settings: Settings) -> None:
    async with running_service(_on(settings)) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}"
        for headers in [
            None, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN},
        ]:  # fmt: skip
            for method, path in [("GET", "/v1/instances"), ("POST", "/v1/replay"), ("GET", "/v1/nope")]:
                status, body, h = await _call(http, method, base + path, headers=headers)
                assert status == 401, (headers, path)
                assert h["WWW-Authenticate"].startswith("Bearer")
                assert body["error"] in ("unauthorized", "invalid_token") and TOKEN not in body["message"]
        # the OpenAPI document needs no token; the scheme is case-insensitive
        status, doc, _ = await _call(http, "GET", base + "/v1/openapi.json", headers=None)
        assert status == 200 and doc["openapi"].startswith("3.")
        assert (await _call(http, "GET", base + "/v1/instances", headers={"Authorization": f"bearer {TOKEN}"}))[
            0
        ] == 200


def test_the_token_is_never_in_the_settings_repr_and_a_short_one_is_refused() -> None:
    s = Settings.from_env({"SFWORKFLOW_ADMIN_TOKEN": TOKEN})
    assert s.admin_token == TOKEN and TOKEN not in repr(s)
    with pytest.raises(ValueError, match="at least 16") as err:
        Settings.from_env({"SFWORKFLOW_ADMIN_TOKEN": "short"})
    assert "short" not in str(err.value).split("too short")[1]  # the message never echoes the value


# ---- each route, on a real instance ----------------------------------------------------------------------------
async def test_routes_on_a_real_instance_then_dry_run_and_real_replay_of_it_stuck(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with (
        running_service(_on(settings)) as service,
        Amqp(settings.amqp_url) as mq,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{service.http_port}/v1"
        await mq.publish(event("sequence.enrolled", "api-1", enrolled_data(steps=1)))
        first = await wait_for(lambda: mq.drain_json(COMMANDS), what="the first send_step")
        await wait_for(lambda: _sending(pg, "api-1"), what="api-1 sending")
        ref = f"{TENANT}/sequence/api-1"

        # list, filtered
        status, page, _ = await _call(http, "GET", f"{base}/instances")
        assert status == 200 and page["next"] is None
        [item] = page["items"]
        assert (item["instance"], item["state"], item["terminal"], item["workflow"]) == (
            ref,
            "sending",
            False,
            "sequence",
        )
        query = f"workflow=sequence&tenant={TENANT.upper()}&state=sending&terminal=false"
        assert [i["entity_id"] for i in (await _call(http, "GET", f"{base}/instances?{query}"))[1]["items"]] == [
            "api-1"
        ]
        for q in ("terminal=true", "workflow=prospecting", "state=completed", "tenant=" + "0" * 8 + TENANT[8:]):
            assert (await _call(http, "GET", f"{base}/instances?{q}"))[1]["items"] == [], q

        # one instance with history, timers, outbox (bodies) and parked events
        status, one, _ = await _call(http, "GET", f"{base}/instances/{ref}")
        assert status == 200
        assert one["instance"]["state"] == "sending" and one["instance"]["entity_id"] == "api-1"
        assert [h["to_state"] for h in one["history"]][-1] == "sending"
        [cmd] = [o for o in one["outbox"] if o["kind"] == "command"]
        assert cmd["body"]["idempotency_key"] == first[0]["idempotency_key"] and cmd["body"]["attempt"] == 1
        assert one["timers"] == [] and one["parked"] == []
        status, body, _ = await _call(http, "GET", f"{base}/instances/{TENANT}/sequence/nobody")
        assert status == 404 and body["error"] == "not_found" and "nobody" in body["message"]

        # not stuck yet; then stuck (20 minutes without an answer to its command)
        assert (await _call(http, "GET", f"{base}/stuck"))[1] == {"items": [], "count": 0}
        await _age_state(pg, "api-1", 20)
        status, stuck, _ = await _call(http, "GET", f"{base}/stuck?workflow=sequence&tenant={TENANT}&older_than=1m")
        assert status == 200 and stuck["count"] == 1
        [s] = stuck["items"]
        assert (s["instance"], s["why"], s["pending_command"], s["attempt"]) == (
            ref,
            "no_progress",
            "sequence.send_step",
            1,
        )
        assert s["replay"]["action"] == "reissue_command"
        assert (await _call(http, "GET", f"{base}/stuck?older_than=1h"))[1]["count"] == 0  # stuck for 5 min only
        assert (await _call(http, "GET", f"{base}/stuck?older_than=2w"))[1]["count"] == 0  # weeks, as the CLI

        # dry run: the plan, nothing done
        outbox_before = await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox")
        status, dry, _ = await _call(
            http, "POST", f"{base}/replay", json={"instance": ref, "dry_run": True, "reason": "worker hung"}
        )
        assert status == 200 and dry["dry_run"] is True and dry["ok"] is True
        assert [(r["instance"], r["action"], r["status"]) for r in dry["results"]] == [
            (ref, "reissue_command", "planned")
        ]
        assert dry["summary"] == {"matched": 1, "planned": 1, "done": 0, "skipped": 0, "failed": 0}
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox") == outbox_before
        status, all_dry, _ = await _call(
            http, "POST", f"{base}/replay",
            json={"all_stuck": True, "workflow": "sequence", "tenant": TENANT, "dry_run": True, "reason": "check"},
        )  # fmt: skip
        assert status == 200 and [r["instance"] for r in all_dry["results"]] == [ref]

        # for real: the same command again, same idempotency key, attempt 2, recorded in the history
        status, done, _ = await _call(
            http, "POST", f"{base}/replay", json={"instance": ref, "reason": "worker hung", "by": "oncall"}
        )
        assert status == 200 and done["ok"] is True, done
        assert [(r["action"], r["status"]) for r in done["results"]] == [("reissue_command", "done")]
        again = await wait_for(lambda: mq.drain_json(COMMANDS), what="the re-issued send_step")
        assert len(again) == 1
        assert again[0]["idempotency_key"] == first[0]["idempotency_key"] and again[0]["attempt"] == 2
        [h] = await pg.fetch("SELECT detail FROM sfworkflow.history WHERE outcome = 'replayed'")
        assert (h["detail"]["by"], h["detail"]["reason"], h["detail"]["action"]) == (
            "oncall", "worker hung", "reissue_command",
        )  # fmt: skip
        # once per stuck episode: a second replay finds nothing to do
        status, twice, _ = await _call(http, "POST", f"{base}/replay", json={"instance": ref, "reason": "again"})
        assert status == 200 and twice["summary"]["matched"] == 0 and "nothing to replay" in twice["message"]
        status, body, _ = await _call(
            http, "POST", f"{base}/replay", json={"instance": f"{TENANT}/sequence/nobody", "reason": "x"}
        )
        assert status == 404 and body["error"] == "not_found"

        # the instance finishes after the replayed command is answered
        await mq.publish(event("sequence.step_sent", "api-1", {"step": 0, "attempt": 2, "provider_message_id": "p"}))
        await wait_for(lambda: _state_is(pg, "api-1", "completed"), what="completed after the replay")
        page = (await _call(http, "GET", f"{base}/instances?terminal=true"))[1]
        assert [i["entity_id"] for i in page["items"]] == ["api-1"]


async def test_replay_of_a_named_instance_not_stuck_explains_it_and_force_replays_it_now(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with (
        running_service(_on(settings)) as service,
        Amqp(settings.amqp_url) as mq,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{service.http_port}/v1"
        await mq.publish(event("sequence.enrolled", "api-2", enrolled_data(steps=1)))
        first = await wait_for(lambda: mq.drain_json(COMMANDS), what="the first send_step")
        await wait_for(lambda: _sending(pg, "api-2"), what="api-2 sending")
        ref = f"{TENANT}/sequence/api-2"

        status, body, _ = await _call(http, "POST", f"{base}/replay", json={"instance": ref, "reason": "check"})
        assert status == 200 and body["summary"]["matched"] == 0 and body["results"] == [], body
        e = body["explanation"]
        assert (e["instance"], e["state"], e["stuck"], e["kind"]) == (ref, "sending", False, "no_progress")
        assert e["rule"].startswith("counts as stuck 15m after entering sending (at ") and e["stuck_at"]
        assert e["replay"]["action"] == "reissue_command" and "attempt 2" in e["replay"]["detail"]
        assert "not stuck yet" in body["message"] and "force" in body["message"]

        status, dry, _ = await _call(
            http, "POST", f"{base}/replay", json={"instance": ref, "reason": "now", "force": True, "dry_run": True}
        )
        assert status == 200, dry
        [planned] = dry["results"]
        assert (planned["action"], planned["status"], planned["forced"]) == ("reissue_command", "planned", True)
        status, done, _ = await _call(
            http, "POST", f"{base}/replay", json={"instance": ref, "reason": "now", "force": True, "by": "oncall"}
        )
        assert status == 200 and [(r["status"], r["forced"]) for r in done["results"]] == [("done", True)], done
        again = await wait_for(lambda: mq.drain_json(COMMANDS), what="the forced re-issue")
        assert [(c["idempotency_key"], c["attempt"]) for c in again] == [(first[0]["idempotency_key"], 2)]
        [h] = await pg.fetch("SELECT detail FROM sfworkflow.history WHERE outcome = 'replayed'")
        assert (h["detail"]["forced"], h["detail"]["by"]) == (True, "oncall")

        status, body, _ = await _call(
            http, "POST", f"{base}/replay", json={"all_stuck": True, "force": True, "reason": "x"}
        )
        assert status == 400 and "force" in body["message"]


async def _state_is(pg: asyncpg.Connection, entity: str, state: str) -> bool:
    return await state_of(pg, entity) == state


async def test_definitions_with_their_diagrams(settings: Settings) -> None:
    async with running_service(_on(settings)) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}/v1"
        status, listed, _ = await _call(http, "GET", f"{base}/definitions")
        assert status == 200
        loaded = {(d["workflow"], d["version"]) for d in listed["items"]}
        assert loaded == set(service.engine.compiled)
        status, d, _ = await _call(http, "GET", f"{base}/definitions/sequence")
        assert status == 200 and d["version"] == service.engine.latest["sequence"]
        assert "sending" in d["states"] and "completed" in d["terminal"]
        assert "sequence.enrolled" in d["events"] and "sequence.send_step" in d["commands"]
        assert isinstance(d["compensations"], list) and d["transitions"]
        assert d["diagram"]["mermaid"].startswith("stateDiagram-v2") and "sending" in d["diagram"]["mermaid"]
        assert d["diagram"]["dot"].startswith("digraph")
        status, v1, _ = await _call(http, "GET", f"{base}/definitions/sequence?version={d['versions'][0]}")
        assert status == 200 and v1["version"] == d["versions"][0]
        assert (await _call(http, "GET", f"{base}/definitions/nope"))[0] == 404
        assert (await _call(http, "GET", f"{base}/definitions/sequence?version=999"))[0] == 404


# ---- definition-change safety (tests/integration/test_check_definition.py, through the API) ---------------------


async def test_a_definition_check_reports_the_recorded_histories_a_version_would_treat_differently(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    await record_done_and_going(_on(settings), pg)
    history_before = await pg.fetchval("SELECT count(*) FROM sfworkflow.history")
    # a release that loads sequence v2 (the last send now goes to `confirming`) beside v1
    async with (
        running_service(_on(settings), definitions=(*DEFINITIONS, V2)) as service,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{service.http_port}/v1/definitions/sequence/check"
        status, report, _ = await _call(http, "GET", base, params={"version": "2", "ended": "true", "all": "true"})
        assert status == 200, report
        assert (report["workflow"], report["version"], report["instances"], report["diverging"]) == (
            "sequence", 2, 2, 1,
        ), report  # fmt: skip
        assert report["steps"] == 4 and report["partial"] == []  # done: 3 steps, going: 1 (enrolled)
        [bad] = report["divergences"]
        assert bad["instance"] == f"{TENANT}/sequence/done" and bad["against"] == "v2 against v1", bad
        assert (bad["step"], bad["event_type"]) == (3, "sequence.step_sent") and isinstance(bad["seq"], int), bad
        assert "state: completed -> confirming" in bad["diff"], bad
        assert "timers set: [] -> ['confirm_due']" in bad["diff"], bad
        assert bad["text"].startswith(f"{TENANT}/sequence/done: v2 against v1 diverges at step 3, sequence.step_sent")
        assert "state: completed -> confirming" in bad["text"]

        # the default version is the latest loaded (2); in flight only by default: `going` has not reached its last send
        status, in_flight, _ = await _call(http, "GET", base, params={"sample": "10"})
        assert status == 200 and (in_flight["version"], in_flight["instances"], in_flight["diverging"]) == (2, 1, 0)
        status, same, _ = await _call(http, "GET", base, params={"version": "1", "ended": "true", "since": "1h"})
        assert status == 200 and (same["instances"], same["diverging"], same["divergences"]) == (2, 0, []), same
        status, none, _ = await _call(http, "GET", base, params={"ended": "true", "since": "0s"})
        assert status == 200 and none["instances"] == 0, none  # changed within no time at all: none

        # bad parameters: 400 saying what to give
        for query, code, words in [
            ({"version": "9"}, "not_loaded", "no version 9"),
            ({"sample": "0"}, "bad_request", "sample"),
            ({"sample": "5", "all": "true"}, "bad_request", "not both"),
            ({"since": "soon"}, "bad_request", "since"),
            ({"version": "0"}, "bad_request", "version"),
            ({"ended": "yes"}, "bad_request", "ended"),
        ]:
            status, body, _ = await _call(http, "GET", base, params=query)
            assert status == 400 and body["error"] == code and words in body["message"], (query, body)
        status, body, _ = await _call(http, "GET", f"{base.replace('/sequence/', '/nope/')}")
        assert status == 400 and body["error"] == "not_loaded" and "'nope'" in body["message"], body
        assert (await _call(http, "GET", base, headers=None))[0] == 401
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.history") == history_before  # read-only


async def test_pagination_with_limit_and_after(settings: Settings, pg: asyncpg.Connection) -> None:
    entities = [f"page-{i}" for i in range(5)]
    async with (
        running_service(_on(settings)) as service,
        Amqp(settings.amqp_url) as mq,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{service.http_port}/v1"
        for entity in entities:
            await mq.publish(event("sequence.enrolled", entity, enrolled_data(steps=1)))
        await wait_for(lambda: pg.fetchval("SELECT count(*) = 5 FROM sfworkflow.instance"), what="five instances")
        seen: list[int] = []
        pages = []
        url = f"{base}/instances?workflow=sequence&limit=2"
        cursor = None
        while True:
            status, page, _ = await _call(http, "GET", url + (f"&after={cursor}" if cursor is not None else ""))
            assert status == 200
            pages.append(len(page["items"]))
            seen += [i["id"] for i in page["items"]]
            cursor = page["next"]
            if cursor is None:
                break
            assert cursor == page["items"][-1]["id"]
        assert pages == [2, 2, 1]
        assert seen == sorted(seen) and len(set(seen)) == 5
        # exactly a page's worth: the last full page says there is no next one
        status, page, _ = await _call(http, "GET", f"{base}/instances?limit=5")
        assert len(page["items"]) == 5 and page["next"] is None
        assert (await _call(http, "GET", f"{base}/instances?after={seen[-1]}"))[1] == {"items": [], "next": None}


async def test_bad_parameters_are_400_with_a_clear_message(settings: Settings) -> None:
    async with running_service(_on(settings)) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}/v1"
        bad_gets = {
            "/instances?limit=0": "limit", "/instances?limit=501": "limit", "/instances?limit=abc": "limit",
            "/instances?limit=1&limit=2": "limit", "/instances?tenant=not-a-uuid": "tenant",
            "/instances?workflow=a%20b": "workflow", "/instances?state=": "state",
            "/instances?terminal=yes": "terminal",
            "/instances?after=-1": "after", "/instances?after=99999999999999999999": "after",
            "/stuck?older_than=soon": "older_than", "/stuck?older_than=5y": "older_than", "/stuck?limit=9999": "limit",
            "/instances/not-a-uuid/sequence/x": "tenant", f"/instances/{TENANT}/no%20such/x": "workflow",
            f"/instances/{TENANT}/sequence/{'x' * 201}": "entity", "/definitions/sequence?version=0": "version",
            "/definitions/sequence?version=v1": "version", "/definitions/a-b": "workflow",
        }  # fmt: skip
        for path, name in bad_gets.items():
            status, body, _ = await _call(http, "GET", base + path)
            assert status == 400, path
            assert body["error"] == "bad_request" and name in body["message"], (path, body)
        ref = f"{TENANT}/sequence/x"
        bad_posts: list[tuple[Any, str]] = [
            ("not json", "not JSON"), ([], "JSON object"), ({}, "exactly one"), ({"reason": "x"}, "exactly one"),
            ({"instance": ref, "all_stuck": True, "reason": "x"}, "exactly one"),
            ({"all_stuck": True}, "reason"), ({"all_stuck": True, "reason": ""}, "reason"),
            ({"all_stuck": True, "reason": "   "}, "reason"), ({"all_stuck": True, "reason": "a\x00b"}, "reason"),
            ({"all_stuck": True, "reason": "x" * 501}, "reason"), ({"all_stuck": False, "reason": "x"}, "all_stuck"),
            ({"all_stuck": True, "reason": "x", "limit": 0}, "limit"),
            ({"all_stuck": True, "reason": "x", "limit": True}, "limit"),
            ({"all_stuck": True, "reason": "x", "tenant": "nope"}, "tenant"),
            ({"all_stuck": True, "reason": "x", "older_than": 30}, "older_than"),
            ({"all_stuck": True, "reason": "x", "dry_run": "yes"}, "dry_run"),
            ({"all_stuck": True, "reason": "x", "by": ""}, "by"),
            ({"all_stuck": True, "reason": "x", "bogus": 1}, "bogus"),
            ({"instance": ref, "reason": "x", "workflow": "sequence"}, "workflow"),
            ({"instance": "sequence/x", "reason": "x"}, "instance"),
            ({"instance": f"{TENANT}/sequence/", "reason": "x"}, "instance"),
        ]  # fmt: skip
        for payload, word in bad_posts:
            kw = {"data": payload} if isinstance(payload, str) else {"json": payload}
            status, body, _ = await _call(http, "POST", f"{base}/replay", **kw)
            assert status == 400, payload
            assert body["error"] == "bad_request" and word in body["message"], (payload, body)
        # unknown routes and methods: JSON too
        status, body, _ = await _call(http, "GET", f"{base}/nope")
        assert status == 404 and body["error"] == "not_found"
        status, body, headers = await _call(http, "DELETE", f"{base}/instances")
        assert status == 405 and body["error"] == "method_not_allowed" and "GET" in headers["Allow"]
        status, body, _ = await _call(http, "POST", f"{base}/replay", data=b"{" + b" " * 70_000 + b"}")
        assert status == 413 and body["error"] == "too_large"


# ---- schedules -----------------------------------------------------------------------------------------------------
DAILY_REPORT = {
    "tenant": TENANT, "name": "daily-report", "kind": "tick", "event_type": "salesflow.daily_report",
    "cron": "0 8 * * *", "timezone": "Asia/Riyadh", "jitter_s": 60, "reason": "SalesFlow's beat job", "by": "oncall",
}  # fmt: skip
SELF_IMPROVEMENT = {
    "tenant": TENANT.upper(), "name": "self-improvement", "kind": "event",
    "event_type": "self_improvement.cycle_started", "entity_id": "cycle-{tick}", "data": {"requested_by": "scheduler"},
    "every_s": 900, "catch_up": "skip", "description": "a cycle every 15 minutes", "reason": "SalesFlow's beat job",
}  # fmt: skip


async def _api_schedules(pg: asyncpg.Connection) -> list[str]:
    return [r["name"] for r in await pg.fetch("SELECT name FROM sfworkflow.schedule WHERE source = 'api' ORDER BY 1")]


async def test_schedules_are_added_listed_paused_resumed_triggered_once_per_request_and_deleted(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(_on(settings)) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}/v1/schedules"
        status, body, _ = await _call(http, "GET", base)  # the code-declared ones, under the nil tenant
        assert status == 200 and {(r["name"], r["tenant"], r["source"]) for r in body["items"]} >= {
            ("sequence.tick", NIL_TENANT, "code"), ("follow_up.scan", NIL_TENANT, "code"),
        }, body  # fmt: skip

        status, tick, _ = await _call(http, "POST", base, json=DAILY_REPORT)
        assert status == 201, tick
        assert (tick["tenant"], tick["name"], tick["kind"], tick["event_type"], tick["source"]) == (
            TENANT, "daily-report", "tick", "salesflow.daily_report", "api",
        )  # fmt: skip
        assert (tick["cron"], tick["every_s"], tick["timezone"], tick["jitter_s"], tick["paused"]) == (
            "0 8 * * *", None, "Asia/Riyadh", 60.0, False,
        )  # fmt: skip
        assert tick["next_tick_at"].endswith("T05:00:00+00:00"), tick  # 08:00 in Riyadh (UTC+3, no DST)
        assert (tick["updated_by"], tick["reason"], tick["fired"], tick["last_tick_at"]) == (
            "oncall", "SalesFlow's beat job", 0, None,
        )  # fmt: skip
        status, ev, _ = await _call(http, "POST", base, json=SELF_IMPROVEMENT)
        assert status == 201, ev
        assert (ev["tenant"], ev["kind"], ev["entity_id"], ev["data"], ev["every_s"], ev["cron"]) == (
            TENANT, "event", "cycle-{tick}", {"requested_by": "scheduler"}, 900, None,
        )  # fmt: skip
        assert (ev["catch_up"], ev["timezone"], ev["updated_by"]) == ("skip", "UTC", "admin-api")  # the defaults
        assert await _api_schedules(pg) == ["daily-report", "self-improvement"]
        status, body, _ = await _call(http, "POST", base, json={**DAILY_REPORT, "cron": "0 9 * * *"})
        assert status == 409 and body["error"] == "already_exists" and "daily-report" in body["message"], body

        # list (all, one tenant's), get
        status, body, _ = await _call(http, "GET", base, params={"tenant": TENANT})
        assert status == 200 and [r["name"] for r in body["items"]] == ["daily-report", "self-improvement"], body
        status, body, _ = await _call(http, "GET", base)
        assert {"daily-report", "self-improvement", "sequence.tick"} <= {r["name"] for r in body["items"]}
        status, body, _ = await _call(http, "GET", f"{base}/daily-report", params={"tenant": TENANT})
        assert status == 200 and body == tick, body
        status, body, _ = await _call(http, "GET", f"{base}/daily-report")  # no tenant: the code-declared ones
        assert status == 404 and body["error"] == "not_found" and "code-declared" in body["message"], body
        status, body, _ = await _call(http, "GET", f"{base}/sequence.tick")
        assert status == 200 and (body["source"], body["tenant"], body["workflow"]) == ("code", NIL_TENANT, "sequence")

        # pause, resume
        pause = {"tenant": TENANT, "reason": "INC-12 eval backlog", "by": "oncall"}
        status, body, _ = await _call(http, "POST", f"{base}/self-improvement/pause", json=pause)
        assert status == 200 and (body["paused"], body["reason"], body["updated_by"]) == (
            True, "INC-12 eval backlog", "oncall",
        ), body  # fmt: skip
        assert await pg.fetchval("SELECT paused FROM sfworkflow.schedule WHERE name = 'self-improvement'") is True
        status, body, _ = await _call(http, "POST", f"{base}/self-improvement/pause", json={"tenant": TENANT})
        assert status == 400 and "reason" in body["message"], body
        status, body, _ = await _call(http, "POST", f"{base}/nope/pause", json=pause)
        assert status == 404 and body["error"] == "not_found", body
        status, body, _ = await _call(http, "POST", f"{base}/self-improvement/resume", json={**pause, "reason": "ok"})
        assert status == 200 and (body["paused"], body["reason"]) == (False, "ok"), body
        assert body["next_tick_at"] >= ev["next_tick_at"]

        # trigger: one extra tick per request id, whatever the retries
        req = {"tenant": TENANT, "request_id": "req-1"}
        status, first, _ = await _call(http, "POST", f"{base}/daily-report/trigger", json=req)
        assert status == 200 and first["queued"] is True, first
        assert (first["exchange"], first["routing_key"], first["request_id"], first["schedule"]) == (
            SCHEDULES_EXCHANGE, "salesflow.daily_report", "req-1", "daily-report",
        )  # fmt: skip
        status, again, _ = await _call(http, "POST", f"{base}/daily-report/trigger", json=req)
        assert status == 200 and again["queued"] is False and again["message_id"] == first["message_id"], again
        assert await pg.fetchval(
            "SELECT count(*) FROM sfworkflow.outbox WHERE kind = 'schedule' AND message_id = $1", first["message_id"]
        ) == 1  # fmt: skip
        status, body, _ = await _call(http, "GET", f"{base}/daily-report", params={"tenant": TENANT})
        assert body["fired"] == 1, body
        # an event schedule's tick starts an instance (the entity from its template)
        status, fired, _ = await _call(http, "POST", f"{base}/self-improvement/trigger", json={"tenant": TENANT})
        assert status == 200 and fired["queued"] is True and fired["request_id"], fired
        assert (fired["exchange"], fired["routing_key"]) == (EVENTS_EXCHANGE, "self_improvement.cycle_started")
        entity = await wait_for(
            lambda: pg.fetchval(
                "SELECT entity_id FROM sfworkflow.instance WHERE workflow = 'self_improvement' AND tenant_id = $1",
                TENANT,
            ),
            what="the cycle the triggered tick started",
        )
        assert entity.startswith("cycle-") and entity.endswith("Z"), entity
        status, body, _ = await _call(http, "POST", f"{base}/sequence.tick/trigger")  # no body: a code-declared one
        assert status == 200 and (body["tenant"], body["queued"]) == (NIL_TENANT, True), body
        status, body, _ = await _call(http, "POST", f"{base}/daily-report/trigger", json={"request_id": "r"})
        assert status == 404 and body["error"] == "not_found", body

        # delete: a code-declared schedule comes back at the next start, so it is refused
        status, body, _ = await _call(http, "DELETE", f"{base}/sequence.tick")
        assert status == 409 and body["error"] == "code_declared" and "pause it instead" in body["message"], body
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.schedule WHERE name = 'sequence.tick'") == 1
        status, body, _ = await _call(http, "DELETE", f"{base}/daily-report")  # no tenant: not among the code ones
        assert status == 404 and body["error"] == "not_found", body
        status, body, _ = await _call(http, "DELETE", f"{base}/daily-report", params={"tenant": TENANT})
        assert status == 200 and (body["name"], body["fired"]) == ("daily-report", 1), body
        assert await _api_schedules(pg) == ["self-improvement"]
        status, body, _ = await _call(http, "DELETE", f"{base}/daily-report", params={"tenant": TENANT})
        assert status == 404, body
        status, body, _ = await _call(http, "GET", f"{base}/daily-report", params={"tenant": TENANT})
        assert status == 404, body
        status, body, _ = await _call(http, "GET", base, headers=None)
        assert status == 401


async def test_a_schedule_the_loop_could_not_use_is_400_saying_why_and_nothing_is_stored(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    async with running_service(_on(settings)) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.http_port}/v1/schedules"
        bad: list[tuple[dict[str, Any], str, str]] = [
            ({**DAILY_REPORT, "cron": "61 8 * * *"}, "invalid_schedule", "is not a cron expression"),
            ({**DAILY_REPORT, "cron": "0 0 30 2 *"}, "invalid_schedule", "never ticks"),
            ({**DAILY_REPORT, "timezone": "Mars/Olympus_Mons"}, "invalid_schedule", "is not an IANA time zone"),
            ({**SELF_IMPROVEMENT, "event_type": "self_improvement.cycle_begun"}, "invalid_schedule",
             "is not an event this deployment's workflows take; known: "),
            ({**SELF_IMPROVEMENT, "data": {"requested_by": ""}}, "invalid_schedule",
             "data for self_improvement.cycle_started: "),
            ({**SELF_IMPROVEMENT, "data": {"asked_by": "me"}}, "invalid_schedule",
             "data for self_improvement.cycle_started: "),
            ({**SELF_IMPROVEMENT, "data": {"requested_by": "a\u0000b"}}, "invalid_schedule", "NUL"),
            ({k: v for k, v in SELF_IMPROVEMENT.items() if k != "entity_id"}, "invalid_schedule", "needs an entity id"),
            ({**SELF_IMPROVEMENT, "entity_id": "cycle-{when}"}, "invalid_schedule", "names {when}"),
            ({**DAILY_REPORT, "entity_id": "x"}, "invalid_schedule", "a tick has no entity id"),
            ({**DAILY_REPORT, "every_s": 60}, "bad_request", 'exactly one of "cron" and "every_s"'),
            ({**SELF_IMPROVEMENT, "every_s": 0}, "bad_request", '"every_s" must be an integer from 1 to'),
            ({**DAILY_REPORT, "name": "Daily Report"}, "bad_request", '"name" must be lower-case letters'),
            ({**DAILY_REPORT, "kind": "job"}, "bad_request", '"kind" must be one of "event", "tick"'),
            ({**DAILY_REPORT, "tenant": "nope"}, "bad_request", '"tenant" must be a UUID'),
            ({**DAILY_REPORT, "reason": "\u00a0"}, "bad_request", '"reason" must be text'),
            ({**DAILY_REPORT, "jitter_s": 3601}, "bad_request", '"jitter_s" must be a number from 0 to 3600'),
            ({**DAILY_REPORT, "catch_up": "some"}, "bad_request", '"catch_up" must be one of'),
            ({**DAILY_REPORT, "data": []}, "bad_request", '"data" must be a JSON object'),
            ({k: v for k, v in DAILY_REPORT.items() if k != "reason"}, "bad_request", '"reason" is required'),
        ]  # fmt: skip
        for payload, code, words in bad:
            status, body, _ = await _call(http, "POST", base, json=payload)
            assert status == 400, (payload, body)
            assert body["error"] == code and words in body["message"], (payload, body)
        assert await _api_schedules(pg) == []


# ---- schemathesis -----------------------------------------------------------------------------------------------
MAX_EXAMPLES = 25  # per operation and phase
DEADLINE_S = 180  # the whole run; past it the run is stopped and the test fails


def run_schemathesis(base: str) -> dict[str, Any]:
    """`schemathesis run` through its Python API: examples, coverage and fuzzing phases, every default check."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import Status, events, from_schema

    config = SchemathesisConfig.from_dict(
        {
            "seed": int(os.environ.get("SFWORKFLOW_TEST_SCHEMATHESIS_SEED", "4242")),
            "base-url": base,
            "headers": AUTH,
            "request-timeout": 10,
            "generation": {"max-examples": MAX_EXAMPLES},
            "phases": {"stateful": {"enabled": False}},
            # A new schedule's cron expression, time zone, event type and data are checked as the schedule loop will
            # use them: no schema says every one of those it cannot use, so a body the document calls valid may be a
            # 400 invalid_schedule naming what is wrong (every operation but the two below: a valid request is never a
            # 400).
            "operations": [
                {
                    "include-path": "/v1/schedules",
                    "include-method": "POST",
                    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "409"]}},
                },
                # A definition check names a workflow and a version the service must have loaded, and takes `sample`
                # or `all=true`, not both: a request the document calls valid may be a 400 not_loaded or bad_request.
                {
                    "include-path": "/v1/definitions/{workflow}/check",
                    "include-method": "GET",
                    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]}},
                },
            ],
        }
    )
    schema = schemathesis.openapi.from_url(f"{base}/v1/openapi.json", config=config)
    out: dict[str, Any] = {
        "operations": set(),
        "cases": 0,
        "checks": Counter(),
        "failures": [],
        "errors": [],
        "skipped": {},
    }
    deadline = time.monotonic() + DEADLINE_S
    stream = from_schema(schema).execute()
    for ev in stream:
        if time.monotonic() > deadline and "deadline" not in out:
            out["deadline"] = True
            stream.stop()
        if isinstance(ev, events.ScenarioFinished):
            if ev.status == Status.SKIP:
                out["skipped"][ev.label] = ev.skip_reason
            elif ev.label:
                out["operations"].add(ev.label)
            out["cases"] += len(ev.recorder.cases)
            for case_id, nodes in ev.recorder.checks.items():
                for node in nodes:
                    out["checks"][node.status.value] += 1
                    if node.status == Status.FAILURE:
                        case = ev.recorder.cases[case_id].value
                        info = node.failure_info
                        what = info.failure.title if info is not None else ""
                        detail = info.failure.message[:400] if info is not None else ""
                        out["failures"].append(
                            f"{node.name}: {what} ({case.method} {case.formatted_path} query={case.query!r} "
                            f"body={case.body!r:.300}) {detail}"
                        )
        elif isinstance(ev, events.NonFatalError):
            out["errors"].append(f"{ev.label}: {ev.info.format()[:600]}")
        elif isinstance(ev, events.FatalError):
            out["errors"].append(f"fatal: {ev.exception!r}")
        elif isinstance(ev, events.EngineFinished):
            out["stop_reason"] = ev.stop_reason.value
    return out


@pytest.mark.timeout(DEADLINE_S + 120)
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        pytest.skip("schemathesis is not installed: install the test extra (pip install -e '.[test]')")
    async with running_service(_on(settings)) as service, Amqp(settings.amqp_url) as mq:
        await mq.publish(event("sequence.enrolled", "fuzz-1", enrolled_data(steps=1)))
        await wait_for(lambda: _sending(pg, "fuzz-1"), what="a real instance to find")
        await _age_state(pg, "fuzz-1", 20)  # and a stuck one, for /v1/stuck and /v1/replay
        result = await asyncio.to_thread(run_schemathesis, f"http://127.0.0.1:{service.http_port}")
    print(
        f"schemathesis: {len(result['operations'])} operations, {result['cases']} cases, "
        f"checks {dict(result['checks'])}, skipped {result['skipped']}, stop: {result.get('stop_reason')}"
    )
    assert not result["errors"], "\n".join(result["errors"])
    assert not result["failures"], "\n".join(sorted(set(result["failures"])))
    # every operation but GET /v1/openapi.json, which schemathesis does not test (it is the schema it loaded)
    assert len(result["operations"]) >= 6 and result["cases"] >= 6 * 10
    assert result.get("stop_reason") == "completed"
