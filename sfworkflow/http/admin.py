"""The admin HTTP API under /v1/: instances, stuck instances, replay, rate limits, schedules, definitions (and the
definition-change check of ops/compat.py), and its OpenAPI document.

Off unless SFWORKFLOW_ADMIN_TOKEN is set: then every /v1/ route answers 404 saying how to turn it on.
On: every route but /v1/openapi.json wants `Authorization: Bearer <token>` (compared in constant time).
Every parameter and request body is checked against the API's own OpenAPI document (sfworkflow.http.openapi),
compiled once when the app is built (sfworkflow.http.validation); errors are JSON `{"error": code, "message":
text}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog
from aiohttp import web

from sfworkflow import db
from sfworkflow.contract.storable import clean_json
from sfworkflow.core.compat import Checked
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.diagrams import render
from sfworkflow.core.durations import parse_age
from sfworkflow.core.engine import CompiledWorkflow, Engine
from sfworkflow.core.stuck import Filters
from sfworkflow.db import operations
from sfworkflow.db import schedules as schedule_rows
from sfworkflow.errors import UsageError
from sfworkflow.http import openapi
from sfworkflow.http.validation import Checks, Invalid
from sfworkflow.ops import compat, limits, replay, schedules
from sfworkflow.ops.inspect import load_instance
from sfworkflow.ops.stuck import find_stuck

if TYPE_CHECKING:
    from sfworkflow.runtime.service import Service
else:
    Service = object

log = structlog.get_logger("sfworkflow.admin")

PREFIX = "/v1"
OPENAPI_PATH = "/v1/openapi.json"
SERVICE: web.AppKey[Service] = web.AppKey("sfworkflow_admin_service")
CHECKS: web.AppKey[Checks] = web.AppKey("sfworkflow_admin_checks")
ACQUIRE_TIMEOUT_S = 5.0  # seconds to wait for a PostgreSQL connection before answering 503
REALM = 'Bearer realm="sfworkflow-admin"'
OFF_MESSAGE = (
    "the admin API is off: set SFWORKFLOW_ADMIN_TOKEN to a secret of at least 16 characters (e.g. the output of "
    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) and restart the service, then send it as "
    "`Authorization: Bearer <token>`"
)


class ApiError(Exception):
    """An error answer: HTTP status, a machine-readable code, a sentence saying what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": code, "message": message}, status=status, headers=headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=str), status=status, content_type="application/json", headers=headers
    )


def mount(app: web.Application, service: Service) -> None:
    """Add the /v1/ routes and the middleware that guards them."""
    app[SERVICE] = service
    app[CHECKS] = Checks.from_document(openapi.document())  # compiled once, not per request
    app.middlewares.append(guard)
    app.router.add_get(OPENAPI_PATH, openapi_document)
    app.router.add_get(PREFIX + "/instances", list_instances)
    app.router.add_get(PREFIX + "/instances/{tenant}/{workflow}/{entity:[^/]+}", get_instance)
    app.router.add_get(PREFIX + "/stuck", list_stuck)
    app.router.add_post(PREFIX + "/replay", post_replay)
    app.router.add_get(PREFIX + "/limits", list_limits)
    app.router.add_get(PREFIX + "/limits/{tenant}", get_tenant_limits)
    app.router.add_put(PREFIX + "/limits/{tenant}", put_tenant_limit)
    app.router.add_delete(PREFIX + "/limits/{tenant}", delete_tenant_limit)
    app.router.add_get(PREFIX + "/schedules", list_schedules)
    app.router.add_post(PREFIX + "/schedules", post_schedule)
    app.router.add_get(PREFIX + "/schedules/{name}", get_schedule)
    app.router.add_delete(PREFIX + "/schedules/{name}", delete_schedule)
    app.router.add_post(PREFIX + "/schedules/{name}/pause", pause_schedule)
    app.router.add_post(PREFIX + "/schedules/{name}/resume", resume_schedule)
    app.router.add_post(PREFIX + "/schedules/{name}/trigger", trigger_schedule)
    app.router.add_get(PREFIX + "/definitions", list_definitions)
    app.router.add_get(PREFIX + "/definitions/{workflow}", get_definition)
    app.router.add_get(PREFIX + "/definitions/{workflow}/check", get_definition_check)


# ---- authentication and errors --------------------------------------------------------------------------------
def token_ok(header: str | None, token: str) -> bool:
    """The Authorization header carries `Bearer <token>`; compared in constant time (as fixed-size digests)."""
    if not header:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    a = hashlib.sha256(given.strip().encode("utf-8", "replace")).digest()
    b = hashlib.sha256(token.encode("utf-8", "replace")).digest()
    return hmac.compare_digest(a, b)


@web.middleware
async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    if request.path != PREFIX and not request.path.startswith(PREFIX + "/"):
        return await handler(request)
    token = request.app[SERVICE].settings.admin_token
    if not token:
        return error_response(404, "admin_api_off", OFF_MESSAGE)
    if request.path != OPENAPI_PATH:
        header = request.headers.get("Authorization")
        if not token_ok(header, token):
            if header:
                return error_response(
                    401, "invalid_token", "the bearer token is wrong",
                    {"WWW-Authenticate": REALM + ', error="invalid_token"'},
                )  # fmt: skip
            return error_response(
                401, "unauthorized", "send the admin token as `Authorization: Bearer <token>`",
                {"WWW-Authenticate": REALM},
            )  # fmt: skip
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except Invalid as exc:
        return error_response(400, "bad_request", exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code, message = {
            404: ("not_found", f"no route {request.method} {request.path}: see {OPENAPI_PATH}"),
            405: ("method_not_allowed", f"{request.method} is not allowed here; allowed: {exc.headers.get('Allow')}"),
            413: ("too_large", "the body is too large: a replay request is a small JSON object"),
        }.get(exc.status, ("http_error", exc.reason))
        return error_response(exc.status, code, message, headers)
    except Exception as exc:
        if db.is_connection_error(exc):
            log.warning("admin API: PostgreSQL unavailable", path=request.path, error=type(exc).__name__)
            return error_response(503, "store_unavailable", "PostgreSQL is not reachable; try again shortly")
        log.exception("admin API: internal error", path=request.path, error=type(exc).__name__)
        return error_response(500, "internal_error", f"{type(exc).__name__}; the service log has the details")


def _service(request: web.Request) -> Service:
    return request.app[SERVICE]


def _pool(request: web.Request) -> asyncpg.Pool:
    pool = _service(request).pool
    if pool is None:
        raise ApiError(503, "store_unavailable", "the service is still starting")
    return pool


def _engine(request: web.Request) -> Engine:
    return _service(request).engine


# ---- parameters ---------------------------------------------------------------------------------------------
def params(request: web.Request, operation_id: str) -> dict[str, Any]:
    """The operation's path and query parameters, checked against the document, with its defaults."""
    return request.app[CHECKS].params(operation_id, request.query, request.match_info)


def _lower(tenant: str | None) -> str | None:
    return None if tenant is None else tenant.lower()


# ---- handlers -----------------------------------------------------------------------------------------------
async def openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi.document())


async def list_instances(request: web.Request) -> web.Response:
    p = params(request, "listInstances")
    workflow, tenant, state, terminal = p.get("workflow"), _lower(p.get("tenant")), p.get("state"), p.get("terminal")
    limit, after = p["limit"], p["after"]
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        rows = await operations.list_instances_page(
            conn, workflow=workflow, tenant_id=tenant, state=state, terminal=terminal, after=after, limit=limit + 1
        )
    items = [
        {"id": r["id"], "instance": f"{r['tenant_id']}/{r['workflow']}/{r['entity_id']}", **dict(r)}
        for r in rows[:limit]
    ]
    return json_response({"items": items, "next": items[-1]["id"] if len(rows) > limit else None})


async def get_instance(request: web.Request) -> web.Response:
    p = params(request, "getInstance")
    tenant, workflow, entity = p["tenant"].lower(), p["workflow"], p["entity"]
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        found = await load_instance(conn, tenant, workflow, entity)
    if found is None:
        raise ApiError(404, "not_found", f"no instance {tenant}/{workflow}/{entity} and no parked event for it")
    return json_response({"history": [], "timers": [], "outbox": [], **found})


async def list_stuck(request: web.Request) -> web.Response:
    p = params(request, "listStuck")
    f = Filters(
        workflow=p.get("workflow"),
        tenant=_lower(p.get("tenant")),
        state=p.get("state"),
        older_than_s=parse_age(p["older_than"]),
        limit=p["limit"],
        default_after_s=_service(request).settings.stuck_after_s,
    )
    engine = _engine(request)
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        stuck = await find_stuck(conn, engine, f)
    items = []
    for s in stuck:
        plan = replay.plan_for(s, engine)
        items.append({**s.as_json(), "replay": {"action": plan.action, "detail": plan.detail}})
    return json_response({"items": items, "count": len(items)})


def replay_filters(body: dict[str, Any]) -> Filters:
    """The selection a checked replay body describes (as the CLI's --instance / --all-stuck and filters)."""
    older_than_s = parse_age(body["older_than"]) if "older_than" in body else 0.0
    if "instance" in body:
        tenant, workflow, entity = body["instance"].split("/", 2)
        return Filters(workflow, tenant.lower(), body.get("state"), entity, older_than_s, openapi.MAX_LIMIT)
    return Filters(
        workflow=body.get("workflow"),
        tenant=_lower(body.get("tenant")),
        state=body.get("state"),
        older_than_s=older_than_s,
        limit=int(body["limit"]),  # JSON Schema counts 113.0 as an integer
    )


async def _select(
    conn: asyncpg.Connection, engine: Engine, f: Filters, body: dict[str, Any], force: bool
) -> tuple[list[replay.Plan], replay.Named | None]:
    """The plans of a replay request; for one named instance also where it stands (as `sfworkflow replay`)."""
    if f.entity is None:
        return [replay.plan_for(s, engine) for s in await find_stuck(conn, engine, f)], None
    assert f.tenant is not None and f.workflow is not None
    named = await replay.select_instance(conn, engine, InstanceKey(f.tenant, f.workflow, f.entity), f, force)
    if named is None:
        raise ApiError(404, "not_found", f"no instance {body['instance']}")
    return named.plans, named


def _explanation(named: replay.Named) -> dict[str, Any]:
    return {**named.explanation.as_json(), "replay": {"action": named.plan.action, "detail": named.plan.detail}}


def _nothing_message(named: replay.Named | None) -> str:
    if named is None:
        return "nothing to replay: no stuck instance matches"
    hint = "; force: true does it now" if named.forceable else ""
    return f"nothing to replay: {named.explanation.summary()}; {named.explanation.rule.text}; {named.why_not}{hint}"


# ---- rate limits (ops/limits.py) ----------------------------------------------------------------------------
async def list_limits(request: web.Request) -> web.Response:
    params(request, "listLimits")
    engine = _engine(request)
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        found = {
            "limits": [d.as_json() for d in limits.declared(engine)],
            "concurrency": limits.declared_concurrency(engine),
            "overrides": await limits.overrides(conn),
        }
    return json_response(found)


async def get_tenant_limits(request: web.Request) -> web.Response:
    p = params(request, "getTenantLimits")
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        return json_response(await limits.tenant_view(conn, _engine(request), p["tenant"]))


async def put_tenant_limit(request: web.Request) -> web.Response:
    p = params(request, "setTenantLimit")
    body = request.app[CHECKS].body("setTenantLimit", await request.read())
    engine = _engine(request)
    try:
        limits.check_limit(engine, body["limit"])
    except UsageError as exc:
        raise ApiError(404, "unknown_limit", str(exc)) from None
    per_s = float(body["per_s"]) if "per_s" in body else None
    burst = int(body["burst"]) if "burst" in body else None
    slots = int(body["slots"]) if "slots" in body else None
    daily_cap = int(body["daily_cap"]) if "daily_cap" in body else None
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        try:
            row = await limits.set_override(
                conn, engine, p["tenant"], body["limit"], per_s, burst, body["reason"], body["by"], slots, daily_cap
            )
        except UsageError as exc:  # a rate for a concurrency limit, slots for a rate limit: no such limit of that kind
            raise ApiError(404, "wrong_kind_of_limit", str(exc)) from None
    log.info("limit override set", tenant_id=row["tenant"], limit=row["limit"], per_s=row["per_s"],
             burst=row["burst"], daily_cap=row["daily_cap"], slots=row["slots"], reason=row["reason"],
             by=row["updated_by"])  # fmt: skip
    return json_response(row)


async def delete_tenant_limit(request: web.Request) -> web.Response:
    p = params(request, "unsetTenantLimit")
    engine = _engine(request)
    try:
        limits.check_limit(engine, p["limit"])
    except UsageError as exc:
        raise ApiError(404, "unknown_limit", str(exc)) from None
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        row = await limits.unset_override(conn, engine, p["tenant"], p["limit"])
    if row is None:
        raise ApiError(404, "not_found", f"tenant {p['tenant']} has no override of {p['limit']}")
    log.info("rate limit override removed", tenant_id=row["tenant"], limit=row["limit"])
    return json_response(row)


# ---- schedules (ops/schedules.py) ------------------------------------------------------------------------------
# ops/schedules.py says what it refuses with a UsageError: a body it cannot use is a 400 (invalid_schedule), no such
# schedule a 404, anything else the schedule's state refuses (a taken name, a code-declared one deleted) a 409.
def _no_schedule(tenant: str | None, name: str) -> ApiError:
    whose = f"tenant {tenant}" if tenant else "the code-declared ones (no tenant)"
    return ApiError(404, "not_found", f"no schedule {name!r} among {whose}; GET {PREFIX}/schedules lists them")


async def _refused(conn: asyncpg.Connection, tenant: str | None, name: str, exc: UsageError, code: str) -> ApiError:
    """The answer to a UsageError of ops/schedules.py about the schedule `name`: 404 when it is not there, else 409."""
    if await schedule_rows.get(conn, schedules.check_tenant(tenant), name) is None:
        return _no_schedule(tenant, name)
    return ApiError(409, code, str(exc))


async def list_schedules(request: web.Request) -> web.Response:
    p = params(request, "listSchedules")
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        return json_response({"items": await schedules.list_(conn, _lower(p.get("tenant")))})


async def get_schedule(request: web.Request) -> web.Response:
    p = params(request, "getSchedule")
    tenant, name = _lower(p.get("tenant")), p["name"]
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        try:
            return json_response(await schedules.show(conn, tenant, name))
        except UsageError:
            raise _no_schedule(tenant, name) from None


async def post_schedule(request: web.Request) -> web.Response:
    body = request.app[CHECKS].body("addSchedule", await request.read())
    if clean_json(body["data"])[1]:  # a jsonb column holds neither
        raise ApiError(400, "invalid_schedule", '"data" holds a NUL character or an unpaired surrogate: remove it')
    try:
        s = schedules.build(
            _engine(request), tenant=body["tenant"], name=body["name"], kind=body["kind"],
            event_type=body["event_type"], entity_id=body.get("entity_id"), data=dict(body["data"]),
            cron=body.get("cron"), every_s=int(body["every_s"]) if "every_s" in body else None,
            timezone=body["timezone"], jitter_s=float(body["jitter_s"]), catch_up=body["catch_up"],
            max_catch_up=int(body["max_catch_up"]), description=body["description"],
        )  # fmt: skip
    except UsageError as exc:  # a cron expression, a zone, an event type or data it cannot use: nothing stored
        raise ApiError(400, "invalid_schedule", str(exc)) from None
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        try:
            row = await schedules.add(conn, s, body["by"], body["reason"])
        except UsageError as exc:  # the tenant has one of that name
            raise ApiError(409, "already_exists", str(exc)) from None
    log.info("schedule added", tenant_id=row["tenant"], schedule=row["name"], kind=row["kind"],
             event_type=row["event_type"], cron=row["cron"], every_s=row["every_s"], timezone=row["timezone"],
             reason=row["reason"], by=row["updated_by"])  # fmt: skip
    return json_response(row, status=201)


async def _pause_or_resume(request: web.Request, operation_id: str, paused: bool) -> web.Response:
    p = params(request, operation_id)
    body = request.app[CHECKS].body(operation_id, await request.read())
    tenant, name = _lower(body.get("tenant")), p["name"]
    change, code = (schedules.pause, "cannot_pause") if paused else (schedules.resume, "cannot_resume")
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        try:
            row = await change(conn, tenant, name, body["by"], body["reason"])
        except UsageError as exc:
            raise await _refused(conn, tenant, name, exc, code) from None
    log.info("schedule paused" if paused else "schedule resumed", tenant_id=row["tenant"], schedule=name,
             next_tick_at=row["next_tick_at"], reason=row["reason"], by=row["updated_by"])  # fmt: skip
    return json_response(row)


async def pause_schedule(request: web.Request) -> web.Response:
    return await _pause_or_resume(request, "pauseSchedule", True)


async def resume_schedule(request: web.Request) -> web.Response:
    return await _pause_or_resume(request, "resumeSchedule", False)


async def delete_schedule(request: web.Request) -> web.Response:
    p = params(request, "deleteSchedule")
    tenant, name = _lower(p.get("tenant")), p["name"]
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        try:
            row = await schedules.delete(conn, _engine(request), tenant, name)
        except UsageError as exc:  # not there, or declared by a definition (it would come back at the next start)
            raise await _refused(conn, tenant, name, exc, "code_declared") from None
    log.info("schedule deleted", tenant_id=row["tenant"], schedule=name)
    return json_response(row)


async def trigger_schedule(request: web.Request) -> web.Response:
    p = params(request, "triggerSchedule")
    body = request.app[CHECKS].body("triggerSchedule", await request.read() or b"{}")  # the body is optional
    tenant, name = _lower(body.get("tenant")), p["name"]
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        try:
            out = await schedules.trigger(conn, tenant, name, body.get("request_id"))
        except UsageError as exc:
            raise await _refused(conn, tenant, name, exc, "cannot_fire") from None
    log.info("schedule triggered", tenant_id=out["tenant"], schedule=name, request_id=out["request_id"],
             message_id=out["message_id"], queued=out["queued"])  # fmt: skip
    return json_response(out)


async def post_replay(request: web.Request) -> web.Response:
    body = request.app[CHECKS].body("replay", await request.read())  # a body over the app's limit: 413
    service, engine, pool = _service(request), _engine(request), _pool(request)
    f = dataclasses.replace(replay_filters(body), default_after_s=service.settings.stuck_after_s)
    dry_run, force, reason, by = body["dry_run"], body.get("force", False), body["reason"], body["by"]
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        plans, named = await _select(conn, engine, f, body, force)
    results: list[replay.Result] = []
    if dry_run:
        results = [replay.Result(p, "planned", p.detail) for p in plans]
    else:
        if service.store is None:
            raise ApiError(503, "store_unavailable", "the service is still starting")
        results = await replay.replay_all(pool, service.store, plans, reason, by)
        if results:
            log.info(
                "admin replay",
                by=by,
                reason=reason,
                instances=[r.plan.stuck.ref for r in results][:50],
                done=sum(r.status == "done" for r in results),
                failed=sum(r.status == "failed" for r in results),
                forced=sum(r.plan.forced for r in results),
            )
    summary = {k: sum(r.status == k for r in results) for k in ("planned", "done", "skipped", "failed")}
    summary["matched"] = len(plans)
    if not plans:
        message = _nothing_message(named)
    elif dry_run:
        message = f"dry run: {len(plans)} instance(s), nothing done"
    else:
        message = "summary: " + ", ".join(f"{k} {summary[k]}" for k in ("done", "skipped", "failed") if summary[k])
    answer: dict[str, Any] = {
        "dry_run": dry_run,
        "ok": summary["failed"] == 0,
        "results": [
            {
                "instance": r.plan.stuck.ref,
                "state": r.plan.stuck.state,
                "why": r.plan.stuck.why,
                "action": r.plan.action,
                "status": r.status,
                "message": r.message,
                "forced": r.plan.forced,
            }
            for r in results
        ],
        "summary": summary,
        "message": message,
    }
    if named is not None:
        answer["explanation"] = _explanation(named)
    return json_response(answer)


def _definition_summary(cw: CompiledWorkflow, latest: int) -> dict[str, Any]:
    d = cw.definition
    return {
        "workflow": d.name,
        "version": d.version,
        "latest": d.version == latest,
        "description": d.description,
        "initial": cw.initial,
        "states": [str(s.value) for s in d.states],
        "terminal": sorted(d.terminal),
    }


async def list_definitions(request: web.Request) -> web.Response:
    engine = _engine(request)
    items = [_definition_summary(cw, engine.latest[n]) for (n, _v), cw in sorted(engine.compiled.items())]
    return json_response({"items": items})


def describe(cw: CompiledWorkflow, engine: Engine) -> dict[str, Any]:
    d = cw.definition
    return {
        **_definition_summary(cw, engine.latest[d.name]),
        "latest_version": engine.latest[d.name],
        "versions": sorted(v for n, v in engine.compiled if n == d.name),
        "waits_for_operator": sorted(d.waits_for_operator),
        "events": sorted(d.event_type(e) for e in d.events),
        "start_events": sorted(d.event_type(e) for e in d.start_events),
        "internal_events": sorted(d.internal_events),
        "commands": sorted(d.event_type(c) for c in d.commands),
        "compensations": sorted(d.event_type(c) for c in d.compensations),
        "stuck_after_s": {str(k): v for k, v in d.stuck_after_s.items()},
        "retry": {"max_attempts": d.retry.max_attempts, "base_s": d.retry.base_s, "cap_s": d.retry.cap_s},
        "transitions": [
            {
                "trigger": row["trigger"],
                "source": list(row["source"]),
                "dest": row["dest"],
                "guards": [c.__name__ for c in row["conditions"]],
            }
            for row in cw.table
        ],
        "diagram": {"mermaid": render(cw, "mermaid"), "dot": render(cw, "dot")},
    }


async def get_definition(request: web.Request) -> web.Response:
    p = params(request, "getDefinition")
    name, version = p["workflow"], p.get("version")
    engine = _engine(request)
    if name not in engine.latest:
        raise ApiError(404, "not_found", f"no workflow {name!r} is loaded; loaded: {', '.join(sorted(engine.latest))}")
    cw = engine.workflow(name, version)
    if cw is None:
        loaded = sorted(v for n, v in engine.compiled if n == name)
        raise ApiError(404, "not_found", f"{name} v{version} is not loaded; loaded versions: {loaded}")
    return json_response(describe(cw, engine))


# ---- definition-change safety (ops/compat.py; `sfworkflow check-definition`) ------------------------------------
def _divergence(c: Checked) -> dict[str, Any]:
    d = c.divergence
    assert d is not None
    step = d.step
    return {
        "instance": str(c.key),
        "against": c.against,
        "step": None if step is None else d.index + 1,  # as its text says it: 1-based, none when no step parts
        "event_type": None if step is None else step.event_type,
        "seq": None if step is None else step.seq,
        "diff": list(d.lines),
        "text": d.text(c.key, c.against),
    }


def check_report(report: compat.CheckReport) -> dict[str, Any]:
    """A CheckReport as JSON: what `sfworkflow check-definition` prints (CheckReport.lines), item by item."""
    return {
        "workflow": report.workflow,
        "version": report.version,
        "instances": len(report.checked),
        "steps": sum(c.steps for c in report.checked),
        "diverging": len(report.diverged),
        "divergences": [_divergence(c) for c in report.diverged],
        "partial": [{"why": why, "instances": n} for why, n in report.partial()],
    }


async def get_definition_check(request: web.Request) -> web.Response:
    p = params(request, "checkDefinition")
    if p.get("all") and "sample" in p:
        raise ApiError(400, "bad_request", "give sample=K or all=true, not both")
    sample = None if p.get("all") else p.get("sample", openapi.DEFAULT_SAMPLE)
    since = None
    if "since" in p:
        try:
            age = parse_age(p["since"])
        except ValueError as exc:
            raise ApiError(400, "bad_request", f"since: {exc}") from None
        try:
            since = datetime.now(UTC) - timedelta(seconds=age)
        except OverflowError:  # further back than datetime reaches (thousands of years): every instance
            since = None
    engine = _engine(request)
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        try:
            report = await compat.check_definition(
                conn, engine, p["workflow"], p.get("version"), sample=sample, ended_too=p["ended"], since=since
            )
        except UsageError as exc:  # no such workflow or version loaded by this service (sample < 1: the document's)
            raise ApiError(400, "not_loaded", str(exc)) from None
    return json_response(check_report(report))
