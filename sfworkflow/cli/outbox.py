"""`sfworkflow outbox failed|republish`: the outbox rows the relay gave up, and publishing them again.

The relay gives a row up after SFWORKFLOW_RELAY_MAX_ATTEMPTS publishes the broker refused (returned as
unroutable: no queue is bound for its routing key; or nacked). Fix the cause (bind the worker's queue, free the
broker), then republish: the service's relays publish the rows within moments, with their original message ids.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC
from typing import Any

import orjson

from sfworkflow.cli.exit_codes import ExitCode
from sfworkflow.core.batch import OUTBOX_KINDS as KINDS
from sfworkflow.ops.outbox import list_failed, republish
from sfworkflow.settings import Settings

DEFAULT_LIMIT = 500


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "outbox",
        help="outbox rows the relay gave up, and republishing them",
        description="The relay gives an outbox row up after SFWORKFLOW_RELAY_MAX_ATTEMPTS publishes the broker "
        "refused (unroutable: no queue bound for its routing key; or nacked). `failed` lists those rows; once the "
        "cause is fixed (the worker's queue bound, the broker freed), `republish` makes them due again.",
    )
    actions = p.add_subparsers(dest="outbox_command", required=True, metavar="failed|republish")
    ls = actions.add_parser(
        "failed",
        help="rows given up after SFWORKFLOW_RELAY_MAX_ATTEMPTS refused publishes",
        description="List the outbox rows the relay gave up, oldest first: id, kind, routing key, attempts, when "
        "and the broker's last error. Changes nothing.",
    )
    ls.add_argument("--kind", choices=KINDS, help="only this kind")
    ls.add_argument("--limit", type=_positive, default=DEFAULT_LIMIT, help="rows at most (default 500)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of text")
    rp = actions.add_parser(
        "republish",
        help="make given-up rows due again; the running relays publish them",
        description="Make given-up outbox rows due again (by --id, or --all of a --kind): the service's running "
        "relays publish them within moments, with their original message ids. Run it after fixing what `outbox "
        "failed` shows. Exits 1 when a named row is not given up (published already, or unknown).",
    )
    which = rp.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=_positive, action="append", dest="ids", help="an outbox row id (repeatable)")
    which.add_argument("--all", action="store_true", help="every row given up (of --kind, when given)")
    rp.add_argument("--kind", choices=KINDS, help="with --all: only this kind")
    return {"outbox": outbox}


async def outbox(settings: Settings, args: argparse.Namespace) -> int:
    if args.outbox_command == "failed":
        rows = await list_failed(settings, args.kind, args.limit)
        if args.json:
            print(orjson.dumps([_as_json(r) for r in rows], option=orjson.OPT_INDENT_2).decode())
        else:
            _print_table(rows)
        return 0
    n = await republish(settings, ids=args.ids or (), kind=args.kind)
    if args.ids and n < len(set(args.ids)):
        print(
            f"sfworkflow outbox republish: republished {n} of {len(set(args.ids))} row(s): the others are not "
            "given up (published, or unknown); `sfworkflow outbox failed` lists those that are",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    if n == 0:
        print("no outbox rows given up" + (f" of kind {args.kind}" if args.kind else "") + ": nothing to republish")
        return 0
    print(f"republished {n} row(s); the running relays publish them now")
    return 0


def _as_json(r: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: r[k] for k in ("id", "message_id", "kind", "exchange", "routing_key", "instance_id")},
        "attempts": r["publish_attempts"],
        "last_error": r["last_error"],
        "created_at": r["created_at"].isoformat(),
        "failed_at": r["failed_at"].isoformat(),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no outbox rows given up")
        return
    print(f"{len(rows)} outbox row(s) given up, oldest first; `sfworkflow outbox republish --id ID` retries one")
    print(f"  {'ID':>10}  {'KIND':<12} {'ROUTING KEY':<36} {'ATTEMPTS':>8}  {'GIVEN UP':<20} LAST ERROR")
    for r in rows:
        print(
            f"  {r['id']:>10}  {r['kind']:<12} {r['routing_key']:<36} {r['publish_attempts']:>8}  "
            f"{r['failed_at'].astimezone(UTC):%Y-%m-%d %H:%M:%SZ} {(r['last_error'] or '')[:120]}"
        )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
