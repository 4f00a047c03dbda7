"""The admin HTTP API under /v1/: instances, stuck instances, replay, definitions, and its OpenAPI document.

Off unless SFWORKFLOW_ADMIN_TOKEN is set: then every /v1/ route answers 404 saying how to turn it on.
On: every route but /v1/openapi.json wants `Authorization: Bearer <token>` (compared in constant time).
Every parameter is checked against the rules in `sfworkflow.openapi` (the document states the same rules);
errors are JSON `{"error": code, "message": text}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
import structlog
from aiohttp import web

from sfworkflow import db
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.diagrams import render
from sfworkflow.core.engine import CompiledWorkflow, Engine
from sfworkflow.http import openapi
from sfworkflow.ops import replay
from sfworkflow.ops.inspect import load_instance
from sfworkflow.ops.stuck import Filters, find_stuck, parse_age

if TYPE_CHECKING:
    from sfworkflow.runtime.service import Service
else:
    Service = object

log = structlog.get_logger("sfworkflow.admin")

PREFIX = "/v1"
OPENAPI_PATH = "/v1/openapi.json"
SERVICE: web.AppKey[Service] = web.AppKey("sfworkflow_admin_service")
ACQUIRE_TIMEOUT_S = 5.0  # seconds to wait for a PostgreSQL connection before answering 503
REALM = 'Bearer realm="sfworkflow-admin"'
OFF_MESSAGE = (
    "the admin API is off: set SFWORKFLOW_ADMIN_TOKEN to a secret of at least 16 characters (e.g. the output of "
    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) and restart the service, then send it as "
    "`Authorization: Bearer <token>`"
)

_LIST_INSTANCES = """
SELECT id, tenant_id, workflow, entity_id, definition_version, state, version, terminal, parked_count,
       last_event_type, created_at, updated_at, state_entered_at
FROM sfworkflow.instance
WHERE ($1::text IS NULL OR workflow = $1)
  AND ($2::uuid IS NULL OR tenant_id = $2)
  AND ($3::text IS NULL OR state = $3)
  AND ($4::boolean IS NULL OR terminal = $4)
  AND id > $5
ORDER BY id
LIMIT $6
"""
_REPLAY_KEYS = {
    "instance": {"instance", "state", "older_than", "dry_run", "force", "reason", "by"},
    "all_stuck": {"all_stuck", "workflow", "tenant", "state", "older_than", "limit", "dry_run", "reason", "by"},
}
_INT = re.compile(r"-?[0-9]{1,20}")


class ApiError(Exception):
    """An error answer: HTTP status, a machine-readable code, a sentence saying what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": code, "message": message}, status=status, headers=headers)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=str), status=status, content_type="application/json", headers=headers
    )


def mount(app: web.Application, service: Service) -> None:
    """Add the /v1/ routes and the middleware that guards them."""
    app[SERVICE] = service
    app.middlewares.append(guard)
    app.router.add_get(OPENAPI_PATH, openapi_document)
    app.router.add_get(PREFIX + "/instances", list_instances)
    app.router.add_get(PREFIX + "/instances/{tenant}/{workflow}/{entity:[^/]+}", get_instance)
    app.router.add_get(PREFIX + "/stuck", list_stuck)
    app.router.add_post(PREFIX + "/replay", post_replay)
    app.router.add_get(PREFIX + "/definitions", list_definitions)
    app.router.add_get(PREFIX + "/definitions/{workflow}", get_definition)


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
def _show(value: str) -> str:
    return repr(value[:60] + ("..." if len(value) > 60 else ""))


def _single(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise bad(f"{name} is given {len(values)} times: give it once")
    return values[0]


def check(name: str, value: str, pattern: str, max_length: int, what: str) -> str:
    if len(value) > max_length or not re.fullmatch(pattern, value):
        raise bad(f"{name}={_show(value)} is not valid: {what}")
    return value


def check_name(name: str, value: str) -> str:
    return check(name, value, openapi.NAME, 64, "a name of letters, digits and '_', at most 64 characters")


def check_tenant(name: str, value: str) -> str:
    return check(name, value, openapi.UUID, 36, "a UUID such as 3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00").lower()


def check_entity(name: str, value: str) -> str:
    return check(name, value, openapi.ENTITY, 200, "1 to 200 characters, no '/'")


def check_age(name: str, value: str) -> float:
    check(name, value, openapi.AGE, 16, "an age such as 90s, 30m, 12h, 7d or plain seconds")
    return parse_age(value)


def check_int(name: str, value: str, low: int, high: int) -> int:
    if not _INT.fullmatch(value) or not low <= int(value) <= high:
        raise bad(f"{name}={_show(value)} is not valid: an integer from {low} to {high}")
    return int(value)


def query_name(request: web.Request, name: str) -> str | None:
    v = _single(request, name)
    return None if v is None else check_name(name, v)


def query_tenant(request: web.Request) -> str | None:
    v = _single(request, "tenant")
    return None if v is None else check_tenant("tenant", v)


def query_int(request: web.Request, name: str, low: int, high: int, default: int | None) -> int | None:
    v = _single(request, name)
    return default if v is None else check_int(name, v, low, high)


def query_limit(request: web.Request) -> int:
    limit = query_int(request, "limit", 1, openapi.MAX_LIMIT, openapi.DEFAULT_LIMIT)
    assert limit is not None
    return limit


def query_bool(request: web.Request, name: str) -> bool | None:
    v = _single(request, name)
    if v is None:
        return None
    if v not in ("true", "false"):
        raise bad(f"{name}={_show(v)} is not valid: true or false")
    return v == "true"


# ---- handlers -----------------------------------------------------------------------------------------------
async def openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi.document())


async def list_instances(request: web.Request) -> web.Response:
    workflow, tenant, state = query_name(request, "workflow"), query_tenant(request), query_name(request, "state")
    terminal = query_bool(request, "terminal")
    limit = query_limit(request)
    after = query_int(request, "after", 0, openapi.MAX_ID, 0)
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        rows = await conn.fetch(_LIST_INSTANCES, workflow, tenant, state, terminal, after, limit + 1)
    items = [
        {"id": r["id"], "instance": f"{r['tenant_id']}/{r['workflow']}/{r['entity_id']}", **dict(r)}
        for r in rows[:limit]
    ]
    return json_response({"items": items, "next": items[-1]["id"] if len(rows) > limit else None})


async def get_instance(request: web.Request) -> web.Response:
    tenant = check_tenant("tenant", request.match_info["tenant"])
    workflow = check_name("workflow", request.match_info["workflow"])
    entity = check_entity("entity", request.match_info["entity"])
    async with _pool(request).acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        found = await load_instance(conn, tenant, workflow, entity)
    if found is None:
        raise ApiError(404, "not_found", f"no instance {tenant}/{workflow}/{entity} and no parked event for it")
    return json_response({"history": [], "timers": [], "outbox": [], **found})


async def list_stuck(request: web.Request) -> web.Response:
    older = _single(request, "older_than")
    f = Filters(
        workflow=query_name(request, "workflow"),
        tenant=query_tenant(request),
        state=query_name(request, "state"),
        older_than_s=0.0 if older is None else check_age("older_than", older),
        limit=query_limit(request),
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


async def _replay_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad(f"the body is not JSON ({exc}): send a JSON object") from None
    if not isinstance(body, dict):
        raise bad('the body must be a JSON object: {"instance": "T/W/E"} or {"all_stuck": true}, with "reason"')
    mode = "instance" if "instance" in body else "all_stuck"
    if ("instance" in body) == ("all_stuck" in body):
        raise bad('give exactly one of "instance" (TENANT/WORKFLOW/ENTITY) and "all_stuck": true')
    unknown = sorted(set(body) - _REPLAY_KEYS[mode])
    if unknown:
        raise bad(f"unknown field(s) with {mode!r}: {', '.join(unknown)}; allowed: {sorted(_REPLAY_KEYS[mode])}")
    return body


def _text(body: dict[str, Any], name: str, max_length: int, default: str | None) -> str:
    v = body.get(name, default)
    if v is None:
        raise bad(f'"{name}" is required: say why (it is recorded in each instance\'s history)')
    if not isinstance(v, str) or not v or len(v) > max_length or not re.fullmatch(openapi.TEXT, v):
        raise bad(f'"{name}" must be text of 1 to {max_length} characters, without control characters')
    return v


def _str_field(body: dict[str, Any], name: str, checker: Callable[[str, str], Any]) -> Any:
    v = body.get(name)
    if v is None and name not in body:
        return None
    if not isinstance(v, str):
        raise bad(f'"{name}" must be a string')
    return checker(name, v)


def _int_field(body: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    v = body.get(name, default)
    if isinstance(v, float) and v.is_integer():  # JSON Schema: 113.0 is an integer
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise bad(f'"{name}" must be an integer from {low} to {high}')
    return v


def replay_filters(body: dict[str, Any]) -> Filters:
    """The selection a replay body describes (same as the CLI's --instance / --all-stuck and filters)."""
    older = _str_field(body, "older_than", check_age)
    state = _str_field(body, "state", check_name)
    if "instance" in body:
        ref = body["instance"]
        if not isinstance(ref, str) or len(ref) > 302 or not re.fullmatch(openapi.INSTANCE_REF, ref):
            raise bad('"instance" must be TENANT/WORKFLOW/ENTITY (a UUID, a workflow name, an entity id)')
        tenant, workflow, entity = ref.split("/", 2)
        return Filters(workflow, tenant.lower(), state, entity, older or 0.0, openapi.MAX_LIMIT)
    if body["all_stuck"] is not True:
        raise bad('"all_stuck" must be true (or give "instance" instead)')
    return Filters(
        workflow=_str_field(body, "workflow", check_name),
        tenant=_str_field(body, "tenant", check_tenant),
        state=state,
        older_than_s=older or 0.0,
        limit=_int_field(body, "limit", 1, openapi.MAX_LIMIT, openapi.DEFAULT_LIMIT),
    )


def _flag(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if not isinstance(v, bool):
        raise bad(f'"{name}" must be true or false')
    return v


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


async def post_replay(request: web.Request) -> web.Response:
    body = await _replay_body(request)
    service, engine, pool = _service(request), _engine(request), _pool(request)
    f = dataclasses.replace(replay_filters(body), default_after_s=service.settings.stuck_after_s)
    dry_run, force = _flag(body, "dry_run"), _flag(body, "force")
    reason = _text(body, "reason", openapi.MAX_REASON, None)
    by = _text(body, "by", openapi.MAX_BY, "admin-api")
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        plans, named = await _select(conn, engine, f, body, force)
    results: list[replay.Result] = []
    if dry_run:
        results = [replay.Result(p, "planned", p.detail) for p in plans]
    else:
        if service.store is None:
            raise ApiError(503, "store_unavailable", "the service is still starting")
        for p in plans:
            try:
                results.append(await replay.execute(pool, service.store, p, reason, by))
            except Exception as exc:  # one instance failing does not stop the others (as in the CLI)
                results.append(replay.Result(p, "failed", f"{type(exc).__name__}: {str(exc)[:200]}"))
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
    name = check_name("workflow", request.match_info["workflow"])
    version = query_int(request, "version", 1, openapi.MAX_VERSION, None)
    engine = _engine(request)
    if name not in engine.latest:
        raise ApiError(404, "not_found", f"no workflow {name!r} is loaded; loaded: {', '.join(sorted(engine.latest))}")
    cw = engine.workflow(name, version)
    if cw is None:
        loaded = sorted(v for n, v in engine.compiled if n == name)
        raise ApiError(404, "not_found", f"{name} v{version} is not loaded; loaded versions: {loaded}")
    return json_response(describe(cw, engine))
