"""The read-only status page at `/`: server-rendered HTML, no script, no external asset, every value escaped.

It shows instances by workflow and state, stuck instances (why, since when, the pending command), dead letters
by reason (outbox rows of kind `dead_letter` within the retention period), the outbox backlog, the outbox rows
the relay gave up, parked events, and each loaded workflow's diagram as Mermaid source. It needs no token: it
shows ids, states and counts, never a message body or a context (no recipient address, no personal data). It
refreshes itself every 10 s.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog
from aiohttp import web

from sfworkflow.core.diagrams import render
from sfworkflow.core.stuck import Filters, StuckInstance
from sfworkflow.core.stuck import format_age as age
from sfworkflow.db import operations, outbox
from sfworkflow.http.admin import SERVICE
from sfworkflow.ops import replay
from sfworkflow.ops.stuck import find_stuck

if TYPE_CHECKING:
    from sfworkflow.runtime.service import Service
else:
    Service = object

log = structlog.get_logger("sfworkflow.status_page")

REFRESH_S = 10  # seconds between the page's own reloads
CACHE_S = 3.0  # seconds one rendering is served to every viewer (bounds the load many open pages put on PostgreSQL)
STUCK_SHOWN = 50
FAILED_SHOWN = 50  # outbox rows given up listed at most
QUERY_TIMEOUT_S = 5.0
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_CACHE: web.AppKey[dict[str, Any]] = web.AppKey("sfworkflow_status_cache")

STYLE = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2430;
       background: #f4f6f9; }
header { background: #1d2430; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; color: #c7cedb; font-size: 13px; }
main { padding: 16px 24px 40px; max-width: 1400px; }
section { background: #fff; border: 1px solid #dde2ea; border-radius: 6px; padding: 12px 16px; margin: 0 0 16px; }
h2 { font-size: 16px; margin: 0 0 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #e8ebf0; vertical-align: top; }
th { background: #f0f2f6; font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, .id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 8px; overflow-x: auto; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 0 0 16px; }
.card { background: #fff; border: 1px solid #dde2ea; border-radius: 6px; padding: 10px 16px; min-width: 150px; }
.card .v { font-size: 26px; font-weight: 700; }
.card .l { color: #5b6577; font-size: 12px; }
.bad { color: #b42318; } .ok { color: #067647; } .muted { color: #6b7383; }
.pill { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; background: #eef1f5; }
.pill.bad { background: #fee4e2; } .pill.ok { background: #dcfae6; }
details summary { cursor: pointer; font-weight: 600; margin: 4px 0; }
"""


def mount(app: web.Application, service: Service) -> None:
    app[SERVICE] = service
    app[_CACHE] = {}
    app.router.add_get("/", status_page)


def e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def table(head: list[str], rows: list[list[str]], numeric: set[int] | None = None, empty: str = "none") -> str:
    """`rows` hold HTML already escaped by the caller."""
    numeric = numeric or set()
    if not rows:
        return f'<p class="muted">{e(empty)}</p>'
    th = "".join(f"<th{' class=num' if i in numeric else ''}>{e(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


async def gather(service: Service) -> dict[str, Any]:
    """Everything the page shows, read in one connection."""
    assert service.pool is not None
    async with asyncio.timeout(QUERY_TIMEOUT_S), service.pool.acquire() as conn:
        stuck = await find_stuck(conn, service.engine, Filters(limit=STUCK_SHOWN + 1))
        return {
            "by_state": await operations.instances_by_state_and_end(conn),
            "stuck": stuck,
            "dead": await operations.dead_letters_by_reason(conn, service.settings.retention_days * 86400.0),
            "backlog": await operations.outbox_backlog_by_kind(conn),
            "parked": await operations.parked_count(conn),
            "failed": await outbox.list_failed(conn, None, FAILED_SHOWN),
            "failed_total": await outbox.failed_count(conn),
        }


def _cards(data: dict[str, Any]) -> str:
    active = sum(r["n"] for r in data["by_state"] if not r["terminal"])
    ended = sum(r["n"] for r in data["by_state"] if r["terminal"])
    n_stuck = len(data["stuck"])
    dead = sum(r["n"] for r in data["dead"])
    backlog = sum(r["n"] for r in data["backlog"])
    oldest = max((r["oldest_s"] for r in data["backlog"]), default=0.0)
    cards = [
        (f"{active}", "active instances", ""),
        (f"{ended}", "ended instances", ""),
        (f"{STUCK_SHOWN}+" if n_stuck > STUCK_SHOWN else f"{n_stuck}", "stuck instances", "bad" if n_stuck else "ok"),
        (f"{dead}", "dead letters (retention)", "bad" if dead else "ok"),
        (f"{backlog}", f"outbox backlog (oldest {age(oldest)})", "bad" if oldest > 60 else ""),
        (f"{data['failed_total']}", "outbox rows given up", "bad" if data["failed_total"] else "ok"),
        (f"{data['parked']}", "parked events", ""),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v {cls}">{e(v)}</div><div class="l">{e(label)}</div></div>'
        for v, label, cls in cards
    ) + "</div>"  # fmt: skip


def _stuck_rows(stuck: list[StuckInstance], service: Service, now: datetime) -> list[list[str]]:
    rows = []
    for s in stuck[:STUCK_SHOWN]:
        plan = replay.plan_for(s, service.engine)
        command = e(s.pending_command or "-") + (
            f' <span class="muted">attempt {e(s.attempt)}</span>' if s.attempt else ""
        )
        rows.append(
            [
                e(s.workflow), f'<span class="id">{e(s.tenant_id)}</span>', f'<span class="id">{e(s.entity_id)}</span>',
                e(s.state), f'<span class="pill bad">{e(s.why)}</span><br><span class="muted">{e(s.detail)}</span>',
                f"{e(age((now - s.stuck_since).total_seconds()))}<br>"
                f'<span class="muted">{e(s.stuck_since.strftime("%Y-%m-%d %H:%M:%S"))} UTC</span>',
                command, e(plan.action),
            ]
        )  # fmt: skip
    return rows


def render_page(service: Service, data: dict[str, Any], health: dict[str, dict[str, Any]]) -> str:
    now = datetime.now(UTC)
    checks = " ".join(
        f'<span class="pill {"ok" if c["ok"] else "bad"}">{e(name)} {"ok" if c["ok"] else "down"}</span>'
        for name, c in health.items()
    )
    stuck = data["stuck"]
    more = f" (first {STUCK_SHOWN} shown)" if len(stuck) > STUCK_SHOWN else ""
    by_state = table(
        ["workflow", "state", "active / ended", "instances"],
        [
            [e(r["workflow"]), e(r["state"]), '<span class="muted">ended</span>' if r["terminal"] else "active",
             e(r["n"])]
            for r in data["by_state"]
        ],
        {3},
        "no instances yet",
    )  # fmt: skip
    dead = table(
        ["reason", "dead letters", "last"],
        [[e(r["reason"]), e(r["n"]), e(r["last"].strftime("%Y-%m-%d %H:%M:%S"))] for r in data["dead"]],
        {1},
        "no dead letters within the retention period",
    )
    backlog = table(
        ["kind", "unpublished", "oldest"],
        [[e(r["kind"]), e(r["n"]), e(age(r["oldest_s"]))] for r in data["backlog"]],
        {1, 2},
        "empty: every message is published",
    )
    failed = table(
        ["id", "kind", "routing key", "attempts", "last error", "given up"],
        [
            [e(r["id"]), e(r["kind"]), e(r["routing_key"]), e(r["publish_attempts"]), e(r["last_error"] or ""),
             e(r["failed_at"].strftime("%Y-%m-%d %H:%M:%S"))]
            for r in data["failed"]
        ],
        {0, 3},
        "none: the relay gave nothing up",
    )  # fmt: skip
    stuck_in = {(s.workflow, s.definition_version) for s in stuck}
    diagrams = "".join(  # open where something is stuck: the states it is stuck in, and the way out
        f"<details{' open' if (name, version) in stuck_in else ''}><summary>{e(name)} v{e(version)}"
        f"{' (latest)' if service.engine.latest[name] == version else ''}</summary>"
        f"<pre>{e(render(cw, 'mermaid'))}</pre></details>"
        for (name, version), cw in sorted(service.engine.compiled.items())
    )
    stuck_table = table(
        ["workflow", "tenant", "entity", "state", "why", "stuck for", "pending command", "replay would"],
        _stuck_rows(stuck, service, now),
        empty="nothing is stuck",
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sfworkflow status</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>sfworkflow status</h1>
<p>{e(now.strftime("%Y-%m-%d %H:%M:%S"))} UTC · refreshes every {REFRESH_S} s · {checks}</p></header>
<main>
{_cards(data)}
<section id="stuck"><h2>Stuck instances{e(more)}</h2>
{stuck_table}
<p class="muted">Fix: <code>sfworkflow replay --instance TENANT/WORKFLOW/ENTITY --dry-run --reason TEXT</code>,
then without <code>--dry-run</code>; details: <code>sfworkflow inspect TENANT/WORKFLOW/ENTITY</code>.</p></section>
<section id="instances"><h2>Instances by workflow and state</h2>{by_state}</section>
<section id="dead-letters"><h2>Dead letters by reason</h2>{dead}
<p class="muted">Within the retention period ({e(f"{service.settings.retention_days:g}")} days);
<code>sfworkflow dead-letters list</code> shows what is in sfworkflow.dead.</p></section>
<section id="outbox"><h2>Outbox backlog</h2>{backlog}</section>
<section id="outbox-failed"><h2>Outbox rows given up ({e(data["failed_total"])})</h2>{failed}
<p class="muted">The broker refused them SFWORKFLOW_RELAY_MAX_ATTEMPTS times (unroutable or nacked); fix the cause,
then <code>sfworkflow outbox republish --id ID</code> (or <code>--all</code>).</p></section>
<section id="diagrams"><h2>Workflow diagrams (Mermaid)</h2>{diagrams}</section>
</main>
</body>
</html>
"""


def unavailable_page(why: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>sfworkflow status: unavailable</title><style>{STYLE}</style></head>
<body><header><h1>sfworkflow status</h1><p>refreshes every {REFRESH_S} s</p></header>
<main><section><h2 class="bad">Status unavailable</h2><p>{e(why)}</p></section></main></body></html>
"""


async def status_page(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    cache = request.app[_CACHE]
    if cache.get("at", -1e9) > time.monotonic() - CACHE_S:
        return web.Response(text=cache["html"], content_type="text/html", charset="utf-8", headers=HEADERS)
    try:
        health = await service.readiness(2.0)
        html = render_page(service, await gather(service), health)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, AssertionError) as exc:
        log.warning("status page: PostgreSQL unavailable", error=type(exc).__name__)
        text = unavailable_page(f"PostgreSQL is not reachable ({type(exc).__name__}); the page retries by itself.")
        return web.Response(text=text, status=503, content_type="text/html", charset="utf-8", headers=HEADERS)
    cache.update(at=time.monotonic(), html=html)
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers=HEADERS)
