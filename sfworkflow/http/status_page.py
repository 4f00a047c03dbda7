"""The read-only status page at `/`: server-rendered HTML, no script, no external asset, every value escaped.

At a glance, on top: events received per second and the lag (p50 and p99 of the event age at commit), from
this replica's own counters over about the last minute (core/rates.py: the difference against the snapshot
taken closest to a minute before; each replica counts only what it consumed), and the age of the oldest
unpublished outbox row (PostgreSQL: every replica's). Then instances by workflow and state, stuck instances
(why, since when, the pending command), dead letters by reason (outbox rows of kind `dead_letter` within the
retention period), the outbox backlog, the outbox rows the relay gave up, parked events, the schedules (when each
ticks, what it publishes, its next and last ticks, how many it fired and missed), and each loaded workflow's state
diagram: an inline SVG drawn on the server (core/svg.py, once per definition, in a thread at
the first view; the CSP allows no script), with its Mermaid source in a collapsed <details>. It needs no token:
it shows ids, states and counts, never a message body, a context or a schedule's data (no recipient address, no
personal data).
It refreshes itself every 10 s.
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

from sfworkflow.core import rates, svg
from sfworkflow.core.diagrams import render
from sfworkflow.core.stuck import Filters, StuckInstance
from sfworkflow.core.stuck import format_age as age
from sfworkflow.db import operations, outbox
from sfworkflow.http.admin import SERVICE
from sfworkflow.ops import replay, schedules
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
SCHEDULES_SHOWN = 100  # schedules listed at most
QUERY_TIMEOUT_S = 5.0
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_CACHE: web.AppKey[dict[str, Any]] = web.AppKey("sfworkflow_status_cache")
_RATES: web.AppKey[rates.Window] = web.AppKey("sfworkflow_status_rates")
_DIAGRAMS: web.AppKey[dict[tuple[str, int], str]] = web.AppKey("sfworkflow_status_diagrams")
_DRAWING: web.AppKey[asyncio.Lock] = web.AppKey("sfworkflow_status_drawing")  # the first views wait for one drawing
DIAGRAM_MIN_SCALE = 0.75  # a diagram wider than the page shrinks to this at most, then the page scrolls it
LAG_BAD_S = 10.0  # seconds of p99 lag shown in red
OUTBOX_BAD_S = 60.0  # seconds of age of the oldest unpublished outbox row shown in red

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
.card .s { color: #6b7383; font-size: 11px; }
.workflow { border-top: 1px solid #e8ebf0; padding: 8px 0 4px; }
.workflow h3 { font-size: 14px; margin: 0 0 6px; }
.diagram { overflow-x: auto; }
.diagram svg { display: block; width: 100%; height: auto; }
.legend span { margin-right: 14px; }
"""


def mount(app: web.Application, service: Service) -> None:
    app[SERVICE] = service
    app[_CACHE] = {}
    app[_RATES] = rates.Window(first=snapshot(service, time.monotonic()))
    app[_DIAGRAMS] = {}
    app[_DRAWING] = asyncio.Lock()
    app.router.add_get("/", status_page)


def snapshot(service: Service, at: float) -> rates.Snapshot:
    """This replica's counters now: events received (every workflow and outcome) and the event-age histogram."""
    m = service.metrics
    events = sum(s.value for f in m.events.collect() for s in f.samples if s.name.endswith("_total"))
    buckets = rates.merge_buckets(
        (float(s.labels["le"]), s.value) for f in m.event_age.collect() for s in f.samples if s.name.endswith("_bucket")
    )
    return rates.Snapshot(at, events, buckets)


def draw_diagrams(service: Service) -> dict[tuple[str, int], str]:
    """Every loaded workflow version's SVG (tens of milliseconds each the first time: the caller runs it in a
    thread; svg.svg keeps each drawing). One that fails is "" (logged): the page shows its Mermaid source."""
    drawn = {}
    for (name, version), cw in service.engine.compiled.items():
        try:
            drawn[(name, version)] = svg.svg(cw)
        except Exception:  # a layout bug must not take the status page down
            log.exception("status page: drawing a workflow diagram failed", workflow=name, version=version)
            drawn[(name, version)] = ""
    return drawn


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
            "schedules": await schedules.list_(conn),
        }


def _card_row(cards: list[tuple[str, str, str, str, str]]) -> str:
    """(id, value, label, class of the value, small print) per card."""
    return '<div class="cards">' + "".join(
        f'<div class="card" id="{e(key)}"><div class="v {cls}">{e(v)}</div><div class="l">{e(label)}</div>'
        + (f'<div class="s">{e(small)}</div>' if small else "") + "</div>"
        for key, v, label, cls, small in cards
    ) + "</div>"  # fmt: skip


def _glance(data: dict[str, Any], f: rates.Figures) -> str:
    """Events/s and lag from this replica's counters; the oldest unpublished outbox row from the database."""
    if f.span_s:
        span = f"this replica, {'since start: ' if f.since_first else ''}last {rates.format_span(f.span_s)}"
    else:
        span = "this replica: from the next view on"
    backlog = sum(r["n"] for r in data["backlog"])
    deferred = sum(r["deferred"] for r in data["backlog"])
    oldest = max((r["oldest_s"] for r in data["backlog"]), default=0.0)

    def lag(value: float | None) -> str:
        return rates.format_seconds(value, f.last_bound_s)

    cards = [
        ("events-per-s", rates.format_rate(f.events_per_s), "events/s received", "", f"{f.events:.0f} events · {span}"),
        ("lag-p50", lag(f.p50_s), "lag p50 (event age at commit)", "", span),
        ("lag-p99", lag(f.p99_s), "lag p99 (event age at commit)", "bad" if (f.p99_s or 0) > LAG_BAD_S else "", span),
        ("outbox-oldest", rates.format_seconds(oldest) if backlog else "none", "oldest unpublished outbox row",
         "bad" if oldest > OUTBOX_BAD_S else "",
         f"{backlog} unpublished · {deferred} deferred by a rate limit · all replicas"),
    ]  # fmt: skip
    return (
        f'<section id="glance"><h2>At a glance</h2>{_card_row(cards)}'
        '<p class="muted">Lag: from an event\'s timestamp (set by its producer) to the commit that recorded it. '
        "Events/s and lag come from this replica's own counters (each replica counts the events it consumed); "
        "the outbox from PostgreSQL.</p></section>"
    )


def _cards(data: dict[str, Any]) -> str:
    active = sum(r["n"] for r in data["by_state"] if not r["terminal"])
    ended = sum(r["n"] for r in data["by_state"] if r["terminal"])
    n_stuck = len(data["stuck"])
    dead = sum(r["n"] for r in data["dead"])
    backlog = sum(r["n"] for r in data["backlog"])
    oldest = max((r["oldest_s"] for r in data["backlog"]), default=0.0)
    cards = [
        ("active", f"{active}", "active instances", "", ""),
        ("ended", f"{ended}", "ended instances", "", ""),
        ("stuck-n", f"{STUCK_SHOWN}+" if n_stuck > STUCK_SHOWN else f"{n_stuck}", "stuck instances",
         "bad" if n_stuck else "ok", ""),
        ("dead", f"{dead}", "dead letters (retention)", "bad" if dead else "ok", ""),
        ("backlog", f"{backlog}", f"outbox backlog (oldest {age(oldest)})", "bad" if oldest > 60 else "", ""),
        ("given-up", f"{data['failed_total']}", "outbox rows given up", "bad" if data["failed_total"] else "ok", ""),
        ("parked", f"{data['parked']}", "parked events", "", ""),
    ]  # fmt: skip
    return _card_row(cards)


def _diagrams(service: Service, drawn: dict[tuple[str, int], str], stuck: list[StuckInstance]) -> str:
    """Each loaded workflow version: its SVG (scaled down to DIAGRAM_MIN_SCALE at most to fit), then its Mermaid;
    the heading says in which states instances are stuck."""
    stuck_in: dict[tuple[str, int], dict[str, int]] = {}
    for s in stuck:
        states = stuck_in.setdefault((s.workflow, s.definition_version), {})
        states[s.state] = states.get(s.state, 0) + 1
    out = []
    for (name, version), cw in sorted(service.engine.compiled.items()):
        latest = " (latest)" if service.engine.latest[name] == version else ""
        where = stuck_in.get((name, version), {})
        note = ", ".join(f"{st} ({n})" for st, n in sorted(where.items()))
        drawing = drawn.get((name, version), "")
        width = svg.width_of(drawing)
        picture = (
            f'<div class="diagram"><div style="width: clamp({width * DIAGRAM_MIN_SCALE:.0f}px, 100%, {width:.0f}px)">'
            f"{drawing}</div></div>"
            if drawing
            else '<p class="muted">The diagram could not be drawn (the log says why); its Mermaid source:</p>'
        )
        out.append(
            f'<div class="workflow" id="diagram-{e(name)}-v{e(version)}"><h3>{e(name)} v{e(version)}{latest}'
            + (f' <span class="pill bad">stuck in {e(note)}</span>' if note else "")
            + f"</h3>{picture}<details><summary>Mermaid source</summary><pre>{e(render(cw, 'mermaid'))}</pre>"
            "</details></div>"
        )
    return "".join(out)


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


SCHEDULE_HEAD = ["name", "tenant", "when (zone)", "publishes", "state", "next tick", "last tick", "fired", "missed"]


def _schedules(found: list[dict[str, Any]]) -> str:
    """Each schedule: whose, when it ticks, what it publishes, paused or not, its next and last ticks, its counts."""

    def at(t: datetime | None) -> str:
        return "-" if t is None else f"{e(t.strftime('%Y-%m-%d %H:%M:%S'))} UTC"

    rows = []
    for r in found[:SCHEDULES_SHOWN]:
        whose = (
            '<span class="muted">code</span>' if r["source"] == "code" else f'<span class="id">{e(r["tenant"])}</span>'
        )
        when = f"cron <code>{e(r['cron'])}</code>" if r["cron"] else f"every {e(r['every_s'])} s"
        paused = r["paused"]
        rows.append(
            [
                f'<span class="id">{e(r["name"])}</span>', whose,
                f'{when} <span class="muted">{e(r["timezone"])}</span>',
                f"{e(r['kind'])} <code>{e(r['event_type'])}</code>",
                '<span class="pill bad">paused</span>' if paused else '<span class="pill ok">active</span>',
                '<span class="muted">-</span>' if paused else at(r["next_tick_at"]), at(r["last_tick_at"]),
                e(r["fired"]), e(r["missed"]),
            ]
        )  # fmt: skip
    return table(SCHEDULE_HEAD, rows, {7, 8}, "no schedules")


def render_page(
    service: Service,
    data: dict[str, Any],
    health: dict[str, dict[str, Any]],
    glance: rates.Figures,
    drawn: dict[tuple[str, int], str],
) -> str:
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
        ["kind", "unpublished", "oldest", "deferred by a rate limit"],
        [
            [e(r["kind"]), e(r["n"]), e(age(r["oldest_s"]) if r["n"] else "-"), e(r["deferred"])]
            for r in data["backlog"]
        ],
        {1, 2, 3},
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
    diagrams = _diagrams(service, drawn, stuck)
    n_schedules = len(data["schedules"])
    first = f" (first {SCHEDULES_SHOWN} of {n_schedules} shown)" if n_schedules > SCHEDULES_SHOWN else ""
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
{_glance(data, glance)}
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
<section id="schedules"><h2>Schedules{e(first)}</h2>{_schedules(data["schedules"])}
<p class="muted">Each tick is fired once whatever the number of replicas; <code>sfworkflow schedules pause NAME
--reason TEXT</code> stops one (<code>--tenant T</code> for a tenant's), <code>resume</code> starts it again.</p>
</section>
<section id="diagrams"><h2>Workflow diagrams</h2>
<p class="muted legend"><span>● start</span><span><b>bold green</b>: initial state</span>
<span>double border: terminal</span><span>amber, dashed: waits for an operator</span>
<span>dashed box: a transition from any active state</span><span>↻ inside a box: keeps the state</span></p>
{diagrams}</section>
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
        data = await gather(service)
        drawn = request.app[_DIAGRAMS]
        async with request.app[_DRAWING]:  # the first view draws, in a thread (grandalf's layout is pure Python)
            if not drawn:
                drawn.update(await asyncio.to_thread(draw_diagrams, service))
        glance = request.app[_RATES].add(snapshot(service, time.monotonic()))
        html = render_page(service, data, health, glance, drawn)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, AssertionError) as exc:
        log.warning("status page: PostgreSQL unavailable", error=type(exc).__name__)
        text = unavailable_page(f"PostgreSQL is not reachable ({type(exc).__name__}); the page retries by itself.")
        return web.Response(text=text, status=503, content_type="text/html", charset="utf-8", headers=HEADERS)
    cache.update(at=time.monotonic(), html=html)
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers=HEADERS)
