"""Does the cost stay flat as the data grows? The same end-to-end workload on an empty database and on one
that holds a live deployment's rows. Prints one JSON line.

    python bench/growth.py                                  # 0 and 1,000,000 active instances
    python bench/growth.py --rows 0,100000,300000,1000000   # the curve
    python bench/growth.py --rows 0,100000 --modes drain    # quicker

For each size in --rows: a fresh database is preloaded with that many active instances, each with a pending
timer far in the future, `--history-per-instance` (10) history rows and `--inbox-per-instance` (10) inbox
ids per instance, and one published outbox row per instance; then each workload of bench/throughput.py in
--modes runs against it with a fresh service process and a fresh vhost (drain: a preloaded queue, as fast as
it goes; live: enrollments answered by the simulated worker, closed loop) and its invariant checks, counted
on the workload's own tenant. The figures of each size are compared with those of the first (--rows 0: the
empty database): `ratio` is events/s at that size over events/s on the empty database.

Preloading goes through the service's own write path first, then copies: template instances (sequence
enrollments whose first step is due in 30 days, and whole sequences that ran to completion) are applied by
the repository (`Store.apply_deliveries`, `Store.fire_due_timers`: the plan and the writes the service
makes), and their rows (instance, timer, history, inbox, outbox) are copied in SQL, with new ids, keys and
times, up to the sizes asked. So every row has the shape the service writes, and a million instances load
in minutes instead of hours. Then VACUUM ANALYZE, as autovacuum would have done on a live database, and a
CHECKPOINT, so that the first workload does not pay for flushing the preload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import throughput  # noqa: E402
from sfworkflow import db  # noqa: E402
from sfworkflow.client.producer import build_event  # noqa: E402
from sfworkflow.contract import schemas  # noqa: E402
from sfworkflow.contract.envelope import EventParser  # noqa: E402
from sfworkflow.core.batch import Delivery  # noqa: E402
from sfworkflow.core.engine import Engine  # noqa: E402
from sfworkflow.db import migrate  # noqa: E402
from sfworkflow.db.repository import Store  # noqa: E402
from sfworkflow.runtime import logs  # noqa: E402
from sfworkflow.runtime.service import known_event_types  # noqa: E402
from sfworkflow.workflows import DEFINITIONS  # noqa: E402

TABLES = ("instance", "timer", "history", "inbox", "outbox", "effect", "claim", "parked")
TEMPLATE_TENANT = "00000000-0000-4000-8000-00000000feed"
TEMPLATES_ACTIVE = 40  # enrollments waiting for their first step, 30 days ahead
TEMPLATES_DONE = 10  # sequences that ran to completion
CHUNK = 200_000  # rows per INSERT ... SELECT, one transaction each
TENANTS = 200  # the preloaded rows are spread over this many tenants


def _enrolled(entity: str, delay_s: int, steps: int) -> dict[str, Any]:
    return build_event(
        "sequence.enrolled",
        tenant_id=TEMPLATE_TENANT,
        entity_id=entity,
        data={
            "sequence_id": "seq-growth",
            "lead_id": f"lead-{entity}",
            "recipient": {"channel": "email", "address": f"{entity}@growth.example"},
            "steps": [{"template_id": f"tpl-{s}", "delay_seconds": delay_s} for s in range(steps)],
        },
        source="bench.growth",
    )


async def _templates(db_url: str) -> None:
    """Template instances written by the repository, as the service writes them."""
    engine = Engine(DEFINITIONS)
    parser = EventParser(schemas.default(), known_event_types(engine), 1 << 20)

    def delivery(ev: dict[str, Any]) -> Delivery:
        body = orjson.dumps(ev)
        return Delivery(parser.parse(body), body)

    pool = await db.create_pool(db_url, 2)
    try:
        store = Store(pool, engine, park_timeout_s=3600.0)
        await store.apply_deliveries([delivery(_enrolled(f"a{i}", 30 * 86400, 3)) for i in range(TEMPLATES_ACTIVE)])
        done = [f"d{i}" for i in range(TEMPLATES_DONE)]
        await store.apply_deliveries([delivery(_enrolled(e, 0, 2)) for e in done])
        for step in range(2):
            while (await store.fire_due_timers()).timers_fired:  # step_due: the send_step command goes out
                pass
            answers = [
                build_event(
                    "sequence.step_sent",
                    tenant_id=TEMPLATE_TENANT,
                    entity_id=e,
                    data={"step": step, "attempt": 1, "provider_message_id": f"p-{e}-{step}"},
                    source="bench.growth",
                )
                for e in done
            ]
            await store.apply_deliveries([delivery(ev) for ev in answers])
    finally:
        await pool.close()


# The copies. $1: first number of the slice, $2: last; a copy's number g makes its keys and ids unique, and
# g modulo the number of template rows ($3) picks the template row it copies (a hash join on k).
TENANT_OF = f"md5('growth-tenant-' || (g % {TENANTS}))::uuid"
TEMPLATE = f"tenant_id = '{TEMPLATE_TENANT}'"
COPY_INSTANCES = f"""
WITH t AS (SELECT row_number() OVER (ORDER BY id) - 1 AS k, * FROM sfworkflow.instance
           WHERE {TEMPLATE} AND NOT terminal)
INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, context, version,
    terminal, parked_count, correlation_id, last_event_id, last_event_type, created_at, updated_at, state_entered_at)
SELECT {TENANT_OF}, t.workflow, t.entity_id || '-' || g, t.definition_version, t.state, t.context, t.version,
       false, 0, t.correlation_id, gen_random_uuid(), t.last_event_type,
       now() - (g % 1000) * interval '1 minute', now() - (g % 1000) * interval '1 minute',
       now() - (g % 1000) * interval '1 minute'
FROM generate_series($1::bigint, $2::bigint) g JOIN t ON t.k = g % $3::bigint
"""
# Every copied instance gets the template's pending timer, due 30 to 31 days from now ($1, $2: an id range).
COPY_TIMERS = f"""
INSERT INTO sfworkflow.timer (instance_id, name, due_at, payload, created_at, lane)
SELECT i.id, tt.name, now() + interval '30 days' + (i.id % 86400) * interval '1 second', tt.payload, i.created_at,
       sfworkflow.tenant_lane(i.tenant_id)
FROM sfworkflow.instance i
CROSS JOIN (SELECT name, payload FROM sfworkflow.timer WHERE instance_id =
    (SELECT min(id) FROM sfworkflow.instance WHERE {TEMPLATE} AND NOT terminal)) tt
WHERE i.id BETWEEN $1 AND $2 AND i.tenant_id <> '{TEMPLATE_TENANT}'
"""
# History, inbox and outbox rows go to the copied instances at random ($4, $5: their id range), at times
# spread over the last 13 days (inside the default retention of 14 days: the sweep leaves them).
SPREAD = "now() - (g % 1123200) * interval '1 second'"
PICK = "$4::bigint + (g * 7919) % ($5::bigint - $4::bigint + 1)"  # a copied instance's id
COPY_HISTORY = f"""
WITH h AS (SELECT row_number() OVER (ORDER BY h.id) - 1 AS k, h.* FROM sfworkflow.history h
           WHERE h.instance_id IN (SELECT id FROM sfworkflow.instance WHERE {TEMPLATE}))
INSERT INTO sfworkflow.history (instance_id, seq, event_id, event_type, outcome, from_state, to_state, detail,
    created_at)
SELECT {PICK}, h.seq, CASE WHEN h.event_id IS NULL THEN NULL ELSE gen_random_uuid() END,
       h.event_type, h.outcome, h.from_state, h.to_state, h.detail, {SPREAD}
FROM generate_series($1::bigint, $2::bigint) g JOIN h ON h.k = g % $3::bigint
"""


def copy_inbox(at: str, suffix: str = "-") -> str:
    """Copies of the template inbox ids, received at `at` (SQL of the copy's number g)."""
    return f"""
WITH t AS (SELECT row_number() OVER (ORDER BY event_id) - 1 AS k, * FROM sfworkflow.inbox WHERE {TEMPLATE})
INSERT INTO sfworkflow.inbox (tenant_id, event_id, event_type, entity_id, received_at)
SELECT {TENANT_OF}, gen_random_uuid(), t.event_type, t.entity_id || '{suffix}' || g, {at}
FROM generate_series($1::bigint, $2::bigint) g JOIN t ON t.k = g % $3::bigint
"""


def copy_outbox(at: str, instance: str) -> str:
    """Copies of the template outbox rows, published at `at`, owned by the instance `instance` (SQL of g)."""
    return f"""
WITH o AS (SELECT row_number() OVER (ORDER BY id) - 1 AS k, o.* FROM sfworkflow.outbox o
           WHERE instance_id IN (SELECT id FROM sfworkflow.instance WHERE {TEMPLATE}))
INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, instance_id, body, headers, mandatory,
    created_at, next_attempt_at, published_at, publish_attempts)
SELECT gen_random_uuid(), o.kind, o.exchange, o.routing_key, {instance}, o.body, o.headers,
       o.mandatory, {at}, {at}, {at} + interval '20 milliseconds', 1
FROM generate_series($1::bigint, $2::bigint) g JOIN o ON o.k = g % $3::bigint
"""


COPY_INBOX = copy_inbox(SPREAD)
COPY_OUTBOX = copy_outbox(SPREAD, PICK)
TEMPLATE_COUNTS = {
    "instance": f"SELECT count(*) FROM sfworkflow.instance WHERE {TEMPLATE} AND NOT terminal",
    "history": f"SELECT count(*) FROM sfworkflow.history WHERE instance_id IN "
    f"(SELECT id FROM sfworkflow.instance WHERE {TEMPLATE})",
    "inbox": f"SELECT count(*) FROM sfworkflow.inbox WHERE {TEMPLATE}",
    "outbox": f"SELECT count(*) FROM sfworkflow.outbox WHERE instance_id IN "
    f"(SELECT id FROM sfworkflow.instance WHERE {TEMPLATE})",
}


async def _chunks(conn: asyncpg.Connection, sql: str, total: int, *extra: Any) -> None:
    for first in range(1, total + 1, CHUNK):
        last = min(total, first + CHUNK - 1)
        await conn.execute(sql, first, last, *extra)


async def preload(db_url: str, instances: int, history: int, inbox: int, outbox: int) -> dict[str, Any]:
    """Fill the database; what was loaded and how long it took."""
    t0 = time.monotonic()
    conn = await asyncpg.connect(db_url)
    try:
        await migrate.migrate(conn)
        if instances == 0:
            return {"instances": 0, "history": 0, "inbox": 0, "outbox": 0, "seconds": 0.0}
        await _templates(db_url)
        k = {t: await conn.fetchval(sql) for t, sql in TEMPLATE_COUNTS.items()}
        await _chunks(conn, COPY_INSTANCES, instances, k["instance"])
        lo, hi = await conn.fetchrow(
            f"SELECT min(id), max(id) FROM sfworkflow.instance WHERE tenant_id <> '{TEMPLATE_TENANT}'"
        )
        for first in range(lo, hi + 1, CHUNK):
            await conn.execute(COPY_TIMERS, first, min(hi, first + CHUNK - 1))
        await _chunks(conn, COPY_HISTORY, history, k["history"], lo, hi)
        await _chunks(conn, COPY_INBOX, inbox, k["inbox"])
        await _chunks(conn, COPY_OUTBOX, outbox, k["outbox"], lo, hi)
        for table in TABLES:
            await conn.execute(f"VACUUM ANALYZE sfworkflow.{table}")
        counts = {t: await conn.fetchval(f"SELECT count(*) FROM sfworkflow.{t}") for t in TABLES[:5]}
        # Flush what the preload wrote (gigabytes at 1M) before the workloads: otherwise the first one runs
        # under the checkpoint of the preload's writes, paying its I/O and a full-page image for every page it
        # touches first, a cost of the benchmark's setup that a deployment which did not just load 5 GB never has.
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return {**counts, "seconds": round(time.monotonic() - t0, 1)}


async def sizes(db_url: str) -> dict[str, Any]:
    """Bytes of each table (heap) and of each of its indexes."""
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT c.relname AS name, c.relkind::text AS kind, pg_relation_size(c.oid) AS bytes,"
            " coalesce(t.relname, c.relname) AS of_table"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_index x ON x.indexrelid = c.oid LEFT JOIN pg_class t ON t.oid = x.indrelid"
            " WHERE n.nspname = 'sfworkflow' AND c.relkind IN ('r', 'i') ORDER BY 4, 2 DESC, 1"
        )
    finally:
        await conn.close()
    out: dict[str, Any] = {}
    for r in rows:
        entry = out.setdefault(r["of_table"], {"table_mb": 0.0, "indexes_mb": {}})
        mb = round(r["bytes"] / 1e6, 1)
        if r["kind"] == "r":
            entry["table_mb"] = mb
        else:
            entry["indexes_mb"][r["name"]] = mb
    return out


def _workload_args(mode: str, args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        mode=mode,
        enrollments=args.enrollments,
        rate=0.0,
        dup_rate=0.05,
        ooo_rate=0.02,
        queue_type="classic",
        replicas=1,
        timeout=args.timeout,
        seed=args.seed,
    )


KEPT = (
    "events_applied",
    "events_applied_per_s_steady",
    "batch_commits_per_s_steady",
    "wall_s",
    "event_age_at_commit_p50_ms",
    "event_age_at_commit_p99_ms",
    "service_cpu_pct_steady",
    "mean_batch_size",
)


async def _wal(db_url: str) -> dict[str, int]:
    """The cluster's WAL written so far (pg_stat_wal): bytes, and full-page images (a page's first change after a
    checkpoint is written whole: what an index that outgrew the cache costs on every random insert)."""
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow("SELECT wal_bytes::bigint AS wal_bytes, wal_fpi FROM pg_stat_wal")
    finally:
        await conn.close()
    return {"wal_bytes": int(row["wal_bytes"]), "wal_fpi": int(row["wal_fpi"])}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rows = [int(x) for x in args.rows.split(",")]
    modes = args.modes.split(",")
    results: list[dict[str, Any]] = []
    for n in rows:
        db_url = await throughput._reset_database()
        loaded = await preload(
            db_url, n, n * args.history_per_instance, n * args.inbox_per_instance, n * args.outbox_per_instance
        )
        size: dict[str, Any] = {"active_instances": n, "preloaded": loaded, "workloads": {}}
        for mode in modes:
            before = await _wal(db_url)
            r = await throughput.run(_workload_args(mode, args), db_url=db_url)
            after = await _wal(db_url)
            wal = {
                "wal_bytes_per_event": round((after["wal_bytes"] - before["wal_bytes"]) / max(1, r["events_applied"])),
                "wal_full_page_images": after["wal_fpi"] - before["wal_fpi"],
            }
            size["workloads"][mode] = (
                {k: r[k] for k in KEPT} | wal | {"checks_ok": r["checks"]["ok"], "checks": r["checks"]}
            )
        size["sizes"] = await sizes(db_url)
        results.append(size)
        print(json.dumps({"progress": n, **size["workloads"]}), file=sys.stderr, flush=True)
    base = results[0]["workloads"]
    for size in results:
        for mode, w in size["workloads"].items():
            b, x = base[mode]["events_applied_per_s_steady"], w["events_applied_per_s_steady"]
            w["ratio_to_first"] = round(x / b, 3) if b and x else None
    return {
        "bench": "sfworkflow growth",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
        "modes": modes,
        "enrollments_per_workload": args.enrollments,
        "results": results,
        "ok": all(w["checks_ok"] for s in results for w in s["workloads"].values()),
        "run_id": str(uuid.uuid4()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="0,1000000", help="active instances to preload, one run each (default 0,1000000)")
    p.add_argument("--history-per-instance", type=int, default=10)
    p.add_argument("--inbox-per-instance", type=int, default=10)
    p.add_argument("--outbox-per-instance", type=int, default=1)
    p.add_argument("--modes", default="drain,live", help="workloads of bench/throughput.py (default drain,live)")
    p.add_argument("--enrollments", type=int, default=4000, help="enrollments per workload (default 4000)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    logs.configure("warning")  # the templates are applied in this process: no line per event
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
