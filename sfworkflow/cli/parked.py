"""`sfworkflow parked list`: events waiting (parked) until their instance allows them, with their deadline.

Past its deadline a parked event is dead-lettered `transition_not_allowed` (or `unknown_definition_version`
when it waited for a replica with its instance's definition version) by the next sweep of the service
(every few seconds).
"""

from __future__ import annotations

import argparse
from datetime import UTC, timedelta
from typing import Any

import orjson

from sfworkflow.cli.stuck import tenant_id
from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import check_names
from sfworkflow.ops.parked import list_parked
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS

DEFAULT_LIMIT = 500
EXPIRED = "expired, dead-lettered at the next sweep"


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "parked",
        help="events parked until their instance allows them",
        description="Events that arrived before their instance could take them (out of order, or for a "
        "definition version this replica has not loaded) wait, parked, until it can or until their deadline "
        "(SFWORKFLOW_PARK_TIMEOUT_S); past it they are dead-lettered by the next sweep.",
    )
    actions = p.add_subparsers(dest="parked_command", required=True, metavar="list")
    ls = actions.add_parser(
        "list",
        help="parked events with the time left until their deadline",
        description="List parked events, nearest deadline first: instance, event type and id, why it waits, "
        "when it was parked and the time left. Changes nothing.",
    )
    ls.add_argument("--workflow", help="only this workflow, e.g. sequence")
    ls.add_argument("--tenant", type=tenant_id, help="only this tenant id (a UUID)")
    ls.add_argument("--limit", type=_positive, default=DEFAULT_LIMIT, help="rows at most (default 500)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of text")
    return {"parked": parked}


async def parked(settings: Settings, args: argparse.Namespace) -> int:
    check_names(Engine(DEFINITIONS), args.workflow, None)
    rows = await list_parked(settings, args.workflow, args.tenant, args.limit)
    if args.json:
        print(orjson.dumps([as_json(r) for r in rows], option=orjson.OPT_INDENT_2).decode())
    else:
        print_table(rows, args)
    return 0


def as_json(row: dict[str, Any]) -> dict[str, Any]:
    left: timedelta = row["time_left"]
    return {
        "tenant_id": row["tenant_id"],
        "workflow": row["workflow"],
        "entity_id": row["entity_id"],
        "event_type": row["event_type"],
        "event_id": row["event_id"],
        "reason": row["reason"],
        "awaiting_version": row["awaiting_version"],
        "parked_at": row["parked_at"].isoformat(),
        "deadline": row["deadline"].isoformat(),
        "seconds_left": max(0.0, left.total_seconds()),
        "expired": left <= timedelta(0),
        "time_left": time_left(left),
    }


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if not rows:
        print("no parked events" + _filters(args))
        return
    total = rows[0]["total"]
    shown = f" (first {len(rows)}, --limit)" if total > len(rows) else ""
    print(f"{total} parked event(s){_filters(args)}{shown}, nearest deadline first")
    print(
        f"  {'TENANT':<36}  {'WORKFLOW':<18} {'ENTITY':<24} {'EVENT TYPE':<30} {'EVENT ID':<36}  "
        f"{'PARKED AT':<20} {'TIME LEFT':<12} REASON"
    )
    for r in rows:
        print(
            f"  {r['tenant_id']:<36}  {_cell(r['workflow']):<18} {_cell(r['entity_id']):<24} "
            f"{_cell(r['event_type']):<30} {r['event_id']:<36}  {r['parked_at'].astimezone(UTC):%Y-%m-%d %H:%M:%SZ} "
            f"{time_left(r['time_left']):<12} {_cell(r['reason'])}"
        )


def time_left(left: timedelta) -> str:
    """`2d 3h`, `1h 05m`, `4m 10s`, `12s`; or EXPIRED once the deadline passed."""
    seconds = int(left.total_seconds())
    if seconds <= 0:
        return EXPIRED
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _filters(args: argparse.Namespace) -> str:
    parts = [f"workflow {args.workflow}" if args.workflow else "", f"tenant {args.tenant}" if args.tenant else ""]
    text = ", ".join(p for p in parts if p)
    return f" for {text}" if text else ""


def _cell(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
