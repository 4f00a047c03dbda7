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

from sfworkflow import db
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


SCANS = {"Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan"}


def _literal(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return "'" + text.replace("'", "''") + "'"


async def _rows_read_by_a_plan_made_young(
    pg: asyncpg.Connection, query: str, arg: str, grow: list[str], then: str, *, runs: int = 1, generic: bool = True
) -> tuple[dict[str, int], int]:
    """What `query` reads once the tables grew, with the plan it got while they were empty: prepared and run `runs`
    times first (with `generic`, with a generic plan: a service's pool connections prepare each statement once, and
    after 5 runs PostgreSQL may keep a generic plan for the connection's lifetime: nothing but an ANALYZE or a schema
    change makes it plan again; with autovacuum off, as on this project's CI machine, nothing does; without, as the
    connection's own plan_cache_mode decides), then the `grow` statements, then run with `then` for real, rolled
    back. Rows read per table scanned (returned or filtered out) and the buffers the whole plan read (`buffers`:
    index entries of dead rows count there only); rows returned."""
    if generic:
        await pg.execute("SET plan_cache_mode = force_generic_plan")  # the plan PostgreSQL may keep after 5 runs
    await pg.execute(f"PREPARE young AS {q(query)}")
    for _ in range(runs):  # planned on the young tables' statistics
        tr = pg.transaction()
        await tr.start()
        await pg.execute(f"EXECUTE young({arg})")
        await tr.rollback()
    for statement in grow:
        await pg.execute(statement)
    tr = pg.transaction()
    await tr.start()
    try:
        text = await pg.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE young({then})")
    finally:
        await tr.rollback()
    plan = orjson.loads(text)[0]["Plan"]
    return {"buffers": plan["Shared Hit Blocks"] + plan["Shared Read Blocks"], **_read_by(plan)}, plan["Actual Rows"]


def _read_by(plan: dict[str, Any]) -> dict[str, int]:
    """Rows an executed plan read per table scanned: returned by the scan or filtered out by it."""
    read: dict[str, int] = {}
    for n in _nodes(plan):
        if n["Node Type"] in SCANS and n.get("Relation Name"):
            rows = (n["Actual Rows"] + n.get("Rows Removed by Filter", 0)) * n["Actual Loops"]
            read[n["Relation Name"]] = read.get(n["Relation Name"], 0) + rows
    return read


TENANT = "6a0c6a1e-2b3d-4e5f-8a9b-0c1d2e3f4a5b"
# 20,000 instances of one tenant (e1..e20000), each changed twice since (dead versions: no vacuum between).
MANY_INSTANCES = [
    "INSERT INTO sfworkflow.instance (tenant_id, workflow, entity_id, definition_version, state, context) "
    f"SELECT '{TENANT}', 'sequence', 'e' || g, 1, 'sending', '{{\"step\": 1}}' FROM generate_series(1, 20000) g",
    "UPDATE sfworkflow.instance SET version = version + 1, updated_at = now()",
    "UPDATE sfworkflow.instance SET version = version + 1, updated_at = now()",
]


def _keys(entities: range, **extra: Any) -> str:
    return _literal([{"tenant_id": TENANT, "workflow": "sequence", "entity_id": f"e{g}", **extra} for g in entities])


async def test_a_batch_locks_its_instances_reading_only_their_rows(pg: asyncpg.Connection) -> None:
    """Every batch locks its instances by key. Joined to the batch's keys, whose number the planner guesses at 100
    (a set-returning function's estimate), the instance table was hashed whole by a plan made while it was small and
    kept by the connection: 11,452 rows and 15 ms a batch 20 s into the drain benchmark, growing with every instance
    created. Each key is looked up in the key's index instead, whatever the planner thinks of the table."""
    keys = range(1, 20_000, 157)  # 128 keys spread over the table
    read, locked = await _rows_read_by_a_plan_made_young(pg, "lock_instances", _keys(keys), MANY_INSTANCES, _keys(keys))
    assert locked == len(keys)
    assert read.get("instance", 0) <= 3 * len(keys), (
        f"locking {len(keys)} instances read {read}"
    )  # a probe per key, one per id


async def test_a_batch_creates_its_new_instances_reading_only_their_keys(pg: asyncpg.Connection) -> None:
    """The same for the instances a batch names that may not exist yet: each key is looked up, not the table hashed
    (an anti-join that read every instance, 15,891 rows and 15 ms a batch in the drain benchmark)."""
    new = dict(definition_version=1, state="sending", correlation_id=None)
    keys = [*range(1, 20_000, 313), *range(30_000, 30_064)]
    args = _literal([{"tenant_id": TENANT, "workflow": "sequence", "entity_id": f"e{g}", **new} for g in keys])
    read, _ = await _rows_read_by_a_plan_made_young(pg, "create_instances", args, MANY_INSTANCES, args)
    assert read.get("instance", 0) <= 2 * len(keys), f"creating among {len(keys)} keys read {read}"


async def test_a_handed_claim_reads_a_bounded_number_of_outbox_rows(pg: asyncpg.Connection) -> None:
    """The relay's claim of the rows handed to it finds them by id. With a plan made while the outbox was small it
    read a whole index of unpublished rows instead (outbox_unpublished_instance_idx: every row waiting, and every
    row published since the last vacuum), filtering it by id: 15,000 buffers and 38 ms a claim in the drain."""
    grow = [
        "INSERT INTO sfworkflow.outbox (message_id, kind, exchange, routing_key, instance_id, body) "
        "SELECT gen_random_uuid(), 'command', 'x', 'y', g / 2, '\\x7b7d' FROM generate_series(1, 20000) g",
        "UPDATE sfworkflow.outbox SET published_at = now() WHERE id <= 10000",  # published, unvacuumed
    ]  # and 10,000 waiting: the relay behind a burst
    ids = _literal("{" + ",".join(str(i) for i in range(10_001, 10_251)) + "}")
    read, claimed = await _rows_read_by_a_plan_made_young(pg, "claim_handed", _literal("{1,2,3}"), grow, ids)
    assert claimed == 250
    assert read.get("outbox", 0) <= 4 * 250, f"claiming 250 handed rows read {read}"


async def test_the_service_plans_each_batch_statement_for_the_tables_as_they_are(database_url: str) -> None:
    """A connection of the service's pool runs a statement with the plan made for it there and then (plan_cache_mode
    = force_custom_plan), never a generic plan kept from when the tables were small: write_batch updates its
    instances joined to the batch's rows, and a generic plan made on a young table hashed the table whole (the
    instance table read on 616 of 973 batches 30 s into the drain benchmark, its ~3,000 pages each time; PostgreSQL
    CPU per event 326 against 259 us at batches of 64). Each execution is planned (~1 ms of PostgreSQL CPU per batch
    for all its statements); an ANALYZE, which would replace a kept plan, is autovacuum's, and here it is off."""
    pool = await db.create_pool(database_url, 1)
    try:
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
            instances = [
                {"id": n, "state": "s", "context": {}, "version": 3, "terminal": False, "parked_count": 0,
                 "last_event_type": "e", "definition_version": 1, "restart_clock": False}
                for n in range(100, 20_000, 311)
            ]  # fmt: skip
            args = f"{_literal(instances)}, '[]', '{{}}', '[]', '[]', '{{}}', '[]', '{{}}'"
            # the 5 runs after which PostgreSQL may keep a generic plan, on an empty table
            scanned, _ = await _rows_read_by_a_plan_made_young(
                conn, "write_batch", args, MANY_INSTANCES, args, runs=6, generic=False
            )
        read = scanned.get("instance", 0)
        assert read <= 2 * len(instances), f"updating {len(instances)} instances read {read} instance rows"
    finally:
        await pool.close()
