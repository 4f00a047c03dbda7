"""`sfworkflow replay`: do what the definition says for stuck instances, once, with a record of it.

Exit codes: 0 something was done (or, with --dry-run, would be), 1 a replay failed, 2 a usage error (e.g. an
unknown workflow or state), 3 nothing to do (nothing stuck matches; the named instance does not exist, is not
stuck yet, or has nothing a replay could do). The rules are in sfworkflow/ops/replay.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import asyncpg

from sfworkflow import db
from sfworkflow.cli.exit_codes import ExitCode
from sfworkflow.cli.progress import Progress
from sfworkflow.cli.stuck import add_filters, filters_from, instance_key
from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import Filters, check_names, format_age
from sfworkflow.db.repository import Store
from sfworkflow.errors import UsageError
from sfworkflow.ops import replay
from sfworkflow.ops.stuck import find_stuck
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "replay",
        help="re-drive stuck instances: fire an overdue timer, re-issue the pending command (same key, "
        "attempt + 1), or re-drive parked events",
        description="Do once, for stuck instances, what their definition says unsticks them: fire an overdue "
        "timer now, re-issue the pending command (same idempotency key, attempt + 1) or re-drive parked events. "
        "Use it after the cause is fixed (a worker back, a provider up); start with --dry-run. Each replay is a "
        "history row saying who, when and why; it is safe while the service runs and when two replays run at "
        "once. A named instance that is not stuck yet is explained instead (--force replays it all the same). "
        "With --all-stuck, progress (count, rate, time left) is shown on stderr when it is a terminal, else a "
        "summary line.",
        epilog="exit codes: 0 replayed (with --dry-run: would replay), 1 a replay failed, 2 a usage error, "
        "3 nothing to do (no stuck instance matches; the named one does not exist, is not stuck yet, or has "
        "nothing a replay could do)",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--instance", help="one instance: TENANT/WORKFLOW/ENTITY (explained when it is not stuck)")
    which.add_argument("--all-stuck", action="store_true", help="every stuck instance matching the filters")
    add_filters(p)
    p.add_argument("--dry-run", action="store_true", help="print exactly what would be done, do nothing")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --instance: replay it now although it is not stuck yet (recorded as forced)",
    )
    p.add_argument("--reason", default="", help="why (recorded in each instance's history)")
    p.add_argument("--by", default=None, help="who (recorded; default: the OS user)")
    return {"replay": run}


async def run(settings: Settings, args: argparse.Namespace) -> int:
    engine = Engine(DEFINITIONS)
    if args.force and not args.instance:
        raise UsageError("--force goes with --instance: it replays one named instance that is not stuck yet")
    key = instance_key(args.instance) if args.instance else None
    if key is not None:
        args.tenant, args.workflow = key.tenant_id, key.workflow
    check_names(engine, args.workflow, args.state)
    f = filters_from(args, key.entity_id if key else None, settings)
    pool = await db.create_pool(settings.database_url, 2)
    try:
        async with pool.acquire() as conn:
            plans = await _plans(conn, engine, f, args) if key is None else await _named(conn, engine, f, args)
        if not plans:
            return ExitCode.NOTHING_TO_DO
        if args.dry_run:
            return _dry_run(plans)
        results = await _execute(pool, engine, settings, plans, args)
    finally:
        await pool.close()
    return exit_code(results)


def exit_code(results: list[replay.Result]) -> int:
    """FAILED when any replay failed, OK when any was done, else NOTHING_TO_DO (all skipped)."""
    statuses = {r.status for r in results}
    if "failed" in statuses:
        return ExitCode.FAILED
    return ExitCode.OK if "done" in statuses else ExitCode.NOTHING_TO_DO


async def _plans(conn: asyncpg.Connection, engine: Engine, f: Filters, args: argparse.Namespace) -> list[replay.Plan]:
    plans = [replay.plan_for(s, engine) for s in await find_stuck(conn, engine, f)]
    if not plans:
        print("nothing to replay: no stuck instance matches")
    return plans


async def _named(conn: asyncpg.Connection, engine: Engine, f: Filters, args: argparse.Namespace) -> list[replay.Plan]:
    """The plan for the named instance; when it has none, why (its state, its stuck rule, what replay would do)."""
    named = await replay.select_instance(conn, engine, instance_key(args.instance), f, force=args.force)
    if named is None:
        print(
            f"sfworkflow replay: no instance {args.instance}; check the tenant, workflow and entity "
            "(`sfworkflow inspect` shows one instance, `sfworkflow stuck` the stuck ones)",
            file=sys.stderr,
        )
        return []
    if named.plans and not named.plan.forced:
        return named.plans
    print_explanation(named)
    if named.why_not:
        why = "" if named.why_not == named.plan.detail else f": {named.why_not}"
        print(f"nothing done{why}" + ("; --force does it now" if named.forceable else ""))
    return named.plans


def print_explanation(named: replay.Named) -> None:
    """Its state and since when, when its definition counts it as stuck, and what a replay does for it."""
    e = named.explanation
    since = e.rule.since
    soon = f", {format_age((since - e.now).total_seconds())} from now" if since and since > e.now else ""
    print(e.summary())
    print(f"  stuck rule: {e.rule.text}{soon}")
    print(f"  replay plan: {named.plan.action}: {named.plan.detail}")


def _dry_run(plans: list[replay.Plan]) -> int:
    for p in plans:
        forced = " [forced: not stuck yet]" if p.forced else ""
        print(f"would {p.action:<16} {p.stuck.ref}  ({p.stuck.state}, {p.stuck.why}): {p.detail}{forced}")
    print(f"dry run: {len(plans)} instance(s), nothing done")
    return ExitCode.OK if any(p.acts for p in plans) else ExitCode.NOTHING_TO_DO


async def _execute(
    pool: asyncpg.Pool, engine: Engine, settings: Settings, plans: list[replay.Plan], args: argparse.Namespace
) -> list[replay.Result]:
    """Each plan carried out, a line each as it is done; with --all-stuck, progress on stderr."""
    by = args.by or replay.operator()
    counts: dict[str, int] = {}
    store = Store(pool, engine, settings.park_timeout_s)
    with Progress("replay", len(plans), "instance(s)", show=args.all_stuck) as progress:

        def done(r: replay.Result) -> None:
            counts[r.status] = counts.get(r.status, 0) + 1
            forced = " (forced)" if r.plan.forced else ""
            progress.echo(f"{r.status:<8} {r.plan.action:<16} {r.plan.stuck.ref}: {r.message}{forced}")
            progress.advance()

        results = await replay.replay_all(pool, store, plans, args.reason, by, progress=done)
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return results
