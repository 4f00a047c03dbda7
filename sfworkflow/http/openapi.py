"""The OpenAPI 3.1 document of the admin HTTP API (served at /v1/openapi.json): the one source of its rules.

The admin API checks every request against this document (sfworkflow.http.validation compiles its schemas
once, when the app is built), so what the document calls valid is exactly what the API accepts
(schemathesis checks both directions). Patterns are written without anchors; the document anchors them
(`^...$`). `IN_WORDS` says each pattern in words, for the 400 answers.
"""

from __future__ import annotations

from typing import Any

from sfworkflow import __version__
from sfworkflow.core.durations import EXAMPLES as AGE_EXAMPLES
from sfworkflow.core.durations import UNITS
from sfworkflow.core.limits import MAX_DAILY_CAP, MAX_RATE, MAX_SLOTS, MIN_PER_S

NAME = r"[A-Za-z][A-Za-z0-9_]{0,63}"  # a workflow or state name
UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
ENTITY = r"[^/\u0000]{1,200}"  # an entity id: no '/', no NUL, at most 200 characters
# An age (sfworkflow.core.durations): the bounded part of its grammar the API takes, so every value the document
# calls valid is a finite age: at most 6 digits, 3 decimals, then a unit (s m h d w) or none (seconds).
AGE = rf"[0-9]{{1,6}}(\.[0-9]{{1,3}})?[{''.join(UNITS)}]?"
INSTANCE_REF = rf"{UUID}/{NAME}/{ENTITY}"
LIMIT_NAME = rf"{NAME}\.{NAME}/{NAME}"  # a limit: <workflow>.<command>/<name>
SCHEDULE_NAME = r"[a-z0-9][a-z0-9_.-]{0,99}"  # a schedule's name (core/schedules.py NAME, the table's CHECK)
ROUTING = r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+"  # a schedule's event type or tick routing key, e.g. sequence.tick
# Free text (reason, by): no control characters, at least one character that is not a space.
TEXT = r"[^\u0000-\u001f\u007f]*[^\u0000-\u0020\u007f][^\u0000-\u001f\u007f]*"
LINE = r"[^\u0000-\u001f\u007f]*"  # text that may be empty (a description): no control characters
# A schedule's reason: TEXT whose character that is not a space is not one of the other spaces Python's str.strip()
# removes either (ops/schedules.py refuses a reason that strips to nothing).
SPACES = r"\u0000-\u0020\u007f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
WORDS = rf"[^\u0000-\u001f\u007f]*[^{SPACES}][^\u0000-\u001f\u007f]*"
MAX_REASON = 500
MAX_BY = 100
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_ID = 2**63 - 1
MAX_VERSION = 1_000_000
DEFAULT_SAMPLE = 100  # instances a definition check replays unless told (as `sfworkflow check-definition`)
MAX_SAMPLE = 100_000

ERROR = {"$ref": "#/components/responses/Error"}
UNAUTHORIZED = {"$ref": "#/components/responses/Unauthorized"}
TIMESTAMP = {"type": "string", "format": "date-time"}
NULLABLE_TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}
NULLABLE_STRING = {"type": ["string", "null"]}
JSON_OBJECT = {"type": "object"}
STRINGS = {"type": "array", "items": {"type": "string"}}


def anchored(pattern: str) -> str:
    return f"^{pattern}$"


# What a value matching each (anchored) pattern is, in words; `{maxLength}` etc. are the schema's own keywords.
IN_WORDS = {
    anchored(NAME): "a name of letters, digits and '_', at most 64 characters",
    anchored(UUID): "a UUID such as 3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00",
    anchored(ENTITY): "1 to 200 characters, no '/'",
    anchored(AGE): f"an age such as {AGE_EXAMPLES}",
    anchored(INSTANCE_REF): "TENANT/WORKFLOW/ENTITY (a UUID, a workflow name, an entity id)",
    anchored(LIMIT_NAME): "a limit's name, WORKFLOW.COMMAND/NAME, e.g. sequence.send_step/per_sender",
    anchored(TEXT): "text of {minLength} to {maxLength} characters, without control characters, not only spaces",
    anchored(LINE): "text of at most {maxLength} characters, without control characters",
    anchored(WORDS): "text of {minLength} to {maxLength} characters, without control characters, not only spaces",
    anchored(SCHEDULE_NAME): "lower-case letters, digits, '.', '_' or '-' (up to 100), e.g. daily-report",
    anchored(ROUTING): "a dotted name such as self_improvement.cycle_started or salesflow.daily_report",
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _path(name: str, pattern: str, max_length: int, description: str) -> dict[str, Any]:
    schema = {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": anchored(pattern)}
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


WORKFLOW_Q = _query("workflow", {"type": "string", "maxLength": 64, "pattern": anchored(NAME)}, "Only this workflow.")
TENANT_Q = _query("tenant", {"type": "string", "format": "uuid", "pattern": anchored(UUID)}, "Only this tenant (UUID).")
STATE_Q = _query("state", {"type": "string", "maxLength": 64, "pattern": anchored(NAME)}, "Only this state.")
LIMIT_Q = _query(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    f"At most this many items (1..{MAX_LIMIT}, default {DEFAULT_LIMIT}).",
)
OLDER_THAN_Q = _query(
    "older_than",
    {"type": "string", "maxLength": 16, "pattern": anchored(AGE), "default": "0s"},
    f"Stuck for at least this long: {AGE_EXAMPLES}.",
)
TENANT_P = _path("tenant", UUID, 36, "Tenant id (UUID).")
SCHEDULE_P = _path("name", SCHEDULE_NAME, 100, "The schedule's name, e.g. daily-report or sequence.tick.")
SCHEDULE_TENANT_Q = _query(
    "tenant",
    {"type": "string", "format": "uuid", "pattern": anchored(UUID)},
    "Its tenant (UUID); omit it for a schedule the workflow definitions declare (they belong to no tenant).",
)
WORKFLOW_P = _path("workflow", NAME, 64, "Workflow name, e.g. `sequence`.")
ENTITY_P = _path("entity", ENTITY, 200, "Entity id the instance is keyed on.")

ERRORS_COMMON = {"401": UNAUTHORIZED, "404": ERROR, "503": ERROR}


def _op(
    summary: str,
    description: str,
    ok: dict[str, Any],
    params: list[dict[str, Any]],
    *,
    status: str = "200",
    conflict: bool = False,
    **extra: Any,
) -> Any:
    """An operation answering `status` with `ok`; `conflict`: also 409 (the item's state refuses the change)."""
    content = {"application/json": {"schema": ok}}
    responses: dict[str, Any] = {status: {"description": {"200": "OK", "201": "Created"}[status], "content": content}}
    if params or "requestBody" in extra:
        responses["400"] = ERROR
    if "requestBody" in extra:
        responses["413"] = ERROR
    responses.update(ERRORS_COMMON)
    if conflict:
        responses["409"] = ERROR
    op: dict[str, Any] = {"summary": summary, "description": description, "parameters": params}
    op.update(extra)
    op["responses"] = responses
    return op


DAILY_CAP_FIELD = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_DAILY_CAP,
    "description": "A rate limit: this tenant's commands a UTC day per key at most (past it: the next day's).",
}
LIMIT_FIELD = {
    "type": "string",
    "maxLength": 200,
    "pattern": anchored(LIMIT_NAME),
    "description": "The limit, e.g. sequence.send_step/per_sender (GET /v1/limits lists them).",
}


OVERRIDE_OR_NULL = {"oneOf": [{"$ref": "#/components/schemas/LimitOverride"}, {"type": "null"}]}

SCHEDULE_TENANT_FIELD = {
    "type": "string",
    "format": "uuid",
    "pattern": anchored(UUID),
    "description": "Its tenant (UUID); leave it out for a schedule the workflow definitions declare.",
}
MAX_EVERY_S = 366 * 86400  # an interval of a year at most (core/schedules.py Spec)


def _schedule_schemas(reason: dict[str, Any], by: dict[str, Any]) -> dict[str, Any]:
    """The schedules' request and response bodies (ops/schedules.py; `sfworkflow schedules`)."""
    why = {"reason": {**reason, "pattern": anchored(WORDS), "description": "Why (kept with the schedule)."}, "by": by}
    # What a new schedule says besides when it ticks. Only the shape is checked here: its cron expression, time
    # zone, event type and data are checked as the schedule loop will use them (400 invalid_schedule says what).
    what = {
        "tenant": {**SCHEDULE_TENANT_FIELD, "description": "The tenant whose schedule it is (UUID)."},
        "name": {
            "type": "string", "minLength": 1, "maxLength": 100, "pattern": anchored(SCHEDULE_NAME),
            "description": "Its name, unique within the tenant, e.g. daily-report.",
        },
        "kind": {
            "type": "string", "enum": ["event", "tick"],
            "description": "`event`: publish `event_type` into sfworkflow at each tick (a start event starts an "
            "instance per tick; needs `entity_id`); `tick`: publish a tick with routing key `event_type` on the "
            "exchange sfworkflow.schedules, for a SalesFlow job.",
        },
        "event_type": {
            "type": "string", "minLength": 3, "maxLength": 100, "pattern": anchored(ROUTING),
            "description": "kind event: an event type the loaded workflows take (its `data` must pass its "
            "schema); kind tick: the tick's routing key, e.g. salesflow.daily_report.",
        },
        "entity_id": {
            "type": "string", "minLength": 1, "maxLength": 200, "pattern": anchored(ENTITY),
            "description": "kind event (required there): the entity id, a template naming {tick} (the tick's "
            "instant), {date} (its date in the zone) or {schedule}, e.g. cycle-{tick}.",
        },
        "data": {"type": "object", "default": {}, "description": "The event's data, or the tick's (a JSON object)."},
        "timezone": {
            "type": "string", "minLength": 1, "maxLength": 64, "pattern": anchored(TEXT), "default": "UTC",
            "description": "The IANA time zone a cron expression is read in, e.g. Asia/Riyadh.",
        },
        "jitter_s": {
            "type": "number", "minimum": 0, "maximum": 3600, "default": 0,
            "description": "Spread each tick over this many seconds (the same spread on every replica).",
        },
        "catch_up": {
            "type": "string", "enum": ["skip", "once", "all"], "default": "once",
            "description": "After downtime: skip the missed ticks, fire the latest once, or fire each up to "
            "`max_catch_up`.",
        },
        "max_catch_up": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
        "description": {
            "type": "string", "maxLength": 500, "pattern": anchored(LINE), "default": "",
            "description": "What it is for.",
        },
        **why,
    }  # fmt: skip
    cron = {
        "type": "string", "minLength": 1, "maxLength": 200, "pattern": anchored(TEXT),
        "description": "A cron expression: minute hour day-of-month month day-of-week, e.g. `0 8 * * *`.",
    }  # fmt: skip
    every_s = {
        "type": "integer", "minimum": 1, "maximum": MAX_EVERY_S,
        "description": "An interval in seconds, counted from a round instant (every 900: at :00, :15, :30, :45).",
    }  # fmt: skip
    request_id = {
        "type": "string", "minLength": 1, "maxLength": 100, "pattern": anchored(TEXT),
        "description": "An id for this request (default: a new one): a retry with the same id fires nothing more.",
    }  # fmt: skip
    required = ["tenant", "name", "kind", "event_type", "reason"]
    row = {
        "tenant": {"type": "string", "format": "uuid", "description": "The nil UUID for a code-declared one."},
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["event", "tick"]},
        "event_type": {"type": "string"},
        "entity_id": NULLABLE_STRING,
        "data": JSON_OBJECT,
        "cron": NULLABLE_STRING,
        "every_s": {"type": ["integer", "null"]},
        "timezone": {"type": "string"},
        "jitter_s": {"type": "number"},
        "catch_up": {"type": "string", "enum": ["skip", "once", "all"]},
        "max_catch_up": {"type": "integer"},
        "paused": {"type": "boolean"},
        "next_tick_at": {**TIMESTAMP, "description": "Its first unfired tick (jitter not applied)."},
        "last_tick_at": {**NULLABLE_TIMESTAMP, "description": "The latest tick fired by the schedule loop."},
        "last_fired_at": NULLABLE_TIMESTAMP,
        "fired": {"type": "integer", "description": "Ticks fired (by the loop and by trigger)."},
        "missed": {"type": "integer", "description": "Ticks passed over under its catch-up policy."},
        "source": {"type": "string", "enum": ["code", "api"]},
        "workflow": {**NULLABLE_STRING, "description": "source code: the definition that declares it."},
        "description": {"type": "string"},
        "updated_by": {"type": "string"},
        "reason": {"type": "string"},
        "updated_at": TIMESTAMP,
    }
    return {
        "Schedule": {"type": "object", "required": list(row), "properties": row},
        "ScheduleList": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Schedule"}}},
        },
        "ScheduleRequest": {
            "description": "A tenant's schedule: when it ticks, a cron expression (`cron`, read in `timezone`) or "
            "an interval (`every_s`), and what it publishes at each tick.",
            "type": "object",
            "oneOf": [
                {
                    "type": "object",
                    "title": "On a cron expression",
                    "required": ["cron", *required],
                    "additionalProperties": False,
                    "properties": {"cron": cron, **what},
                },
                {
                    "type": "object",
                    "title": "Every N seconds",
                    "required": ["every_s", *required],
                    "additionalProperties": False,
                    "properties": {"every_s": every_s, **what},
                },
            ],
        },
        "ScheduleChangeRequest": {
            "description": "Which schedule (`tenant`: leave it out for a code-declared one), and why.",
            "type": "object",
            "required": ["reason"],
            "additionalProperties": False,
            "properties": {"tenant": SCHEDULE_TENANT_FIELD, **why},
        },
        "ScheduleTriggerRequest": {
            "description": "Which schedule (`tenant`: leave it out for a code-declared one), and the request's id.",
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "tenant": SCHEDULE_TENANT_FIELD,
                "request_id": request_id,
            },
        },
        "ScheduleTrigger": {
            "type": "object",
            "required": ["tenant", "schedule", "message_id", "request_id", "queued", "exchange", "routing_key"],
            "properties": {
                "tenant": {"type": "string", "format": "uuid"},
                "schedule": {"type": "string"},
                "message_id": {"type": "string", "format": "uuid", "description": "The extra tick's message id."},
                "request_id": {"type": "string"},
                "queued": {
                    "type": "boolean",
                    "description": "false: this request's tick was queued before (a retry); nothing more is sent.",
                },
                "exchange": {"type": "string"},
                "routing_key": {"type": "string"},
            },
        },
    }


def _schemas() -> dict[str, Any]:
    filters = {
        "state": {"type": "string", "maxLength": 64, "pattern": anchored(NAME)},
        "older_than": {"type": "string", "maxLength": 16, "pattern": anchored(AGE)},
        "dry_run": {"type": "boolean", "default": False, "description": "Plan only: nothing is done."},
        "reason": {
            "type": "string", "minLength": 1, "maxLength": MAX_REASON, "pattern": anchored(TEXT),
            "description": "Why (recorded in each replayed instance's history).",
        },
        "by": {
            "type": "string", "minLength": 1, "maxLength": MAX_BY, "pattern": anchored(TEXT),
            "default": "admin-api", "description": "Who (recorded).",
        },
    }  # fmt: skip
    # The why and who of a limit override, in both forms of its request.
    override_why = {
        "reason": {**filters["reason"], "description": "Why (kept with the override)."},
        "by": filters["by"],
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "description": "A machine-readable code."},
                "message": {"type": "string", "description": "What went wrong and what to do."},
            },
        },
        "InstanceSummary": {
            "type": "object",
            "required": ["id", "instance", "tenant_id", "workflow", "entity_id", "state", "terminal", "version"],
            "properties": {
                "id": {"type": "integer", "description": "The paging cursor: pass it as `after`."},
                "instance": {"type": "string", "description": "TENANT/WORKFLOW/ENTITY"},
                "tenant_id": {"type": "string", "format": "uuid"},
                "workflow": {"type": "string"},
                "entity_id": {"type": "string"},
                "definition_version": {"type": "integer"},
                "state": {"type": "string"},
                "version": {"type": "integer"},
                "terminal": {"type": "boolean"},
                "parked_count": {"type": "integer"},
                "last_event_type": NULLABLE_STRING,
                "created_at": TIMESTAMP,
                "updated_at": TIMESTAMP,
                "state_entered_at": TIMESTAMP,
            },
        },
        "InstancePage": {
            "type": "object",
            "required": ["items", "next"],
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/InstanceSummary"}},
                "next": {
                    "type": ["integer", "null"],
                    "description": "Pass as `after` for the next page; null on the last page.",
                },
            },
        },
        "InstanceDetail": {
            "type": "object",
            "required": ["instance", "history", "timers", "outbox", "parked"],
            "properties": {
                "instance": {
                    "type": ["object", "null"],
                    "description": "The instance row (null: none yet, but events are parked for it).",
                    "properties": {
                        "tenant_id": {"type": "string", "format": "uuid"},
                        "workflow": {"type": "string"},
                        "entity_id": {"type": "string"},
                        "state": {"type": "string"},
                        "context": JSON_OBJECT,
                        "version": {"type": "integer"},
                        "terminal": {"type": "boolean"},
                        "trace_id": {
                            **NULLABLE_STRING,
                            "description": "The trace of the event that started it (or one derived for it).",
                        },
                        "traceparent": NULLABLE_STRING,
                    },
                },
                "history": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["seq", "event_type", "outcome", "created_at"],
                        "properties": {
                            "seq": {"type": "integer"},
                            "event_id": NULLABLE_STRING,
                            "event_type": {"type": "string"},
                            "outcome": {"type": "string"},
                            "from_state": NULLABLE_STRING,
                            "to_state": NULLABLE_STRING,
                            "detail": {"type": ["object", "null"]},
                            "trace_id": {**NULLABLE_STRING, "description": "The trace of what caused the entry."},
                            "created_at": TIMESTAMP,
                        },
                    },
                },
                "timers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "due_at"],
                        "properties": {"name": {"type": "string"}, "due_at": TIMESTAMP, "payload": JSON_OBJECT},
                    },
                },
                "outbox": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["message_id", "kind", "routing_key", "body"],
                        "properties": {
                            "message_id": {"type": "string", "format": "uuid"},
                            "kind": {"type": "string"},
                            "routing_key": {"type": "string"},
                            "created_at": TIMESTAMP,
                            "published_at": NULLABLE_TIMESTAMP,
                            "publish_attempts": {"type": "integer"},
                            "last_error": NULLABLE_STRING,
                            "deferred_until": {
                                **NULLABLE_TIMESTAMP,
                                "description": "A command a rate limit deferred is not published before this.",
                            },
                            "deferred_by": {**NULLABLE_STRING, "description": "The rate limit that deferred it."},
                            "gate_key": {
                                **NULLABLE_STRING,
                                "description": "The concurrency key (limit|tenant|part) it was queued for.",
                            },
                            "granted_at": {**NULLABLE_TIMESTAMP, "description": "When it was granted a slot."},
                            "queued": {"type": "boolean", "description": "Waiting for a concurrency slot."},
                            "queued_ahead": {
                                "type": ["integer", "null"],
                                "description": "While queued: the key's commands ahead of it.",
                            },
                            "body": {"description": "The message body as published (JSON)."},
                        },
                    },
                },
                "parked": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["event_id", "event_type", "reason", "deadline"],
                        "properties": {
                            "event_id": {"type": "string", "format": "uuid"},
                            "event_type": {"type": "string"},
                            "reason": {"type": "string"},
                            "parked_at": TIMESTAMP,
                            "deadline": TIMESTAMP,
                        },
                    },
                },
            },
        },
        "StuckInstance": {
            "type": "object",
            "required": ["instance", "workflow", "tenant_id", "entity_id", "state", "stuck_since", "why", "replay"],
            "properties": {
                "instance": {"type": "string", "description": "TENANT/WORKFLOW/ENTITY"},
                "workflow": {"type": "string"},
                "tenant_id": {"type": "string", "format": "uuid"},
                "entity_id": {"type": "string"},
                "definition_version": {"type": "integer"},
                "state": {"type": "string"},
                "version": {"type": "integer"},
                "stuck_since": TIMESTAMP,
                "why": {"type": "string", "enum": ["operator", "timer_overdue", "no_progress"]},
                "detail": {"type": "string"},
                "last_event_type": NULLABLE_STRING,
                "last_event_at": TIMESTAMP,
                "pending_command": NULLABLE_STRING,
                "attempt": {"type": ["integer", "null"]},
                "pending_timer": NULLABLE_STRING,
                "parked": {"type": "integer"},
                "replay": {
                    "type": "object",
                    "description": "What a replay would do for it.",
                    "required": ["action", "detail"],
                    "properties": {"action": {"type": "string"}, "detail": {"type": "string"}},
                },
            },
        },
        "StuckList": {
            "type": "object",
            "required": ["items", "count"],
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/components/schemas/StuckInstance"}},
                "count": {"type": "integer"},
            },
        },
        "Rate": {
            "type": ["object", "null"],
            "description": "Commands a second, the burst and the daily cap (commands a UTC day per key; null: none); "
            "null: the limit is off in this deployment.",
            "required": ["per_s", "burst", "daily_cap"],
            "properties": {
                "per_s": {"type": "number"},
                "burst": {"type": "integer"},
                "daily_cap": {"type": ["integer", "null"]},
            },
        },
        "LimitOverride": {
            "type": "object",
            "required": [
                "tenant",
                "limit",
                "per_s",
                "burst",
                "daily_cap",
                "slots",
                "reason",
                "updated_by",
                "updated_at",
            ],
            "description": "A tenant's own rate (per_s, burst) and/or daily cap for a rate limit (null: the one in "
            "force), or slots for a concurrency limit.",
            "properties": {
                "tenant": {"type": "string", "format": "uuid"},
                "limit": {"type": "string"},
                "per_s": {"type": ["number", "null"]},
                "burst": {"type": ["integer", "null"]},
                "daily_cap": {"type": ["integer", "null"]},
                "slots": {"type": ["integer", "null"]},
                "reason": {"type": "string"},
                "updated_by": {"type": "string"},
                "updated_at": TIMESTAMP,
                "note": {"type": "string", "description": "Set when the override has no effect, and why."},
            },
        },
        "LimitList": {
            "type": "object",
            "required": ["limits", "overrides"],
            "properties": {
                "limits": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["limit", "workflow", "command", "definition", "in_force", "source"],
                        "properties": {
                            "limit": {"type": "string"},
                            "workflow": {"type": "string"},
                            "command": {"type": "string"},
                            "description": {"type": "string"},
                            "definition": {"$ref": "#/components/schemas/Rate"},
                            "in_force": {"$ref": "#/components/schemas/Rate"},
                            "source": {"type": "string", "enum": ["definition", "SFWORKFLOW_RATE_LIMITS", "off"]},
                        },
                    },
                },
                "concurrency": {"type": "array", "items": {"$ref": "#/components/schemas/ConcurrencyLimit"}},
                "overrides": {"type": "array", "items": {"$ref": "#/components/schemas/LimitOverride"}},
            },
        },
        "ConcurrencyLimit": {
            "type": "object",
            "required": ["limit", "workflow", "command", "slots", "held_in"],
            "properties": {
                "limit": {"type": "string"},
                "workflow": {"type": "string"},
                "command": {"type": "string"},
                "description": {"type": "string"},
                "slots": {"type": "integer", "description": "The definition's: commands in flight at once per key."},
                "held_in": {"type": "array", "items": {"type": "string"}},
            },
        },
        "TenantLimits": {
            "type": "object",
            "required": ["tenant", "limits", "concurrency"],
            "properties": {
                "tenant": {"type": "string", "format": "uuid"},
                "concurrency": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["limit", "command", "slots", "source", "held", "waiting"],
                        "properties": {
                            "limit": {"type": "string"},
                            "command": {"type": "string"},
                            "slots": {"type": "integer", "description": "In force for the tenant."},
                            "source": {"type": "string"},
                            "override": OVERRIDE_OR_NULL,
                            "held": {"type": "integer", "description": "Its slots held now."},
                            "waiting": {"type": "integer", "description": "Its commands queued for a slot."},
                        },
                    },
                },
                "limits": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["limit", "rate", "source", "keys", "deferred"],
                        "properties": {
                            "limit": {"type": "string"},
                            "command": {"type": "string"},
                            "rate": {"$ref": "#/components/schemas/Rate"},
                            "source": {"type": "string"},
                            "override": OVERRIDE_OR_NULL,
                            "keys": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["key", "booked_until", "booked_ahead_s"],
                                    "properties": {
                                        "key": {"type": "string"},
                                        "booked_until": TIMESTAMP,
                                        "booked_ahead_s": {"type": "number"},
                                        "day": {
                                            "type": "string",
                                            "format": "date",
                                            "description": "A daily cap in force: the UTC day of the key's latest "
                                            "slot.",
                                        },
                                        "booked_that_day": {
                                            "type": "integer",
                                            "description": "A daily cap in force: the slots booked on `day`.",
                                        },
                                    },
                                },
                            },
                            "deferred": {"type": "integer", "description": "Its commands deferred to a time ahead."},
                            "deferred_until": NULLABLE_TIMESTAMP,
                        },
                    },
                },
            },
        },
        "LimitOverrideRequest": {
            "description": "A tenant's own rate for a rate limit (`per_s`, `burst`), its own daily cap (`daily_cap`, "
            "with or without a rate: what the body does not name stays: the tenant's own, else the one in force), or "
            "its own slots for a concurrency limit (`slots`). The other kind's numbers for a limit: 404 "
            "wrong_kind_of_limit.",
            "type": "object",
            "oneOf": [
                {
                    "type": "object",
                    "title": "A rate",
                    "required": ["limit", "per_s", "reason"],
                    "additionalProperties": False,
                    "properties": {
                        "limit": LIMIT_FIELD,
                        "per_s": {
                            "type": "number",
                            "minimum": MIN_PER_S,
                            "maximum": MAX_RATE,
                            "description": "Commands a second for this tenant.",
                        },
                        "burst": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_RATE,
                            "description": "Commands at once after a quiet spell (default: the rate in force's burst).",
                        },
                        "daily_cap": DAILY_CAP_FIELD,
                        **override_why,
                    },
                },
                {
                    "type": "object",
                    "title": "A daily cap",
                    "required": ["limit", "daily_cap", "reason"],
                    "additionalProperties": False,
                    "properties": {"limit": LIMIT_FIELD, "daily_cap": DAILY_CAP_FIELD, **override_why},
                },
                {
                    "type": "object",
                    "title": "Slots",
                    "required": ["limit", "slots", "reason"],
                    "additionalProperties": False,
                    "properties": {
                        "limit": LIMIT_FIELD,
                        "slots": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_SLOTS,
                            "description": "A concurrency limit: this tenant's commands in flight at once per key.",
                        },
                        **override_why,
                    },
                },
            ],
        },
        "ReplayRequest": {
            "description": "Either one instance (`instance`) or every stuck instance matching filters (`all_stuck`).",
            # Each branch says it too; said once here, a body that is not an object is told so before a branch
            # is picked (sfworkflow.http.validation).
            "type": "object",
            "oneOf": [
                {
                    "type": "object",
                    "title": "One instance",
                    "required": ["instance", "reason"],
                    "additionalProperties": False,
                    "properties": {
                        "instance": {
                            "type": "string",
                            "maxLength": 302,
                            "pattern": anchored(INSTANCE_REF),
                            "description": "TENANT/WORKFLOW/ENTITY",
                        },
                        "force": {
                            "type": "boolean",
                            "default": False,
                            "description": "Replay it now although it is not stuck yet (recorded as forced).",
                        },
                        **filters,
                    },
                },
                {
                    "type": "object",
                    "title": "Every stuck instance matching the filters",
                    "required": ["all_stuck", "reason"],
                    "additionalProperties": False,
                    "properties": {
                        "all_stuck": {"type": "boolean", "const": True},
                        "workflow": {"type": "string", "maxLength": 64, "pattern": anchored(NAME)},
                        "tenant": {"type": "string", "format": "uuid", "pattern": anchored(UUID)},
                        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
                        **filters,
                    },
                },
            ],
        },
        "ReplayResult": {
            "type": "object",
            "required": ["instance", "state", "why", "action", "status", "message"],
            "properties": {
                "instance": {"type": "string"},
                "state": {"type": "string"},
                "why": {"type": "string"},
                "action": {
                    "type": "string",
                    "enum": ["fire_timer", "redrive_parked", "reissue_command", "needs_operator", "nothing"],
                },
                "status": {"type": "string", "enum": ["planned", "done", "skipped", "failed"]},
                "message": {"type": "string"},
                "forced": {"type": "boolean", "description": "Replayed although it was not stuck (`force`)."},
            },
        },
        "ReplayExplanation": {
            "type": "object",
            "description": "Where the named instance stands against its definition's stuck rule.",
            "required": ["instance", "state", "terminal", "entered_at", "stuck", "kind", "stuck_at", "rule", "replay"],
            "properties": {
                "instance": {"type": "string"},
                "state": {"type": "string"},
                "terminal": {"type": "boolean"},
                "entered_at": {**TIMESTAMP, "description": "When it entered its state."},
                "in_state_s": {"type": "number", "description": "Seconds in its state so far."},
                "stuck": {"type": "boolean"},
                "kind": {
                    "type": "string",
                    "enum": ["operator", "timer_overdue", "no_progress", "never", "ended"],
                    "description": "How its state counts as stuck; `never` and `ended`: it does not.",
                },
                "stuck_at": {**NULLABLE_TIMESTAMP, "description": "When it counts (or counted) as stuck; null: never."},
                "rule": {"type": "string", "description": "The rule and its moment, in words."},
                "summary": {"type": "string"},
                "replay": {
                    "type": "object",
                    "description": "What a replay does for it (with `force` when it is not stuck yet).",
                    "required": ["action", "detail"],
                    "properties": {"action": {"type": "string"}, "detail": {"type": "string"}},
                },
            },
        },
        "ReplayResponse": {
            "type": "object",
            "required": ["dry_run", "ok", "results", "summary", "message"],
            "properties": {
                "dry_run": {"type": "boolean"},
                "ok": {"type": "boolean", "description": "False when any instance failed."},
                "results": {"type": "array", "items": {"$ref": "#/components/schemas/ReplayResult"}},
                "summary": {
                    "type": "object",
                    "required": ["matched", "planned", "done", "skipped", "failed"],
                    "properties": {k: {"type": "integer"} for k in ("matched", "planned", "done", "skipped", "failed")},
                },
                "message": {"type": "string"},
                "explanation": {"$ref": "#/components/schemas/ReplayExplanation"},
            },
        },
        "DefinitionSummary": {
            "type": "object",
            "required": ["workflow", "version", "latest"],
            "properties": {
                "workflow": {"type": "string"},
                "version": {"type": "integer"},
                "latest": {"type": "boolean"},
                "description": {"type": "string"},
                "initial": {"type": "string"},
                "states": STRINGS,
                "terminal": STRINGS,
            },
        },
        "DefinitionList": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/DefinitionSummary"}}},
        },
        "Definition": {
            "type": "object",
            "required": ["workflow", "version", "states", "terminal", "events", "commands", "compensations", "diagram"],
            "properties": {
                "workflow": {"type": "string"},
                "version": {"type": "integer"},
                "latest_version": {"type": "integer"},
                "versions": {"type": "array", "items": {"type": "integer"}},
                "description": {"type": "string"},
                "initial": {"type": "string"},
                "states": STRINGS,
                "terminal": STRINGS,
                "waits_for_operator": STRINGS,
                "events": {**STRINGS, "description": "Event types in (`<workflow>.<event>`)."},
                "start_events": STRINGS,
                "internal_events": STRINGS,
                "commands": {**STRINGS, "description": "Command types out (`<workflow>.<command>`)."},
                "compensations": STRINGS,
                "stuck_after_s": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
                "retry": {
                    "type": "object",
                    "properties": {
                        "max_attempts": {"type": "integer"},
                        "base_s": {"type": "number"},
                        "cap_s": {"type": "number"},
                    },
                },
                "transitions": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "trigger": {"type": "string"},
                            "source": STRINGS,
                            "dest": NULLABLE_STRING,
                            "guards": STRINGS,
                        },
                    },
                },
                "diagram": {
                    "type": "object",
                    "required": ["mermaid", "dot"],
                    "properties": {
                        "mermaid": {"type": "string", "description": "Mermaid stateDiagram-v2 source."},
                        "dot": {"type": "string", "description": "Graphviz DOT source."},
                    },
                },
            },
        },
        "DefinitionCheck": {
            "type": "object",
            "required": ["workflow", "version", "instances", "steps", "diverging", "divergences", "partial"],
            "properties": {
                "workflow": {"type": "string"},
                "version": {"type": "integer", "description": "The version checked."},
                "instances": {"type": "integer", "description": "Instances whose histories were replayed."},
                "steps": {"type": "integer", "description": "Steps replayed, over all of them."},
                "diverging": {"type": "integer", "description": "Instances whose replay diverges."},
                "divergences": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["instance", "against", "step", "event_type", "seq", "diff", "text"],
                        "properties": {
                            "instance": {"type": "string", "description": "TENANT/WORKFLOW/ENTITY"},
                            "against": {
                                "type": "string",
                                "description": "What was compared, e.g. `v2 against v1`, or `v1 replayed against "
                                "its recorded history` (its own version no longer reproduces it).",
                            },
                            "step": {
                                "type": ["integer", "null"],
                                "description": "The step (1-based) where the replays part; null: one replay has "
                                "steps the other has not.",
                            },
                            "event_type": {**NULLABLE_STRING, "description": "The event of that step."},
                            "seq": {"type": ["integer", "null"], "description": "Its history entry's seq."},
                            "diff": {
                                **STRINGS,
                                "description": "How they differ, e.g. `state: completed -> confirming`.",
                            },
                            "text": {"type": "string", "description": "All of it, as the CLI prints it."},
                        },
                    },
                },
                "partial": {
                    "type": "array",
                    "description": "Histories replayed only up to a step no definition can redo, per reason.",
                    "items": {
                        "type": "object",
                        "required": ["why", "instances"],
                        "properties": {"why": {"type": "string"}, "instances": {"type": "integer"}},
                    },
                },
            },
        },
        **_schedule_schemas(filters["reason"], filters["by"]),
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call)."""
    ref = "#/components/schemas/"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sfworkflow admin API",
            "version": __version__,
            "description": (
                "Inspect workflow instances, find stuck ones and replay them, read the loaded definitions and check "
                "a definition change against recorded histories, set a tenant's rate limits, list, add, pause, "
                "resume, delete and trigger schedules.\n\n"
                "The API is off unless `SFWORKFLOW_ADMIN_TOKEN` is set (at least 16 characters); while it is off "
                "every `/v1/` route answers 404. Send the token as `Authorization: Bearer <token>`; a missing or "
                'wrong token gets 401. Errors are JSON: `{"error": code, "message": text}`.'
            ),
        },
        "security": [{"bearerAuth": []}],
        "paths": {
            "/v1/instances": {
                "get": _op(
                    "List instances",
                    "Instances matching the filters, in id order, one page at a time (`after` = the last page's "
                    "`next`).",
                    {"$ref": ref + "InstancePage"},
                    [
                        WORKFLOW_Q,
                        TENANT_Q,
                        STATE_Q,
                        _query("terminal", {"type": "boolean"}, "true: only ended instances; false: only active."),
                        LIMIT_Q,
                        _query(
                            "after",
                            {"type": "integer", "minimum": 0, "maximum": MAX_ID, "default": 0},
                            "Cursor: instances with an id greater than this.",
                        ),
                    ],
                    operationId="listInstances",
                )
            },
            "/v1/instances/{tenant}/{workflow}/{entity}": {
                "get": _op(
                    "Get one instance",
                    "The instance with its full history, timers, outbox messages (with bodies) and parked events. "
                    "404 when there is neither an instance nor a parked event for the key.",
                    {"$ref": ref + "InstanceDetail"},
                    [TENANT_P, WORKFLOW_P, ENTITY_P],
                    operationId="getInstance",
                )
            },
            "/v1/stuck": {
                "get": _op(
                    "List stuck instances",
                    "Instances stuck by their definition's rules, longest stuck first, with what a replay would do.",
                    {"$ref": ref + "StuckList"},
                    [WORKFLOW_Q, TENANT_Q, STATE_Q, OLDER_THAN_Q, LIMIT_Q],
                    operationId="listStuck",
                )
            },
            "/v1/replay": {
                "post": _op(
                    "Replay stuck instances",
                    "Same semantics as `sfworkflow replay`: per stuck instance, fire its overdue timer, re-drive its "
                    "parked events or re-issue its pending command (same idempotency key, attempt + 1); states "
                    "waiting for a person are left alone. Each replay is recorded in the instance history (who, "
                    "when, why, what) and happens once per stuck episode. `dry_run` only plans. 200 even when an "
                    "instance failed: see `ok` and `summary.failed`. With `instance`, the answer's `explanation` says "
                    "where it stands against its stuck rule; one that is not stuck yet is replayed only with "
                    "`force` (recorded as forced). 404 when there is no such instance.",
                    {"$ref": ref + "ReplayResponse"},
                    [],
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": ref + "ReplayRequest"}}},
                    },
                    operationId="replay",
                )
            },
            "/v1/limits": {
                "get": _op(
                    "List rate limits",
                    "Every rate limit the loaded definitions declare, the rate this deployment enforces (the "
                    "definition's, or SFWORKFLOW_RATE_LIMITS), and every tenant's override.",
                    {"$ref": ref + "LimitList"},
                    [],
                    operationId="listLimits",
                )
            },
            "/v1/limits/{tenant}": {
                "get": _op(
                    "A tenant's rate limits",
                    "For one tenant, each limit's rate in force and where it comes from (its override, the "
                    "deployment, the definition), how far ahead each of its keys is booked, and how many of its "
                    "commands wait deferred.",
                    {"$ref": ref + "TenantLimits"},
                    [TENANT_P],
                    operationId="getTenantLimits",
                ),
                "put": _op(
                    "Set a tenant's rate for a limit",
                    "Same as `sfworkflow limits set`: the tenant's own rate for `limit`, replacing an earlier "
                    "override, from the next batch on, on every replica; commands already deferred keep their "
                    "slots. 404 when no definition declares the limit.",
                    {"$ref": ref + "LimitOverride"},
                    [TENANT_P],
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": ref + "LimitOverrideRequest"}}},
                    },
                    operationId="setTenantLimit",
                ),
                "delete": _op(
                    "Remove a tenant's override",
                    "Same as `sfworkflow limits unset`: the tenant follows the deployment's rate for `limit` again "
                    "from the next batch on. 404 when no definition declares the limit or the tenant has no "
                    "override of it.",
                    {"$ref": ref + "LimitOverride"},
                    [
                        TENANT_P,
                        {
                            **_query(
                                "limit",
                                {"type": "string", "maxLength": 200, "pattern": anchored(LIMIT_NAME)},
                                "The limit, e.g. sequence.send_step/per_sender.",
                            ),
                            "required": True,
                        },
                    ],
                    operationId="unsetTenantLimit",
                ),
            },
            "/v1/schedules": {
                "get": _op(
                    "List schedules",
                    "Same as `sfworkflow schedules list`: every schedule (of one tenant with `tenant`; the "
                    "code-declared ones have the nil UUID), by tenant and name, with its next and last ticks and how "
                    "many it fired and missed.",
                    {"$ref": ref + "ScheduleList"},
                    [TENANT_Q],
                    operationId="listSchedules",
                ),
                "post": _op(
                    "Add a tenant's schedule",
                    "Same as `sfworkflow schedules add`: a schedule of `tenant` that publishes an event into "
                    "sfworkflow (kind event) or a tick for a SalesFlow job (kind tick) at each tick of a cron "
                    "expression in a time zone or of an interval, once per tick whatever the number of replicas. "
                    "It fires first at its first tick after now. 400 invalid_schedule when the cron expression, the "
                    "time zone, the event type or its data cannot be used (the message says why); 409 "
                    "already_exists when the tenant has a schedule of that name.",
                    {"$ref": ref + "Schedule"},
                    [],
                    status="201",
                    conflict=True,
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": ref + "ScheduleRequest"}}},
                    },
                    operationId="addSchedule",
                ),
            },
            "/v1/schedules/{name}": {
                "get": _op(
                    "Get a schedule",
                    "Same as `sfworkflow schedules show`. 404 when there is no such schedule.",
                    {"$ref": ref + "Schedule"},
                    [SCHEDULE_P, SCHEDULE_TENANT_Q],
                    operationId="getSchedule",
                ),
                "delete": _op(
                    "Delete a tenant's schedule",
                    "Same as `sfworkflow schedules delete`: the removed schedule (its ticks already queued still go "
                    "out). 404 when there is no such schedule; 409 code_declared for one the workflow definitions "
                    "declare, which would come back at the next start: pause it instead.",
                    {"$ref": ref + "Schedule"},
                    [SCHEDULE_P, SCHEDULE_TENANT_Q],
                    conflict=True,
                    operationId="deleteSchedule",
                ),
            },
            "/v1/schedules/{name}/pause": {
                "post": _op(
                    "Pause a schedule",
                    "Same as `sfworkflow schedules pause`: it fires nothing more until resumed (a tick being fired "
                    "now still goes out), on every replica from its next round. 404 when there is no such schedule.",
                    {"$ref": ref + "Schedule"},
                    [SCHEDULE_P],
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": ref + "ScheduleChangeRequest"}}},
                    },
                    operationId="pauseSchedule",
                )
            },
            "/v1/schedules/{name}/resume": {
                "post": _op(
                    "Resume a schedule",
                    "Same as `sfworkflow schedules resume`: it fires again from its first tick after now; the ticks "
                    "that fell while it was paused are not fired. 404 when there is no such schedule; 409 "
                    "cannot_resume when its row describes no schedule any more (delete it and add it again).",
                    {"$ref": ref + "Schedule"},
                    [SCHEDULE_P],
                    conflict=True,
                    requestBody={
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": ref + "ScheduleChangeRequest"}}},
                    },
                    operationId="resumeSchedule",
                )
            },
            "/v1/schedules/{name}/trigger": {
                "post": _op(
                    "Fire one extra tick now",
                    "Same as `sfworkflow schedules trigger`: one extra tick now, paused or not, besides the "
                    "schedule's own. Its message id comes from `request_id` (default: a new one): a retry with the "
                    "same `request_id` queues nothing more and answers `queued: false`. The body may be left out "
                    "(a code-declared schedule, a new request id). 404 when there is no such schedule; 409 "
                    "cannot_fire when its row describes no schedule any more.",
                    {"$ref": ref + "ScheduleTrigger"},
                    [SCHEDULE_P],
                    conflict=True,
                    requestBody={
                        "required": False,
                        "content": {"application/json": {"schema": {"$ref": ref + "ScheduleTriggerRequest"}}},
                    },
                    operationId="triggerSchedule",
                )
            },
            "/v1/definitions": {
                "get": _op(
                    "List loaded definitions",
                    "Every loaded (workflow, version).",
                    {"$ref": ref + "DefinitionList"},
                    [],
                    operationId="listDefinitions",
                )
            },
            "/v1/definitions/{workflow}": {
                "get": _op(
                    "Get a definition",
                    "States, events, commands, compensations, transitions and the diagram (Mermaid and DOT).",
                    {"$ref": ref + "Definition"},
                    [
                        WORKFLOW_P,
                        _query(
                            "version",
                            {"type": "integer", "minimum": 1, "maximum": MAX_VERSION},
                            "Definition version (default: the latest loaded).",
                        ),
                    ],
                    operationId="getDefinition",
                )
            },
            "/v1/definitions/{workflow}/check": {
                "get": _op(
                    "Check a definition change against recorded histories",
                    "Same as `sfworkflow check-definition`, read-only: the recorded histories of the workflow's "
                    "instances (in flight; `ended`: ended ones too; `sample` of them at random, or `all`) replayed "
                    "through their own definition version (which must reproduce the recorded states) and through "
                    "`version` (default: the latest this service loads), and, for each instance whose replay "
                    "diverges, the first step where it does: the outcome (an event now ignored or not allowed), the "
                    "state, the commands (- before, + after), the timers. `version` must be one this service "
                    "loaded (GET /v1/definitions/{workflow} lists them). 400 not_loaded when the workflow or the "
                    "version is not loaded; 400 bad_request when both `sample` and `all=true` are given.",
                    {"$ref": ref + "DefinitionCheck"},
                    [
                        WORKFLOW_P,
                        _query(
                            "version",
                            {"type": "integer", "minimum": 1, "maximum": MAX_VERSION},
                            "The definition version to check (default: the latest loaded).",
                        ),
                        _query(
                            "sample",
                            {"type": "integer", "minimum": 1, "maximum": MAX_SAMPLE},
                            f"Replay this many instances at random (1..{MAX_SAMPLE}, default {DEFAULT_SAMPLE}); "
                            "leave it out with `all=true`.",
                        ),
                        _query("all", {"type": "boolean", "default": False}, "true: replay every instance."),
                        _query(
                            "ended",
                            {"type": "boolean", "default": False},
                            "true: ended instances too (their histories are whole).",
                        ),
                        _query(
                            "since",
                            {"type": "string", "maxLength": 16, "pattern": anchored(AGE)},
                            f"Only instances changed within this long: {AGE_EXAMPLES}.",
                        ),
                    ],
                    operationId="checkDefinition",
                )
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "description": "Served without a token (while the admin API is on).",
                    "operationId": "openapi",
                    "security": [],
                    "responses": {
                        "200": {"description": "OK", "content": {"application/json": {"schema": JSON_OBJECT}}},
                        "404": ERROR,
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The value of SFWORKFLOW_ADMIN_TOKEN.",
                }
            },
            "responses": {
                "Error": {
                    "description": "An error: 400 bad parameter, 401 missing or wrong token (with "
                    "`WWW-Authenticate: Bearer`), 404 unknown item or admin API off, 409 the item's state refuses the "
                    "change, 413 body too large, 503 PostgreSQL unavailable.",
                    "content": {"application/json": {"schema": {"$ref": ref + "Error"}}},
                },
                "Unauthorized": {
                    "description": "The bearer token is missing or wrong.",
                    "headers": {
                        "WWW-Authenticate": {
                            "required": True,
                            "description": '`Bearer realm="sfworkflow-admin"` (with `error="invalid_token"` '
                            "for a wrong token).",
                            "schema": {"type": "string"},
                        }
                    },
                    "content": {"application/json": {"schema": {"$ref": ref + "Error"}}},
                },
            },
            "schemas": _schemas(),
        },
    }
