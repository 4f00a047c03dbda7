"""The statements that run on every batch or every retention sweep can be answered from an index.

A statement that can only be answered by reading a whole table costs more as the table grows: at 300k timer
rows `delete_timers` read every row of sfworkflow.timer on nearly every batch. Each statement here is
planned with sequential scans disabled (`enable_seqscan = off` makes the planner take any index path
there is, whatever the table's size), so a sequential scan left in its plan means that no index can serve
it: the test fails whatever the data, and stays quiet whatever the planner would pick on small tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from sfworkflow.db.pool import q

# The tables that grow with the data: a sequential scan of any of them is a cost that grows too.
GROWING = {"instance", "history", "inbox", "outbox", "timer", "effect", "claim", "parked", "schedule"}

# (query name, sample arguments)
STATEMENTS: list[tuple[str, tuple[Any, ...]]] = [
    # instances, history, timers cancelled (every timer of 1 and 2; "retry" of 3, "step" of 4), outbox
    (
        "write_batch",
        (
            [
                {
                    "id": 7,
                    "state": "s",
                    "context": {},
                    "version": 1,
                    "terminal": False,
                    "parked_count": 0,
                    "last_event_type": "e",
                    "definition_version": 1,
                    "restart_clock": False,
                }
            ],
            [],
            [1, 2],
            [{"instance_id": 3, "name": "retry"}, {"instance_id": 4, "name": "step"}],
            [],
            [],
            [
                {
                    "bucket_key": "sequence.send_step/per_sender|t|email:-",
                    "tat": "2026-12-07T00:00:01+00:00",
                    "cap_day": "2026-12-07",
                    "cap_used": 3,
                }
            ],
            [],
        ),
    ),
    ("lock_due_schedules", (100,)),  # every round of every replica's schedule loop
    ("histories_with_bodies", ([1, 2],)),  # check-definition, export-histories: a chunk of instances at a time
    ("lock_due_timer_instances_by_lane", (4, ["sequence"], [1])),
    ("lock_due_timer_instances", (256, ["sequence"], [1], [1, 2])),
    ("upsert_timers", ([1], ["step_due"], [datetime(2026, 12, 7, tzinfo=UTC)], [{}])),
    ("prune_outbox", (14.0, 5000)),
    ("prune_inbox", (14.0, 5000)),
    ("prune_instances", (14.0, 5000)),
    ("claim_outbox", (500,)),
    ("outbox_backlog", ()),
    ("outbox_failed_count", ()),
    ("demo_unpublished_count", ()),
    ("active_instances_by_state", ()),
    (
        "inbox_state_of_event",
        ("0e4a3b4c-8a54-4c5e-9b7a-3c1d2e4f5a6b", "5f0c6a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b", "sequence", "enr-1"),
    ),
    (
        "stuck_candidates",
        (
            None,
            None,
            None,
            None,
            60.0,
            60.0,
            ["partner_approval"],
            ["pending_review"],
            100_000,
            ["sequence", "sequence"],
            [1, 1],
            ["sending", "paused"],
            [900.0, None],
        ),
    ),
]


def _scans(node: dict[str, Any]) -> Iterator[tuple[str, str]]:
    yield node["Node Type"], node.get("Relation Name", "")
    for child in node.get("Plans", ()):
        yield from _scans(child)


async def _plan(pg: asyncpg.Connection, sql: str, args: tuple[Any, ...]) -> dict[str, Any]:
    async with pg.transaction():
        await pg.execute("SET LOCAL enable_seqscan = off")
        text = await pg.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    plan: dict[str, Any] = orjson.loads(text)[0]["Plan"]
    return plan


@pytest.mark.parametrize(("name", "args"), STATEMENTS, ids=[s[0] for s in STATEMENTS])
async def test_no_growing_table_is_read_whole(pg: asyncpg.Connection, name: str, args: tuple[Any, ...]) -> None:
    plan = await _plan(pg, q(name), args)
    whole = sorted({rel for kind, rel in _scans(plan) if kind == "Seq Scan" and rel in GROWING})
    assert not whole, f"{name} reads sfworkflow.{', sfworkflow.'.join(whole)} whole: no index serves it"


async def test_a_statement_without_an_index_is_caught(pg: asyncpg.Connection) -> None:
    """The check itself: a filter on a column no index covers leaves a sequential scan in the plan."""
    plan = await _plan(pg, "DELETE FROM sfworkflow.timer WHERE payload = '{}'::jsonb", ())
    assert ("Seq Scan", "timer") in set(_scans(plan))


async def test_counting_unpublished_rows_reads_the_index_of_unpublished_rows(pg: asyncpg.Connection) -> None:
    """`published_at IS NULL` alone (the demo's and the benchmarks' "is everything published?") is answered from
    an index of unpublished rows. With indexes whose predicate also said `failed_at IS NULL`, it read the whole
    outbox (or every block range of its BRIN index): 0.5 to 1 s at a million rows, several times a second."""
    await pg.execute(
        "INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, body, published_at) "
        "SELECT gen_random_uuid(), 'command', 'x', 'y', '\\x7b7d', CASE WHEN g > 5 THEN now() END "
        "FROM generate_series(1, 20000) g"
    )
    await pg.execute("VACUUM ANALYZE sfworkflow.outbox")
    text = await pg.fetchval(f"EXPLAIN (FORMAT JSON) {q('demo_unpublished_count')}")
    plan = orjson.loads(text)[0]["Plan"]
    used = {n.get("Index Name") for n in _nodes(plan)}
    assert used & {"outbox_due_idx", "outbox_unpublished_instance_idx"}, plan


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


async def test_a_claim_reads_a_bounded_number_of_outbox_rows_whatever_the_backlog(pg: asyncpg.Connection) -> None:
    """The relay's claim costs what it claims, not what is waiting. The planner's estimate of the unpublished rows
    comes from the last ANALYZE, taken while the relay kept up (a few hundred rows); when a backlog builds (an
    outage, a burst) that estimate stays small, and a claim that sorted every due row before its LIMIT read the
    whole backlog each round: 20,400 rows and ~50 ms per claim here, 190 ms in the drain benchmark, so the relay
    fell further behind the more there was to publish."""
    await pg.execute(
        "INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, instance_id, body, published_at) "
        "SELECT gen_random_uuid(), 'command', 'x', 'y', g / 2, '\\x7b7d', CASE WHEN g > 400 THEN now() END "
        "FROM generate_series(1, 20000) g"
    )
    await pg.execute("VACUUM ANALYZE sfworkflow.outbox")  # the statistics of a relay that keeps up
    await pg.execute(
        "INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, instance_id, body) "
        "SELECT gen_random_uuid(), 'command', 'x', 'y', 100000 + g / 2, '\\x7b7d' FROM generate_series(1, 20000) g"
    )  # then a backlog of 20,000 rows, two per instance, that no ANALYZE has seen
    limit = 500
    tr = pg.transaction()
    await tr.start()
    try:
        text = await pg.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {q('claim_outbox')}", limit)
    finally:
        await tr.rollback()
    plan = orjson.loads(text)[0]["Plan"]
    read = {
        f"{n['Node Type']} ({n.get('Index Name', '')})": n["Actual Rows"] * n["Actual Loops"]
        for n in _nodes(plan)
        if n.get("Relation Name") == "outbox"
    }
    assert plan["Actual Rows"] == limit, plan
    assert max(read.values()) <= 2 * limit, f"the claim read {read} outbox rows for {limit}"


async def test_history_is_indexed_only_by_keys_that_new_rows_extend(pg: asyncpg.Connection) -> None:
    """Every history row goes into every index of the table, and history is the largest table there is (months of
    it). An index keyed by a random value (an event's UUID) puts each new entry on a random page of an index that
    has outgrown the cache; each such page's first change after a checkpoint writes a full-page image. At 1M active
    instances and 10M history rows, `history_event_idx` (event_id) was 79.5 of the 195 MB of WAL a drain of 16,000
    events wrote, more than any table. History is indexed by its id and by (instance_id, id): a new row extends
    the first at its right end and the second among its instance's rows."""
    rows = await pg.fetch(
        "SELECT i.indexrelid::regclass::text AS name, a.attname AS leading FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE i.indrelid = 'sfworkflow.history'::regclass"
    )
    assert rows, "sfworkflow.history has no index at all"
    random_keyed = {r["name"]: r["leading"] for r in rows if r["leading"] not in ("id", "instance_id")}
    assert not random_keyed, f"history indexes keyed by a column new rows do not extend: {random_keyed}"


async def test_a_handed_claim_reads_only_the_rows_handed_over(pg: asyncpg.Connection) -> None:
    """The relay locks the rows the service just committed by their ids (`claim_handed`). Its test of "due" must not
    be answered from outbox_due_idx: that index keeps an entry for every row published since the last vacuum, and
    a bitmap scan of it (which the planner took beside the ids while the table's statistics were young) read them
    all on every claim, 75,000 entries and 8 ms a claim 40 s into the fairness benchmark's burst, growing with it."""
    await pg.execute(
        "INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, body) "
        "SELECT gen_random_uuid(), 'command', 'x', 'y', '\\x7b7d' FROM generate_series(1, 20000)"
    )
    await pg.execute("UPDATE sfworkflow.outbox SET published_at = now() WHERE id % 1000 <> 0")  # published, unvacuumed
    ids = await pg.fetchval("SELECT array_agg(id) FROM (SELECT id FROM sfworkflow.outbox ORDER BY id DESC LIMIT 250) x")
    text = await pg.fetchval(f"EXPLAIN (FORMAT JSON) {q('claim_handed')}", ids)
    used = {n.get("Index Name") for n in _nodes(orjson.loads(text)[0]["Plan"])}
    assert "outbox_due_idx" not in used, used
