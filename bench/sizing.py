"""What one event costs a deployment: rows and bytes per table, WAL, CPU of each process, and the connections one
replica holds. Prints one JSON line.

    python bench/sizing.py                      # the demo's mix of every workflow, 5,000 instances
    python bench/sizing.py --enrollments 10000  # the mix's size (instances, as bench/throughput.py counts them)
    python bench/sizing.py --idle-after-s 330   # idle figures 5.5 min after the load (asyncpg drops idle conns)

How: a fresh database (`sfw_sizing`) and vhost (`sfw-sizing`), their own names so that other benchmarks on the same
PostgreSQL and RabbitMQ are left alone; one service (`python -m sfworkflow run`, SFWORKFLOW_PROCESSES=1, quorum
queues, HTTP on 8190); the mix of bench/throughput.py's `--mode mix` (its publisher process: the demo's traffic of
every workflow, ~5 % of events published twice, as fast as it goes; the demo's simulated worker in this process,
with the demo's failures: retryable, fatal, consent_missing). It waits until every instance settled and the outbox
is drained, then reads:

- events: sfworkflow_events_total by outcome from /metrics ("per event" below means per event *applied*);
- every table of schema `sfworkflow`: exact row count, pg_total_relation_size, heap (main fork), indexes, the rest
  (TOAST, free space and visibility maps), rows inserted / updated / deleted during the run (pg_stat_user_tables),
  live tuple bytes (pgstattuple), every index's size; then the same sizes after VACUUM FULL (the rows packed, no
  dead versions: the machine's CI PostgreSQL runs with autovacuum off, so "as written" keeps every dead version);
- WAL: pg_current_wal_lsn() before and after, and the same range read with pg_walinspect (a temporary physical
  replication slot keeps it) split by the database each record touches, because other databases on the same
  PostgreSQL may write WAL meanwhile;
- CPU seconds over the run (psutil, user + system) per event applied: the service's process; PostgreSQL's backends
  serving this database (found through pg_stat_activity; the monitor's own connection left out); PostgreSQL's
  background processes (checkpointer, WAL writer, ... shared with every database of the cluster); RabbitMQ's node
  (the beam.smp listening on 5672: shared with every vhost); and, to judge how clean those shared figures are, the
  CPU of other databases' backends and the connections of other vhosts seen meanwhile. CPU per event is robust to
  a busy machine where rates are not. Shared processes are only as clean as the servers were quiet: the run waits
  (`--wait-quiet-s`) until no other database has a client on this PostgreSQL and no other vhost a connection on
  this RabbitMQ node, measures `--idle-s` of baseline (the deployment idle: quorum queues tick, loops poll), and
  reports the figures gross and net of that baseline, with what else it saw meanwhile (`contamination`);
- connections: to PostgreSQL by application_name (pg_stat_activity) and the service's TCP connections to 5432;
  to RabbitMQ the service's connections and their channels (management API, matched by the service's local
  ports); at start, at the peak of the run, and idle after it;
- the disk a million events take at the retention in force (SFWORKFLOW_RETENTION_DAYS, 14 by default): bytes
  per event x 1e6, heap and indexes apart, and what one event per second sustained keeps on disk over that period.

The vhost is deleted at the end (its idle quorum queues cost the broker CPU; `--keep-vhost` keeps it); the database
stays, compacted, for a look. The service's log goes to $TMPDIR/sfw-sizing-service.log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import throughput as tp  # noqa: E402
from sfworkflow.demo.worker import SimulatedWorker, WorkerProfile  # noqa: E402
from sfworkflow.settings import DEFAULT_RETENTION_DAYS  # noqa: E402

MANAGEMENT = os.environ.get("SFWORKFLOW_BENCH_SIZING_MANAGEMENT", "http://127.0.0.1:15672")
DB_NAME = "sfw_sizing"
VHOST = "sfw-sizing"
HTTP_PORT = int(os.environ.get("SFWORKFLOW_BENCH_SIZING_HTTP_PORT", "8190"))
PG_PORT = 5432
AMQP_PORT = 5672
KEY_TABLES = ("history", "inbox", "outbox", "instance", "timer")
# Tables whose size does not grow with events (a few rows each: migrations, schedules, limits, gates, rate buckets
# keyed by tenant and sender): left out of the per-event totals, listed apart.
FIXED_TABLES = ("schema_migration", "schedule", "limit_override", "slot_gate", "rate_bucket")
MONITOR_APP = "sfw-sizing-monitor"
SLOT = "sfw_sizing_wal"


# ---- database and vhost of our own -------------------------------------------------------------
async def reset_database() -> str:
    return await tp._reset_database(DB_NAME)


def reset_vhost() -> str:
    return tp._reset_vhost(VHOST)


def management(path: str) -> Any:
    req = urllib.request.Request(MANAGEMENT + path)
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


# ---- CPU accounting ------------------------------------------------------------------------------
def _listener(port: int) -> psutil.Process:
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    raise RuntimeError(f"nothing listens on port {port}")


def _cpu(p: psutil.Process) -> float | None:
    try:
        t = p.cpu_times()
        return float(t.user + t.system)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class CpuLedger:
    """CPU seconds per group of processes between `start()` and the last `sample()`. A process first seen after the
    start counts from its birth (its CPU so far is the window's); one that exits keeps what it had at its last
    sample."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[str, psutil.Process, float, float]] = {}  # pid -> (group, proc, base, last)
        self.machine0 = 0.0
        self.machine1 = 0.0

    @staticmethod
    def machine() -> float:
        m = psutil.cpu_times()
        # busy: not idle, not waiting for I/O, not taken by the hypervisor (steal); guest time is already in user
        idle = m.idle + getattr(m, "iowait", 0.0) + getattr(m, "steal", 0.0)
        return float(sum(m) - idle - getattr(m, "guest", 0.0) - getattr(m, "guest_nice", 0.0))

    def start(self, groups: dict[int, str]) -> None:
        self.procs.clear()
        for pid, group in groups.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                v = _cpu(p)
                if v is not None:
                    self.procs[pid] = (group, p, v, v)
        self.machine0 = self.machine1 = self.machine()

    def sample(self, groups: dict[int, str]) -> None:
        for pid, group in groups.items():
            if pid not in self.procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p = psutil.Process(pid)
                    self.procs[pid] = (group, p, 0.0, _cpu(p) or 0.0)
        for pid, (group, p, base, _last) in list(self.procs.items()):
            v = _cpu(p)
            if v is not None:
                self.procs[pid] = (group, p, base, v)
        self.machine1 = self.machine()

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for group, _p, base, last in self.procs.values():
            out[group] = out.get(group, 0.0) + (last - base)
        out["machine"] = self.machine1 - self.machine0
        return out


class Monitor:
    """What runs where: the service's processes, PostgreSQL's processes by group, RabbitMQ's node."""

    def __init__(self, conn: asyncpg.Connection, service: subprocess.Popen[bytes]) -> None:
        self.conn = conn
        self.service = psutil.Process(service.pid)
        self.postmaster = _listener(PG_PORT)
        self.beam = _listener(AMQP_PORT)
        self.bench = psutil.Process(os.getpid())
        self.publisher: psutil.Process | None = None
        self.monitor_pid = 0
        self.pg_peak: dict[str, int] = {}
        self.pg_peak_total = 0
        self.other_db_active_max = 0

    async def groups(self) -> dict[int, str]:
        """pid -> group, from pg_stat_activity (and the peak of this database's connections by application_name)."""
        rows = await self.conn.fetch("SELECT pid, datname, backend_type, application_name, state FROM pg_stat_activity")
        out: dict[int, str] = {self.postmaster.pid: "postgresql_background", self.beam.pid: "rabbitmq"}
        for p in [self.service, *self._children(self.service)]:
            out[p.pid] = "service"
        out[self.bench.pid] = "bench_worker"  # this process: the simulated worker and the sampling
        if self.publisher is not None:
            out[self.publisher.pid] = "bench_publisher"
        mine: dict[str, int] = {}
        other_active = 0
        for r in rows:
            if r["pid"] == self.monitor_pid:
                continue
            if r["backend_type"] == "client backend":
                if r["datname"] == DB_NAME:
                    out[r["pid"]] = "postgresql_this_database"
                    app = r["application_name"] or "(none)"
                    mine[app] = mine.get(app, 0) + 1
                else:
                    out[r["pid"]] = "postgresql_other_databases"
                    other_active += r["state"] == "active"
            elif r["backend_type"] == "walsender":
                out[r["pid"]] = "postgresql_other_databases"
            else:  # checkpointer, background writer, walwriter, autovacuum, ...: the whole cluster's
                out[r["pid"]] = "postgresql_background"
        for app, n in mine.items():
            self.pg_peak[app] = max(self.pg_peak.get(app, 0), n)
        self.pg_peak_total = max(self.pg_peak_total, sum(mine.values()))
        self.other_db_active_max = max(self.other_db_active_max, other_active)
        return out

    @staticmethod
    def _children(p: psutil.Process) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return list(p.children(recursive=True))
        return []

    def service_sockets(self) -> dict[str, Any]:
        """The service's established TCP connections to PostgreSQL and RabbitMQ (and its local ports to RabbitMQ)."""
        pg = 0
        amqp_ports: list[int] = []
        for p in [self.service, *self._children(self.service)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                for c in p.net_connections(kind="tcp"):
                    if c.status != psutil.CONN_ESTABLISHED or not c.raddr:
                        continue
                    if c.raddr.port == PG_PORT:
                        pg += 1
                    elif c.raddr.port == AMQP_PORT:
                        amqp_ports.append(c.laddr.port)
        return {"postgresql_tcp": pg, "rabbitmq_tcp": len(amqp_ports), "rabbitmq_local_ports": amqp_ports}

    async def snapshot(self) -> dict[str, Any]:
        """This database's connections by application_name, the service's sockets, and its RabbitMQ connections and
        channels as the management API lists them (the others of our vhost: the bench's worker and publisher)."""
        rows = await self.conn.fetch(
            "SELECT coalesce(nullif(application_name, ''), '(none)') AS app, count(*) AS n FROM pg_stat_activity"
            " WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY 1 ORDER BY 1",
            DB_NAME,
        )
        sockets = self.service_sockets()
        ports = set(sockets.pop("rabbitmq_local_ports"))
        vhost = quote(VHOST, safe="")
        conns = await asyncio.to_thread(management, f"/api/vhosts/{vhost}/connections")
        channels = await asyncio.to_thread(management, f"/api/vhosts/{vhost}/channels")
        service = [c for c in conns if c.get("peer_port") in ports]
        return {
            "postgresql_by_application_name": {r["app"]: r["n"] for r in rows},
            "service_sockets": sockets,
            "rabbitmq_service_connections": len(service),
            "rabbitmq_service_channels": sum(
                (c.get("connection_details") or {}).get("peer_port") in ports for c in channels
            ),
            "rabbitmq_vhost_connections_all": len(conns),  # the service's and the bench's (publisher, worker)
        }

    async def others(self) -> dict[str, int]:
        """What else uses the shared servers right now: other databases' client backends on this PostgreSQL, and
        connections of other vhosts on this RabbitMQ node."""
        pg = await self.conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND datname IS DISTINCT FROM $1",
            DB_NAME,
        )
        conns = await asyncio.to_thread(management, "/api/connections?columns=vhost")
        return {
            "postgresql_other_database_backends": int(pg),
            "rabbitmq_other_vhost_connections": sum(c.get("vhost") != VHOST for c in conns),
        }

    async def wait_quiet(self, max_wait_s: float, quiet_s: float = 10.0) -> float:
        """Wait (at most `max_wait_s`) until nothing else has used the shared servers for `quiet_s`: the seconds
        waited."""
        t0 = time.monotonic()
        quiet_since = time.monotonic()
        while time.monotonic() - t0 < max_wait_s:
            if any((await self.others()).values()):
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
            await asyncio.sleep(1.0)
        return time.monotonic() - t0


# ---- what the database holds ------------------------------------------------------------------
TABLES_SQL = """
SELECT c.relname AS name, c.oid,
       pg_total_relation_size(c.oid) AS total, pg_relation_size(c.oid, 'main') AS heap, pg_indexes_size(c.oid) AS idx,
       coalesce(s.n_tup_ins, 0) AS ins, coalesce(s.n_tup_upd, 0) AS upd, coalesce(s.n_tup_hot_upd, 0) AS hot,
       coalesce(s.n_tup_del, 0) AS del, coalesce(s.n_dead_tup, 0) AS dead
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE n.nspname = 'sfworkflow' AND c.relkind = 'r' ORDER BY 3 DESC, 1
"""

INDEXES_SQL = """
SELECT t.relname AS tbl, i.relname AS name, pg_relation_size(i.oid) AS bytes
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = 'sfworkflow' ORDER BY 1, 3 DESC
"""


async def tables(conn: asyncpg.Connection, live: bool) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in await conn.fetch(TABLES_SQL):
        t: dict[str, Any] = {
            "rows": await conn.fetchval(f'SELECT count(*) FROM sfworkflow."{r["name"]}"'),
            "total_bytes": r["total"],
            "heap_bytes": r["heap"],
            "index_bytes": r["idx"],
            "other_bytes": r["total"] - r["heap"] - r["idx"],  # TOAST, free space map, visibility map
        }
        if live:
            t |= {
                "inserted": r["ins"],
                "updated": r["upd"],
                "hot_updated": r["hot"],
                "deleted": r["del"],
                "dead_tuples": r["dead"],
            }
            if r["heap"]:
                st = await conn.fetchrow(
                    "SELECT tuple_len, dead_tuple_len, free_space FROM pgstattuple($1::oid::regclass)", r["oid"]
                )
                t |= {
                    "live_tuple_bytes": st["tuple_len"],
                    "dead_tuple_bytes": st["dead_tuple_len"],
                    "free_bytes": st["free_space"],
                }
        out[r["name"]] = t
    for r in await conn.fetch(INDEXES_SQL):
        out[r["tbl"]].setdefault("indexes", {})[r["name"]] = r["bytes"]
    return out


async def wal_by_database(conn: asyncpg.Connection, start: str, end: str, db_oid: int) -> dict[str, Any] | None:
    """The WAL of [start, end) by the database its records' first block belongs to: this one, other ones, none
    (commits, checkpoints, running-xacts records: any database's). None when the WAL is gone."""
    sql = """
    WITH r AS (
        SELECT record_length, fpi_length, substring(block_ref FROM 'rel \\d+/(\\d+)/')::oid AS db
        FROM pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn))
    SELECT CASE WHEN db IS NULL THEN 'no_block' WHEN db = $3 THEN 'this_database' WHEN db = 0 THEN 'shared_catalogs'
                ELSE 'other_databases' END AS g,
           count(*) AS records, sum(record_length)::bigint AS bytes, sum(fpi_length)::bigint AS fpi_bytes
    FROM r GROUP BY 1
    """
    try:
        rows = await conn.fetch(sql, start, end, db_oid)
    except asyncpg.PostgresError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return {r["g"]: {"records": r["records"], "bytes": r["bytes"], "fpi_bytes": r["fpi_bytes"]} for r in rows}


# ---- the run ------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict[str, Any]:
    db_url = await reset_database()
    amqp_url = reset_vhost()
    tenant = str(uuid.uuid4())
    mon_conn = await asyncpg.connect(db_url, server_settings={"application_name": MONITOR_APP})
    for ext in ("pgstattuple", "pg_walinspect"):
        await mon_conn.execute(f"CREATE EXTENSION IF NOT EXISTS {ext}")
    slot = True
    try:  # keeps the run's WAL until this session ends, for pg_walinspect (a checkpoint would recycle it)
        await mon_conn.execute(f"SELECT pg_create_physical_replication_slot('{SLOT}', true, true)")
    except asyncpg.PostgresError:
        slot = False
    env = dict(os.environ)
    env.update(
        SFWORKFLOW_DATABASE_URL=db_url,
        SFWORKFLOW_AMQP_URL=amqp_url,
        SFWORKFLOW_HTTP_PORT=str(HTTP_PORT),
        SFWORKFLOW_QUEUE_TYPE="quorum",
        SFWORKFLOW_PROCESSES="1",
        SFWORKFLOW_LOG_LEVEL="warning",
        # One tenant, one sender: the default 50 sends/s per sender would measure the limit (as bench/throughput.py)
        SFWORKFLOW_RATE_LIMITS=os.environ.get(
            "SFWORKFLOW_RATE_LIMITS", "sequence.send_step/per_sender=1000000/1000000"
        ),
    )
    retention_days = float(env.get("SFWORKFLOW_RETENTION_DAYS") or DEFAULT_RETENTION_DAYS)
    pool_size = int(env.get("SFWORKFLOW_POOL_SIZE") or 10)
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "sfw-sizing-service.log", "wb")
    service = subprocess.Popen([sys.executable, "-m", "sfworkflow", "run"], env=env, stdout=log, stderr=log, cwd=ROOT)
    worker: SimulatedWorker | None = None
    publisher: subprocess.Popen[bytes] | None = None
    ledger = CpuLedger()
    try:
        await tp.wait_ready(HTTP_PORT, service)
        mon = Monitor(mon_conn, service)
        mon.monitor_pid = await mon_conn.fetchval("SELECT pg_backend_pid()")
        db_oid = await mon_conn.fetchval("SELECT oid FROM pg_database WHERE datname = $1", DB_NAME)
        await asyncio.sleep(6.0)  # the stats task's first round; the management API's statistics (every 5 s)
        at_start = await mon.snapshot()
        waited = await mon.wait_quiet(args.wait_quiet_s)
        # The servers' cost of idling with this deployment's queues and connections (quorum queues tick): the
        # baseline the run's RabbitMQ and PostgreSQL figures are also given net of.
        base = CpuLedger()
        base.start(await mon.groups())
        t_base = time.monotonic()
        await asyncio.sleep(args.idle_s)
        base.sample(await mon.groups())
        base_rate = {k: v / (time.monotonic() - t_base) for k, v in base.totals().items()}
        others_before = await mon.others()
        ledger.start(await mon.groups())
        lsn0 = await mon_conn.fetchval("SELECT pg_current_wal_lsn()::text")
        wal0 = await mon_conn.fetchrow("SELECT wal_bytes::bigint AS b, wal_fpi FROM pg_stat_wal")
        db0 = await mon_conn.fetchrow("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", DB_NAME)
        t0 = time.monotonic()

        profile = WorkerProfile(
            failure_rate=0.05, fatal_rate=0.01, consent_rate=0.02, duplicate_rate=args.dup_rate, seed=args.seed
        )  # the demo's failure mix, as throughput.py --mode mix
        worker = SimulatedWorker(amqp_url, profile, workflows=None)
        await worker.start()
        pub_args = argparse.Namespace(
            mode="mix", enrollments=args.enrollments, rate=0.0, seed=args.seed, dup_rate=args.dup_rate, ooo_rate=0.02
        )
        publisher = subprocess.Popen(tp._publisher_cmd(pub_args, amqp_url, tenant), stdout=subprocess.PIPE, cwd=ROOT)
        mon.publisher = psutil.Process(publisher.pid)

        peak: dict[str, Any] = {}
        busy: dict[str, int] = dict(others_before)
        pub_out: dict[str, Any] | None = None
        expected = args.enrollments
        done_at: float | None = None
        last_mgmt = 0.0
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - t0 < args.timeout:
                ledger.sample(await mon.groups())
                if time.monotonic() - last_mgmt > 3.0:  # the peak of the service's connections and channels
                    last_mgmt = time.monotonic()
                    snap = await mon.snapshot()
                    for k in ("rabbitmq_service_connections", "rabbitmq_service_channels"):
                        peak[k] = max(peak.get(k, 0), snap[k])
                    for k, v in snap["service_sockets"].items():
                        peak["service_" + k] = max(peak.get("service_" + k, 0), v)
                    for k, v in (await mon.others()).items():
                        busy[k] = max(busy.get(k, 0), v)
                if publisher.poll() is not None:
                    if pub_out is None:
                        out = (publisher.communicate(timeout=30)[0] or b"{}").decode().strip().splitlines()
                        pub_out = json.loads(out[-1] if out else "{}")
                        expected = pub_out.get("instances", expected)
                    sql = f"SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $3 AND {tp.SETTLED}"
                    settled = await mon_conn.fetchval(sql, *tp.SETTLED_ARGS, tenant)
                    backlog = await mon_conn.fetchval(
                        "SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL"
                    )
                    if settled >= expected and backlog == 0:
                        done_at = time.monotonic() - t0
                        break
                await asyncio.sleep(0.5)
            ledger.sample(await mon.groups())
            cpu = ledger.totals()
            wall = time.monotonic() - t0
            lsn1 = await mon_conn.fetchval("SELECT pg_current_wal_lsn()::text")
            wal1 = await mon_conn.fetchrow("SELECT wal_bytes::bigint AS b, wal_fpi FROM pg_stat_wal")
            db1 = await mon_conn.fetchrow("SELECT xact_commit FROM pg_stat_database WHERE datname = $1", DB_NAME)
            await asyncio.sleep(1.0)  # the last answers and duplicates are counted
            final = await tp.scrape(http, HTTP_PORT)
            if pub_out is None:
                out = (publisher.communicate(timeout=30)[0] or b"{}").decode().strip().splitlines()
                pub_out = json.loads(out[-1] if out else "{}")
            checks = await tp.invariants(
                mon_conn, final, pub_out.get("published", 0), worker, expected, tenant, mix=True
            )
            # Idle: no load, every loop still polling. Connections as they stay, and what idling costs.
            await worker.stop()
            worker = None
            await asyncio.sleep(5.0)
            idle = CpuLedger()
            idle.start(await mon.groups())
            t_idle = time.monotonic()
            await asyncio.sleep(args.idle_after_s if args.idle_after_s is not None else args.idle_s)
            idle.sample(await mon.groups())
            idle_cpu = {k: round(v / (time.monotonic() - t_idle) * 100, 2) for k, v in idle.totals().items()}
            at_idle = await mon.snapshot()
            for k, v in (await mon.others()).items():
                busy[k] = max(busy.get(k, 0), v)
        by_workflow = await mon_conn.fetch(
            "SELECT workflow, count(*) AS n FROM sfworkflow.instance WHERE tenant_id = $1 GROUP BY 1 ORDER BY 2 DESC",
            tenant,
        )
    finally:
        if worker:
            await worker.stop()
        if publisher and publisher.poll() is None:
            publisher.kill()
        tp.stop_replicas([service], 15)
        log.close()
        if not args.keep_vhost:  # idle quorum queues cost the broker CPU: leave none behind
            tp._rabbitmqctl("delete_vhost", VHOST)

    await asyncio.sleep(1.0)  # the service's last statistics reach pg_stat_user_tables
    as_written = await tables(mon_conn, live=True)
    wal_split = await wal_by_database(mon_conn, lsn0, lsn1, db_oid) if slot else None
    await mon_conn.execute("VACUUM FULL")  # this database only: the rows packed, indexes rebuilt
    compacted = await tables(mon_conn, live=False)
    await mon_conn.close()  # drops the temporary slot

    applied = int(tp.metric(final, "sfworkflow_events_total", outcome="applied"))
    outcomes = {
        o: int(tp.metric(final, "sfworkflow_events_total", outcome=o))
        for o in ("applied", "duplicate", "parked", "ignored", "dead_lettered", "awaiting_version")
    }
    per = max(1, applied)
    wal_lsn = await _lsn_diff(db_url, lsn0, lsn1)

    def per_event(tbls: dict[str, dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in KEY_TABLES:
            t = tbls[name]
            out[name] = {
                "rows": round(t["rows"] / per, 3),
                "bytes": round(t["total_bytes"] / per, 1),
                "heap": round(t["heap_bytes"] / per, 1),
                "index": round(t["index_bytes"] / per, 1),
            }
            if "inserted" in t:
                out[name]["rows_inserted"] = round(t["inserted"] / per, 3)
        scaling = [t for name, t in tbls.items() if name not in FIXED_TABLES]
        tot = {
            k: sum(t[k] for t in scaling) for k in ("rows", "total_bytes", "heap_bytes", "index_bytes", "other_bytes")
        }
        out["total_event_tables"] = {
            "rows": round(tot["rows"] / per, 3),
            "bytes": round(tot["total_bytes"] / per, 1),
            "heap": round(tot["heap_bytes"] / per, 1),
            "index": round(tot["index_bytes"] / per, 1),
            "other": round(tot["other_bytes"] / per, 1),
        }
        return out

    def disk(tbls: dict[str, dict[str, Any]]) -> dict[str, Any]:
        scaling = [t for name, t in tbls.items() if name not in FIXED_TABLES]
        heap = sum(t["heap_bytes"] + t["other_bytes"] for t in scaling) / per
        idx = sum(t["index_bytes"] for t in scaling) / per
        kept = retention_days * 86400  # events kept per event/s sustained
        return {
            "mb_per_million_events": {
                "heap_and_toast": round(heap, 1),
                "indexes": round(idx, 1),
                "total": round(heap + idx, 1),
            },  # bytes/event x 1e6 / 1e6
            "indexes_add_pct_of_heap": round(idx / heap * 100, 1) if heap else None,
            "gb_kept_per_event_per_s_sustained": round((heap + idx) * kept / 1e9, 2),
            "fixed_tables_bytes": sum(t["total_bytes"] for name, t in tbls.items() if name in FIXED_TABLES),
        }

    svc_pg_tcp = at_idle["service_sockets"]["postgresql_tcp"]
    return {
        "bench": "sfworkflow sizing",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["bench/sizing.py", *sys.argv[1:]]),
        "workload": f"mix of every workflow (bench/throughput.py --mode mix), closed loop, {args.enrollments} "
        "instances asked for, ~5 % of events published twice, the demo's worker failures",
        "database": DB_NAME,
        "vhost": VHOST,
        "queue_type": "quorum",
        "processes": 1,
        "pool_size": pool_size,
        "retention_days": retention_days,
        "cores": psutil.cpu_count(),
        "instances": expected,
        "instances_by_workflow": {r["workflow"]: r["n"] for r in by_workflow},
        "events": outcomes,
        "transitions": int(tp.metric(final, "sfworkflow_transitions_total")),
        "timers_fired": int(tp.metric(final, "sfworkflow_timers_fired_total")),
        "outbox_rows_queued": int(tp.metric(final, "sfworkflow_outbox_queued_total")),
        "messages_published": int(tp.metric(final, "sfworkflow_published_total")),
        "events_per_instance": round(applied / max(1, expected), 2),
        "wall_s": round(done_at, 1) if done_at else None,
        "commits_per_event": round((db1["xact_commit"] - db0["xact_commit"]) / per, 3),
        "mean_batch_size": tp._round(
            tp.metric(final, "sfworkflow_batch_size_sum") / max(1.0, tp.metric(final, "sfworkflow_batch_size_count")), 1
        ),
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_us_per_event": {k: round(v / per * 1e6, 1) for k, v in cpu.items()},
        # 1e6 / us: events/s one core sustains for that process's share, if nothing else ran on it
        "events_per_s_per_core": {
            k: round(1e6 / (v / per * 1e6))
            for k, v in cpu.items()
            if k in ("service", "postgresql_this_database", "rabbitmq") and v > 0
        },
        # The same, less what each process spent idling at the baseline's rate over the run (quorum queues'
        # ticks, the service's polling loops): the cost of the events themselves.
        "cpu_us_per_event_net_of_idle": {
            k: round((v - base_rate.get(k, 0.0) * wall) / per * 1e6, 1) for k, v in cpu.items() if k in base_rate
        },
        "machine_busy_pct": round(cpu["machine"] / wall * 100, 1),
        "contamination": {  # what else ran on the shared servers meanwhile
            "waited_for_quiet_s": round(waited, 1),
            "postgresql_other_databases_cpu_s": round(cpu.get("postgresql_other_databases", 0.0), 2),
            "postgresql_other_databases_active_backends_max": mon.other_db_active_max,
            **{k + "_max": v for k, v in busy.items()},
        },
        "baseline_cpu_pct_before": {k: round(v * 100, 2) for k, v in base_rate.items()},
        "idle_cpu_pct_after": idle_cpu,
        "wal": {
            "lsn_diff_bytes": wal_lsn,
            "bytes_per_event_lsn_diff": round(wal_lsn / per, 1),
            "pg_stat_wal_bytes": int(wal1["b"] - wal0["b"]),
            "full_page_images": int(wal1["wal_fpi"] - wal0["wal_fpi"]),
            "by_database": wal_split,
            "bytes_per_event_this_database_plus_no_block": round(
                sum(wal_split[g]["bytes"] for g in ("this_database", "no_block") if g in wal_split) / per, 1
            )
            if wal_split and "error" not in wal_split
            else None,
        },
        "connections": {
            "postgresql_peak_by_application_name": mon.pg_peak,
            "postgresql_peak_total": mon.pg_peak_total,
            "at_start": at_start,
            "peak": peak,
            "idle_after": at_idle,
            "postgresql_per_replica_max": f"SFWORKFLOW_POOL_SIZE ({pool_size}) + relay LISTEN + cluster stats = "
            f"{pool_size + 2}, +1 for a moment at start-up (migrations); measured {mon.pg_peak_total} at peak, "
            f"{svc_pg_tcp} TCP idle",
        },
        "tables_as_written": as_written,
        "tables_after_vacuum_full": compacted,
        "per_event_as_written": per_event(as_written),
        "per_event_after_vacuum_full": per_event(compacted),
        "disk_as_written": disk(as_written),
        "disk_after_vacuum_full": disk(compacted),
        "checks": checks,
    }


async def _lsn_diff(db_url: str, a: str, b: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval("SELECT pg_wal_lsn_diff($2::text::pg_lsn, $1::text::pg_lsn)::bigint", a, b))
    finally:
        await conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--enrollments", type=int, default=5000, help="instances of the mix (default 5000)")
    p.add_argument("--dup-rate", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--idle-s", type=float, default=20.0, help="seconds of idle measured before and after the run")
    p.add_argument(
        "--idle-after-s",
        type=float,
        default=None,
        help="seconds of idle after the run before the idle figures (default: --idle-s; asyncpg closes pool "
        "connections unused for 300 s)",
    )
    p.add_argument(
        "--wait-quiet-s",
        type=float,
        default=1800.0,
        help="wait at most this long for other databases and vhosts to leave the servers (default 1800)",
    )
    p.add_argument("--keep-vhost", action="store_true", help="leave the vhost (its idle quorum queues) in place")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    import structlog

    # The simulated worker's log lines go to stderr: stdout is the one JSON line.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    print(json.dumps(tp.run_loop(run(args))), flush=True)


if __name__ == "__main__":
    main()
