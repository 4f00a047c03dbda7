"""`sfworkflow demo`: the real service plus a simulated SalesFlow worker and a few hundred enrollments.

Runs against the configured PostgreSQL and RabbitMQ (the local ones by default), under a fresh
tenant id, so each run's figures are its own. Prints a summary and exits 0 when every instance
reached a terminal state and the invariants hold; 1 otherwise, naming what is stuck.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections import Counter
from typing import Any

import asyncpg
import structlog

from sfworkflow import db
from sfworkflow.producer import EventPublisher, build_event
from sfworkflow.service import Service
from sfworkflow.settings import Settings
from sfworkflow.simulator import SimulatedWorker, WorkerProfile

log = structlog.get_logger("sfworkflow.demo")

TEMPLATES = ("welcome", "case-study", "check-in", "last-call")


def _enrollments(args: argparse.Namespace, rnd: random.Random) -> list[dict[str, Any]]:
    """Enrollment data; about 3 % share a recipient with another one, to show effect suppression."""
    out = []
    for i in range(args.enrollments):
        steps = [
            {"template_id": TEMPLATES[s % len(TEMPLATES)], "delay_seconds": 0 if s == 0 else rnd.choice((0, 1))}
            for s in range(args.steps)
        ]
        address = f"lead{i}@example.com"
        if i > 0 and rnd.random() < 0.03:
            address = f"lead{rnd.randrange(i)}@example.com"
        out.append(
            {
                "sequence_id": f"seq-{i % 7}",
                "lead_id": f"lead-{i}",
                "recipient": {"channel": rnd.choice(("email", "whatsapp", "sms")), "address": address},
                "steps": steps,
            }
        )
    return out


async def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    tenant = str(uuid.uuid4())
    rnd = random.Random(args.seed)
    service = Service(settings)
    try:
        await service.start()
    except OSError as exc:  # the HTTP port is taken: the demo still runs, on any free port
        log.warning("HTTP port busy; using a free one", port=settings.http_port, error=str(exc))
        await service.stop()
        from dataclasses import replace

        service = Service(replace(settings, http_port=0))
        await service.start()
    profile = WorkerProfile(
        failure_rate=args.failure_rate,
        fatal_rate=args.fatal_rate,
        consent_rate=args.consent_rate,
        duplicate_rate=args.duplicate_rate,
        seed=args.seed,
    )
    worker = SimulatedWorker(settings.amqp_url, profile)
    await worker.start()
    publisher = await EventPublisher.connect(settings.amqp_url)
    started = time.monotonic()
    published = Counter[str]()
    try:
        entities = [f"enrollment-{i}" for i in range(args.enrollments)]
        for entity, data in zip(entities, _enrollments(args, rnd), strict=True):
            ev = build_event(
                "sequence.enrolled",
                tenant_id=tenant,
                entity_id=entity,
                data=data,
                source="sfworkflow.demo",
                correlation_id=f"demo-{entity}",
            )
            await publisher.publish(ev)
            published["sequence.enrolled"] += 1
            if rnd.random() < args.duplicate_rate:
                await publisher.publish(ev)
                published["duplicate deliveries"] += 1
        repliers = [e for e in entities if rnd.random() < args.reply_rate]
        await asyncio.sleep(0.5)
        for entity in repliers:
            await publisher.publish(
                build_event(
                    "sequence.replied",
                    tenant_id=tenant,
                    entity_id=entity,
                    data={"channel": "email"},
                    source="sfworkflow.demo",
                )
            )
            published["sequence.replied"] += 1
        ok = await _wait_until_done(settings, tenant, args.enrollments, args.timeout)
        elapsed = time.monotonic() - started
        await _wait_outbox_empty(settings, 10.0)
        await asyncio.sleep(0.5)  # let the worker take the last compensation commands
        summary = await _summary(settings, tenant)
    finally:
        await publisher.close()
        await worker.stop()
        await service.stop()
    summary["sends_twice"] = worker.stats.sends_twice()
    _print_summary(summary, service, worker, published, elapsed, args, tenant, ok)
    bad = summary["sends_twice"] or summary["commands_per_idempotency_over_attempts"]
    if not ok:
        await _print_stuck(settings, tenant)
    return 0 if ok and not bad else 1


async def _print_stuck(settings: Settings, tenant: str) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT entity_id, state, updated_at FROM sfworkflow.instance WHERE tenant_id = $1 AND NOT terminal "
            "ORDER BY updated_at LIMIT 20",
            uuid.UUID(tenant),
        )
    finally:
        await conn.close()
    print("instances that did not end (first 20):")
    for r in rows:
        print(f"  {tenant}/sequence/{r['entity_id']}  state={r['state']}  since {r['updated_at']:%H:%M:%S}")


async def _wait_until_done(settings: Settings, tenant: str, expected: int, timeout: float) -> bool:
    conn = await asyncpg.connect(settings.database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = await conn.fetchval(
                "SELECT count(*) FROM sfworkflow.instance WHERE tenant_id = $1 AND terminal", uuid.UUID(tenant)
            )
            if done >= expected:
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
            if not await conn.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE published_at IS NULL"):
                return
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def _summary(settings: Settings, tenant: str) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url)
    await db.init_connection(conn)
    try:
        states = {
            r["state"]: r["n"]
            for r in await conn.fetch(
                "SELECT state, count(*) AS n FROM sfworkflow.instance WHERE tenant_id = $1 GROUP BY state "
                "ORDER BY state",
                tenant,
            )
        }
        totals = await conn.fetchrow(
            """
            SELECT coalesce(sum((context->>'sent')::int), 0) AS sent,
                   coalesce(sum((context->>'skipped')::int), 0) AS skipped,
                   coalesce(sum((context->>'suppressed')::int), 0) AS suppressed,
                   coalesce(sum((context->>'retries')::int), 0) AS retries
            FROM sfworkflow.instance WHERE tenant_id = $1
            """,
            tenant,
        )
        # Each idempotency key may carry one command per attempt, never two for the same attempt.
        over = await conn.fetchval(
            """
            SELECT count(*) FROM (
                SELECT convert_from(o.body, 'UTF8')::jsonb->>'idempotency_key' AS k,
                       convert_from(o.body, 'UTF8')::jsonb->>'attempt' AS a
                FROM sfworkflow.outbox o JOIN sfworkflow.instance i ON i.id = o.instance_id
                WHERE i.tenant_id = $1 AND o.kind = 'command'
                GROUP BY 1, 2 HAVING count(*) > 1) d
            """,
            tenant,
        )
        outbox = {
            r["kind"]: r["n"]
            for r in await conn.fetch(
                "SELECT o.kind, count(*) AS n FROM sfworkflow.outbox o JOIN sfworkflow.instance i "
                "ON i.id = o.instance_id WHERE i.tenant_id = $1 GROUP BY o.kind",
                tenant,
            )
        }
        return {
            "states": states,
            "sent": totals["sent"],
            "skipped": totals["skipped"],
            "suppressed": totals["suppressed"],
            "retries": totals["retries"],
            "commands_per_idempotency_over_attempts": over,
            "outbox": outbox,
        }
    finally:
        await conn.close()


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
    args: argparse.Namespace,
    tenant: str,
    ok: bool,
) -> None:
    applied = _metric(service, "sfworkflow_events_total", outcome="applied")
    line = "-" * 64
    print(line)
    print(f"sfworkflow demo: {args.enrollments} enrollments x {args.steps} steps, tenant {tenant}")
    print(line)
    print("instances by final state:")
    for state, n in s["states"].items():
        print(f"  {state:<14}{n:>8}")
    print("events:")
    for outcome in ("applied", "duplicate", "parked", "ignored", "dead_lettered"):
        print(f"  {outcome:<14}{int(_metric(service, 'sfworkflow_events_total', outcome=outcome)):>8}")
    print(f"  {'unparked':<14}{int(_metric(service, 'sfworkflow_unparked_total')):>8}   (parked, applied later)")
    print("sends:")
    print(f"  {'sent':<14}{s['sent']:>8}")
    print(f"  {'suppressed':<14}{s['suppressed']:>8}   (same template, recipient and day: not sent twice)")
    print(f"  {'skipped':<14}{s['skipped']:>8}   (consent_missing)")
    print(f"  {'retries':<14}{s['retries']:>8}   (same idempotency key, attempt + 1)")
    comp = sum(worker.stats.compensations.values())
    print(f"compensations received by the worker: {comp} ({dict(worker.stats.compensations)})")
    print(
        f"commands received by the worker: {sum(worker.stats.commands.values())}, "
        f"redelivered copies deduped on command_id: {worker.stats.duplicate_commands}"
    )
    print(f"outbox rows by kind: {s['outbox']}")
    print(f"published by the demo: {dict(published)}")
    print(f"same send (template, recipient, day) received by the worker under two decisions: {s['sends_twice']}")
    print(f"idempotency keys with two commands for one attempt: {s['commands_per_idempotency_over_attempts']}")
    print(
        f"elapsed {elapsed:.1f} s, {applied / elapsed if elapsed else 0:.0f} events applied/s "
        "(paced by step delays and retry backoff, not a benchmark: see bench/throughput.py)"
    )
    if service.http_port:
        print(f"metrics were at http://127.0.0.1:{service.http_port}/metrics")
    print("look at one instance:  sfworkflow inspect " + tenant + "/sequence/enrollment-0")
    print(line)
    print("result: " + ("every instance ended; invariants hold" if ok else "NOT every instance ended (see above)"))
