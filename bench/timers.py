"""A tenant's campaign: N timers due at the same moment. How long until every one fired, with 1 and with R
replicas? Prints one JSON line.

    python bench/timers.py                         # 100,000 timers, 1 then 3 replicas
    python bench/timers.py --timers 20000 --replicas 1,2,3

For each replica count: a fresh database is preloaded (bench/growth.py's preload: sequence enrollments written
by the repository, copied in SQL) with N active instances, each waiting for its first step's timer 30 days
ahead; the replicas start and are ready; then one statement makes every timer due now, and the clock runs
until none of those timers is left (each fired: its instance moved on; the copies share their template's
recipient, so most sends are suppressed as the same send, which moves the instance to its next step, 30 days
ahead) and the outbox holds nothing unpublished. Reported: seconds until all fired, timers fired per second,
the timers each replica fired (sfworkflow_timers_fired_total), and the checks (every instance moved on, none
fired twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import growth, throughput  # noqa: E402

OURS = f"i.tenant_id <> '{growth.TEMPLATE_TENANT}'"
PENDING = f"SELECT count(*) FROM sfworkflow.timer t JOIN sfworkflow.instance i ON i.id = t.instance_id WHERE {OURS}"
DUE = PENDING + " AND t.due_at <= $1 AND t.lane < 64"  # the timers made due, not yet fired


async def one(n: int, replicas: int, timeout: float) -> dict[str, Any]:
    db_url = await throughput._reset_database()
    loaded = await growth.preload(db_url, n, 0, 0, 0)
    amqp_url = throughput._reset_vhost()
    await throughput._declare(db_url, amqp_url, "classic")
    env = dict(os.environ)
    env.update(
        SFWORKFLOW_DATABASE_URL=db_url,
        SFWORKFLOW_AMQP_URL=amqp_url,
        SFWORKFLOW_QUEUE_TYPE="classic",
        SFWORKFLOW_LOG_LEVEL="warning",
        SFWORKFLOW_PROCESSES="1",  # one process per replica
    )
    ports = [throughput.HTTP_PORT + k for k in range(replicas)]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "sfworkflow-bench-timers.log", "wb")
    services = throughput.start_replicas(env, ports, log)
    pg = await asyncpg.connect(db_url)
    try:
        for port, service in zip(ports, services, strict=True):
            await throughput.wait_ready(port, service)
        pending = await pg.fetchval(PENDING)
        t0 = time.monotonic()
        due_at = await pg.fetchval(
            "WITH u AS (UPDATE sfworkflow.timer t SET due_at = now() FROM sfworkflow.instance i "
            f"WHERE i.id = t.instance_id AND {OURS} RETURNING t.due_at) SELECT max(due_at) FROM u"
        )
        due_s = time.monotonic() - t0
        fired_at = None
        while time.monotonic() - t0 < timeout:
            if await pg.fetchval(DUE, due_at) == 0:
                fired_at = time.monotonic() - t0
                break
            await asyncio.sleep(0.1)
        while time.monotonic() - t0 < timeout:
            if not await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL"):
                break
            await asyncio.sleep(0.1)
        published_at = time.monotonic() - t0
        per_replica = []
        async with aiohttp.ClientSession() as http:
            for port in ports:
                m = await throughput.scrape(http, port)
                per_replica.append(int(throughput.metric(m, "sfworkflow_timers_fired_total")))
        moved_on = await pg.fetchval(
            f"SELECT count(*) FROM sfworkflow.instance i WHERE {OURS} AND i.updated_at >= $1", due_at
        )
        twice = await pg.fetchval(
            "SELECT count(*) FROM (SELECT h.instance_id FROM sfworkflow.history h JOIN sfworkflow.instance i "
            f"ON i.id = h.instance_id WHERE {OURS} AND h.event_type = 'timer_step_due' AND h.created_at >= $1 "
            "GROUP BY h.instance_id HAVING count(*) > 1) x",
            due_at,
        )
    finally:
        await pg.close()
        throughput.stop_replicas(services)
    checks = {
        "timers_due": pending,
        "all_fired": fired_at is not None,
        "fired_counted": sum(per_replica),
        "instances_moved_on": moved_on,
        "instances_fired_twice": twice,
    }
    checks["ok"] = bool(fired_at is not None and moved_on == pending and twice == 0)
    return {
        "replicas": replicas,
        "timers": pending,
        "preload_s": loaded["seconds"],
        "make_due_s": round(due_s, 2),
        "all_fired_s": None if fired_at is None else round(fired_at, 2),
        "timers_per_s": None if fired_at is None else round(pending / fired_at, 1),
        "all_published_s": round(published_at, 2),
        "fired_per_replica": per_replica,
        "checks": checks,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for r in [int(x) for x in args.replicas.split(",")]:
        result = await one(args.timers, r, args.timeout)
        print(json.dumps(result), file=sys.stderr, flush=True)
        runs.append(result)
    first = runs[0]["all_fired_s"]
    for run in runs:
        run["speedup_vs_first"] = round(first / run["all_fired_s"], 2) if first and run["all_fired_s"] else None
    return {
        "bench": "sfworkflow timers",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "timers": args.timers,
        "runs": runs,
        "ok": all(r["checks"]["ok"] for r in runs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timers", type=int, default=100_000, help="timers due at once (default 100000)")
    p.add_argument("--replicas", default="1,3", help="replica counts, one run each (default 1,3)")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
