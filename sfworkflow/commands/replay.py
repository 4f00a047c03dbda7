"""`sfworkflow replay`: do what the definition says for stuck instances, once, with a record of it."""

from __future__ import annotations

import argparse
from typing import Any

from sfworkflow import db, replay
from sfworkflow.commands.stuck import add_filters, filters_from, load
from sfworkflow.engine import Engine
from sfworkflow.settings import Settings
from sfworkflow.store import Store
from sfworkflow.workflows import DEFINITIONS


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "replay",
        help="re-drive stuck instances: fire an overdue timer, re-issue the pending command (same key, "
        "attempt + 1), or re-drive parked events",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--instance", help="one instance: TENANT/WORKFLOW/ENTITY")
    which.add_argument("--all-stuck", action="store_true", help="every stuck instance matching the filters")
    add_filters(p)
    p.add_argument("--dry-run", action="store_true", help="print exactly what would be done, do nothing")
    p.add_argument("--reason", default="", help="why (recorded in each instance's history)")
    p.add_argument("--by", default=None, help="who (recorded; default: the OS user)")
    return {"replay": run}


async def run(settings: Settings, args: argparse.Namespace) -> int:
    entity = None
    if args.instance:
        parts = args.instance.split("/")
        if len(parts) != 3:
            print("sfworkflow replay: --instance is TENANT/WORKFLOW/ENTITY")
            return 2
        args.tenant, args.workflow, entity = parts
    stuck = await load(settings, filters_from(args, entity, settings))
    engine = Engine(DEFINITIONS)
    plans = [replay.plan_for(s, engine) for s in stuck]
    if not plans:
        print("nothing to replay: no stuck instance matches")
        return 0
    if args.dry_run:
        for p in plans:
            print(f"would {p.action:<16} {p.stuck.ref}  ({p.stuck.state}, {p.stuck.why}): {p.detail}")
        print(f"dry run: {len(plans)} instance(s), nothing done")
        return 0
    by = args.by or replay.operator()
    pool = await db.create_pool(settings.database_url, 2)
    try:
        store = Store(pool, engine, settings.park_timeout_s)
        results = []
        for p in plans:
            try:
                results.append(await replay.execute(pool, store, p, args.reason, by))
            except Exception as exc:  # one instance failing does not stop the others
                results.append(replay.Result(p, "failed", f"{type(exc).__name__}: {str(exc)[:200]}"))
    finally:
        await pool.close()
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
        print(f"{r.status:<8} {r.plan.action:<16} {r.plan.stuck.ref}: {r.message}")
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("failed") else 0
