"""Hostile input against the running service: a generated mix of every kind of bad message interleaved
with good events. The service stays up and ready, the events queue drains with nothing left unacked,
every bad message is in sfworkflow.dead with the reason it deserves, every good one is applied once,
and nothing vanishes. An entity id of another tenant never touches that tenant's instance.

SFWORKFLOW_TEST_FUZZ_SEED and SFWORKFLOW_TEST_FUZZ_SCALE (a multiplier of every count) change the run;
run with `-s` to see the counts per category and the throughput of the good events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import time
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import orjson

from sfworkflow.runtime.consumer import MAX_HEADER_BYTES
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.fuzz_support import (
    APPLIED,
    DUPLICATE,
    Case,
    Generator,
    http_get,
    interleave,
    metric_total,
    queue_counts,
)
from tests.integration.helpers_extra import (
    DEAD_Q,
    EVENT_QUEUES,
    Inbox,
    events_depth,
    quick,
    wait_all_published,
)
from tests.support import OTHER_TENANT, TENANT, Amqp, enrolled_data, event, running_service

SEED = int(os.environ.get("SFWORKFLOW_TEST_FUZZ_SEED", "20261126"))
SCALE = max(1, int(os.environ.get("SFWORKFLOW_TEST_FUZZ_SCALE", "1")))
# Categories left out of the run (comma-separated), to see what each costs the good events.
SKIP = {c for c in os.environ.get("SFWORKFLOW_TEST_FUZZ_SKIP", "").split(",") if c}
GOOD = 200  # plain good events (times SCALE), besides the odd-looking good ones
DUPLICATES = 20  # good events published a second time (times SCALE)


def _vhost(amqp_url: str) -> str:
    return unquote(urlsplit(amqp_url).path.lstrip("/"))


async def _publish(mq: Amqp, c: Case) -> None:
    await mq.publish_raw(
        c.body, routing_key=c.routing_key, content_type=c.content_type, headers=c.headers, message_id=c.message_id
    )


async def _count(pg: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await pg.fetchval(sql, *args))


async def _drain_run(settings: Settings, pg: asyncpg.Connection, cases: list[Case], good: int) -> dict[str, Any]:
    """Preload the queue with `cases`, start consuming, and wait until every good one is applied and
    every bad one dead-lettered. What the run saw, for the assertions."""
    n_bad = sum(1 for c in cases if c.bad)
    async with running_service(quick(settings), consume=False) as service, Amqp(settings.amqp_url) as mq:
        dead = Inbox(mq, DEAD_Q)
        for c in cases:
            await _publish(mq, c)
        assert (await events_depth(settings.amqp_url))[0] == len(cases)
        assert service.consumer is not None and service.http_port is not None
        started = time.perf_counter()
        await service.consumer.start()
        await wait_for(
            lambda: _count(pg, "SELECT count(*) = $1 FROM sfworkflow.instance", good),
            timeout=90,
            interval=0.01,
            what=f"{good} good events applied",
        )
        good_s = time.perf_counter() - started
        await wait_for(
            lambda: _count(pg, "SELECT count(*) = $1 FROM sfworkflow.outbox WHERE kind = 'dead_letter'", n_bad),
            timeout=90,
            interval=0.01,
            what=f"{n_bad} dead letters written",
        )
        all_s = time.perf_counter() - started
        await wait_all_published(pg, timeout=60)
        if n_bad:
            await dead.wait_raw(n_bad, timeout=60)
        letters = await dead.settle_raw(0.5)
        ready, body = await http_get(service.http_port, "/readyz")
        counts = queue_counts(_vhost(settings.amqp_url), EVENT_QUEUES)
        alive = [not t.done() for t in service.consumer._tasks]
        metrics = {
            "applied": metric_total(service.metrics.events, outcome="applied"),
            "duplicate": metric_total(service.metrics.events, outcome="duplicate"),
            "dead_lettered": metric_total(service.metrics.events, outcome="dead_lettered"),
            "dead_by_reason": {
                r: metric_total(service.metrics.dead, reason=r)
                for r in {h for c in cases for h in c.expected if h not in (APPLIED, DUPLICATE)}
            },
            "batch_retries": metric_total(service.metrics.batch_retries),
        }
    return {
        "letters": letters,
        "good_s": good_s,
        "all_s": all_s,
        "ready": (ready, body),
        "events_queue": counts,
        "after_stop": await events_depth(settings.amqp_url),
        "consumers_alive": alive,
        "metrics": metrics,
    }


async def test_hostile_mix_is_dead_lettered_with_the_right_reason_while_good_events_flow(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    gen = Generator(SEED, SCALE)
    rng = random.Random(SEED + 1)
    bad = [c for c in gen.bad() if c.category not in SKIP]
    good = gen.good_mix(GOOD)
    dups = [
        dataclasses.replace(c, category="duplicate", expected=frozenset({DUPLICATE}))
        for c in rng.sample(good, DUPLICATES * SCALE)
    ]
    cases = interleave(rng, bad + dups, good)
    assert len(bad) >= (200 if not SKIP else 1) and len(good) >= 200
    assert len({c.digest for c in bad}) == len(bad), "bad bodies must be unique to be matched to their dead letter"
    assert len({c.event_id for c in good}) == len(good) == len({c.entity_id for c in good})

    run = await _drain_run(settings, pg, cases, len(good))

    # The service stayed up, ready, and consuming; the queue is empty with nothing unacked.
    assert run["ready"][0] == 200, run["ready"]
    assert all(run["consumers_alive"]), run["consumers_alive"]
    assert run["events_queue"] == (0, 0), f"events queue (ready, unacked) = {run['events_queue']}"
    assert run["after_stop"] == (0, 0)  # nothing came back when the consumer's channels closed

    # Every bad message is in sfworkflow.dead, byte for byte, once, with the reason it deserves.
    letters = run["letters"]
    by_digest = {c.digest: c for c in bad}
    seen: Counter[str] = Counter()
    wrong = []
    for m in letters:
        c = by_digest.get(_sha(m.body))
        assert c is not None, f"a dead letter that matches no bad message: {m.body[:100]!r} {m.headers}"
        seen[c.digest] += 1
        reason = m.headers["x-sfworkflow-reason"]
        if reason not in c.expected:
            wrong.append((c.category, sorted(c.expected), reason, m.headers.get("x-sfworkflow-detail", "")[:200]))
        _check_dead_letter_headers(c, m)
    assert not wrong, f"{len(wrong)} dead letters with the wrong reason: {wrong[:10]}"
    missing = [(c.category, c.body[:60]) for c in bad if seen[c.digest] == 0]
    assert not missing, f"{len(missing)} bad messages never dead-lettered: {missing[:10]}"
    assert max(seen.values()) == 1, "a bad message was dead-lettered twice"

    # Every good event applied exactly once: one instance each, one `applied` history row for its event.
    good_ids = [str(c.event_id) for c in good]
    assert await _count(pg, "SELECT count(*) FROM sfworkflow.instance") == len(good)
    rows = await pg.fetch(
        "SELECT event_id, count(*) AS n FROM sfworkflow.history "
        "WHERE outcome = 'applied' AND event_id = ANY($1::uuid[]) GROUP BY event_id",
        good_ids,
    )
    applied = {r["event_id"]: r["n"] for r in rows}
    assert sorted(applied) == sorted(good_ids), f"{len(good_ids) - len(applied)} good events not applied"
    assert set(applied.values()) == {1}
    instances = await pg.fetch("SELECT tenant_id, entity_id FROM sfworkflow.instance")
    assert sorted(r["entity_id"] for r in instances) == sorted(str(c.entity_id) for c in good)
    assert {r["tenant_id"] for r in instances} == {TENANT}
    assert await _count(pg, "SELECT count(*) FROM sfworkflow.parked") == 0

    # Nothing vanished: published = dead-lettered + applied + duplicates, by the service's own count too.
    m = run["metrics"]
    n_dups = len(dups)
    assert len(cases) == len(letters) + len(applied) + n_dups
    assert m["applied"] == len(good) and m["duplicate"] == n_dups and m["dead_lettered"] == len(bad), m
    assert sum(m["dead_by_reason"].values()) == len(bad), m

    _report(cases, letters, run)


def _check_dead_letter_headers(c: Case, m: Any) -> None:
    """The original headers ride along (made JSON-safe, or dropped when too big); ours cannot be forged."""
    h = m.headers
    assert h["x-sfworkflow-original-routing-key"] == c.routing_key
    assert h["x-sfworkflow-original-exchange"] == "sfworkflow.events"
    assert h["x-sfworkflow-detail"] and len(h["x-sfworkflow-detail"]) <= 1000
    if c.headers is None:
        return
    if "x-sfworkflow-headers-dropped" in h:
        assert len(repr(c.headers)) > MAX_HEADER_BYTES // 4, (c.category, h)
        return
    assert h.get("x-fuzz-index") == c.headers["x-fuzz-index"], h
    if "x-sfworkflow-detail" in c.headers:  # forged: overwritten by the real ones
        assert h["x-sfworkflow-reason"] in c.expected and h["x-sfworkflow-detail"] != "forged"
    if "x-nul\x00key" in c.headers:
        assert h["x-nul\ufffdkey"] == "va\ufffdlue"


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _report(cases: list[Case], letters: list[Any], run: dict[str, Any]) -> None:
    tried: Counter[str] = Counter(c.category for c in cases)
    outcome: dict[str, Counter[str]] = defaultdict(Counter)
    for c in cases:
        for e in c.expected:
            outcome[c.category][e] += 0
    reasons = {_sha(m.body): m.headers["x-sfworkflow-reason"] for m in letters}
    for c in cases:
        if c.bad:
            outcome[c.category][reasons[c.digest]] += 1
        else:
            outcome[c.category][next(iter(c.expected))] += 1
    n_good = tried["good"] + tried["good_odd"]
    lines = [f"hostile input, seed {SEED}, scale {SCALE}: {len(cases)} messages published"]
    lines.append(f"{'category':<28}{'tried':>7}  outcomes")
    for cat in sorted(tried):
        shown = ", ".join(f"{k} {v}" for k, v in sorted(outcome[cat].items()) if v)
        lines.append(f"{cat:<28}{tried[cat]:>7}  {shown}")
    lines.append("crashes 0 (consumers alive, /readyz 200), silent drops 0 (published = dead + applied + duplicates)")
    lines.append(
        f"throughput: {n_good} good events applied in {run['good_s']:.2f} s ({n_good / run['good_s']:.0f} events/s) "
        f"alongside {sum(1 for c in cases if c.bad)} bad ones; everything settled in {run['all_s']:.2f} s; "
        f"batch retries {run['metrics']['batch_retries']:.0f}"
    )
    print("\n" + "\n".join(lines))


async def test_clean_run_throughput_baseline(settings: Settings, pg: asyncpg.Connection) -> None:
    """The same good events without the hostile ones, drained the same way: the figure to compare with."""
    gen = Generator(SEED, SCALE)
    gen.bad()  # same ids as the hostile run
    good = gen.good_mix(GOOD)
    run = await _drain_run(settings, pg, good, len(good))
    assert run["ready"][0] == 200 and run["events_queue"] == (0, 0) and run["letters"] == []
    assert run["metrics"]["applied"] == len(good)
    print(
        f"\nclean run, seed {SEED}, scale {SCALE}: {len(good)} good events applied in {run['good_s']:.2f} s "
        f"({len(good) / run['good_s']:.0f} events/s)"
    )


# ---- tenants ----------------------------------------------------------------------------------------
async def _snapshot(pg: asyncpg.Connection, tenant: str) -> dict[str, Any]:
    instances = await pg.fetch(
        "SELECT id, entity_id, state, version, context, parked_count, correlation_id, last_event_id "
        "FROM sfworkflow.instance WHERE tenant_id = $1 ORDER BY id",
        tenant,
    )
    ids = [r["id"] for r in instances]
    history = await pg.fetch(
        "SELECT instance_id, seq, event_id, event_type, outcome, from_state, to_state FROM sfworkflow.history "
        "WHERE instance_id = ANY($1::bigint[]) ORDER BY id",
        ids,
    )
    timers = await pg.fetch(
        "SELECT instance_id, name, due_at FROM sfworkflow.timer WHERE instance_id = ANY($1::bigint[]) "
        "ORDER BY instance_id, name",
        ids,
    )
    outbox = await pg.fetch(
        "SELECT message_id, kind, routing_key FROM sfworkflow.outbox WHERE instance_id = ANY($1::bigint[]) ORDER BY id",
        ids,
    )
    return {
        "instances": [dict(r) for r in instances],
        "history": [dict(r) for r in history],
        "timers": [dict(r) for r in timers],
        "outbox": [dict(r) for r in outbox],
    }


async def test_an_entity_id_of_another_tenant_never_touches_that_tenants_instance(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    a, b = TENANT, OTHER_TENANT
    entities = [f"shared-{i}" for i in range(12)]
    async with running_service(quick(settings)) as service, Amqp(settings.amqp_url) as mq:
        a_events = [event("sequence.enrolled", e, enrolled_data(steps=2, delay_s=3600), tenant=a) for e in entities]
        for ev in a_events:
            await mq.publish(ev)
        await wait_for(
            lambda: _count(pg, "SELECT count(*) = 12 FROM sfworkflow.instance WHERE state = 'waiting'"),
            what="tenant A's instances waiting",
        )
        # One of A's instances moves on a little, so there is more than the start to protect.
        await mq.publish(event("sequence.paused", entities[0], {"reason": "a"}, tenant=a))
        await wait_for(lambda: _count(pg, "SELECT count(*) = 1 FROM sfworkflow.instance WHERE state = 'paused'"))
        await wait_all_published(pg)
        before = await _snapshot(pg, a)

        hostile: list[dict[str, Any]] = []
        for i, e in enumerate(entities):
            same_id = a_events[i]["event_id"]  # B reuses A's event ids: not a duplicate, not A's
            hostile += [
                event("sequence.replied", e, {}, tenant=b, event_id=same_id),
                event("sequence.cancelled", e, {"reason": "b"}, tenant=b),
                event("sequence.step_sent", e, {"step": 0, "provider_message_id": "p"}, tenant=b),
                event("sequence.step_failed", e, {"step": 0, "error_code": "x", "retryable": False}, tenant=b),
                event("sequence.unsubscribed", e, {}, tenant=b.upper()),  # the same tenant B, spelled upper-case
                event("sequence.resumed", e, {}, tenant=b),
            ]
            if i % 2:  # B's own instance under the same entity id: created, then cancelled
                hostile.append(event("sequence.enrolled", e, enrolled_data(steps=1, delay_s=3600), tenant=b))
                hostile.append(event("sequence.cancelled", e, {"reason": "b-own"}, tenant=b))
        for ev in hostile:
            await mq.publish(ev)
        b_own = len(entities) // 2
        await wait_for(
            lambda: _count(pg, "SELECT count(*) = $1 FROM sfworkflow.inbox WHERE tenant_id = $2", len(hostile), b),
            what="every event of tenant B taken in",
        )
        await wait_for(
            lambda: _count(
                pg, "SELECT count(*) = $1 FROM sfworkflow.instance WHERE tenant_id = $2 AND terminal", b_own, b
            ),
            what="tenant B's own instances ended",
        )
        await wait_all_published(pg)
        after = await _snapshot(pg, a)
        b_instances = await pg.fetch("SELECT entity_id, state FROM sfworkflow.instance WHERE tenant_id = $1", b)
        parked = await pg.fetch("SELECT tenant_id, entity_id, event_id FROM sfworkflow.parked")
        dead = await mq.drain(DEAD_Q)
        dup = metric_total(service.metrics.events, outcome="duplicate")

    assert after == before, "tenant B's events changed tenant A's instances"
    b_only = {ev["event_id"] for ev in hostile} - {ev["event_id"] for ev in a_events}
    assert {h["event_id"] for h in after["history"]}.isdisjoint(b_only)
    assert dup == 0, "an event of tenant B was taken for a duplicate of tenant A's"
    assert sorted(r["entity_id"] for r in b_instances) == sorted(e for i, e in enumerate(entities) if i % 2)
    assert {r["tenant_id"] for r in parked} <= {b}
    assert parked, "B's events for entities B has no instance of wait (parked) under B"
    assert dead == []


# ---- bugs found by the fuzzing --------------------------------------------------------------------
async def test_an_object_nested_300_deep_is_dead_lettered_and_does_not_stall_the_consumer(
    settings: Settings, pg: asyncpg.Connection
) -> None:
    nested = b"[" * 300 + b"]" * 300
    async with running_service(quick(settings, consumers=1)) as service, Amqp(settings.amqp_url) as mq:
        ev = event("sequence.enrolled", "deep", enrolled_data(steps=1, delay_s=3600))
        body = orjson.dumps(ev).replace(b'"data":{', b'"data":{"deep":' + nested + b",", 1)
        await mq.publish_raw(body)
        await mq.publish(event("sequence.enrolled", "after-deep", enrolled_data(steps=1, delay_s=3600)))
        try:
            await wait_for(
                lambda: _count(pg, "SELECT count(*) FROM sfworkflow.instance WHERE entity_id = 'after-deep'"),
                timeout=5,
                what="the good event after the deeply nested one",
            )
            dead = await wait_for(lambda: mq.drain(DEAD_Q), timeout=5, what="the dead letter")
        finally:
            assert service.consumer is not None
            alive = [not t.done() for t in service.consumer._tasks]
    assert all(alive)
    assert dead[0].body == body
    assert dead[0].headers["x-sfworkflow-reason"] in ("invalid_json", "schema_violation")


async def test_unstorable_but_schema_valid_events_are_schema_violations(settings: Settings) -> None:
    gen = Generator(SEED)
    cases = gen.unstorable()
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        for c in cases:
            await _publish(mq, c)
        dead = Inbox(mq, DEAD_Q)
        await dead.wait_raw(len(cases))
    reasons = sorted(str(m.headers["x-sfworkflow-reason"]) for m in dead.messages)
    assert reasons == ["schema_violation"] * len(cases), reasons
