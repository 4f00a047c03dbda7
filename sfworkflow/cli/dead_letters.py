"""`sfworkflow dead-letters list | show | redrive | purge`: look at and act on `sfworkflow.dead`.

list and show take nothing away: every message read goes back to the queue. redrive re-publishes the
original message to sfworkflow.events (with publisher confirms) and removes the dead letter only after
the broker confirmed the copy. purge removes dead letters older than an age.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from sfworkflow.cli.exit_codes import ExitCode
from sfworkflow.cli.progress import Progress
from sfworkflow.contract.headers import DEAD_LETTERED_AT
from sfworkflow.contract.topology import DEAD_QUEUE, EVENTS_EXCHANGE
from sfworkflow.core.durations import WITH_UNITS, parse_age, unit_of
from sfworkflow.db import operations
from sfworkflow.errors import DeadReason, SfworkflowError
from sfworkflow.ops.dead_letters import (
    DeadLetter,
    DeadLetterQueue,
    connect_database,
    describe,
)
from sfworkflow.settings import Settings

SHOW_BODY_LIMIT = 4096  # characters of body `show` prints
DETAIL_WIDTH = 60  # characters of detail per line of `list`
PURGE_LINES = 20  # purged messages listed one per line, at most
DEFAULT_LIST_LIMIT = 100
DEFAULT_MAX_REDRIVES = 3

# Reasons given after the event's id went into the inbox: a redrive is applied only once that entry,
# which made the service treat the event as seen, is released (when the event was not applied since).
INBOX_REASONS = frozenset(
    {DeadReason.INTERNAL_ERROR, DeadReason.TRANSITION_NOT_ALLOWED, DeadReason.UNKNOWN_DEFINITION_VERSION}
)

Action = Callable[[Settings, argparse.Namespace], Awaitable[int]]


def register(sub: Any) -> dict[str, Action]:
    p = sub.add_parser(
        "dead-letters",
        help=f"list, show, redrive or purge the dead letters in {DEAD_QUEUE}",
        description=f"Look at and act on {DEAD_QUEUE}, where every message the service could not apply lands "
        "with a reason code. Start with `list` (grouped by reason), read one with `show`, "
        "fix the cause, then `redrive` what can now be applied, or `purge` what will never be.",
    )
    actions = p.add_subparsers(dest="dead_letters_command", required=True, metavar="list|show|redrive|purge")
    ls = actions.add_parser(
        "list",
        help="dead letters grouped by reason, then one line each (nothing is removed)",
        description=f"Read every message in {DEAD_QUEUE} and put it back: a count per reason with the oldest and "
        "newest, then one line per message (id, reason, routing key, when, redrives, detail).",
    )
    ls.add_argument("--reason", help="only this reason code, e.g. schema_violation")
    ls.add_argument("--limit", type=_positive, default=DEFAULT_LIST_LIMIT, help="message lines at most (default 100)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of text")
    sh = actions.add_parser(
        "show",
        help="one dead letter: every header and the body (nothing is removed)",
        description="Print one dead letter, found by its AMQP message id: its reason, every header and its body "
        "(pretty JSON when it parses). The message goes back to the queue. Exits 1 when no message has the id.",
    )
    sh.add_argument("id", help="its AMQP message id (see `dead-letters list`)")
    rd = actions.add_parser(
        "redrive",
        help=f"re-publish dead letters to {EVENTS_EXCHANGE} (after a fix)",
        description=f"Re-publish the original message of each selected dead letter to {EVENTS_EXCHANGE} (with "
        "publisher confirms) and remove the dead letter once the broker confirmed the copy. Use it once the "
        "cause is fixed (a schema or release deployed); try --dry-run first. An event the service had recorded as "
        "seen is released first, unless it was applied since. Progress (count, rate, time left) is shown on "
        "stderr when it is a terminal, else a summary line. Exits 1 when a message was refused or failed.",
    )
    rd.add_argument("--reason", help="only this reason code")
    rd.add_argument("--event-type", help="only this event type, e.g. sequence.enrolled")
    rd.add_argument("--id", action="append", help="only this message id (repeatable)")
    rd.add_argument("--limit", type=_positive, help="redrive at most this many")
    rd.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    rd.add_argument(
        "--max-redrives",
        type=_positive,
        default=DEFAULT_MAX_REDRIVES,
        help="refuse a message already redriven this many times (default 3)",
    )
    pg = actions.add_parser(
        "purge",
        help="delete dead letters older than an age",
        description="Delete the dead letters dead-lettered longer ago than --older-than (of --reason, when "
        "given), for those that will never be applied. Try --dry-run first. Exits 1 when some could not be removed.",
    )
    pg.add_argument(
        "--older-than",
        required=True,
        type=_age,
        metavar="AGE",
        help=f"an age with its unit: {WITH_UNITS} (a plain number, seconds elsewhere, is refused here: a purge "
        "deletes)",
    )
    pg.add_argument("--reason", help="only this reason code")
    pg.add_argument("--dry-run", action="store_true", help="print what would be deleted; delete nothing")
    return {"dead-letters": dead_letters}


async def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    actions: dict[str, Action] = {
        "list": list_dead_letters,
        "show": show_dead_letter,
        "redrive": redrive_dead_letters,
        "purge": purge_dead_letters,
    }
    return await actions[args.dead_letters_command](settings, args)


# ---- list -------------------------------------------------------------------------------------------


async def list_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    async with DeadLetterQueue(settings) as dlq:
        read = 0
        async for dl in dlq.read():
            read += 1
            if args.reason is None or dl.reason == args.reason:
                rows.append(summary_row(dl))
    report = {
        "queue": DEAD_QUEUE,
        "read": read,
        "matching": len(rows),
        "reason_filter": args.reason,
        "by_reason": group_by_reason(rows),
        "messages": rows[: args.limit],
    }
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print_list(report)
    return 0


def summary_row(dl: DeadLetter) -> dict[str, Any]:
    at = dl.dead_lettered_at
    return {
        "message_id": dl.message_id,
        "reason": dl.reason,
        "original_routing_key": dl.original_routing_key,
        "event_type": dl.event_type,
        "dead_lettered_at": at.isoformat() if at else None,
        "redrives": dl.redrives,
        "detail": dl.detail,
    }


def group_by_reason(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reason: count, oldest and newest dead-lettered-at; the most frequent reason first."""
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault(r["reason"], {"reason": r["reason"], "count": 0, "oldest": None, "newest": None})
        g["count"] += 1
        at = r["dead_lettered_at"]
        if at is not None:
            g["oldest"] = at if g["oldest"] is None else min(g["oldest"], at, key=_instant)
            g["newest"] = at if g["newest"] is None else max(g["newest"], at, key=_instant)
    return sorted(groups.values(), key=lambda g: (-g["count"], g["reason"]))


def print_list(report: dict[str, Any]) -> None:
    matching, read = report["matching"], report["read"]
    if read == 0:
        print(f"{DEAD_QUEUE} is empty")
        return
    if matching == 0:
        print(f"no dead letter with reason {report['reason_filter']!r} among the {read} in {DEAD_QUEUE}")
        return
    scope = f" with reason {report['reason_filter']!r}" if report["reason_filter"] else ""
    print(f"{DEAD_QUEUE}: {matching} dead letter(s){scope} of {read}")
    print(f"  {'REASON':<28} {'COUNT':>6}  {'OLDEST':<20}  {'NEWEST':<20}")
    for g in report["by_reason"]:
        print(f"  {safe(g['reason']):<28} {g['count']:>6}  {_when(g['oldest']):<20}  {_when(g['newest']):<20}")
    print()
    print(f"  {'MESSAGE ID':<36}  {'REASON':<26} {'ROUTING KEY':<28} {'DEAD-LETTERED AT':<20} {'REDRIVES':>8}  DETAIL")
    for r in report["messages"]:
        print(
            f"  {safe(r['message_id'] or '-'):<36}  {safe(r['reason']):<26} {safe(r['original_routing_key']):<28} "
            f"{_when(r['dead_lettered_at']):<20} {r['redrives']:>8}  {shorten(r['detail'], DETAIL_WIDTH)}"
        )
    hidden = matching - len(report["messages"])
    if hidden > 0:
        print(f"  … and {hidden} more (--limit)")


# ---- show -------------------------------------------------------------------------------------------


async def show_dead_letter(settings: Settings, args: argparse.Namespace) -> int:
    async with DeadLetterQueue(settings) as dlq:
        found: DeadLetter | None = None
        copies = read = 0
        async for dl in dlq.read():
            read += 1
            if dl.message_id == args.id:
                copies += 1
                found = found or dl
        if found is None:
            print(
                f"sfworkflow dead-letters show: no dead letter with message id {safe(args.id)!r} among the {read} "
                f"in {DEAD_QUEUE}; `sfworkflow dead-letters list` shows their ids",
                file=sys.stderr,
            )
            return ExitCode.FAILED
        print_message(found, copies)
    return 0


def print_message(dl: DeadLetter, copies: int) -> None:
    print(f"message id:     {safe(dl.message_id or '-')}")
    if copies > 1:
        print(f"copies:         {copies} messages in {DEAD_QUEUE} carry this id (the first is shown)")
    print(f"reason:         {safe(dl.reason)}")
    print(f"content type:   {safe(dl.content_type or '-')}")
    print(f"redrives:       {dl.redrives}")
    if dl.delivery_count:
        print(f"delivery count: {dl.delivery_count} (times it went back to the queue)")
    print("headers:")
    for key in sorted(dl.headers):
        print(f"  {safe(key)}: {header_value(dl.headers[key])}")
    print(f"body ({len(dl.body)} bytes{', JSON' if dl.parsed_body is not None else ''}):")
    print(body_text(dl))


def header_value(value: Any) -> str:
    if isinstance(value, str):
        return safe(value)
    return orjson.dumps(value, default=str).decode()


def body_text(dl: DeadLetter) -> str:
    """Pretty JSON when the body parses, else a repr of the bytes; at most SHOW_BODY_LIMIT characters."""
    if dl.parsed_body is not None:
        text = orjson.dumps(dl.parsed_body, option=orjson.OPT_INDENT_2).decode()
    else:
        text = repr(dl.body[: SHOW_BODY_LIMIT + 1])
    if len(text) > SHOW_BODY_LIMIT:
        return text[:SHOW_BODY_LIMIT] + f"\n… (truncated at {SHOW_BODY_LIMIT} characters; body is {len(dl.body)} bytes)"
    return text


# ---- redrive ----------------------------------------------------------------------------------------


@dataclass
class RedriveRun:
    """What one redrive did, counted and line by line."""

    dry_run: bool
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    redriven: int = 0
    refused: int = 0
    failed: int = 0
    skipped: int = 0
    seen: dict[str, bytes] = field(default_factory=dict)  # message id -> body redriven in this run
    echo: Callable[[str], None] = print  # prints a line of the run's report (above the progress line)

    def remember(self, dl: DeadLetter) -> None:
        if dl.message_id is not None:
            self.seen[dl.message_id] = dl.body

    def say(self, verb: str, dl: DeadLetter, text: str) -> None:
        self.echo(f"{verb:<10} {safe(dl.message_id or '-')} {safe(dl.reason)}: {text}")


class InboxGuard:
    """Releases the inbox entry of a dead-lettered event that was never applied, so its redrive is not
    dropped as a duplicate. Connects to PostgreSQL on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn: asyncpg.Connection | None = None
        self.error: str | None = None

    async def prepare(self, key: operations.EventKey, release: bool) -> str:
        """'applied' (history or parked rows have the event), 'released'/'would release', or 'absent'."""
        if self.error is None and self.conn is None:
            try:
                self.conn = await connect_database(self.settings)
            except SfworkflowError as exc:
                self.error = str(exc)
        if self.conn is None:
            raise SfworkflowError(self.error or "no database connection")
        async with self.conn.transaction():
            state = await operations.inbox_state_of_event(self.conn, key)
            if state.taken:
                return "applied"
            if not state.in_inbox:
                return "absent"
            if not release:
                return "would release"
            await operations.release_inbox_entry(self.conn, key.tenant_id, key.event_id)
            return "released"

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()


async def redrive_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    run = RedriveRun(dry_run=args.dry_run)
    guard = InboxGuard(settings)
    chosen = 0
    try:
        async with DeadLetterQueue(settings) as dlq:
            # Progress counts the dead letters read (each is looked at once), of those in the queue at the start.
            with Progress("redrive", dlq.ready, "dead letter(s) read") as progress:
                run.echo = progress.echo
                async for dl in dlq.read():
                    progress.advance()
                    if not selected(dl, args) or _after(dl, run.started):
                        run.skipped += 1
                        continue
                    if args.limit is not None and chosen >= args.limit:
                        run.skipped += 1
                        continue
                    chosen += 1
                    await redrive_one(dlq, dl, args, guard, run)
    finally:
        await guard.close()
    print_redrive_summary(run)
    return 1 if run.refused or run.failed else 0


def selected(dl: DeadLetter, args: argparse.Namespace) -> bool:
    if args.reason is not None and dl.reason != args.reason:
        return False
    if args.event_type is not None and (dl.event_type or dl.original_routing_key) != args.event_type:
        return False
    return not args.id or dl.message_id in args.id


async def redrive_one(
    dlq: DeadLetterQueue, dl: DeadLetter, args: argparse.Namespace, guard: InboxGuard, run: RedriveRun
) -> None:
    if dl.redrives >= args.max_redrives:
        run.refused += 1
        run.say("refused", dl, f"already redriven {dl.redrives} time(s) (--max-redrives {args.max_redrives}); it stays")
        return
    routing_key = dl.redrive_routing_key
    if not routing_key:
        run.failed += 1
        run.say("failed", dl, "no original routing key and no event_type in the body; it stays")
        return
    if dl.message_id is not None and run.seen.get(dl.message_id) == dl.body:
        await remove_copy(dlq, dl, run)
        return
    if not await release_inbox(dl, guard, run):
        return
    n = dl.redrives + 1
    if run.dry_run:
        run.redriven += 1
        run.remember(dl)
        run.say("would", dl, f"redrive to {EVENTS_EXCHANGE} with routing key {safe(routing_key)} (redrive {n})")
        return
    try:
        await dlq.publish_event(dl, routing_key)
    except SfworkflowError:
        raise
    except Exception as exc:
        run.failed += 1
        run.say("failed", dl, f"not published ({describe(exc, '')}); it stays")
        return
    run.remember(dl)
    await remove_after_publish(dlq, dl, run, f"published to {EVENTS_EXCHANGE} as {safe(routing_key)} (redrive {n})")


async def release_inbox(dl: DeadLetter, guard: InboxGuard, run: RedriveRun) -> bool:
    """For events the service already recorded as seen: False (and the reason said) when not redrivable."""
    key = event_key(dl) if dl.reason in INBOX_REASONS else None
    if key is None:
        return True
    try:
        state = await guard.prepare(key, release=not run.dry_run)
    except Exception as exc:
        run.failed += 1
        run.say("failed", dl, f"cannot check whether event {key.event_id} was applied since: {exc}; it stays")
        return False
    if state == "applied":
        run.skipped += 1
        run.say(
            "skipped",
            dl,
            f"event {key.event_id} was applied or parked since; a redrive would be dropped as a duplicate "
            "(purge it when no longer needed)",
        )
        return False
    if state in ("released", "would release"):
        run.echo(f"{'':<10} {safe(dl.message_id or '-')}: inbox entry of event {key.event_id} {state}")
    return True


async def remove_copy(dlq: DeadLetterQueue, dl: DeadLetter, run: RedriveRun) -> None:
    """A second identical copy of a message redriven in this run (e.g. published twice by a relay)."""
    if run.dry_run:
        run.skipped += 1
        run.say("would", dl, "remove this identical copy of a message redriven above")
        return
    await remove_after_publish(dlq, dl, run, "identical copy of a message redriven above, removed")


async def remove_after_publish(dlq: DeadLetterQueue, dl: DeadLetter, run: RedriveRun, text: str) -> None:
    try:
        await dlq.remove(dl)
    except Exception as exc:
        run.failed += 1
        run.say(
            "failed",
            dl,
            f"{text}, but the dead letter could not be removed ({describe(exc, '')}); it returns to the queue "
            "(the service drops a second redrive of an applied event as a duplicate)",
        )
        return
    run.redriven += 1
    run.say("redriven", dl, text)


def event_key(dl: DeadLetter) -> operations.EventKey | None:
    """The body's tenant and event ids (when both are UUIDs), its workflow (its event type's prefix) and entity."""
    body = dl.parsed_body
    if not isinstance(body, dict):
        return None
    try:
        tenant_id, event_id = str(uuid.UUID(str(body.get("tenant_id")))), str(uuid.UUID(str(body.get("event_id"))))
    except ValueError:
        return None
    return operations.EventKey(
        tenant_id, event_id, str(body.get("event_type", "")).partition(".")[0], str(body.get("entity_id", ""))
    )


def print_redrive_summary(run: RedriveRun) -> None:
    verb = "would be redriven" if run.dry_run else "redriven"
    print(
        f"{'dry run: ' if run.dry_run else ''}{run.redriven} {verb}, {run.refused} refused, {run.failed} failed, "
        f"{run.skipped} skipped (not selected, over --limit, or applied since)"
    )
    if run.refused:
        print("refused messages stay in the queue: raise --max-redrives once the cause is fixed, or purge them")
    if run.failed:
        print("failed messages stay in the queue; fix what the lines above say and run the redrive again")


def _after(dl: DeadLetter, started: datetime) -> bool:
    """Dead-lettered after this run started (e.g. a message this run redrove, rejected again)."""
    at = dl.dead_lettered_at
    return at is not None and at > started


# ---- purge ------------------------------------------------------------------------------------------


async def purge_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    cutoff = now - args.older_than
    purged = kept = undated = failed = 0
    async with DeadLetterQueue(settings) as dlq:
        async for dl in dlq.read():
            at = dl.dead_lettered_at
            if args.reason is not None and dl.reason != args.reason:
                kept += 1
            elif at is None:
                undated += 1
            elif at >= cutoff:
                kept += 1
            elif await purge_one(dlq, dl, args.dry_run, purged, now):
                purged += 1
            else:
                failed += 1
    if purged > PURGE_LINES:
        print(f"… and {purged - PURGE_LINES} more")
    verb = "would purge" if args.dry_run else "purged"
    print(
        f"{'dry run: ' if args.dry_run else ''}{verb} {purged} dead letter(s) dead-lettered before "
        f"{_when(cutoff.isoformat())}; kept {kept}"
    )
    if undated:
        print(f"kept {undated} without a readable {DEAD_LETTERED_AT} header (`dead-letters show` them)")
    if failed:
        print(f"{failed} could not be removed; they stay in the queue: run the purge again")
    return 1 if failed else 0


async def purge_one(dlq: DeadLetterQueue, dl: DeadLetter, dry_run: bool, done: int, now: datetime) -> bool:
    if not dry_run:
        try:
            await dlq.remove(dl)
        except Exception:
            return False
    if done < PURGE_LINES:
        at = dl.dead_lettered_at
        age = f"dead-lettered {_age_text(now - at)} ago" if at else ""
        print(f"{'would purge' if dry_run else 'purged':<11} {safe(dl.message_id or '-')} {safe(dl.reason)} {age}")
    return True


# ---- helpers ----------------------------------------------------------------------------------------


def safe(text: str) -> str:
    """Text safe for a terminal: control characters shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def shorten(text: str, width: int) -> str:
    text = safe(" ".join(str(text).split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def _age_text(age: timedelta) -> str:
    hours = age.total_seconds() / 3600
    return f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.1f} h"


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _age(text: str) -> timedelta:
    """An age as given on the command line (sfworkflow.core.durations) whose cutoff is still a date. A purge
    deletes: a bare number (seconds elsewhere) is refused, so `30` meant as days cannot purge nearly everything."""
    try:
        seconds = parse_age(text)
    except ValueError as exc:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not an age: write a number and a unit, e.g. {WITH_UNITS}"
        ) from exc
    if unit_of(text) is None:  # `30`, `+30`, `1e3`: seconds elsewhere, refused here
        raise argparse.ArgumentTypeError(f"{text!r} has no unit: give one, e.g. {WITH_UNITS}")
    if seconds >= (datetime.now(UTC) - datetime.min.replace(tzinfo=UTC)).total_seconds():
        raise argparse.ArgumentTypeError(f"{text!r} reaches back before year 1: give a shorter age")
    return timedelta(seconds=seconds)
