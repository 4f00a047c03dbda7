"""`sfworkflow migrate-instances`: move in-flight instances of a workflow from one definition version to another.

    sfworkflow migrate-instances --workflow W --from 1 --to 2 [--map OLD=NEW ...] [--dry-run] [--limit N]
                                 [--reason TEXT] [--batch-size N]

Exit codes: 0 every selected instance was migrated (or skipped because busy: run again), 1 some instance was
refused (it stays on its version; the lines above the summary say why), 2 the migration cannot run as asked
(a version not loaded, a bad --map entry). The rules are in sfworkflow/core/versions.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import asyncpg

from sfworkflow import db
from sfworkflow.cli.exit_codes import ExitCode
from sfworkflow.cli.progress import Progress
from sfworkflow.core.definition import WorkflowDefinition
from sfworkflow.core.engine import Engine
from sfworkflow.core.versions import check_versions, parse_map
from sfworkflow.errors import VersionMigrationError
from sfworkflow.ops.versions import (
    DEFAULT_BATCH_SIZE,
    InstanceResult,
    MigrationReport,
    count_candidates,
    migrate_instances,
)
from sfworkflow.settings import Settings


def loaded_definitions() -> tuple[WorkflowDefinition, ...]:
    """The definitions this release loads (the same the service runs with)."""
    from sfworkflow.workflows import DEFINITIONS

    return DEFINITIONS


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "migrate-instances",
        help="move non-terminal instances of a workflow from one loaded definition version to another",
        description=(
            "Move the non-terminal instances of WORKFLOW on definition version --from to version --to. "
            "A state is kept when it exists in the target version, else mapped with --map; an instance "
            "without a mapping, or whose pending timers the target state does not accept, is refused and "
            "stays where it is. Context and timers are kept. Use it after deploying a release that loads both "
            "versions; run it with --dry-run first. Progress (count, rate, time left) is shown on stderr when it is "
            "a terminal, else a summary line."
        ),
        epilog="exit codes: 0 every selected instance was migrated (or skipped because busy: run again), 1 some "
        "instance was refused (it stays on its version; the lines above the summary say why), 2 the migration "
        "cannot run as asked (a version not loaded, a bad --map entry)",
    )
    p.add_argument("--workflow", required=True, help="workflow name, e.g. sequence")
    p.add_argument(
        "--from", dest="from_version", type=int, required=True, metavar="N", help="the version instances are on"
    )
    p.add_argument("--to", dest="to_version", type=int, required=True, metavar="N", help="the version to move them to")
    p.add_argument(
        "--map",
        dest="mapping",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="state OLD of --from becomes state NEW of --to (repeatable; wins over keeping the same name)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    p.add_argument("--limit", type=positive, default=None, metavar="N", help="consider at most N instances")
    p.add_argument("--reason", default=None, metavar="TEXT", help="why (recorded in each instance's history)")
    p.add_argument(
        "--batch-size", type=positive, default=DEFAULT_BATCH_SIZE, metavar="N", help="instances per transaction"
    )
    return {"migrate-instances": _cmd_migrate_instances}


def positive(text: str) -> int:
    """A whole number of at least 1 (argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def _cmd_migrate_instances(settings: Settings, args: argparse.Namespace) -> int:
    engine = Engine(loaded_definitions())
    try:
        mapping = parse_map(args.mapping)
        check_versions(engine, args.workflow, args.from_version, args.to_version)  # before connecting
        conn = await asyncpg.connect(settings.database_url)
        try:
            await db.init_connection(conn)
            total = await count_candidates(conn, args.workflow, args.from_version)
            with Progress("migrate-instances", min(total, args.limit or total), "instance(s)") as progress:

                def done(report: MigrationReport, batch: list[InstanceResult]) -> None:
                    for r in batch:
                        progress.echo(report.line(r))
                    progress.advance(len(batch))

                report = await migrate_instances(
                    conn,
                    engine,
                    args.workflow,
                    args.from_version,
                    args.to_version,
                    mapping,
                    dry_run=args.dry_run,
                    limit=args.limit,
                    reason=args.reason,
                    batch_size=args.batch_size,
                    progress=done,
                )
        finally:
            await conn.close()
    except VersionMigrationError as exc:
        print(f"sfworkflow migrate-instances: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    for line in report.summary():
        print(line)
    return ExitCode.FAILED if report.refused or report.broken else ExitCode.OK
