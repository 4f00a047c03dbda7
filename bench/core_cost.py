"""The service's Python cost per event without I/O: parse, plan, write set. Prints one JSON line.

    python bench/core_cost.py [--enrollments 3000] [--batch 85] [--rounds 3] [--profile 30]

The drain benchmark's stream (bench/throughput.py: enrolled, then step_sent for each of 3 steps,
interleaved across instances, 5 % delivered twice) is built as message bodies, then applied batch by
batch exactly as the service applies it: each body parsed and validated (EventParser), each batch
planned (BatchPlan.deliveries, timers due inline) and its write set applied to an in-memory database
that answers the plan's requests the way the repository's SQL does (tests/unit/plankit.FakeDatabase).
What it leaves out is what the end-to-end benchmark adds: AMQP frames, asyncpg's encoding, the relay.

Figures: microseconds per event for parsing and for planning (best of --rounds), and events/s for
both. --profile N prints cProfile's N costliest functions (by own time) of one round to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import plan_drain  # noqa: E402
from sfworkflow.client import memory  # noqa: E402
from sfworkflow.client.producer import build_event  # noqa: E402
from sfworkflow.contract import schemas  # noqa: E402
from sfworkflow.contract.envelope import EventParser  # noqa: E402
from sfworkflow.core.batch import Delivery  # noqa: E402
from sfworkflow.core.engine import Engine  # noqa: E402
from sfworkflow.core.plan import BatchPlan  # noqa: E402
from sfworkflow.runtime import logs  # noqa: E402
from sfworkflow.runtime.service import known_event_types  # noqa: E402
from sfworkflow.settings import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PARK_TIMEOUT_S  # noqa: E402
from sfworkflow.workflows import DEFINITIONS  # noqa: E402
from tests.unit.plankit import FakeDatabase  # noqa: E402

TENANT = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"


def bodies(enrollments: int, seed: int) -> list[bytes]:
    """The drain stream as the broker delivers it: every event once, 5 % again at a later point."""
    rnd = random.Random(seed + 1)
    items = plan_drain(enrollments, seed, 0.05, 0.02)
    events = [orjson.dumps(build_event(t, tenant_id=TENANT, entity_id=e, data=d, source="bench")) for t, e, d in items]
    stream = [(float(k), b) for k, b in enumerate(events)]
    for k in rnd.sample(range(len(events)), int(len(events) * 0.05)):
        stream.append((rnd.uniform(k + 0.5, len(events)), events[k]))
    stream.sort(key=lambda x: x[0])
    return [b for _k, b in stream]


def one_round(stream: list[bytes], batch: int, parser: EventParser, engine: Engine) -> dict[str, float]:
    db = FakeDatabase()
    park = timedelta(seconds=DEFAULT_PARK_TIMEOUT_S)
    parse_s = plan_s = 0.0
    for i in range(0, len(stream), batch):
        chunk = stream[i : i + batch]
        t0 = time.perf_counter()
        deliveries = [Delivery(parser.parse(b, "application/json"), b) for b in chunk]
        t1 = time.perf_counter()
        db.write(db.run(BatchPlan(engine, park).deliveries(deliveries)))
        plan_s += time.perf_counter() - t1
        parse_s += t1 - t0
    n = len(stream)
    return {"parse_us": 1e6 * parse_s / n, "plan_us": 1e6 * plan_s / n, "outbox_rows": len(db.outbox)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--enrollments", type=int, default=3000)
    p.add_argument("--batch", type=int, default=85, help="events per batch (the drain's mean batch size)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--default-gc", action="store_true", help="CPython's collector thresholds, not the service's")
    p.add_argument("--profile", type=int, default=0, help="print cProfile's N costliest functions to stderr")
    args = p.parse_args()
    logs.configure("info")  # as the service runs: debug lines filtered out
    engine = Engine(DEFINITIONS)
    parser = EventParser(schemas.default(), known_event_types(engine), DEFAULT_MAX_MESSAGE_BYTES)
    stream = bodies(args.enrollments, args.seed)
    if not args.default_gc:
        memory.settle_heap()  # as the service does once started
    rounds = [one_round(stream, args.batch, parser, engine) for _ in range(args.rounds)]
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(one_round, stream, args.batch, parser, engine)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    parse_us = min(r["parse_us"] for r in rounds)
    plan_us = min(r["plan_us"] for r in rounds)
    out: dict[str, Any] = {
        "bench": "sfworkflow core cost",
        "events": len(stream),
        "batch": args.batch,
        "parse_us_per_event": round(parse_us, 1),
        "plan_us_per_event": round(plan_us, 1),
        "core_us_per_event": round(parse_us + plan_us, 1),
        "core_events_per_s": round(1e6 / (parse_us + plan_us)),
        "outbox_rows_per_event": round(rounds[0]["outbox_rows"] / len(stream), 3),
        "rounds": [{k: round(v, 1) for k, v in r.items()} for r in rounds],
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
