"""The event path's repository: runs batch plans (core/plan.py) against PostgreSQL, one transaction each.

The plan decides; this module only answers its requests with SQL (sql/queries.sql, named blocks) and writes
its write set. For a batch of deliveries one transaction makes these round trips, whatever the batch's size:

    insert_inbox                       dedupe on (tenant_id, event_id): duplicates are dropped here
    create_instances, lock_instances   every key inserted in key order, then every row locked in id order
                                       (each row says whether events were parked under its key before it
                                       was created now)
    load_parked                        only when an instance of the batch has parked events
    per resolution round, each only when some step asked for it (a round answers what the steps of the
    round before asked; most batches need one round, feedback chains a few):
      insert_effects                   effect keys: a key claimed before suppresses the command
      delete_claims, insert_claims, claim_holders
      read_registers
    writes, each only when there are such rows: write_batch (instances, history, timers cancelled and
      outbox rows in one statement), delete_unstarted, upsert_timers, insert_parked, raise_parked_counts,
      clear_awaiting_version, delete_parked, delete_claims, delete_effects, upsert_registers (+ NOTIFY only
      from a process without a relay; the service hands the rows queued to its own relay after the commit:
      on_commit)

Every bad message of the batch becomes a dead-letter outbox row in the same transaction, so acking the whole
batch after commit loses nothing. Timers, parked re-drives and the expiry of parked events run the same plan
through the same executor.
"""

from __future__ import annotations

import contextlib
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg
import structlog

from sfworkflow.core.batch import (
    BatchReport,
    ClaimAnswer,
    ClaimEffects,
    ClaimKeys,
    Delivery,
    Holder,
    InsertInbox,
    KeyRelease,
    LoadParked,
    LockInstances,
    RateAnswer,
    ReadRegisters,
    Request,
    TakeRates,
    WriteSet,
)
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Engine
from sfworkflow.core.limits import ConcurrencyLimit, DayCount, Rate
from sfworkflow.core.plan import RETRY_FAILED_TIMER, BatchPlan
from sfworkflow.db.outbox import Queued
from sfworkflow.db.pool import is_connection_error, is_transient, q
from sfworkflow.settings import REDELIVERY_WINDOW_DAYS

log = structlog.get_logger("sfworkflow.store")

T = TypeVar("T")
TIMER_LANES = 64  # timer.lane: sfworkflow.tenant_lane(tenant_id), migration 0012
CHANGED = "changed since it was selected (replayed by someone else, or moved on)"

__all__ = ["CHANGED", "Store", "write"]


class Store:
    """Applies batches of deliveries and due timers; the only writer of instance state."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        engine: Engine,
        park_timeout_s: float,
        on_commit: Callable[[list[Queued]], None] | None = None,
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.park_timeout = timedelta(seconds=park_timeout_s)
        # Called with the outbox rows a transaction queued, once it committed: the service hands them to its
        # relay, which publishes them from memory. Without it (an operator's command), rows are NOTIFYed.
        self.on_commit = on_commit
        # Called once a transaction that queued a command for a concurrency slot, or released slots, committed:
        # the service wakes its gate loop (runtime/gates.py), which grants at once instead of at its next poll.
        self.on_gates: Callable[[], None] | None = None

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Unit]:
        """One transaction; the outbox rows it queued go to `on_commit` once it committed (not if it failed)."""
        async with self.pool.acquire() as conn, conn.transaction():
            unit = _Unit(conn)
            yield unit
        if unit.queued and self.on_commit is not None:
            self.on_commit(unit.queued)
        if unit.gates and self.on_gates is not None:
            self.on_gates()

    async def apply_deliveries(self, deliveries: Sequence[Delivery]) -> BatchReport:
        """Apply a micro-batch in one transaction. Raises only when the transaction failed as a whole."""
        plan = BatchPlan(self.engine, self.park_timeout)
        async with self._transaction() as unit:
            await self._write(unit, await self._run(unit.conn, plan.deliveries(deliveries)))
        return plan.report

    async def fire_due_timers(self, limit: int = 256) -> BatchReport:
        """Fire due timers of instances no other process holds, on definition versions this process has
        loaded (in a rolling deploy the other versions' replicas fire the rest); `timers_fired` says how
        many were taken, `timer_failures` how many were put back.

        A timer whose firing raises is put back by the batch itself (see BatchPlan.timers). When the
        transaction fails as a whole for a reason that is not transient (a command that cannot be
        written, say), each instance's timers are fired alone, and an instance that fails alone has its
        due timers put back RETRY_FAILED_TIMER later: healthy timers always fire."""
        workflows, versions = self._loaded_pairs()
        rows: list[asyncpg.Record] = []
        try:
            async with self._transaction() as unit:
                locked = await self._lock_due_timer_instances(unit.conn, limit, workflows, versions)
                rows = sorted({r["id"]: r for r in locked}.values(), key=lambda r: r["id"])  # one per instance
                if not rows:
                    return BatchReport()
                report = await self._fire_locked(unit, rows)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error("timer batch failed; firing its instances one by one", error=repr(exc)[:300])
            report = BatchReport()
            for r in rows:
                report.merge(await self._fire_instance_alone(r["id"]))
            return report
        return report

    async def _lock_due_timer_instances(
        self, conn: asyncpg.Connection, limit: int, workflows: list[str], versions: list[int]
    ) -> list[asyncpg.Record]:
        """A round's due timers, fairly across tenants: an equal share of `limit` per timer lane first (4 of 256
        in each of the 64 lanes, one index probe each), then, when a lane had more, the rest of `limit` oldest first
        whatever the lane (a tenant alone still fills whole rounds). A tenant with 100,000 timers due takes its
        lane's share and the rest, not the whole round: another tenant's due timer fires in the same round unless
        both share a lane. SKIP LOCKED inside each lane's limit: replicas firing at once take different timers.
        (The statements' comments stay short: pg_stat_activity shows the first 1,024 bytes of a statement.)"""
        share = max(1, limit // TIMER_LANES)
        fair: list[asyncpg.Record] = await conn.fetch(q("lock_due_timer_instances_by_lane"), share, workflows, versions)
        fair = fair[:limit]
        per_lane = Counter(r["lane"] for r in fair)
        if len(fair) >= limit or not any(n >= share for n in per_lane.values()):
            return fair  # full, or every lane gave all it had
        taken = sorted({r["id"] for r in fair})
        rest = await conn.fetch(q("lock_due_timer_instances"), limit - len(fair), workflows, versions, taken)
        return [*fair, *rest]

    async def _fire_locked(self, unit: _Unit, rows: Sequence[asyncpg.Record]) -> BatchReport:
        timers = await unit.conn.fetch(q("take_due_timers"), [r["id"] for r in rows])
        plan = BatchPlan(self.engine, self.park_timeout)
        await self._write(unit, await self._run(unit.conn, plan.timers(rows, timers)))
        return plan.report

    async def _fire_instance_alone(self, instance_id: int) -> BatchReport:
        try:
            async with self._transaction() as unit:
                rows = await unit.conn.fetch(q("lock_timer_instance"), instance_id)
                if not rows:
                    return BatchReport()  # taken by another replica meanwhile, or its timers are gone
                report = await self._fire_locked(unit, rows)
            return report
        except Exception as exc:
            if is_transient(exc):
                raise
            return await self._put_back_timers(instance_id, exc)

    async def _put_back_timers(self, instance_id: int, exc: Exception) -> BatchReport:
        """An instance whose due timers cannot be fired even alone: move them RETRY_FAILED_TIMER later,
        with a `failed` history row, so the timer loop goes on with the others."""
        log.error(
            "timers of an instance cannot be fired; put back for 60 s", instance_id=instance_id,
            error=repr(exc)[:300], traceback=traceback.format_exc(limit=8),
        )  # fmt: skip
        async with self.pool.acquire() as conn, conn.transaction():
            n = await conn.fetchval(
                q("put_back_due_timers"), instance_id, RETRY_FAILED_TIMER.total_seconds(), repr(exc)[:300]
            )
        return BatchReport(timer_failures=n or 0)

    def _loaded_pairs(self) -> tuple[list[str], list[int]]:
        pairs = sorted(self.engine.compiled)
        return [w for w, _ in pairs], [v for _, v in pairs]

    async def unfireable_due_timers(self) -> int:
        """Due timers of instances on definition versions this process has not loaded."""
        workflows, versions = self._loaded_pairs()
        async with self.pool.acquire() as conn:
            return int(await conn.fetchval(q("count_unfireable_due_timers"), workflows, versions))

    async def prune(self, retention_days: float, limit: int = 5000) -> dict[str, int]:
        """Delete what the retention period (in days, fractions count) no longer needs; rows deleted per
        table (a bounded slice). An ended instance goes with everything it owns, in one statement."""
        if retention_days < REDELIVERY_WINDOW_DAYS:
            raise ValueError(
                f"retention of {retention_days:g} days is shorter than the redelivery window of "
                f"{REDELIVERY_WINDOW_DAYS} days: the inbox would forget events that may still be redelivered"
            )
        out = {}
        async with self.pool.acquire() as conn:
            for name in ("outbox", "inbox"):
                status = await conn.execute(q(f"prune_{name}"), retention_days, limit)
                out[name] = int(status.split()[-1])
            out["instances"] = await conn.fetchval(q("prune_instances"), retention_days, limit)
            out["rate_buckets"] = int((await conn.execute(q("prune_rate_buckets"), limit)).split()[-1])
        return out

    async def grant_slots(
        self, limits: Mapping[str, ConcurrencyLimit], after: str = "", keys: int = 500
    ) -> tuple[list[tuple[str, int]], str]:
        """One round of the gates (runtime/gates.py): for up to `keys` concurrency keys with queued commands after key
        `after`, each in a transaction of its own under the key's lock (a key another replica is granting is
        skipped), grant the free slots to the oldest queued commands whose instance still holds that state (and
        withdraw those whose instance moved on). `limits`: the declared ones by full name. Returns (limit name,
        commands granted) per key that granted some, and the key to start the next round after ("" once every key
        was seen). A key whose grant fails is logged and skipped: the others go on."""
        async with self.pool.acquire() as conn:
            waiting = [r["gate_key"] for r in await conn.fetch(q("waiting_gates"), keys, after)]
        out: list[tuple[str, int]] = []
        for key in waiting:
            name, tenant, _part = key.split("|", 2)
            limit = limits.get(name)
            if limit is None:  # a limit this replica does not declare (a rolling deploy): a replica that does grants
                continue
            try:
                async with self._transaction() as unit:
                    await unit.conn.execute(q("ensure_gate"), key, tenant, name)
                    if await unit.conn.fetchval(q("lock_gate"), key) is None:
                        continue
                    granted = await unit.conn.fetch(
                        q("grant_slots"), key, limit.slots, sorted(limit.held_in), tenant, name
                    )
            except Exception as exc:
                if is_connection_error(exc):
                    raise
                log.error("granting a concurrency key failed; the others go on", gate_key=key, error=repr(exc)[:300])
                continue
            if granted:
                out.append((name, len(granted)))
        return out, (waiting[-1] if len(waiting) == keys else "")

    async def sweep_slots(self) -> int:
        """Release the concurrency slots whose instance ended, moved on or is gone; how many."""
        async with self.pool.acquire() as conn:
            return len(await conn.fetch(q("sweep_slots")))

    async def redrive_parked(
        self, key: InstanceKey, expect_version: int | None = None, replayed: dict[str, Any] | None = None
    ) -> int | None:
        """Retry an instance's parked events now (replay, or events that waited for a definition version);
        how many were applied; None if it changed meanwhile (its version is not `expect_version`), is
        gone, or is on a definition version this process has not loaded. `replayed`: an operator's replay
        (ops/replay.py): the detail of the `replayed` history entry written in the same transaction."""
        async with self._transaction() as unit:
            rows = await unit.conn.fetch(q("lock_instances"), _keys([key]))
            if not rows or (expect_version is not None and rows[0]["version"] != expect_version):
                return None
            plan = BatchPlan(self.engine, self.park_timeout)
            writes = await self._run(unit.conn, plan.redrive(rows[0], replayed))
            if writes is None:
                return None
            await self._write(unit, writes)
        return sum(plan.report.unparked.values())

    async def redrive_awaiting_version(self, limit: int = 100) -> int:
        """Re-drive instances on a definition version this process has loaded whose events were parked by
        a replica without it (a rolling deploy); how many of those events were applied."""
        workflows, versions = self._loaded_pairs()
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(q("instances_awaiting_version"), workflows, versions, limit)
        applied = 0
        for r in rows:
            n = await self.redrive_parked(InstanceKey(r["tenant_id"], r["workflow"], r["entity_id"]))
            applied += n or 0
        return applied

    async def expire_parked(self, limit: int = 500) -> Counter[str]:
        """Dead-letter parked events past their deadline (see BatchPlan.expired); counts by reason."""
        plan = BatchPlan(self.engine, self.park_timeout)
        async with self._transaction() as unit:
            rows = await unit.conn.fetch(q("take_expired_parked"), limit)
            if not rows:
                return Counter()
            await self._write(unit, plan.expired(rows))
        return Counter(plan.report.dead)

    async def replay(
        self, instance_id: int, expect_version: int, detail: dict[str, Any], *, timer: str | None = None,
        command: dict[str, Any] | None = None,
    ) -> str | None:  # fmt: skip
        """An operator's replay of one instance (ops/replay.py): `timer` falls due now, or `command` is published
        again. None when done; else why nothing was done (the instance changed since it was selected, or the
        timer is gone)."""
        plan = BatchPlan(self.engine, self.park_timeout)
        async with self._transaction() as unit:
            row = await unit.conn.fetchrow(q("lock_instance"), instance_id)
            if row is None or row["version"] != expect_version:
                return CHANGED
            if timer is not None:
                t = await unit.conn.fetchrow(q("instance_timer"), instance_id, timer)
                if t is None:
                    return "the timer is gone (it fired meanwhile)"
                writes = plan.replay_timer(row, t, detail)
            else:
                assert command is not None
                writes = await self._run(unit.conn, plan.reissue_command(row, command, detail))
            await self._write(unit, writes)
        return None

    # ---- the executor: answers a plan's requests, writes its write set ----------------------------
    async def _run(self, conn: asyncpg.Connection, steps: Generator[Request, Any, T]) -> T:
        """Drive a plan's generator: answer each request it yields with SQL, return what it returns."""
        answer: Any = None
        try:
            while True:
                request = steps.send(answer)
                answer = await _answer(conn, request)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _write(self, unit: _Unit, ws: WriteSet) -> None:
        unit.queued += await write(unit.conn, ws, notify=self.on_commit is None)
        if ws.slot_releases or any(x.gate_key is not None for x in ws.outbox):
            unit.gates = True


class _Unit:
    """One transaction of the store: its connection, and the outbox rows it queued so far."""

    __slots__ = ("conn", "gates", "queued")

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queued: list[Queued] = []
        self.gates = False  # it queued a command for a concurrency slot or released slots


async def write(conn: asyncpg.Connection, ws: WriteSet, *, notify: bool = True) -> list[Queued]:
    """Write a plan's write set: instances, history, timers cancelled and outbox rows in one statement
    (write_batch), then a statement per other kind of row, each skipped when it has none; the outbox rows queued
    (a message id queued before is skipped). With `notify`, they wake every replica's relay by NOTIFY (a
    process without a relay of its own: an operator's command); the service passes False and hands them to
    its own relay after the commit."""
    u, h, c, o = ws.instances, ws.history, ws.cancel_timers, ws.outbox
    inserted: list[asyncpg.Record] = []
    if u or h or c or ws.cancel_all_timers or o or ws.buckets:
        inserted = await conn.fetch(
            q("write_batch"),
            [{"id": x.instance_id, "state": x.state, "context": x.context, "version": x.version,
              "terminal": x.terminal, "parked_count": x.parked_count, "last_event_id": x.last_event_id,
              "last_event_type": x.last_event_type, "definition_version": x.definition_version,
              "restart_clock": x.restart_clock, "trace_id": x.trace_id, "traceparent": x.traceparent,
              "tracestate": x.tracestate, "deferred_until": x.deferred_until} for x in u],
            [{"instance_id": x.instance_id, "seq": x.seq, "event_id": x.event_id, "event_type": x.event_type,
              "outcome": x.outcome, "from_state": x.from_state, "to_state": x.to_state, "detail": x.detail,
              "trace_id": x.trace_id} for x in h],
            ws.cancel_all_timers,
            [{"instance_id": x.instance_id, "name": x.name} for x in c],
            [{"message_id": x.message_id, "kind": x.kind, "exchange": x.exchange, "routing_key": x.routing_key,
              "instance_id": x.instance_id, "headers": x.headers, "mandatory": x.mandatory,
              "deferred_until": x.deferred_until, "deferred_by": x.deferred_by,
              **({"gate_key": x.gate_key, "gate_timers": [{"name": t.name, "delay_s": t.delay_s, "payload": t.payload}
                                                         for t in x.gate_timers or ()]} if x.gate_key else {}),
              **({"behind_gate": True} if x.behind_gate else {}), **({"check_gate": True} if x.check_gate else {})}
             for x in o],
            [x.body for x in o],
            [{"bucket_key": b.bucket_key, "tat": b.tat, "cap_day": b.count.day, "cap_used": b.count.used,
              "cap_pushed": b.count.pushed} for b in ws.buckets],
            [x.body for x in h],
        )  # fmt: skip
    if ws.slot_releases:
        await conn.execute(
            q("release_slots"),
            [{"instance_id": r.instance_id, "state": r.state, "terminal": r.terminal, "reissued": list(r.reissued)}
             for r in ws.slot_releases],
        )  # fmt: skip
    if ws.unstarted:
        await conn.execute(q("delete_unstarted"), ws.unstarted)
    if ws.timers:
        t = ws.timers
        await conn.execute(
            q("upsert_timers"), [x.instance_id for x in t], [x.name for x in t], [x.due_at for x in t],
            [x.payload for x in t],
        )  # fmt: skip
    if ws.parked:
        p = ws.parked
        await conn.execute(
            q("insert_parked"), [x.event.tenant_id for x in p], [x.event.workflow for x in p],
            [x.event.entity_id for x in p], [x.event.event_id for x in p], [x.event.event_type for x in p],
            [x.body for x in p], [x.headers for x in p], [x.reason for x in p], [x.deadline for x in p],
            [x.awaiting_version for x in p],
        )  # fmt: skip
    if ws.parked_counts:
        pc = ws.parked_counts
        await conn.execute(q("raise_parked_counts"), [x.instance_id for x in pc], [x.added for x in pc])
    if ws.parked_seen:
        await conn.execute(q("clear_awaiting_version"), ws.parked_seen)
    if ws.parked_done:
        await conn.execute(q("delete_parked"), ws.parked_done)
    if ws.claim_releases:
        await _delete_keys(conn, "delete_claims", ws.claim_releases)
    if ws.effect_releases:
        await _delete_keys(conn, "delete_effects", ws.effect_releases)
    if ws.registers:
        r = ws.registers
        await conn.execute(
            q("upsert_registers"), [x.key for x in r], [x.value for x in r], [x.tenant_id for x in r],
            [x.instance_id for x in r],
        )  # fmt: skip
    if inserted and notify:
        await conn.execute(q("notify_relays"))
    rows = {x.message_id: x for x in o}
    if any(r["message_id"] not in rows for r in inserted):  # ids written other than PostgreSQL writes them back
        rows = {str(uuid.UUID(x.message_id)): x for x in o}
    return sorted((Queued(r["id"], rows[r["message_id"]]) for r in inserted), key=lambda x: x.id)


async def _answer(conn: asyncpg.Connection, request: Request) -> Any:
    """The database's answer to one request of a plan (core/batch.py says what each answer is)."""
    match request:
        case InsertInbox(events=events):
            inserted = await conn.fetch(
                q("insert_inbox"),
                [{"tenant_id": e.tenant_id, "event_id": e.event_id, "event_type": e.event_type,
                  "entity_id": e.entity_id} for e in events],
            )  # fmt: skip
            return {(r["tenant_id"], r["event_id"]) for r in inserted}
        case LockInstances(instances=new):
            await conn.execute(
                q("create_instances"),
                [{"tenant_id": n.key.tenant_id, "workflow": n.key.workflow, "entity_id": n.key.entity_id,
                  "definition_version": n.definition_version, "state": n.initial_state,
                  "correlation_id": n.correlation_id} for n in new],
            )  # fmt: skip
            return await conn.fetch(q("lock_instances"), _keys([n.key for n in new]))
        case LoadParked(keys=keys):
            return await conn.fetch(q("load_parked"), _keys(keys))
        case ClaimEffects(claims=claims):
            rows = await conn.fetch(
                q("insert_effects"),
                [{"effect_key": c.effect_key, "tenant_id": c.tenant_id, "instance_id": c.instance_id,
                  "command_id": c.command_id, "idempotency_key": c.idempotency_key} for c in claims],
            )  # fmt: skip
            return {r["effect_key"] for r in rows}
        case ClaimKeys(releases=releases, claims=claims):
            if releases:
                await _delete_keys(conn, "delete_claims", releases)
            rows = await conn.fetch(
                q("insert_claims"), [c.key for c in claims], [c.instance.tenant_id for c in claims],
                [c.instance.workflow for c in claims], [c.instance.entity_id for c in claims],
                [c.instance_id for c in claims],
            )  # fmt: skip
            taken = {r["claim_key"] for r in rows}
            others = [c.key for c in claims if c.key not in taken]
            holders = {}
            if others:
                holders = {
                    r["claim_key"]: Holder(r["instance_id"], r["workflow"], r["entity_id"])
                    for r in await conn.fetch(q("claim_holders"), others)
                }
            return ClaimAnswer(taken, holders)
        case ReadRegisters(keys=keys):
            return {r["key"]: r["value"] for r in await conn.fetch(q("read_registers"), keys)}
        case TakeRates(takes=takes):
            rows = await conn.fetch(
                q("take_rates"),
                [{"bucket_key": t.bucket_key, "tenant_id": t.tenant_id, "limit_name": t.limit_name, "n": t.n,
                  "per_s": t.rate.per_s, "burst": t.rate.burst, "daily_cap": t.rate.daily_cap} for t in takes],
            )  # fmt: skip
            return RateAnswer(
                {r["bucket_key"]: r["tat"] for r in rows},
                {r["bucket_key"]: Rate(r["per_s"], r["burst"], r["daily_cap"]) for r in rows},
                rows[0]["now"],
                {
                    r["bucket_key"]: DayCount(r["cap_day"], r["cap_used"], r["cap_pushed"])
                    for r in rows
                    if r["daily_cap"] is not None
                },
            )
    raise TypeError(f"a batch plan asked for {type(request).__name__}, which the repository cannot answer")


def _keys(keys: Sequence[InstanceKey]) -> list[dict[str, str]]:
    """Instance keys as the statements that take them read them (a JSON array of objects)."""
    return [{"tenant_id": k.tenant_id, "workflow": k.workflow, "entity_id": k.entity_id} for k in keys]


async def _delete_keys(conn: asyncpg.Connection, query: str, keys: Sequence[KeyRelease]) -> None:
    await conn.execute(q(query), [k.key for k in keys], [k.instance_id for k in keys])


# ---- instance migration between definition versions (ops/versions.py) -----------------------------------
async def migration_candidates(
    conn: asyncpg.Connection, workflow: str, from_version: int, after_id: int, limit: int
) -> list[asyncpg.Record]:
    return list(await conn.fetch(q("migration_candidates"), workflow, from_version, after_id, limit))


async def count_migration_candidates(conn: asyncpg.Connection, workflow: str, from_version: int) -> int:
    return int(await conn.fetchval(q("count_migration_candidates"), workflow, from_version))


async def instances_for_migration(conn: asyncpg.Connection, ids: list[int], *, lock: bool) -> list[asyncpg.Record]:
    """The instances' rows; with `lock`, locked, skipping rows another transaction holds."""
    return list(await conn.fetch(q("lock_for_migration" if lock else "read_for_migration"), ids))


async def timer_names(conn: asyncpg.Connection, ids: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for t in await conn.fetch(q("timer_names"), ids):
        out.setdefault(t["instance_id"], []).append(t["name"])
    return out
