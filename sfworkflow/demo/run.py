"""`sfworkflow demo`: the real service, a simulated SalesFlow worker, and a few hundred instances.

Runs against the configured PostgreSQL and RabbitMQ (the local ones by default), under a fresh
tenant id, so each run's figures are its own. Every workflow with a module in sfworkflow/demo/profiles/
gets its share of instances. Prints a summary and exits 0 when every instance has settled (reached
a terminal state, or a state that waits for an operator) and no send was asked for twice; 1
otherwise, naming what did not settle.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

import asyncpg
import structlog

from sfworkflow import db
from sfworkflow.client.dedupe import PostgresDedupe
from sfworkflow.client.producer import EventPublisher, build_event
from sfworkflow.core.stuck import operator_states
from sfworkflow.db import operations
from sfworkflow.demo import profiles as simulation
from sfworkflow.demo import schedules as demo_schedules
from sfworkflow.demo.profiles import Profile, Traffic
from sfworkflow.demo.worker import SimulatedWorker
from sfworkflow.runtime.service import Service
from sfworkflow.settings import Settings

log = structlog.get_logger("sfworkflow.demo")


def plan(total: int, rnd: random.Random, workflows: list[str] | None = None) -> list[Traffic]:
    """The demo's traffic: each workflow's share of `total` instances, interleaved."""
    modules = simulation.modules()
    names = [w for w in modules if workflows is None or w in workflows]
    weight = sum(modules[w].SHARE for w in names)
    counts = {w: max(1, round(total * modules[w].SHARE / weight)) for w in names}
    starts: list[list[Traffic]] = []
    for w in names:
        for i in range(counts[w]):
            starts.append(modules[w].start(i, rnd))
    rnd.shuffle(starts)
    return [t for group in starts for t in group]


async def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    tenant = str(uuid.uuid4())
    rnd = random.Random(args.seed)
    service = Service(settings)
    try:
        await service.start()
    except OSError as exc:  # the HTTP port is taken: the demo still runs, on any free port
        log.warning("HTTP port busy; using a free one", port=settings.http_port, error=str(exc))
        await service.stop()
        service = Service(replace(settings, http_port=0))
        await service.start()
    profile = Profile(
        failure_rate=args.failure_rate,
        fatal_rate=args.fatal_rate,
        consent_rate=args.consent_rate,
        duplicate_rate=args.duplicate_rate,
        reply_rate=args.reply_rate,
        seed=args.seed,
    )
    workflows = args.workflow or None
    traffic = plan(args.instances, rnd, workflows)
    instances = {(t.event_type.partition(".")[0], t.entity_id) for t in traffic}
    # --hang N: the worker takes the commands of N sequence instances and never answers: they get stuck.
    hung = sorted(i for i in instances if i[0] == "sequence")[: args.hang]
    # The worker's dedupe store in the demo's database (schema sfworkflow_worker), as a SalesFlow worker keeps it.
    store = await PostgresDedupe.open(settings.database_url)
    worker = SimulatedWorker(settings.amqp_url, profile, workflows, hang=hung, store=store)
    await worker.start()
    ticks = demo_schedules.TickListener()
    await ticks.start(settings.amqp_url)
    triggered = await demo_schedules.install(settings, service.engine, tenant)
    publisher = await EventPublisher.connect(settings.amqp_url)
    started = time.monotonic()
    published = Counter[str]()
    pending: set[asyncio.Task[None]] = set()
    try:
        for t in traffic:
            ev = build_event(
                t.event_type,
                tenant_id=tenant,
                entity_id=t.entity_id,
                data=t.data,
                source="sfworkflow.demo",
                correlation_id=f"demo-{t.entity_id}",
            )
            if t.delay_s:
                task = asyncio.create_task(_publish_later(publisher, ev, t.delay_s, published))
                pending.add(task)
                task.add_done_callback(pending.discard)
                continue
            await publisher.publish(ev)
            published[t.event_type] += 1
            if rnd.random() < args.duplicate_rate:
                await publisher.publish(ev)
                published["duplicate deliveries"] += 1
        if pending:
            await asyncio.gather(*pending)
        ok = await _wait_until_settled(settings, tenant, len(instances) - len(hung), service, args.timeout)
        elapsed = time.monotonic() - started
        await _wait_outbox_empty(settings, 10.0)
        await asyncio.sleep(0.5)  # let the worker take the last compensation commands
        summary = await _summary(settings, tenant)
        schedule_lines = await demo_schedules.report(settings, service.engine, tenant, ticks, triggered)
    finally:
        for task in pending:
            task.cancel()
        await ticks.stop()
        await publisher.close()
        await worker.stop()
        await service.stop()
    summary["sends_twice"] = worker.stats.sends_twice()
    _print_summary(summary, service, worker, published, elapsed, len(instances), tenant, ok)
    print("\n".join(schedule_lines))
    if hung:
        _print_hung(hung, tenant)
    if not ok:
        await _print_unsettled(settings, tenant, service)
    if service.exit_code:  # a background task died (its traceback was logged): exit as `sfworkflow run` does
        return service.exit_code
    bad = summary["sends_twice"] or summary["commands_per_idempotency_over_attempts"]
    return 0 if ok and not bad else 1


async def _publish_later(publisher: EventPublisher, ev: dict[str, Any], delay: float, published: Counter[str]) -> None:
    await asyncio.sleep(delay)
    await publisher.publish(ev)
    published[ev["event_type"]] += 1


def _operator_states(service: Service) -> tuple[list[str], list[str]]:
    """(workflows, states) where an instance waits for an operator, in the loaded definitions: it has settled."""
    return operator_states(cw.definition for cw in service.engine.compiled.values())


async def _wait_until_settled(settings: Settings, tenant: str, expected: int, service: Service, timeout: float) -> bool:
    ws, ss = _operator_states(service)
    conn = await asyncpg.connect(settings.database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not service.stop_requested.is_set():  # set once a task died
            if await operations.demo_settled_count(conn, tenant, ws, ss) >= expected:
                return True
            await asyncio.sleep(0.25)
        return False
    finally:
        await conn.close()


async def _wait_outbox_empty(settings: Settings, timeout: float) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not await operations.demo_unpublished_count(conn):
                return
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def _summary(settings: Settings, tenant: str) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    await db.init_connection(conn)
    try:
        states: dict[str, dict[str, int]] = {}
        for r in await operations.demo_states(conn, tenant):
            states.setdefault(r["workflow"], {})[r["state"]] = r["n"]
        # Each idempotency key may carry one command per attempt, never two for the same attempt.
        over = await operations.demo_commands_over_attempts(conn, tenant)
        retries = await operations.demo_command_retries(conn, tenant)
        outbox = await operations.demo_outbox_by_kind(conn, tenant)
        return {"states": states, "retries": retries, "commands_per_idempotency_over_attempts": over, "outbox": outbox}
    finally:
        await conn.close()


async def _print_unsettled(settings: Settings, tenant: str, service: Service) -> None:
    ws, ss = _operator_states(service)
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await operations.demo_unsettled(conn, tenant, ws, ss)
    finally:
        await conn.close()
    print("instances that did not settle (first 20):")
    for r in rows:
        print(f"  {tenant}/{r['workflow']}/{r['entity_id']}  state={r['state']}  since {r['updated_at']:%H:%M:%S}")


def _print_hung(hung: list[tuple[str, str]], tenant: str) -> None:
    print(f"{len(hung)} instance(s) left stuck on purpose (--hang): the worker took their command and never answered:")
    for workflow, entity in hung:
        print(f"  {tenant}/{workflow}/{entity}")
    print("find and fix them (docs/runbook.md, 'Stuck instances'):")
    print("  sfworkflow stuck --no-progress-for 5s           # what is stuck, and why (sending waits 15m by itself)")
    print("  sfworkflow replay --all-stuck --no-progress-for 5s --dry-run")
    print("  sfworkflow replay --all-stuck --no-progress-for 5s --reason 'worker hung'")
    print("  sfworkflow worker --seconds 10                  # a worker that answers this time")


def _metric(service: Service, name: str, **labels: str) -> float:
    total = 0.0
    for family in service.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _print_summary(
    s: dict[str, Any],
    service: Service,
    worker: SimulatedWorker,
    published: Counter[str],
    elapsed: float,
    instances: int,
    tenant: str,
    ok: bool,
) -> None:
    applied = _metric(service, "sfworkflow_events_total", outcome="applied")
    line = "-" * 72
    print(line)
    print(f"sfworkflow demo: {instances} instances, tenant {tenant}")
    print(line)
    print("instances by workflow and final state:")
    for workflow, states in s["states"].items():
        print(f"  {workflow:<18}" + ", ".join(f"{state} {n}" for state, n in states.items()))
    print("events:")
    for outcome in ("applied", "duplicate", "parked", "ignored", "dead_lettered"):
        print(f"  {outcome:<18}{int(_metric(service, 'sfworkflow_events_total', outcome=outcome)):>8}")
    print(f"  {'unparked':<18}{int(_metric(service, 'sfworkflow_unparked_total')):>8}   (parked, applied later)")
    suppressed = int(_metric(service, "sfworkflow_effects_suppressed_total"))
    print(f"effects suppressed (same effect key, not published twice): {suppressed}")
    print(f"retries (same idempotency key, attempt + 1): {s['retries']}")
    comp = sum(worker.stats.compensations.values())
    print(f"compensations received by the worker: {comp}")
    for k, n in sorted(worker.stats.compensations.items()):
        print(f"  {k:<44}{n:>6}")
    print(
        f"commands received by the worker: {sum(worker.stats.commands.values())}, "
        f"redelivered copies deduped on command_id: {worker.stats.duplicate_commands}"
    )
    print(f"outbox rows by kind: {s['outbox']}")
    print(f"published by the demo: {sum(published.values())} ({published['duplicate deliveries']} duplicates)")
    print(f"same send (template, recipient, day) received under two decisions: {s['sends_twice']}")
    print(f"idempotency keys with two commands for one attempt: {s['commands_per_idempotency_over_attempts']}")
    print(
        f"elapsed {elapsed:.1f} s, {applied / elapsed if elapsed else 0:.0f} events applied/s "
        "(paced by step delays and retry backoff, not a benchmark: see bench/throughput.py)"
    )
    if service.http_port:
        print(f"metrics were at http://127.0.0.1:{service.http_port}/metrics")
    print("look at one instance:  sfworkflow inspect " + tenant + "/sequence/enrollment-0")
    print(line)
    print("result: " + ("every instance settled; invariants hold" if ok else "NOT every instance settled (see below)"))
