"""`sfworkflow check-definition` and `sfworkflow export-histories`: is a definition change safe for the instances in
flight (ops/compat.py replays their recorded histories; read-only)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sfworkflow.cli.exit_codes import ExitCode
from sfworkflow.cli.versions import loaded_definitions
from sfworkflow.core.durations import EXAMPLES, parse_age
from sfworkflow.core.engine import Engine
from sfworkflow.ops import compat
from sfworkflow.ops.dead_letters import connect_database
from sfworkflow.settings import Settings


def register(sub: Any) -> dict[str, Any]:
    ck = sub.add_parser(
        "check-definition",
        help="replay recorded histories through a definition version; report every instance it would treat differently",
        description="Replay the recorded histories of WORKFLOW's instances (in flight; --ended: ended ones too), "
        "read-only, through its own definition version (which must reproduce the recorded states) and through "
        "--version (default: the latest this release loads), and print, for each instance whose replay diverges, "
        "the first step where it does: the outcome (an event now ignored or not allowed), the state, the commands "
        "(- before, + after), the timers. Exits 1 on any divergence. Run it before every definition change "
        "(runbook: 'A definition version change').",
    )
    ck.add_argument("workflow", help="the workflow, e.g. sequence")
    ck.add_argument("--version", type=int, help="the definition version to check (default: the latest loaded)")
    how_many = ck.add_mutually_exclusive_group()
    how_many.add_argument("--sample", type=int, default=100, help="replay this many instances at random (default 100)")
    how_many.add_argument("--all", action="store_true", help="replay every instance")
    ck.add_argument("--ended", action="store_true", help="ended instances too (their histories are whole)")
    ck.add_argument("--since", help=f"only instances changed within this long ({EXAMPLES})")
    ex = sub.add_parser(
        "export-histories",
        help="write a corpus of recorded histories (JSON lines) for tests/histories/",
        description="Write <out>/<workflow>.jsonl: per workflow and state, the newest --per-state instances' recorded "
        "histories and what their definition did at each step, merged with what the files hold. Tenant and entity "
        "ids, event ids, addresses and free text are replaced by stable pseudonyms unless --no-redact. Commit the "
        "files: tests/unit/test_history_corpus.py replays them against the current definitions, so a change that "
        "treats a recorded history differently fails CI with the diff.",
    )
    ex.add_argument("--out", default="tests/histories", help="the directory (default tests/histories)")
    ex.add_argument("--workflow", action="append", help="only this workflow (repeatable; default: all)")
    ex.add_argument("--per-state", type=int, default=5, help="instances per workflow and state (default 5)")
    ex.add_argument("--no-redact", action="store_true", help="keep ids, addresses and text as recorded")
    ex.add_argument("--key", help="the secret pseudonyms are keyed with (default: a random one, never stored)")
    ex.add_argument("--replace", action="store_true",
                    help="replace each workflow's file instead of merging (after a deliberate change)")  # fmt: skip
    return {"check-definition": run_check, "export-histories": run_export}


async def run_check(settings: Settings, args: argparse.Namespace) -> int:
    engine = Engine(loaded_definitions())
    since = None if args.since is None else datetime.now(UTC) - timedelta(seconds=parse_age(args.since))
    conn = await connect_database(settings)
    try:
        report = await compat.check_definition(
            conn, engine, args.workflow, args.version, sample=None if args.all else args.sample, ended_too=args.ended,
            since=since,
        )  # fmt: skip
    finally:
        await conn.close()
    for line in report.lines():
        print(line)
    return ExitCode.FAILED if report.diverged else ExitCode.OK


async def run_export(settings: Settings, args: argparse.Namespace) -> int:
    engine = Engine(loaded_definitions())
    conn = await connect_database(settings)
    try:
        corpus = await compat.collect_corpus(
            conn, engine, workflows=args.workflow, per_state=args.per_state, redacted=not args.no_redact, key=args.key
        )
    finally:
        await conn.close()
    paths = compat.write_corpus(corpus, Path(args.out), replace_files=args.replace)
    for workflow, n in sorted(corpus.counts.items()):
        print(f"{workflow}: {n['written']} history(ies) written, {n['skipped']} skipped (its own version did not "
              "reproduce its recorded states)")  # fmt: skip
    print(f"wrote {', '.join(str(p) for p in paths) or 'nothing'}")
    return ExitCode.OK
