"""`sfworkflow stuck`: list stuck instances (the definitions say when an instance counts as stuck)."""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from sfworkflow import db
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.durations import EXAMPLES, parse_age
from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import Filters, StuckInstance, check_names, format_age
from sfworkflow.errors import UsageError
from sfworkflow.ops.stuck import find_stuck
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS


def add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workflow", help="only this workflow")
    p.add_argument("--tenant", type=tenant_id, help="only this tenant id (a UUID)")
    p.add_argument("--state", help="only instances in this state")
    p.add_argument(
        "--older-than", default="0s", type=age, metavar="AGE", help=f"stuck for at least this long, an age: {EXAMPLES}"
    )
    p.add_argument(
        "--no-progress-for",
        type=age,
        metavar="AGE",
        help="count an instance as stuck once it made no progress for AGE, instead of its state's own threshold "
        "(e.g. 15 minutes in sequence's sending): for a worker known to hang; an operator's wait and an overdue "
        f"timer keep their rules. An age: {EXAMPLES}",
    )
    p.add_argument("--limit", type=int, default=200, help="at most this many instances (default 200)")


def filters_from(args: argparse.Namespace, entity: str | None = None, settings: Settings | None = None) -> Filters:
    return Filters(
        default_after_s=settings.stuck_after_s if settings else Filters.default_after_s,
        workflow=args.workflow,
        tenant=args.tenant,
        state=args.state,
        entity=entity,
        older_than_s=args.older_than,
        limit=args.limit,
        no_progress_s=args.no_progress_for,
    )


def age(text: str) -> float:
    """An age as given on the command line, in seconds (argparse type; sfworkflow.core.durations)."""
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def tenant_id(text: str) -> str:
    """A tenant id as given on the command line: a UUID (argparse type)."""
    try:
        return str(uuid.UUID(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tenant id (a UUID)") from exc


def instance_key(ref: str) -> InstanceKey:
    """TENANT/WORKFLOW/ENTITY as given on the command line; UsageError when it is not that."""
    parts = ref.split("/")
    if len(parts) != 3 or not all(parts):
        raise UsageError(f"--instance {ref!r}: give the instance as TENANT/WORKFLOW/ENTITY")
    try:
        tenant = str(uuid.UUID(parts[0]))
    except ValueError:
        raise UsageError(f"--instance {ref!r}: {parts[0]!r} is not a tenant id (a UUID)") from None
    return InstanceKey(tenant, parts[1], parts[2])


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "stuck",
        help="list stuck instances: workflow, tenant, entity, state, since, why",
        description="List the instances their definition counts as stuck: a command unanswered for too long, "
        "an overdue timer, events parked too long, or a state that waits for a person. Each row says why, since "
        "when, the last event, the pending command and its attempt. Use it first when work seems to stall; "
        "`sfworkflow replay` acts on what it lists, `sfworkflow inspect` shows one instance in full.",
    )
    add_filters(p)
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    return {"stuck": run}


async def load(settings: Settings, f: Filters) -> list[StuckInstance]:
    conn = await asyncpg.connect(settings.database_url)
    await db.init_connection(conn)
    try:
        return await find_stuck(conn, Engine(DEFINITIONS), f)
    finally:
        await conn.close()


def _age(since: datetime) -> str:
    return format_age((datetime.now(UTC) - since).total_seconds())


def table(rows: list[StuckInstance]) -> str:
    head = ("WORKFLOW", "TENANT", "ENTITY", "STATE", "STUCK FOR", "WHY", "LAST EVENT", "PENDING COMMAND", "ATTEMPT")
    lines = [head]
    for s in rows:
        lines.append(
            (
                s.workflow, s.tenant_id, s.entity_id, s.state, _age(s.stuck_since), s.why,
                f"{s.last_event_type or '-'} ({_age(s.last_event_at)} ago)", s.pending_command or "-",
                str(s.attempt) if s.attempt is not None else "-",
            )
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join(out)


async def run(settings: Settings, args: argparse.Namespace) -> int:
    check_names(Engine(DEFINITIONS), args.workflow, args.state)
    rows = await load(settings, filters_from(args, settings=settings))
    if args.json:
        for s in rows:
            print(orjson.dumps(s.as_json()).decode())
        return 0
    if not rows:
        print("no stuck instances")
        return 0
    print(table(rows))
    print(
        f"\n{len(rows)} stuck; details: sfworkflow inspect TENANT/WORKFLOW/ENTITY; fix: sfworkflow replay --dry-run ..."
    )
    for s in rows[:5]:
        print(f"  {s.ref}: {s.detail}")
    return 0
