"""`sfworkflow schedules list|show|add|pause|resume|delete|trigger|next` (ops/schedules.py does the work).

`next` reads no database: it checks a cron expression or an interval in a time zone and prints its next ticks in
UTC and in the zone's wall time, so a daily report at 08:00 Asia/Riyadh or a 02:30 Europe/Berlin job can be checked
across a daylight-saving change before it is added.
"""

from __future__ import annotations

import argparse
import getpass
from datetime import UTC, datetime
from typing import Any

import orjson

from sfworkflow.cli.limits import engine_of
from sfworkflow.core.durations import EXAMPLES, parse_age
from sfworkflow.core.schedules import Spec, next_tick
from sfworkflow.errors import UsageError
from sfworkflow.ops import schedules
from sfworkflow.ops.dead_letters import connect_database
from sfworkflow.settings import Settings

MAX_COUNT = 1000


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "schedules",
        help="periodic ticks and events: list, add, pause, resume, delete, trigger",
        description="A schedule publishes at each tick of a cron expression (in an IANA time zone) or an interval, "
        "once per tick whatever the number of replicas: an event into sfworkflow (--event; a start event starts an "
        "instance per tick) or a tick for SalesFlow's own job on the exchange sfworkflow.schedules (--tick). "
        "Code-declared schedules belong to no tenant (omit --tenant). README: 'Schedules'.",
    )
    actions = p.add_subparsers(
        dest="schedules_command", required=True, metavar="list|show|add|pause|resume|delete|trigger|next"
    )
    ls = actions.add_parser("list", help="every schedule with its next and last ticks",
                            description="Every schedule (of one tenant with --tenant) with its next and last ticks, "
                            "how many it fired and missed. Changes nothing.")  # fmt: skip
    ls.add_argument("--tenant", help="only this tenant's (a UUID)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of text")
    sh = actions.add_parser("show", help="one schedule", description="One schedule, whole. Changes nothing.")
    _key(sh)
    sh.add_argument("--json", action="store_true", help="print JSON instead of text")
    add = actions.add_parser(
        "add",
        help="add a tenant's schedule",
        description="Add a schedule for a tenant. It fires first at its first tick after now. Examples: "
        "sfworkflow schedules add daily-report --tenant T --cron '0 8 * * *' --tz Asia/Riyadh --tick "
        "salesflow.daily_report --reason 'beat job'; sfworkflow schedules add self-improvement --tenant T --every 15m "
        "--event self_improvement.cycle_started --entity 'cycle-{tick}' --data '{\"requested_by\": \"scheduler\"}' "
        "--reason 'beat job'",
    )
    add.add_argument("name", help="its name: lower-case letters, digits, '.', '_', '-' (e.g. daily-report)")
    add.add_argument("--tenant", required=True, help="tenant id (a UUID)")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="a cron expression: minute hour day-of-month month day-of-week, e.g. '0 8 * * *'")
    when.add_argument("--every", help=f"an interval ({EXAMPLES}), counted from 2026-01-01 UTC (15m: :00, :15, …)")
    what = add.add_mutually_exclusive_group(required=True)
    what.add_argument("--event", help="publish this event type into sfworkflow at each tick (needs --entity)")
    what.add_argument("--tick", help="publish a tick with this routing key on sfworkflow.schedules (SalesFlow's job)")
    add.add_argument("--entity", help="--event: the entity id, a template naming {tick}, {date} or {schedule}")
    add.add_argument("--data", default="{}", help="the event's data or the tick's, a JSON object (default {})")
    add.add_argument("--tz", default="UTC", help="the IANA time zone the cron expression is read in (default: UTC)")
    add.add_argument("--jitter", type=float, default=0.0, help="spread each tick over this many seconds (0 to 3600)")
    add.add_argument("--catch-up", choices=("skip", "once", "all"), default="once",
                     help="after downtime: skip the missed ticks, fire the latest once (default), or fire each up "
                     "to --max-catch-up")  # fmt: skip
    add.add_argument("--max-catch-up", type=int, default=10, help="--catch-up all: at most this many (default 10)")
    add.add_argument("--description", default="", help="what it is for")
    add.add_argument("--reason", required=True, help="why (kept with the schedule)")
    add.add_argument("--by", default=None, help="who (default: the login name)")
    add.add_argument("--json", action="store_true", help="print JSON instead of text")
    for verb, text in (
        ("pause", "stop firing it until resumed"),
        ("resume", "fire it again from its first tick after now (ticks while paused are not fired)"),
    ):
        a = actions.add_parser(verb, help=text, description=f"{verb.capitalize()} a schedule: {text}.")
        _key(a)
        a.add_argument("--reason", required=True, help="why (kept with the schedule)")
        a.add_argument("--by", default=None, help="who (default: the login name)")  # fmt: skip
    rm = actions.add_parser("delete", help="remove a tenant's schedule",
                            description="Remove a run-time schedule (its ticks already queued still go out). A "
                            "code-declared one comes back at the next start: pause it instead.")  # fmt: skip
    _key(rm)
    tr = actions.add_parser("trigger", help="fire one extra tick now",
                            description="Fire one extra tick now, paused or not, besides the schedule's own. Its "
                            "message id comes from --request-id (default: a new one): retrying with the same "
                            "request id queues nothing more.")  # fmt: skip
    _key(tr)
    tr.add_argument("--request-id", help="an id for this request (retries with the same one fire once)")
    tr.add_argument("--json", action="store_true", help="print JSON instead of text")
    nx = actions.add_parser(
        "next",
        help="print the next ticks of a cron expression or an interval, in UTC and in the zone",
        description="Print the next ticks of a schedule, in UTC and in the zone's wall time: a wall time the "
        "spring-forward skips has no tick that day, one the fall-back repeats ticks once (its first occurrence). "
        "Reads no database. Example: sfworkflow schedules next --cron '30 2 * * *' --tz Europe/Berlin "
        "--from 2027-03-26T00:00:00Z --count 4",
    )
    when = nx.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="a cron expression: minute hour day-of-month month day-of-week, e.g. '0 8 * * *'")
    when.add_argument("--every", help=f"an interval ({EXAMPLES}), counted from --from")
    nx.add_argument("--tz", default="UTC", help="the IANA time zone the cron expression is read in (default: UTC)")
    nx.add_argument("--from", dest="start", help="start after this instant, ISO 8601 with an offset (default: now)")
    nx.add_argument("--count", type=int, default=5, help=f"how many ticks (1 to {MAX_COUNT}, default 5)")
    nx.add_argument("--json", action="store_true", help="print JSON instead of text")
    return {"schedules": run}


def _key(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the schedule's name (`schedules list`)")
    p.add_argument("--tenant", help="its tenant (a UUID); omit for a code-declared schedule")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.schedules_command == "next":
        return _next(args)
    conn = await connect_database(settings)
    try:
        return await _run(conn, settings, args)
    finally:
        await conn.close()


async def _run(conn: Any, settings: Settings, args: argparse.Namespace) -> int:
    cmd = args.schedules_command
    by = getattr(args, "by", None) or getpass.getuser()
    if cmd == "list":
        found = await schedules.list_(conn, args.tenant)
        if args.json:
            _json(found)
        else:
            _list_text(found)
    elif cmd == "show":
        row = await schedules.show(conn, args.tenant, args.name)
        _json(row) if args.json else _list_text([row])
    elif cmd == "add":
        try:
            data = orjson.loads(args.data)
        except orjson.JSONDecodeError as exc:
            raise UsageError(
                f"--data is not JSON ({exc}); write an object, e.g. '{{\"stale_after_s\": 86400}}'"
            ) from None
        if not isinstance(data, dict):
            raise UsageError("--data must be a JSON object, e.g. '{}'")
        every = None if args.every is None else _whole_seconds(args.every)
        s = schedules.build(
            engine_of(settings), tenant=args.tenant, name=args.name, kind="event" if args.event else "tick",
            event_type=args.event or args.tick, entity_id=args.entity, data=data, cron=args.cron, every_s=every,
            timezone=args.tz, jitter_s=args.jitter, catch_up=args.catch_up, max_catch_up=args.max_catch_up,
            description=args.description,
        )  # fmt: skip
        row = await schedules.add(conn, s, by, args.reason)
        _json(row) if args.json else print(f"added: {_line(row)}")
    elif cmd in ("pause", "resume"):
        change = schedules.pause if cmd == "pause" else schedules.resume
        row = await change(conn, args.tenant, args.name, by, args.reason)
        print(f"{cmd}d: {_line(row)}")
    elif cmd == "delete":
        row = await schedules.delete(conn, engine_of(settings), args.tenant, args.name)
        print(f"deleted: {_line(row)}")
    else:
        out = await schedules.trigger(conn, args.tenant, args.name, args.request_id)
        if args.json:
            _json(out)
        elif out["queued"]:
            print(f"triggered: {out['schedule']} queued message {out['message_id']} to {out['exchange']} "
                  f"({out['routing_key']}); request id {out['request_id']}")  # fmt: skip
        else:
            print(f"already triggered: request {out['request_id']} queued message {out['message_id']} before")
    return 0


def _whole_seconds(text: str) -> int:
    every = parse_age(text)
    if every != int(every):
        raise UsageError(f"--every {text!r}: a schedule ticks in whole seconds ({EXAMPLES})")
    return int(every)


def _json(found: Any) -> None:
    print(orjson.dumps(found, default=str, option=orjson.OPT_INDENT_2).decode())


def _when(r: dict[str, Any]) -> str:
    return f"cron '{r['cron']}' ({r['timezone']})" if r["cron"] else f"every {r['every_s']} s"


def _line(r: dict[str, Any]) -> str:
    tenant = "code" if r["source"] == "code" else f"tenant {r['tenant']}"
    what = f"{r['kind']} {r['event_type']}" + (f" -> {r['entity_id']}" if r["entity_id"] else "")
    state = "PAUSED" if r["paused"] else f"next {r['next_tick_at']:%Y-%m-%d %H:%M:%S} UTC"
    return f"{r['name']} ({tenant}) {_when(r)}: {what}; {state}"


def _list_text(found: list[dict[str, Any]]) -> None:
    if not found:
        print("no schedules")
    for r in found:
        print(_line(r))
        last = "never" if r["last_tick_at"] is None else f"{r['last_tick_at']:%Y-%m-%d %H:%M:%S} UTC"
        print(f"    last tick {last}; fired {r['fired']}, missed {r['missed']}; catch-up {r['catch_up']}"
              + (f"; {r['reason']}" if r["paused"] else ""))  # fmt: skip


def _next(args: argparse.Namespace) -> int:
    start = _instant(args.start) if args.start else datetime.now(UTC)
    if not 1 <= args.count <= MAX_COUNT:
        raise UsageError(f"--count must be from 1 to {MAX_COUNT}, got {args.count}")
    try:
        every = None if args.every is None else parse_age(args.every)
        if every is not None and every != int(every):
            raise ValueError(f"--every {args.every!r}: a schedule ticks in whole seconds ({EXAMPLES})")
        spec = Spec(cron=args.cron, every_s=None if every is None else int(every), anchor=start, timezone=args.tz)
        ticks = []
        t = start
        for _ in range(args.count):
            t = next_tick(spec, t)
            ticks.append(t)
    except (ValueError, OverflowError) as exc:  # OverflowError: past the year 9999
        raise UsageError(str(exc) or "no tick before the year 9999") from None
    if args.json:
        out = [{"utc": t.isoformat(), "local": t.astimezone(spec.zone).isoformat()} for t in ticks]
        print(orjson.dumps({"timezone": args.tz, "ticks": out}, option=orjson.OPT_INDENT_2).decode())
        return 0
    for t in ticks:
        local = t.astimezone(spec.zone)
        print(f"{t:%Y-%m-%d %H:%M:%S} UTC  {local:%Y-%m-%d %H:%M:%S %Z} ({args.tz})")
    return 0


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--from {text!r}: write an ISO 8601 instant, e.g. 2027-03-26T00:00:00Z") from None
    if value.tzinfo is None:
        raise UsageError(f"--from {text!r}: give its offset (Z for UTC, or +03:00), e.g. 2027-03-26T00:00:00Z")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise UsageError(f"--from {text!r}: out of range (years 1 to 9999, in UTC)") from None
