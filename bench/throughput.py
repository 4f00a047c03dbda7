"""Throughput and latency of sfworkflow, end to end, on this machine. Prints one JSON line.

    python bench/throughput.py                      # drain: a preloaded queue, as fast as it goes
    python bench/throughput.py --mode live          # live loop with a simulated worker, as fast as it goes
    python bench/throughput.py --mode live --rate 1000   # open loop, ~1,000 events/s offered: latency
    python bench/throughput.py --mode mix           # every workflow in the demo's mix, with failures
    python bench/throughput.py --mode enroll        # drain: enrollments alone, the heaviest event

Everything runs on the same cores as PostgreSQL and RabbitMQ, each in its own process: the service
(`python -m sfworkflow run`, fresh database, fresh vhost), a publisher process, and this process.

drain: the publisher preloads every event of N enrollments (enrolled, then step_sent for each of 3
  steps; ~5 % of events published twice at a random later point; ~2 % of instances with two answers
  swapped, so one is parked and applied later), then the service starts and drains the queue. This
  is the figure to compare with the reference bench's consume -> transaction -> ack loop.
enroll: the drain of enrollments alone (the heaviest event: an instance created, its first timer fired
  inline, the first send_step and workflow.started queued), ~5 % delivered twice; done when every
  instance waits for its first answer.
live: the publisher sends enrollments (~5 % twice, ~2 % preceded by an out-of-order `paused` and
  followed by `resumed`) while this process runs the simulated SalesFlow worker, which answers every
  send_step with step_sent (~5 % of answers twice). With --rate it is paced (open loop).

Figures: events applied per second in the steady state (the middle 60 % of the applied events),
event age at commit p50/p99 (envelope timestamp -> commit, from the service's histogram; live mode),
share committed within 100 ms, service CPU %, mean batch size, the pure engine step rate, and the
invariant checks (published = applied + duplicate + parked + ignored + dead-lettered, inbox = distinct
events, every instance completed, nothing parked or unpublished left, one send_step per step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sfworkflow.client import memory  # noqa: E402
from sfworkflow.client.producer import EventPublisher, build_event  # noqa: E402
from sfworkflow.demo.worker import SimulatedWorker, WorkerProfile  # noqa: E402
from sfworkflow.runtime.metrics import OUTCOMES  # noqa: E402

PG_SERVER = os.environ.get("SFWORKFLOW_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP_SERVER = os.environ.get("SFWORKFLOW_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672")
DB_NAME = "sfw_bench"
VHOST = "sfw-bench"
STEPS = 3


def _settled() -> tuple[str, list[list[str]]]:
    """SQL for 'settled': terminal, or waiting for an operator (per the definitions)."""
    from sfworkflow.core.stuck import operator_states
    from sfworkflow.db.operations import settled_condition
    from sfworkflow.workflows import DEFINITIONS

    return settled_condition(), list(operator_states(DEFINITIONS))


SETTLED, SETTLED_ARGS = _settled()
HTTP_PORT = int(os.environ.get("SFWORKFLOW_BENCH_HTTP_PORT", "8097"))


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=False, capture_output=True, timeout=60)


async def _reset_database(name: str = DB_NAME) -> str:
    """A fresh, empty database `name` on the benchmarks' PostgreSQL; its URL."""
    conn = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{PG_SERVER}/{name}"


def _reset_vhost(name: str = VHOST) -> str:
    """A fresh, empty vhost `name` on the benchmarks' RabbitMQ; its URL."""
    _rabbitmqctl("delete_vhost", name)
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return f"{AMQP_SERVER}/{name}"


# ---- publisher process ------------------------------------------------------------------------
def plan(n: int, tenant: str, seed: int, dup_rate: float, ooo_rate: float) -> list[tuple[str, dict[str, Any]]]:
    """(kind, event) in publish order; kind 'dup' marks a second delivery of the same event."""
    rnd = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        entity = f"enr-{i}"
        data = {
            "sequence_id": f"seq-{i % 11}",
            "lead_id": f"lead-{i}",
            "recipient": {"channel": "email", "address": f"lead{i}@bench.example"},
            "steps": [{"template_id": f"tpl-{s}", "delay_seconds": 0} for s in range(STEPS)],
        }
        ooo = rnd.random() < ooo_rate
        if ooo:
            out.append(("event", {"event_type": "sequence.paused", "entity_id": entity, "data": {}}))
        out.append(("event", {"event_type": "sequence.enrolled", "entity_id": entity, "data": data}))
        if rnd.random() < dup_rate:
            out.append(("dup", {}))
        if ooo:
            out.append(("event", {"event_type": "sequence.resumed", "entity_id": entity, "data": {}}))
    return out


def plan_drain(n: int, seed: int, dup_rate: float, ooo_rate: float) -> list[tuple[str, str, dict[str, Any]]]:
    """(event_type, entity, data) of n whole instances, interleaved at random (order kept per instance)."""
    rnd = random.Random(seed)
    per: list[list[tuple[str, str, dict[str, Any]]]] = []
    for i in range(n):
        entity = f"enr-{i}"
        data = {
            "sequence_id": f"seq-{i % 11}",
            "lead_id": f"lead-{i}",
            "recipient": {"channel": "email", "address": f"lead{i}@bench.example"},
            "steps": [{"template_id": f"tpl-{s}", "delay_seconds": 0} for s in range(STEPS)],
        }
        evs = [("sequence.enrolled", entity, data)]
        evs += [
            ("sequence.step_sent", entity, {"step": s, "attempt": 1, "provider_message_id": f"p{s}"})
            for s in range(STEPS)
        ]
        if rnd.random() < ooo_rate:
            evs[2], evs[3] = evs[3], evs[2]  # the answer for step 1 before the one for step 0
        per.append(evs)
    tokens = [i for i, evs in enumerate(per) for _ in evs]
    rnd.shuffle(tokens)
    cursor = [0] * n
    out = []
    for i in tokens:
        out.append(per[i][cursor[i]])
        cursor[i] += 1
    return out


async def preload_main(args: argparse.Namespace) -> None:
    rnd = random.Random(args.seed + 1)
    items = plan_drain(args.enrollments, args.seed, args.dup_rate, args.ooo_rate)
    if args.mode == "enroll":
        items = [x for x in items if x[0] == "sequence.enrolled"]
    events = [build_event(t, tenant_id=args.tenant, entity_id=e, data=d, source="bench.publisher") for t, e, d in items]
    # Duplicates: a share of events delivered a second time, at a random later point of the stream.
    stream = [(float(k), ev) for k, ev in enumerate(events)]
    for k in rnd.sample(range(len(events)), int(len(events) * args.dup_rate)):
        stream.append((rnd.uniform(k + 0.5, len(events)), events[k]))
    stream.sort(key=lambda x: x[0])
    pub = await EventPublisher.connect(args.amqp_url)
    for chunk in range(0, len(stream), 500):
        await asyncio.gather(*(pub.publish(ev, validate=False) for _k, ev in stream[chunk : chunk + 500]))
    await pub.close()
    print(json.dumps({"published": len(stream)}), flush=True)


async def mix_main(args: argparse.Namespace) -> None:
    """Publish the demo's mix of every simulated workflow (later 'human' events after their delay)."""
    from sfworkflow.demo.run import plan as demo_plan

    rnd = random.Random(args.seed)
    traffic = demo_plan(args.enrollments, rnd)
    pub = await EventPublisher.connect(args.amqp_url)
    sent = 0
    dups = 0
    later: list[asyncio.Task[None]] = []
    # Pace on the start events: the worker's answers make up the rest of the offered load (~4 per instance).
    interval = 4.0 / args.rate if args.rate else 0.0
    start = time.monotonic()
    starts = 0

    def make(t: Any) -> dict[str, Any]:
        return build_event(t.event_type, tenant_id=args.tenant, entity_id=t.entity_id, data=t.data, source="bench")

    log = open(args.events_log, "w") if args.events_log else None

    async def send(ev: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(ev) + "\n")
        delay = 0.2
        for _ in range(60):  # RabbitMQ may be restarting (the chaos suite): retry, as a producer must
            try:
                await pub.publish(ev, validate=False)
                return
            except Exception:
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        raise RuntimeError("could not publish for two minutes")

    async def publish_later(t: Any) -> None:
        nonlocal sent
        await asyncio.sleep(t.delay_s)
        await send(make(t))  # stamped when sent: its age at commit is the service's
        sent += 1

    for t in traffic:
        if t.delay_s:
            later.append(asyncio.create_task(publish_later(t)))
            continue
        ev = make(t)
        starts += 1
        if interval:
            delay = start + starts * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await send(ev)
        sent += 1
        if rnd.random() < args.dup_rate:
            await send(ev)
            sent += 1
            dups += 1
    await asyncio.gather(*later)
    await pub.close()
    if log is not None:
        log.close()
    print(
        json.dumps(
            {
                "published": sent,
                "duplicates": dups,
                "instances": len({(t.event_type.split(".")[0], t.entity_id) for t in traffic}),
            }
        )
    )


async def publisher_main(args: argparse.Namespace) -> None:
    if args.mode in ("drain", "enroll"):
        await preload_main(args)
        return
    if args.mode == "mix":
        await mix_main(args)
        return
    items = plan(args.enrollments, args.tenant, args.seed, args.dup_rate, args.ooo_rate)
    pub = await EventPublisher.connect(args.amqp_url)
    # Pace: the publisher's own events are 1 + ~ (dup + 2·ooo) per enrollment; the worker adds STEPS
    # answers per enrollment, so the offered total is about (STEPS + 1.1) x the enrollment rate.
    per_enrollment = STEPS + 1 + args.dup_rate + 2 * args.ooo_rate
    interval = per_enrollment / args.rate if args.rate else 0.0
    start = time.monotonic()
    sent = 0
    last: dict[str, Any] | None = None
    inflight: list[asyncio.Future[Any]] = []
    enrollments = 0
    for kind, spec in items:
        if kind == "dup":
            assert last is not None
            ev = last
        else:
            ev = build_event(
                spec["event_type"],
                tenant_id=args.tenant,
                entity_id=spec["entity_id"],
                data=spec["data"],
                source="bench.publisher",
            )
            if spec["event_type"] == "sequence.enrolled":
                enrollments += 1
                last = ev
                if interval:
                    delay = start + enrollments * interval - time.monotonic()
                    if delay > 0:
                        if inflight:
                            await asyncio.gather(*inflight)
                            inflight.clear()
                        await asyncio.sleep(delay)
        inflight.append(asyncio.ensure_future(pub.publish(ev, validate=False)))
        sent += 1
        if len(inflight) >= 200:
            await asyncio.gather(*inflight)
            inflight.clear()
    await asyncio.gather(*inflight)
    await pub.close()
    print(json.dumps({"published": sent}), flush=True)


# ---- orchestration ----------------------------------------------------------------------------
async def scrape_all(session: aiohttp.ClientSession, ports: list[int]) -> dict[str, float]:
    """Every replica's /metrics, summed series by series (counters and histogram buckets add up)."""
    out: dict[str, float] = {}
    for port in ports:
        for name, value in (await scrape(session, port)).items():
            out[name] = out.get(name, 0.0) + value
    return out


async def scrape(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


def metric(m: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, v in m.items():
        if not key.startswith(name):
            continue
        rest = key[len(name) :]
        if rest and not rest.startswith("{"):
            continue
        if all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


def quantile_from_buckets(m: dict[str, float], name: str, q: float) -> float | None:
    buckets = []
    for key, v in m.items():
        if key.startswith(name + "_bucket{"):
            le = key.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), v))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    target = q * total
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= target:
            if le == float("inf"):
                return prev_le
            frac = (target - prev_n) / (n - prev_n) if n > prev_n else 0.0
            return prev_le + (le - prev_le) * frac
        prev_le, prev_n = le, n
    return None


def share_within(m: dict[str, float], name: str, le: str) -> float | None:
    total = metric(m, name + "_count")
    if not total:
        return None
    return metric(m, name + "_bucket", le=le) / total


async def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode} before it was ready")
            try:
                async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("service not ready in time")


def start_replicas(env: dict[str, str], ports: list[int], log: Any) -> list[subprocess.Popen[bytes]]:
    """One `python -m sfworkflow run` per port (its SFWORKFLOW_HTTP_PORT), output to `log`."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "sfworkflow", "run"], env={**env, "SFWORKFLOW_HTTP_PORT": str(port)},
            stdout=log, stderr=log, cwd=ROOT,
        )
        for port in ports
    ]  # fmt: skip


def stop_replicas(services: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM each, then wait for it (killed past `timeout`)."""
    for service in services:
        service.terminate()
    for service in services:
        try:
            service.wait(timeout)
        except subprocess.TimeoutExpired:
            service.kill()


def engine_rate(seconds: float = 1.5) -> float:
    from bench.engine_step import measure

    return measure(seconds)["events_per_s"]


def _publisher_cmd(args: argparse.Namespace, amqp_url: str, tenant: str) -> list[str]:
    return [
        sys.executable, __file__, "--role", "publisher", "--mode", args.mode, "--amqp-url", amqp_url,
        "--tenant", tenant, "--enrollments", str(args.enrollments), "--rate", str(args.rate),
        "--seed", str(args.seed), "--dup-rate", str(args.dup_rate), "--ooo-rate", str(args.ooo_rate),
    ]  # fmt: skip


async def _declare(db_url: str, amqp_url: str, queue_type: str, shards: int | None = None) -> None:
    """Schema and topology before the service starts, so the drain mode can preload the queue."""
    from sfworkflow.client import amqp
    from sfworkflow.db import migrate
    from sfworkflow.runtime.declare import declare

    conn = await asyncpg.connect(db_url)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()
    connection = await amqp.connect(amqp_url)  # a cluster's nodes: the first that answers
    try:
        from sfworkflow.settings import DEFAULT_EVENT_SHARDS
        from sfworkflow.workflows import DEFINITIONS

        await declare(
            connection, sorted({d.name for d in DEFINITIONS}), queue_type, shards or DEFAULT_EVENT_SHARDS,
            amqp_url=amqp_url,
        )  # fmt: skip
    finally:
        await connection.close()


async def run(args: argparse.Namespace, db_url: str | None = None) -> dict[str, Any]:
    """One run of the workload on a fresh vhost: on a fresh database, or on `db_url` as it is (bench/growth.py
    preloads one); every count is of the run's own tenant, so rows already there are not counted."""
    db_url = db_url or await _reset_database()
    amqp_url = _reset_vhost()
    tenant = str(uuid.uuid4())
    env = dict(os.environ)
    env.update(
        SFWORKFLOW_DATABASE_URL=db_url,
        SFWORKFLOW_AMQP_URL=amqp_url,
        SFWORKFLOW_HTTP_PORT=str(HTTP_PORT),
        SFWORKFLOW_QUEUE_TYPE=args.queue_type,
        SFWORKFLOW_LOG_LEVEL="warning",
        SFWORKFLOW_PROCESSES="1",  # one process per --replicas
        # The workload is one tenant's sends from one sender: at sequence's 50 sends a second the drain would
        # measure the limit. The limit is still taken (its statement runs in every batch with a send), never defers;
        # its daily cap (100,000 sends a day per key) stays in force and is booked: a run's tenant is new, and
        # its sends stay under the cap up to 33,000 enrollments (more: add /daily:off here).
        SFWORKFLOW_RATE_LIMITS=os.environ.get(
            "SFWORKFLOW_RATE_LIMITS", "sequence.send_step/per_sender=1000000/1000000"
        ),
    )
    publisher: subprocess.Popen[bytes] | None = None
    if args.mode in ("drain", "enroll"):
        await _declare(db_url, amqp_url, args.queue_type)
        publisher = subprocess.Popen(_publisher_cmd(args, amqp_url, tenant), stdout=subprocess.PIPE, cwd=ROOT)
        publisher.wait(args.timeout)
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / "sfworkflow-bench-service.log", "wb")
    processes = getattr(args, "processes", 1)
    bases = [HTTP_PORT + k * processes for k in range(args.replicas)]
    ports = [base + j for base in bases for j in range(processes)]  # `run --processes N`: base port + index
    services = [
        subprocess.Popen(
            [sys.executable, "-m", "sfworkflow", "run", *(["--processes", str(processes)] if processes > 1 else [])],
            env={**env, "SFWORKFLOW_HTTP_PORT": str(base)}, stdout=log, stderr=log, cwd=ROOT,
        )
        for base in bases
    ]  # fmt: skip
    worker: SimulatedWorker | None = None
    try:
        for k, service in enumerate(services):
            for port in ports[k * processes : (k + 1) * processes]:
                await wait_ready(port, service)
        sprocs = [q for p in services for q in (psutil.Process(p.pid), *psutil.Process(p.pid).children())]
        if args.mode in ("live", "mix"):
            profile = WorkerProfile(duplicate_rate=args.dup_rate, seed=args.seed)
            if args.mode == "mix":  # the demo's failure mix: retries, compensations, duplicates
                profile = WorkerProfile(
                    failure_rate=0.05, fatal_rate=0.01, consent_rate=0.02, duplicate_rate=args.dup_rate, seed=args.seed
                )
            worker = SimulatedWorker(amqp_url, profile, workflows=None if args.mode == "mix" else ("sequence",))
            await worker.start()
            memory.settle_heap()  # this process is the worker's: tuned as CommandWorker.run() tunes its own
            publisher = subprocess.Popen(_publisher_cmd(args, amqp_url, tenant), stdout=subprocess.PIPE, cwd=ROOT)
        assert publisher is not None
        # (t, applied, batches, service cpu seconds, cpu seconds of PostgreSQL, RabbitMQ and the machine)
        samples: list[tuple[float, float, float, float, dict[str, float]]] = []
        t0 = time.monotonic()
        pg = await asyncpg.connect(db_url)
        done_at = None
        checked_at = 0.0
        expected = args.enrollments
        pub_out: dict[str, Any] | None = None
        async with aiohttp.ClientSession() as http:
            while time.monotonic() - t0 < args.timeout:
                m = await scrape_all(http, ports)
                cpu_s = sum(ct.user + ct.system for ct in (p.cpu_times() for p in sprocs))
                applied = metric(m, "sfworkflow_events_total", outcome="applied")
                batches = metric(m, "sfworkflow_batch_size_count")
                samples.append((time.monotonic() - t0, applied, batches, cpu_s, _cpu_elsewhere()))
                if publisher.poll() is not None:
                    if pub_out is None:
                        out = (publisher.communicate(timeout=30)[0] or b"{}").decode().strip().splitlines()
                        pub_out = json.loads(out[-1] if out else "{}")
                        expected = pub_out.get("instances", expected)
                    # The completion checks read the database: run them once the service has taken every event
                    # published so far (or every 2 s whatever it says), not on every sample, so that the harness
                    # does not load the PostgreSQL it measures.
                    sent = pub_out.get("published", 0) + (sum(worker.stats.answers.values()) if worker else 0)
                    taken = sum(metric(m, "sfworkflow_events_total", outcome=o) for o in OUTCOMES)
                    if taken >= sent or time.monotonic() - checked_at >= 2.0:
                        checked_at = time.monotonic()
                        if await _finished(pg, args.mode, tenant) >= expected and not await pg.fetchval(
                            "SELECT EXISTS (SELECT FROM sfworkflow.outbox WHERE published_at IS NULL)"
                        ):
                            done_at = time.monotonic() - t0
                            break
                await asyncio.sleep(0.25)
            await asyncio.sleep(1.0)  # the last answers and duplicates arrive and are counted
            final = await scrape_all(http, ports)
        if pub_out is None:
            out = (publisher.communicate(timeout=30)[0] or b"{}").decode().strip().splitlines()
            pub_out = json.loads(out[-1] if out else "{}")
        checks = await invariants(
            pg, final, pub_out.get("published", 0), worker, expected, tenant, mix=args.mode == "mix",
            enroll=args.mode == "enroll",
        )  # fmt: skip
        await pg.close()
    finally:
        if worker:
            await worker.stop()
            memory.unsettle_heap()  # bench/growth.py runs several workloads in this process
        stop_replicas(services, 15)
        log.close()

    # Steady state: the middle 60 % of the applied events.
    total = samples[-1][1] if samples else 0
    a = next((x for x in samples if x[1] >= 0.2 * total), None)
    b = next((x for x in samples if x[1] >= 0.8 * total), None)
    steady = (b[1] - a[1]) / (b[0] - a[0]) if a and b and b[0] > a[0] else None
    commits = (b[2] - a[2]) / (b[0] - a[0]) if a and b and b[0] > a[0] else None
    cpu = (b[3] - a[3]) / (b[0] - a[0]) * 100 if a and b and b[0] > a[0] else None
    age = "sfworkflow_event_age_at_commit_seconds"
    live = args.mode in ("live", "mix")
    if args.mode == "drain":
        mode = "drain a preloaded queue"
    elif args.mode == "enroll":
        mode = "drain a preloaded queue of enrollments"
    elif args.mode == "mix":
        by_wf = await _instances_by_workflow(db_url, tenant)
        offered = f"{args.rate:.0f} events/s offered" if args.rate else "closed loop"
        mode = f"mix of every workflow, {offered}: {by_wf}"
    else:
        mode = f"live, open loop, {args.rate:.0f} events/s offered" if args.rate else "live, closed loop"
    return {
        "bench": "sfworkflow throughput",
        "mode": mode,
        "queue_type": args.queue_type,
        "replicas": args.replicas,
        "processes_per_replica": processes,
        "instances": expected,
        "events_applied": int(metric(final, "sfworkflow_events_total", outcome="applied")),
        "events_applied_per_s_steady": round(steady, 1) if steady else None,
        "wall_s": round(done_at, 2) if done_at else None,
        # Every event applied and every outbox row published, from the service ready to done: the rate of the
        # whole job, whatever the relay left for after the steady state.
        "events_per_s_end_to_end": round(metric(final, "sfworkflow_events_total", outcome="applied") / done_at, 1)
        if done_at
        else None,
        "batch_commits_per_s_steady": round(commits, 1) if commits else None,
        "event_age_at_commit_p50_ms": _ms(quantile_from_buckets(final, age, 0.50)) if live else None,
        "event_age_at_commit_p99_ms": _ms(quantile_from_buckets(final, age, 0.99)) if live else None,
        "share_committed_within_100ms": _round(share_within(final, age, "0.1"), 4) if live else None,
        "service_cpu_pct_steady": round(cpu, 1) if cpu is not None else None,
        # All the service did for the run (applying, publishing, timers), from ready to done, per event applied:
        # steadier than a rate on a noisy machine, and it counts the relay's work whenever it happened.
        "service_cpu_us_per_event": _round(
            (samples[-1][3] - samples[0][3]) / max(1.0, samples[-1][1]) * 1e6 if samples else None, 1
        ),
        # Where the machine's CPU went per event applied, over the steady state: what the same work costs in
        # PostgreSQL and RabbitMQ, and how busy the cores were (200 % = two cores saturated).
        "cpu_us_per_event_steady": {"service": _round((b[3] - a[3]) / (b[1] - a[1]) * 1e6, 1)}
        | {k: _round((b[4][k] - a[4][k]) / (b[1] - a[1]) * 1e6, 1) for k in ("postgresql", "rabbitmq", "machine")}
        if a and b and b[1] > a[1]
        else None,
        "machine_busy_pct_steady": _round((b[4]["machine"] - a[4]["machine"]) / (b[0] - a[0]) * 100, 1)
        if a and b and b[0] > a[0]
        else None,
        "mean_batch_size": _round(
            metric(final, "sfworkflow_batch_size_sum") / max(1.0, metric(final, "sfworkflow_batch_size_count")), 1
        ),
        "engine_step_events_per_s": round(engine_rate()),
        "checks": checks,
        "cores": psutil.cpu_count(),
    }


async def _finished(pg: asyncpg.Connection, mode: str, tenant: str) -> int:
    """Instances of the run done with: waiting for their first answer (enroll), else settled."""
    if mode == "enroll":
        sql = "SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $1 AND state = 'sending'"
        return int(await pg.fetchval(sql, tenant))
    sql = f"SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $3 AND {SETTLED}"
    return int(await pg.fetchval(sql, *SETTLED_ARGS, tenant))


def _cpu_elsewhere() -> dict[str, float]:
    """CPU seconds so far of PostgreSQL's processes, RabbitMQ's and the machine as a whole (not idle)."""
    out = {"postgresql": 0.0, "rabbitmq": 0.0}
    for p in psutil.process_iter(["name", "cpu_times"]):
        name, times = p.info["name"] or "", p.info["cpu_times"]
        group = "postgresql" if name.startswith("postgres") else "rabbitmq" if name == "beam.smp" else None
        if group and times is not None:
            out[group] += times.user + times.system
    machine = psutil.cpu_times()
    out["machine"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0) - getattr(machine, "guest", 0.0)
    return out


async def _instances_by_workflow(db_url: str, tenant: str) -> dict[str, int]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(
            "SELECT workflow, count(*) AS n FROM sfworkflow.instance WHERE tenant_id = $1 GROUP BY 1 ORDER BY 2 DESC",
            tenant,
        )
        return {r["workflow"]: r["n"] for r in rows}
    finally:
        await conn.close()


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def _round(v: float | None, n: int) -> float | None:
    return None if v is None else round(v, n)


async def invariants(
    pg: asyncpg.Connection,
    m: dict[str, float],
    publisher_sent: int,
    worker: SimulatedWorker | None,
    expected_instances: int,
    tenant: str,
    mix: bool = False,
    enroll: bool = False,
) -> dict[str, Any]:
    outcomes = {o: int(metric(m, "sfworkflow_events_total", outcome=o)) for o in OUTCOMES}
    worker_sent = sum(worker.stats.answers.values()) if worker else 0
    published = publisher_sent + worker_sent
    accounted = sum(outcomes.values())
    t = tenant
    inbox = await pg.fetchval("SELECT count(*) FROM sfworkflow.inbox WHERE tenant_id = $1", t)
    distinct_published = published - outcomes["duplicate"]
    parked_left = await pg.fetchval("SELECT count(*) FROM sfworkflow.parked WHERE tenant_id = $1", t)
    unpublished = await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL")
    completed = await pg.fetchval(
        "SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $1 AND state = 'completed'", t
    )
    settled = await pg.fetchval(
        f"SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $3 AND {SETTLED}", *SETTLED_ARGS, t
    )
    commands = (
        "FROM sfworkflow.outbox WHERE kind = 'command'"
        " AND instance_id IN (SELECT id FROM sfworkflow.instance WHERE tenant_id = $1)"
    )
    sends = await pg.fetchval(f"SELECT count(*) {commands}", t)
    # One command per idempotency key and attempt: a retry is attempt + 1, never a second copy.
    sends_per_key = await pg.fetchval(
        "SELECT count(*) FROM (SELECT convert_from(body, 'UTF8')::jsonb->>'idempotency_key',"
        f" convert_from(body, 'UTF8')::jsonb->>'attempt' {commands} GROUP BY 1, 2 HAVING count(*) > 1) d",
        t,
    )
    twice = worker.stats.sends_twice() if worker else 0
    sending = await pg.fetchval(
        "SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $1 AND state = 'sending'", t
    )
    ok = (
        published == accounted
        and inbox == distinct_published
        and unpublished == 0
        and (sending if enroll else settled) == expected_instances
        and sends_per_key == 0
        and twice == 0
    )
    if enroll:  # every instance started and sent its first step, once
        ok = ok and parked_left == 0 and sends == expected_instances
    elif not mix:  # the sequence-only mixes have no failures: every step sent exactly once, nothing left parked
        ok = ok and parked_left == 0 and completed == expected_instances and sends == expected_instances * STEPS
    return {
        "published": published,
        **outcomes,
        "published_eq_accounted": published == accounted,
        "inbox_rows_eq_distinct_events": inbox == distinct_published,
        "parked_left": parked_left,
        "outbox_unpublished": unpublished,
        "instances_completed": completed,
        "instances_settled": settled,
        "instances_waiting_for_an_answer": sending,
        "send_step_commands": sends,
        "idempotency_keys_sent_twice": sends_per_key,
        "same_send_under_two_decisions_seen_by_worker": twice,
        "ok": ok,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", default="main", choices=("main", "publisher"))
    p.add_argument("--mode", default="drain", choices=("drain", "enroll", "live", "mix"))
    p.add_argument("--enrollments", type=int, default=4000)
    p.add_argument("--rate", type=float, default=0.0, help="offered events/s (0: as fast as possible)")
    p.add_argument("--dup-rate", type=float, default=0.05)
    p.add_argument("--ooo-rate", type=float, default=0.02)
    p.add_argument("--queue-type", default="classic", choices=("classic", "quorum"))
    p.add_argument("--replicas", type=int, default=1, help="service commands side by side (default 1)")
    p.add_argument("--processes", type=int, default=1, help="`sfworkflow run --processes N` of each (default 1)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--amqp-url", default="")
    p.add_argument("--tenant", default="")
    p.add_argument("--events-log", default="", help="(publisher) write every event published, one JSON a line")
    args = p.parse_args()
    if args.role == "publisher":
        run_loop(publisher_main(args))
        return
    print(json.dumps(run_loop(run(args))), flush=True)


def run_loop(coro: Any) -> Any:
    """Run on uvloop, as the service does: the publisher and the simulated worker share the cores with it."""
    import uvloop

    return uvloop.run(coro)


if __name__ == "__main__":
    main()
