"""Does the retention sweep keep up with the ingest without slowing the event path? Prints one JSON line.

    python bench/retention.py                        # 2,000,000 expired inbox ids and outbox rows
    python bench/retention.py --expired 300000

A fresh database is preloaded with rows past the retention period (14 days), in time order as a live database
holds them: `--expired` inbox ids and published outbox rows, and `--expired / 10` ended instances with the
history rows of a whole sequence each (template rows written by the repository, copied in SQL). Then the drain
workload of bench/throughput.py runs twice: alone, and with the service's retention sweep running beside it
(runtime/retention.RetentionLoop.sweep, its slice size and pause, in this process, on its own pool). Reported:
events/s of each run and their ratio (the sweep's cost to the event path), the rows the sweep deleted per
second while the drain ran, the rows the drain wrote per second (inbox, history, outbox), and their ratio
(target: the sweep deletes at least twice what the peak ingest writes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import growth, throughput  # noqa: E402
from sfworkflow import db  # noqa: E402
from sfworkflow.core.engine import Engine  # noqa: E402
from sfworkflow.db import migrate  # noqa: E402
from sfworkflow.db.repository import Store  # noqa: E402
from sfworkflow.runtime.metrics import Metrics  # noqa: E402
from sfworkflow.runtime.retention import RetentionLoop  # noqa: E402
from sfworkflow.settings import DEFAULT_RETENTION_DAYS  # noqa: E402
from sfworkflow.workflows import DEFINITIONS  # noqa: E402

TEMPLATE = f"tenant_id = '{growth.TEMPLATE_TENANT}'"
OLD = "now() - interval '40 days' + g * interval '1 millisecond'"  # in insertion order, all past 14 days
COPY_ENDED = f"""
WITH t AS (SELECT row_number() OVER (ORDER BY id) - 1 AS k, * FROM sfworkflow.instance WHERE {TEMPLATE} AND terminal)
INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, context, version,
    terminal, parked_count, correlation_id, last_event_id, last_event_type, created_at, updated_at, state_entered_at)
SELECT {growth.TENANT_OF}, t.workflow, t.entity_id || '-old-' || g, t.definition_version, t.state, t.context,
       t.version, true, 0, t.correlation_id, gen_random_uuid(), t.last_event_type, {OLD}, {OLD}, {OLD}
FROM generate_series($1::bigint, $2::bigint) g JOIN t ON t.k = g % $3::bigint
"""
COPY_ENDED_HISTORY = f"""
INSERT INTO sfworkflow.history (instance_id, seq, event_id, event_type, outcome, from_state, to_state, detail,
    created_at)
SELECT i.id, h.seq, CASE WHEN h.event_id IS NULL THEN NULL ELSE gen_random_uuid() END, h.event_type, h.outcome,
       h.from_state, h.to_state, h.detail, i.updated_at
FROM sfworkflow.instance i
CROSS JOIN (SELECT * FROM sfworkflow.history WHERE instance_id =
    (SELECT min(id) FROM sfworkflow.instance WHERE {TEMPLATE} AND terminal)) h
WHERE i.id BETWEEN $1 AND $2 AND i.terminal AND NOT (i.{TEMPLATE})
"""
COPY_INBOX = growth.copy_inbox(OLD, "-old-")
COPY_OUTBOX = growth.copy_outbox(OLD, "NULL")
ROWS = {t: f"SELECT count(*) FROM sfworkflow.{t}" for t in ("instance", "history", "inbox", "outbox")}
# Rows written since $1 (whatever the sweeps deleted meanwhile: only old rows are deleted).
NEW_ROWS = {
    "history": "SELECT count(*) FROM sfworkflow.history WHERE created_at >= $1",
    "inbox": "SELECT count(*) FROM sfworkflow.inbox WHERE received_at >= $1",
    "outbox": "SELECT count(*) FROM sfworkflow.outbox WHERE created_at >= $1",
}


async def preload(db_url: str, expired: int) -> dict[str, Any]:
    t0 = time.monotonic()
    conn = await asyncpg.connect(db_url)
    try:
        await migrate.migrate(conn)
        await growth._templates(db_url)
        ended = await conn.fetchval(f"SELECT count(*) FROM sfworkflow.instance WHERE {TEMPLATE} AND terminal")
        inbox = await conn.fetchval(f"SELECT count(*) FROM sfworkflow.inbox WHERE {TEMPLATE}")
        outbox = await conn.fetchval(
            f"SELECT count(*) FROM sfworkflow.outbox WHERE instance_id IN (SELECT id FROM sfworkflow.instance "
            f"WHERE {TEMPLATE})"
        )
        await growth._chunks(conn, COPY_ENDED, expired // 10, ended)
        lo, hi = await conn.fetchrow(f"SELECT min(id), max(id) FROM sfworkflow.instance WHERE NOT ({TEMPLATE})")
        for first in range(lo, hi + 1, growth.CHUNK):
            await conn.execute(COPY_ENDED_HISTORY, first, min(hi, first + growth.CHUNK - 1))
        await growth._chunks(conn, COPY_INBOX, expired, inbox)
        await growth._chunks(conn, COPY_OUTBOX, expired, outbox)
        for table in growth.TABLES:
            await conn.execute(f"VACUUM ANALYZE sfworkflow.{table}")
        counts = {t: await conn.fetchval(sql) for t, sql in ROWS.items()}
        per_ended = await conn.fetchval(
            "SELECT count(*) FROM sfworkflow.history WHERE instance_id = "
            f"(SELECT min(id) FROM sfworkflow.instance WHERE {TEMPLATE} AND terminal)"
        )
    finally:
        await conn.close()
    return {**counts, "history_per_ended_instance": int(per_ended), "seconds": round(time.monotonic() - t0, 1)}


def _drain_args(enrollments: int) -> argparse.Namespace:
    return argparse.Namespace(
        mode="drain", enrollments=enrollments, rate=0.0, dup_rate=0.05, ooo_rate=0.02, queue_type="classic",
        replicas=1, timeout=600.0, seed=11,
    )  # fmt: skip


async def _sweeping(db_url: str, stop: asyncio.Event, history_per_instance: int) -> dict[str, Any]:
    """The service's sweep, round after round, until `stop` or nothing is left past the retention period: rows
    deleted per table (an ended instance's history rows counted from the template's) and the seconds it ran."""
    pool = await db.create_pool(db_url, 2)
    total: Counter[str] = Counter()
    t0 = time.monotonic()
    try:
        loop = RetentionLoop(Store(pool, Engine(DEFINITIONS), 3600.0), Metrics(), DEFAULT_RETENTION_DAYS)
        while not stop.is_set():
            got = await loop.sweep()
            if not got:
                break
            total.update(got)
    finally:
        await pool.close()
    total["history"] = total["instances"] * history_per_instance
    return {"deleted": dict(total), "seconds": round(time.monotonic() - t0, 2), "finished": not stop.is_set()}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    db_url = await throughput._reset_database()
    loaded = await preload(db_url, args.expired)
    conn = await asyncpg.connect(db_url)
    since = await conn.fetchval("SELECT now()")
    alone = await throughput.run(_drain_args(args.enrollments), db_url=db_url)
    written = {t: int(await conn.fetchval(sql, since)) for t, sql in NEW_ROWS.items()}
    await conn.close()
    ingest_s = alone["wall_s"]
    stop = asyncio.Event()
    sweep = asyncio.create_task(_sweeping(db_url, stop, loaded["history_per_ended_instance"]))
    beside = await throughput.run(_drain_args(args.enrollments), db_url=db_url)
    stop.set()
    swept = await sweep
    deleted = sum(swept["deleted"].values())
    written_rows = sum(written.values())
    ingest_rows_per_s = written_rows / ingest_s if ingest_s else None
    deleted_per_s = deleted / swept["seconds"] if swept["seconds"] else None
    return {
        "bench": "sfworkflow retention",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "preloaded": loaded,
        "drain_alone_events_per_s": alone["events_applied_per_s_steady"],
        "drain_beside_sweep_events_per_s": beside["events_applied_per_s_steady"],
        "event_path_ratio": round(beside["events_applied_per_s_steady"] / alone["events_applied_per_s_steady"], 3),
        "ingest_rows_written": written,
        "ingest_rows_per_s": None if ingest_rows_per_s is None else round(ingest_rows_per_s),
        "sweep": swept,
        "sweep_rows_deleted_per_s": None if deleted_per_s is None else round(deleted_per_s),
        "sweep_to_ingest_ratio": round(deleted_per_s / ingest_rows_per_s, 2)
        if deleted_per_s and ingest_rows_per_s
        else None,
        "checks_ok": alone["checks"]["ok"] and beside["checks"]["ok"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expired", type=int, default=2_000_000, help="expired inbox ids and outbox rows (default 2M)")
    p.add_argument("--enrollments", type=int, default=4000)
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
