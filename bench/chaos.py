"""Chaos suite: faults injected under load, then only system-wide invariants are checked.

    python -m bench.chaos                          # every scenario, full size
    python -m bench.chaos --quick                  # smaller load (what CI runs)
    python -m bench.chaos --scenario kill9 --scenario commit_ack

For each scenario: a fresh database and vhost; service replicas as real processes
(`python -m sfworkflow run`); a publisher sending the demo's mix of every workflow (duplicate
deliveries included; out-of-order events happen by themselves across replicas) while the simulated
SalesFlow worker answers commands; the fault injected during the load; then quiescence (every
instance settled, outbox drained, queues empty) and the invariants:

  lost = 0               every distinct event published is in the inbox (applied, parked or ignored)
                         or was dead-lettered
  duplicate effects = 0  no (idempotency key, attempt) was published under two command ids, and no
                         send was carried out twice by the worker's own dedupe accounting
  unpublished = 0        every committed outbox row was published
  lost timers = 0        no timer of an active instance is overdue
  settled                every instance reached a terminal state or waits for an operator

Scenarios: kill9 (SIGKILL a replica at random moments, ≥ 5 times, restart it), commit_ack (a crash
exactly between the commit and the ack: SFWORKFLOW_FAULT_POINT=after_commit_before_ack),
publish_mark (a crash between publishing and marking published), rabbit_restart, pg_restart
(PostgreSQL restarted, and the service's backends killed with pg_terminate_backend), replicas
(three replicas, one killed for good mid-run), sigterm (graceful stop under load: exit 0 within
10 s, then restart). Prints one table.

Past one machine, with three replicas each (bench/ha.py drives the scripts):

  broker_node  a three-node RabbitMQ cluster (scripts/rabbitmq-cluster; every replica, the publisher and the
               worker given all three nodes, each replica in another order): kill -9 the node leading the
               event queue under load; once events flow again, kill a second node, so that no queue has its
               quorum (two of three) and nothing moves, and read every replica's /readyz meanwhile; then
               start both nodes again. Recovery: the first kill to events applied again ("quorum back" in the
               notes: the restart to events applied again).
  pg_failover  a PostgreSQL primary with a synchronous standby (scripts/pg-standby; the service given both
               in a multi-host URL with target_session_attrs=read-write): kill -9 the primary (an immediate
               stop, a crash) under load, promote the standby a second later. Then the former primary is
               opened alone, read-only, and every event its inbox holds must be in the new primary's: an event
               acked to RabbitMQ was committed there, and with a synchronous standby a commit returns only
               once the standby has it ("failover missing", which must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ha  # noqa: E402
from bench.throughput import DB_NAME, SETTLED, SETTLED_ARGS, VHOST, _declare, _reset_database, _reset_vhost  # noqa: E402
from sfworkflow.client.dedupe import PostgresDedupe  # noqa: E402
from sfworkflow.contract.topology import DEAD_QUEUE  # noqa: E402
from sfworkflow.demo.worker import SimulatedWorker, WorkerProfile  # noqa: E402
from sfworkflow.runtime.relay import CONFIRM_STALL_S  # noqa: E402

BASE_PORT = int(os.environ.get("SFWORKFLOW_CHAOS_PORT", "8130"))
PG_VERSION = (os.listdir("/etc/postgresql") or ["15"])[0] if os.path.isdir("/etc/postgresql") else "15"
SCENARIOS = ("kill9", "commit_ack", "publish_mark", "rabbit_restart", "pg_restart", "replicas", "sigterm")
CLUSTER_SCENARIOS = ("broker_node", "pg_failover")  # need scripts/rabbitmq-cluster, scripts/pg-standby
THREE_REPLICAS = ("replicas", *CLUSTER_SCENARIOS)
FORMER_PRIMARY_PORT = 5449  # the failed primary, opened alone after the pg_failover scenario


@dataclass
class Replica:
    index: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sfworkflow", "run"], env=self.env, cwd=ROOT, stdout=out, stderr=out
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def reap(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.exits.append(rc)
        return rc


@dataclass
class Outcome:
    scenario: str
    published: int = 0
    distinct: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    parked: int = 0
    lost: int = 0
    duplicate_effects: int = 0
    unpublished: int = 0
    lost_timers: int = 0
    unsettled: int = 0
    faults: int = 0
    replay_mismatches: int = 0  # instances whose state differs from a serial replay of their history
    failover_missing: int = 0  # events in the failed primary's inbox that the new primary lacks (pg_failover)
    recovery_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicate_effects
            or self.unpublished
            or self.lost_timers
            or self.unsettled
            or self.replay_mismatches
            or self.failover_missing
        )


def _env(db_url: str, amqp_url: str, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")}
    env.update(
        SFWORKFLOW_DATABASE_URL=db_url,
        SFWORKFLOW_AMQP_URL=amqp_url,
        SFWORKFLOW_HTTP_PORT=str(port),
        SFWORKFLOW_HTTP_HOST="127.0.0.1",
        SFWORKFLOW_QUEUE_TYPE="quorum",
        SFWORKFLOW_LOG_LEVEL="warning",
        SFWORKFLOW_PROCESSES="1",  # one process per replica: the suite counts and kills replicas
        SFWORKFLOW_SHUTDOWN_TIMEOUT_S="8",
    )
    env.update(extra or {})
    return env


async def _count(pg: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await pg.fetchval(sql, *args))


async def _applied(pg: asyncpg.Connection) -> int:
    return await _count(pg, "SELECT count(*) FROM sfworkflow.inbox")


async def _wait_ready(pg: asyncpg.Connection, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pg.fetchval("SELECT to_regclass('sfworkflow.instance') IS NOT NULL"):
            return
        await asyncio.sleep(0.2)


async def _reset_ha_database() -> str:
    """A fresh primary and synchronous standby (scripts/pg-standby) holding a fresh database; its multi-host URL."""
    ha.pg("stop")
    url = ha.last_line(ha.pg("start", DB_NAME))
    admin = url.replace(f"/{DB_NAME}?", "/postgres?")
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    finally:
        await conn.close()
    return url


async def run_scenario(name: str, quick: bool, seed: int) -> Outcome:
    out = Outcome(name)
    db_url = await _reset_ha_database() if name == "pg_failover" else await _reset_database()
    n_replicas = 3 if name in THREE_REPLICAS else 2
    if name == "broker_node":
        nodes = ha.cluster_urls(VHOST)
        amqp_url = ",".join(nodes)
        # Each replica lists the nodes in another order, so their connections spread over the cluster.
        replica_urls = [",".join(nodes[i:] + nodes[:i]) for i in range(n_replicas)]
    else:
        amqp_url = _reset_vhost()
        replica_urls = [amqp_url] * n_replicas
    await _declare(db_url, amqp_url, "quorum")
    if name == "broker_node":
        out.notes.append(f"each queue on {len(ha.queue_members(VHOST, DEAD_QUEUE))} nodes")
    tenant = str(uuid.uuid4())
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"sfworkflow-chaos-{name}"
    logdir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    extra: dict[str, str] = {}
    if name == "commit_ack":
        extra = {"SFWORKFLOW_FAULT_POINT": "after_commit_before_ack", "SFWORKFLOW_FAULT_AFTER": "40"}
    if name == "publish_mark":
        extra = {"SFWORKFLOW_FAULT_POINT": "after_publish_before_mark", "SFWORKFLOW_FAULT_AFTER": "15"}
    replicas = [
        Replica(i, _env(db_url, replica_urls[i], BASE_PORT + i, extra), logdir / f"replica-{i}.log")
        for i in range(n_replicas)
    ]
    for r in replicas:
        r.start()
    pg = await asyncpg.connect(db_url)
    worker_events: list[dict[str, Any]] = []
    # The worker keeps its dedupe store in the same PostgreSQL, so the PostgreSQL restart hits it too.
    worker = SimulatedWorker(
        amqp_url,
        WorkerProfile(failure_rate=0.05, fatal_rate=0.01, duplicate_rate=0.05, seed=seed),
        record=worker_events,
        store=await PostgresDedupe.open(db_url),
    )
    events_log = logdir / "published.jsonl"
    instances = 600 if quick else 3000
    rate = 150 if quick else 400  # start events per second: the load lasts ~4-8 s in all
    publisher = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--role", "publisher", "--mode", "mix",
         "--amqp-url", amqp_url, "--tenant", tenant, "--enrollments", str(instances),
         "--rate", str(rate * 4), "--seed", str(seed), "--dup-rate", "0.05", "--events-log", str(events_log)],
        stdout=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        await _wait_ready(pg)
        await worker.start()
        fault_task = asyncio.create_task(_inject(name, replicas, rnd, out, pg, quick, db_url))
        while publisher.poll() is None:
            await asyncio.sleep(0.2)
            _restart_crashed(replicas, name, out)
        await fault_task
        try:
            await pg.fetchval("SELECT 1")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):  # restarted, or failed over, under us
            pg.terminate()
            pg = await asyncpg.connect(db_url)
        pub = json.loads((publisher.communicate(timeout=30)[0] or b"{}").decode().strip().splitlines()[-1])
        out.published = pub.get("published", 0)
        out.duplicates = pub.get("duplicates", 0)
        expected_instances = pub.get("instances", instances)
        # Quiescence: every instance settled, nothing unpublished, stable applied count.
        deadline = time.monotonic() + (120 if quick else 300)
        stable_since, last = time.monotonic(), -1
        while time.monotonic() < deadline:
            _restart_crashed(replicas, name, out)
            settled = await _count(pg, f"SELECT count(*) FROM sfworkflow.instance WHERE {SETTLED}", *SETTLED_ARGS)
            unpublished = await _count(pg, "SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL")
            applied = await _applied(pg)
            if applied != last:
                stable_since, last = time.monotonic(), applied
            if settled >= expected_instances and unpublished == 0 and time.monotonic() - stable_since > 3:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        await _check(pg, out, worker, expected_instances)
        published = {e["event_id"]: e for e in _read_jsonl(events_log)} | {e["event_id"]: e for e in worker_events}
        out.replay_mismatches = await serial_replay_mismatches(pg, published, out)
        if name == "pg_failover":
            await _compare_former_primary(pg, out)
    finally:
        await worker.stop()
        for r in replicas:
            r.kill(signal.SIGTERM)
        for r in replicas:
            r.reap()
        if publisher.poll() is None:
            publisher.kill()
        await pg.close()
    return out


def _restart_crashed(replicas: list[Replica], name: str, out: Outcome) -> None:
    """A replica that died on a fault point is restarted, as an orchestrator would (without the fault)."""
    for r in replicas:
        if r.proc is not None and r.proc.poll() is not None and r.index >= 0:
            rc = r.reap()
            if name == "replicas" and r.index == 2:
                r.index = -1  # killed for good
                continue
            if rc == 97:  # the fault point fired: count it, restart without it after a few times
                out.faults += 1
                if r.restarts >= 5:
                    r.env.pop("SFWORKFLOW_FAULT_POINT", None)
            r.restarts += 1
            r.start()


async def _inject(name: str, replicas: list[Replica], rnd: random.Random, out: Outcome, pg: asyncpg.Connection,
                  quick: bool, db_url: str) -> None:  # fmt: skip
    await asyncio.sleep(1.0)
    if name == "broker_node":
        await _broker_node(replicas, out, pg, 500 if quick else 2000)
    elif name == "pg_failover":
        await _until_applied(pg, 500 if quick else 2000)  # mid-load: a fifth of the events applied
        t = time.monotonic()
        ha.pg("stop-primary", "--immediate")  # a crash: no shutdown checkpoint, sessions cut
        out.faults += 1
        await asyncio.sleep(1.0)  # a failover manager's detection delay
        ha.pg("promote")
        await _recovered(None, out, t, db_url=db_url)
    if name == "kill9":
        for _ in range(6):
            await asyncio.sleep(rnd.uniform(0.3, 1.2))
            victim = rnd.choice(replicas)
            victim.kill(signal.SIGKILL)
            out.faults += 1
            victim.reap()
            t = time.monotonic()
            victim.restarts += 1
            victim.start()
            await _recovered(pg, out, t)
    elif name == "rabbit_restart":
        # The broker goes away under a running load, not before the publisher has connected (its first
        # connect fails fast, as a producer's does): wait until its events are being applied.
        await _until_applied(pg, 20)
        t = time.monotonic()
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, capture_output=True, timeout=120)
        await asyncio.sleep(2.0)
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, capture_output=True, timeout=120)
        out.faults += 1
        await _recovered(pg, out, t)
    elif name == "pg_restart":
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'sfworkflow' "
            "AND pid <> pg_backend_pid()"
        )
        out.faults += 1
        await asyncio.sleep(1.0)
        t = time.monotonic()
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, "main", "restart", "-m", "fast"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        out.faults += 1
        await _recovered(None, out, t, db_url=_dsn(pg))
    elif name == "replicas":
        await asyncio.sleep(1.0)
        replicas[2].kill(signal.SIGKILL)
        out.faults += 1
    elif name == "sigterm":
        for r in replicas:
            await asyncio.sleep(1.0)
            t = time.monotonic()
            r.kill(signal.SIGTERM)
            rc = r.reap(timeout=12)
            took = time.monotonic() - t
            out.faults += 1
            if rc != 0 or took > 10:
                out.notes.append(f"replica {r.index} exited {rc} after {took:.1f} s (want 0 within 10 s)")
            r.restarts += 1
            r.start()


async def _broker_node(replicas: list[Replica], out: Outcome, pg: asyncpg.Connection, applied: int) -> None:
    await _until_applied(pg, applied)
    queue, leader = ha.busiest_queue_leader(VHOST, "sfworkflow.events.")
    t = time.monotonic()
    ha.rabbit("kill", str(leader))
    out.faults += 1
    out.notes.append(f"killed node {leader}, leader of {queue}")
    await _recovered(pg, out, t)
    await asyncio.sleep(2.0)
    second = next(i for i in (1, 2, 3) if i != leader)
    ha.rabbit("kill", str(second))
    out.faults += 1
    # One node of three: no queue has its quorum. Nothing is consumed or confirmed; what do the replicas say?
    before = await _applied(pg)
    await asyncio.sleep(CONFIRM_STALL_S + 3.0)  # past the relay's confirm stall: /readyz fails then
    ready = [await _readyz(BASE_PORT + r.index) for r in replicas]
    out.notes.append(
        f"node {second} killed too (1 of 3 left): {await _applied(pg) - before} events applied in "
        f"{CONFIRM_STALL_S + 3.0:.0f} s; /readyz: {'; '.join(ready)}"
    )
    t = time.monotonic()
    ha.rabbit("start")  # both nodes at once, as an operator (or the platform) restarts what died
    out.faults += 1
    back = Outcome("quorum")
    await _recovered(pg, back, t)
    if back.recovery_s is None:
        raise RuntimeError("no event was applied within 60 s of restarting the nodes: the cluster did not recover")
    out.notes.append(f"nodes restarted: events applied again {back.recovery_s:.1f} s after the restart began")


async def _readyz(port: int) -> str:
    """A replica's /readyz in a few words: its status and the checks that fail."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            body = await r.json()
    except Exception as exc:
        return f"{port}: no answer ({type(exc).__name__})"
    failed = {k: c.get("error", "")[:40] for k, c in body.get("checks", {}).items() if not c.get("ok")}
    return f"{r.status} {failed}" if failed else str(r.status)


async def _compare_former_primary(pg: asyncpg.Connection, out: Outcome) -> None:
    """Open the failed primary alone and read its inbox: every event it had committed must be on the new primary."""
    ha.pg("open-former", str(FORMER_PRIMARY_PORT))
    try:
        former = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{FORMER_PRIMARY_PORT}/{DB_NAME}")
        try:
            rows = await former.fetch("SELECT tenant_id::text, event_id::text, received_at FROM sfworkflow.inbox")
            last = await former.fetchval("SELECT max(received_at) FROM sfworkflow.inbox")
            recent = await former.fetchval(
                "SELECT count(*) FROM sfworkflow.inbox WHERE received_at > $1::timestamptz - interval '2 seconds'", last
            )
        finally:
            await former.close()
    finally:
        ha.pg("close-former")
    if not rows or not recent:
        raise RuntimeError("the former primary's inbox holds no events: the failover hit no load, nothing to compare")
    sql = "SELECT tenant_id::text, event_id::text, received_at FROM sfworkflow.inbox"
    have = {(r[0], r[1]): r[2] for r in await pg.fetch(sql)}
    missing = [r for r in rows if (r[0], r[1]) not in have]
    # Committed on the former primary, but not confirmed by the standby when it died: never acked, so RabbitMQ
    # delivered it again and the new primary applied it then (another received_at). Expected, a few at most.
    in_doubt = sum(1 for r in rows if (r[0], r[1]) in have and have[(r[0], r[1])] != r[2])
    out.failover_missing = len(missing)
    out.notes.append(
        f"former primary: {len(rows)} events committed, {recent} in its last 2 s; {len(missing)} missing on the "
        f"new primary; {in_doubt} in doubt (committed there, unconfirmed by the standby, delivered again)"
    )


def _dsn(pg: asyncpg.Connection) -> str:
    p = pg._params
    addr = pg._addr
    return f"postgresql://{p.user}@{addr[0]}:{addr[1]}/{p.database}"


async def _until_applied(pg: asyncpg.Connection, n: int, timeout: float = 120.0) -> None:
    """Wait until at least `n` events were applied (the load is running)."""
    deadline = time.monotonic() + timeout
    while await _applied(pg) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} events applied after {timeout:.0f} s: is the publisher running?")
        await asyncio.sleep(0.1)


async def _recovered(pg: asyncpg.Connection | None, out: Outcome, since: float, db_url: str | None = None) -> None:
    """Seconds from the fault until events are being applied again."""
    conn = pg
    try:
        deadline = time.monotonic() + 60
        base = None
        while time.monotonic() < deadline:
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(db_url)
                n = await _applied(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.sleep(0.2)
                continue
            if base is None:
                base = n
            elif n > base:
                took = time.monotonic() - since
                out.recovery_s = max(out.recovery_s or 0.0, took)
                return
            await asyncio.sleep(0.1)
    finally:
        if pg is None and conn is not None:
            await conn.close()


async def _check(pg: asyncpg.Connection, out: Outcome, worker: SimulatedWorker, expected_instances: int) -> None:
    inbox = await _applied(pg)
    dead = await _count(pg, "SELECT count(*) FROM sfworkflow.outbox WHERE kind = 'dead_letter'")
    out.applied = inbox
    out.dead_lettered = dead
    out.parked = await _count(pg, "SELECT count(*) FROM sfworkflow.parked")
    worker_sent = sum(worker.stats.answers.values())
    out.published += worker_sent
    # Distinct events: every publisher/worker event has a new id; duplicates are second copies.
    out.duplicates += worker.stats.answers.get("duplicate", 0)
    out.distinct = out.published - out.duplicates
    out.lost = max(0, out.distinct - inbox - dead)
    out.duplicate_effects = (
        await _count(
            pg,
            "SELECT count(*) FROM (SELECT convert_from(body, 'UTF8')::jsonb->>'idempotency_key',"
            " convert_from(body, 'UTF8')::jsonb->>'attempt' FROM sfworkflow.outbox WHERE kind = 'command'"
            " GROUP BY 1, 2 HAVING count(DISTINCT message_id) > 1) d",
        )
        + worker.stats.sends_twice()
    )
    out.unpublished = await _count(pg, "SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL")
    out.lost_timers = await _count(
        pg,
        "SELECT count(*) FROM sfworkflow.timer t JOIN sfworkflow.instance i ON i.id = t.instance_id "
        "WHERE NOT i.terminal AND t.due_at < now() - interval '10 seconds' AND t.lane < 64",
    )
    settled = await _count(pg, f"SELECT count(*) FROM sfworkflow.instance WHERE {SETTLED}", *SETTLED_ARGS)
    out.unsettled = max(0, expected_instances - settled)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def serial_replay_mismatches(pg: asyncpg.Connection, published: dict[str, dict[str, Any]], out: Outcome) -> int:
    """Replay each instance's applied history, one event after the other, through the pure engine.

    External events come from what the publisher and worker sent; internal ones (timers, the
    database's answers) from the history rows, which keep their trigger and data. Each step must be
    applied and lead to the recorded state, and the last one to the instance's persisted state and
    version: a lost update under concurrency or a crash would break this."""
    from sfworkflow.contract.envelope import parse_timestamp
    from sfworkflow.core.definition import EngineEvent, InstanceKey, InstanceView
    from sfworkflow.core.engine import Engine
    from sfworkflow.core.engine import Outcome as StepOutcome
    from sfworkflow.workflows import DEFINITIONS

    engine = Engine(DEFINITIONS)
    rows = await pg.fetch(
        "SELECT i.id, i.tenant_id::text AS tenant_id, i.workflow, i.entity_id, i.definition_version, i.state,"
        " i.version, h.seq, h.event_id::text AS event_id, h.outcome, h.to_state, h.detail, h.created_at"
        " FROM sfworkflow.instance i JOIN sfworkflow.history h ON h.instance_id = i.id"
        " WHERE h.outcome = 'applied' ORDER BY i.id, h.id"
    )
    bad: set[int] = set()
    state: dict[int, InstanceView | None] = {}
    final: dict[int, tuple[str, int]] = {}
    for r in rows:
        iid = r["id"]
        if iid in bad:
            continue
        compiled = engine.workflow(r["workflow"], r["definition_version"])
        key = InstanceKey(r["tenant_id"], r["workflow"], r["entity_id"])
        view = state.get(iid)
        detail = json.loads(r["detail"]) if isinstance(r["detail"], str) else (r["detail"] or {})
        if r["event_id"] is not None and "trigger" not in detail:  # internal entries (a timer, feedback) carry it
            env = published.get(r["event_id"])
            if env is None:
                bad.add(iid)
                out.notes.append(f"{key}: event {r['event_id']} in its history was never published")
                continue
            ev = EngineEvent(
                env["event_id"], env["event_type"].partition(".")[2], env["data"], parse_timestamp(env["timestamp"]),
                env.get("correlation_id"), env.get("causation_id"),
            )  # fmt: skip
        else:
            ev = EngineEvent(r["event_id"] or "internal", detail.get("trigger", ""), detail.get("data", {}),
                             r["created_at"], internal=True)  # fmt: skip
        assert compiled is not None
        d = engine.step(compiled, key, view, ev, r["created_at"])
        if d.outcome is not StepOutcome.APPLIED or d.to_state != r["to_state"] or d.version != r["seq"]:
            bad.add(iid)
            if len(out.notes) < 5:
                out.notes.append(f"{key}: replay of {ev.name} gave {d.outcome} {d.to_state}, history {r['to_state']}")
            continue
        state[iid] = InstanceView(key, d.to_state, d.context, d.version, r["definition_version"])
        final[iid] = (r["state"], r["version"])
    for iid, view in state.items():
        if iid not in bad and view is not None and (view.state, view.version) != final[iid]:
            bad.add(iid)
    return len(bad)


def table(rows: list[Outcome]) -> str:
    head = ("scenario", "published", "applied", "duplicates", "dead-lettered", "parked", "lost", "dup effects",
            "unpublished", "lost timers", "unsettled", "replay diffs", "failover missing", "faults", "recovery s",
            "ok")  # fmt: skip
    lines = [head] + [
        (r.scenario, str(r.published), str(r.applied), str(r.duplicates), str(r.dead_lettered), str(r.parked),
         str(r.lost), str(r.duplicate_effects), str(r.unpublished), str(r.lost_timers), str(r.unsettled),
         str(r.replay_mismatches), str(r.failover_missing), str(r.faults),
         f"{r.recovery_s:.1f}" if r.recovery_s is not None else "-",
         "yes" if r.ok else "NO")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


async def main_async(args: argparse.Namespace) -> int:
    names = args.scenario or [*SCENARIOS, *CLUSTER_SCENARIOS]
    rows = []
    try:
        for i, name in enumerate(names):
            t = time.monotonic()
            row = await run_scenario(name, args.quick, args.seed + i)
            row.notes.append(f"{time.monotonic() - t:.0f} s")
            rows.append(row)
            print(f"{name}: {'ok' if row.ok else 'FAILED'} ({'; '.join(row.notes)})", flush=True)
    finally:  # the cluster and the standby pair are the suite's own: torn down (--keep-servers keeps them)
        if not args.keep_servers:
            ha.teardown(rabbit="broker_node" in names, pg="pg_failover" in names)
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", action="append", choices=SCENARIOS + CLUSTER_SCENARIOS,
                   help="run only this scenario (repeatable)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smaller load (CI)")
    p.add_argument(
        "--keep-servers", action="store_true", help="leave the RabbitMQ cluster and the PostgreSQL pair running"
    )
    p.add_argument("--seed", type=int, default=5)
    raise SystemExit(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
