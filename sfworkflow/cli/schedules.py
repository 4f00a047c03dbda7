"""`sfworkflow schedules next`: when a schedule would tick (core/schedules.py), before one is declared.

Reads no database: it checks a cron expression or an interval in a time zone and prints its next ticks in UTC and
in the zone's wall time, so a daily report at 08:00 Asia/Riyadh or a 02:30 Europe/Berlin job can be checked across
a daylight-saving change before it is declared (docs/design/schedules.md: the rows and the loop come next).
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import orjson

from sfworkflow.core.durations import EXAMPLES, parse_age
from sfworkflow.core.schedules import Spec, next_tick
from sfworkflow.errors import UsageError

MAX_COUNT = 1000


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "schedules",
        help="schedules: when one would tick",
        description="Schedules publish an event at each tick of a cron expression or an interval, in a time zone "
        "(docs/design/schedules.md). `next` prints when a schedule would tick.",
    )
    actions = p.add_subparsers(dest="schedules_command", required=True, metavar="next")
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


async def run(_settings: Any, args: argparse.Namespace) -> int:
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
