"""Applying events to instances in PostgreSQL: one transaction per micro-batch, constant round trips.

For a batch of deliveries (or of due timers) one transaction does, in this order:

    inbox insert (dedupe on tenant_id, event_id)     -> duplicates are dropped here
    create instances for start events, lock every instance of the batch in id order
    load parked events of instances that may have some
    engine steps, in delivery order per instance     -> pure, in memory
      after each transition: fire timers already due, retry parked events
    claim effect keys; a key claimed before means the command is suppressed and the instance
      is told so (internal event `effect_suppressed`), which may claim more keys
    write instances, history, timers, parked events, outbox rows (+ NOTIFY)

Every bad message of the batch becomes a dead-letter outbox row in the same transaction, so
acking the whole batch after commit loses nothing.
"""

from __future__ import annotations

import copy
import hashlib
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import structlog

from sfworkflow.contract.envelope import IncomingEvent, event_from_body
from sfworkflow.contract.storable import clean_json, clean_text, replaced_note
from sfworkflow.core.definition import (
    ID_NAMESPACE,
    EngineEvent,
    InstanceKey,
    InstanceView,
    OutgoingMessage,
    TimerRequest,
)
from sfworkflow.core.engine import CompiledWorkflow, Decision, Engine, Outcome
from sfworkflow.db.pool import is_transient, q
from sfworkflow.errors import DeadReason, Rejection
from sfworkflow.settings import REDELIVERY_WINDOW_DAYS

log = structlog.get_logger("sfworkflow.store")

EXCHANGE_COMMANDS = "sfworkflow.commands"
EXCHANGE_COMPENSATIONS = "sfworkflow.compensations"
EXCHANGE_LIFECYCLE = "sfworkflow.lifecycle"
DEAD_LETTER_QUEUE = "sfworkflow.dead"
MAX_TRANSITIONS_PER_INSTANCE = 1000  # applied transitions per instance per batch: a definition that loops
# on itself (timers already due, feedback) trips it; retries of parked events that do not apply do not count
RETRY_FAILED_TIMER = timedelta(seconds=60)  # a timer whose step raised fires again this much later

_EXCHANGE_OF_KIND = {
    "command": EXCHANGE_COMMANDS,
    "compensation": EXCHANGE_COMPENSATIONS,
    "lifecycle": EXCHANGE_LIFECYCLE,
}


class StepLimitExceeded(RuntimeError):
    """An instance made more than MAX_TRANSITIONS_PER_INSTANCE transitions in one batch; the batch is split."""


@dataclass(slots=True)
class Delivery:
    """One message as it came from RabbitMQ, with what the parser made of it."""

    parsed: IncomingEvent | Rejection
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    routing_key: str = ""
    exchange: str = ""
    content_type: str | None = None
    message_id: str | None = None
    replaced_in_headers: int = 0  # NUL/surrogate characters the consumer replaced in `headers` (storable.py)


@dataclass
class BatchReport:
    """What a batch did, for metrics and logs. Keys are (workflow, outcome) etc.; never tenant ids."""

    events: Counter[tuple[str, str]] = field(default_factory=Counter)  # (workflow, outcome)
    transitions: Counter[str] = field(default_factory=Counter)  # workflow
    queued: Counter[tuple[str, str]] = field(default_factory=Counter)  # (workflow, kind)
    suppressed: Counter[str] = field(default_factory=Counter)  # workflow
    dead: Counter[str] = field(default_factory=Counter)  # reason
    unparked: Counter[str] = field(default_factory=Counter)  # workflow
    timers_fired: int = 0
    timer_failures: int = 0  # timers put back because firing them failed
    outbox_rows: int = 0


@dataclass(slots=True)
class _Parked:
    event: IncomingEvent
    body: bytes
    headers: dict[str, Any]
    db_id: int | None = None  # None: parked in this batch, not stored yet
    done: bool = False
    awaiting_version: int | None = None  # parked by a replica without the instance's definition version
    tried: bool = False  # stepped in this batch (by a replica that has the version)


@dataclass(slots=True)
class _Mark:
    """A run and its batch as they were before one unit of work (see _Batch._mark)."""

    run: _Run
    timer_ops: dict[str, TimerRequest | None]
    lengths: tuple[int, ...]
    parked: list[tuple[bool, bool]]
    registers: dict[str, tuple[Any, _Run]]
    claimed_here: dict[str, _Run]
    report: BatchReport


@dataclass(slots=True)
class _Run:
    """One instance during one batch."""

    key: InstanceKey
    compiled: CompiledWorkflow
    row_id: int | None = None
    # The instance's definition version when this replica has not loaded it (a rolling deploy): its
    # events are parked for a replica that has it, nothing is stepped.
    foreign_version: int | None = None
    view: InstanceView | None = None
    correlation_id: str | None = None  # the instance's, from its row (set when it was created)
    loaded_version: int = 0
    loaded_parked_count: int = 0
    parked: list[_Parked] = field(default_factory=list)
    outgoing: list[OutgoingMessage] = field(default_factory=list)
    pending_effects: list[OutgoingMessage] = field(default_factory=list)
    pending_claims: list[str] = field(default_factory=list)
    pending_lookups: list[tuple[str, str]] = field(default_factory=list)
    # Later events of this instance in the batch, held while it waits for the database's answers
    # (effect, claim, lookup), so they see the instance as those answers leave it.
    deferred: list[tuple[IncomingEvent, Delivery]] = field(default_factory=list)

    def waiting_for_answers(self) -> bool:
        return bool(self.pending_effects or self.pending_claims or self.pending_lookups)

    timer_ops: dict[str, TimerRequest | None] = field(default_factory=dict)
    cancel_all: bool = False
    history: list[tuple[Any, ...]] = field(default_factory=list)
    changed: bool = False
    terminal: bool = False
    last_event: tuple[str | None, str | None] = (None, None)
    transitions: int = 0  # applied in this batch: what the guard counts


def dead_letter_row(
    body: bytes,
    headers: dict[str, Any],
    reason: DeadReason,
    detail: str,
    *,
    message_id_seed: str,
    routing_key: str = "",
    exchange: str = "",
    content_type: str | None = None,
    replaced_in_headers: int = 0,
) -> tuple[Any, ...]:
    """An outbox row that publishes the original body to sfworkflow.dead with the reason headers.

    Every text that lands in the row's jsonb headers is made storable first (NUL and unpaired
    surrogates become U+FFFD, see storable.py) and the detail says what was replaced where, so one
    message can never make its own dead letter unwritable. `replaced_in_headers`: characters the
    consumer already replaced in the original headers when it received them."""
    h, in_headers = clean_json(headers)  # a new dict: the caller's headers are not touched
    detail, in_detail = clean_text(detail[:1000])
    routing_key, in_routing_key = clean_text(routing_key)
    exchange, in_exchange = clean_text(exchange)
    counts = {
        "header names and values": in_headers + replaced_in_headers,
        "routing key": in_routing_key,
        "exchange": in_exchange,
        "detail": in_detail,
    }
    h["x-sfworkflow-reason"] = str(reason)
    h["x-sfworkflow-original-routing-key"] = routing_key
    h["x-sfworkflow-original-exchange"] = exchange
    h["x-sfworkflow-dead-lettered-at"] = datetime.now(UTC).isoformat()
    if content_type:
        h["x-sfworkflow-original-content-type"], counts["content type"] = clean_text(content_type)
    h["x-sfworkflow-detail"] = detail + replaced_note(counts)
    digest = hashlib.sha256(body).hexdigest()
    message_id = str(uuid.uuid5(ID_NAMESPACE, f"dead/{reason}/{message_id_seed}/{digest}"))
    return (message_id, "dead_letter", "", DEAD_LETTER_QUEUE, None, body, h, True)


class Store:
    """Applies batches of deliveries and due timers; the only writer of instance state."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        engine: Engine,
        park_timeout_s: float,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.park_timeout = timedelta(seconds=park_timeout_s)
        self.on_commit = on_commit  # called after a commit that queued outbox rows (wakes the relay)

    def _committed(self, report: BatchReport) -> BatchReport:
        if report.outbox_rows and self.on_commit is not None:
            self.on_commit()
        return report

    async def apply_deliveries(self, deliveries: Sequence[Delivery]) -> BatchReport:
        """Apply a micro-batch in one transaction. Raises only when the transaction failed as a whole."""
        async with self.pool.acquire() as conn, conn.transaction():
            batch = _Batch(conn, self.engine, self.park_timeout)
            await batch.take_deliveries(deliveries)
            await batch.finish()
        return self._committed(batch.report)

    async def fire_due_timers(self, limit: int = 256) -> BatchReport:
        """Fire due timers of instances no other process holds, on definition versions this process has
        loaded (in a rolling deploy the other versions' replicas fire the rest); `timers_fired` says how
        many were taken, `timer_failures` how many were put back.

        A timer whose firing raises is put back by the batch itself (see _Batch.take_timers). When the
        transaction fails as a whole for a reason that is not transient (a command that cannot be
        written, say), each instance's timers are fired alone, and an instance that fails alone has its
        due timers put back RETRY_FAILED_TIMER later: healthy timers always fire."""
        workflows, versions = self._loaded_pairs()
        rows: list[asyncpg.Record] = []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(q("lock_due_timer_instances"), limit, workflows, versions)
                if not rows:
                    return BatchReport()
                report = await self._fire_locked(conn, rows)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error("timer batch failed; firing its instances one by one", error=repr(exc)[:300])
            report = BatchReport()
            for r in rows:
                self._merge(report, await self._fire_instance_alone(r["id"]))
            return report
        return self._committed(report)

    async def _fire_locked(self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> BatchReport:
        timers = await conn.fetch(q("take_due_timers"), [r["id"] for r in rows])
        batch = _Batch(conn, self.engine, self.park_timeout)
        await batch.take_timers(rows, timers)
        await batch.finish()
        return batch.report

    async def _fire_instance_alone(self, instance_id: int) -> BatchReport:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(q("lock_timer_instance"), instance_id)
                if not rows:
                    return BatchReport()  # taken by another replica meanwhile, or its timers are gone
                report = await self._fire_locked(conn, rows)
            return self._committed(report)
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

    @staticmethod
    def _merge(into: BatchReport, report: BatchReport) -> None:
        for f in ("events", "transitions", "queued", "suppressed", "dead", "unparked"):
            getattr(into, f).update(getattr(report, f))
        into.timers_fired += report.timers_fired
        into.timer_failures += report.timer_failures
        into.outbox_rows += report.outbox_rows

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
        return out

    async def redrive_parked(self, key: InstanceKey, expect_version: int | None = None) -> int | None:
        """Retry an instance's parked events now (replay, or events that waited for a definition version);
        how many were applied; None if it changed meanwhile (its version is not `expect_version`), is
        gone, or is on a definition version this process has not loaded."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(q("lock_instances"), [key.tenant_id], [key.workflow], [key.entity_id])
            if not rows or (expect_version is not None and rows[0]["version"] != expect_version):
                return None
            batch = _Batch(conn, self.engine, self.park_timeout)
            run = batch._run_from_row(rows[0])
            if run is None or run.foreign_version is not None:
                return None
            await batch._load_parked([run])
            batch._settle(run)
            await batch.finish()
        self._committed(batch.report)
        return sum(batch.report.unparked.values())

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
        """Dead-letter parked events past their deadline: `transition_not_allowed`, or
        `unknown_definition_version` for events that waited for a version no replica brought; counts by reason."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(q("take_expired_parked"), limit)
            counts: Counter[str] = Counter()
            if not rows:
                return counts
            out = []
            for r in rows:
                if r["awaiting_version"] is None:
                    reason = DeadReason.TRANSITION_NOT_ALLOWED
                    became = "become applicable"
                else:
                    reason = DeadReason.UNKNOWN_DEFINITION_VERSION
                    became = f"reach a replica that has {r['workflow']} v{r['awaiting_version']}"
                counts[str(reason)] += 1
                detail = (
                    f"{r['event_type']} was parked at {r['parked_at'].isoformat()} ({r['reason']}) and did not "
                    f"{became} before its deadline {r['deadline'].isoformat()}"
                )
                out.append(
                    dead_letter_row(
                        r["body"],
                        r["headers"],
                        reason,
                        detail,
                        message_id_seed=f"parked/{r['tenant_id']}/{r['event_id']}",
                        routing_key=r["event_type"],
                        exchange="sfworkflow.events",
                        content_type="application/json",
                    )
                )
                log.warning(
                    "parked event expired",
                    tenant_id=r["tenant_id"],
                    workflow=r["workflow"],
                    entity_id=r["entity_id"],
                    event_id=r["event_id"],
                    event_type=r["event_type"],
                    reason=str(reason),
                )
            await conn.fetch(q("insert_outbox"), *_columns(out, 8))
        self._committed(BatchReport(outbox_rows=len(out)))
        return counts


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    if not rows:
        return [[] for _ in range(width)]
    return [list(c) for c in zip(*rows, strict=True)]


class _Batch:
    """The work of one transaction."""

    def __init__(self, conn: asyncpg.Connection, engine: Engine, park_timeout: timedelta) -> None:
        self.conn = conn
        self.engine = engine
        self.now = datetime.now(UTC)
        self.deadline = self.now + park_timeout
        self.runs: dict[InstanceKey, _Run] = {}
        self.dead: list[tuple[Any, ...]] = []
        self.created: list[int] = []
        self.report = BatchReport()
        self.releases: list[tuple[str, int | None]] = []  # (claim key, instance id) given up in this batch
        self.claimed_here: dict[str, _Run] = {}  # claim keys taken in this batch
        self.registers: dict[str, tuple[Any, _Run]] = {}  # register writes of this batch (last wins)
        self.released_effects: list[tuple[str, int | None]] = []  # effects that did not happen after all

    # ---- intake --------------------------------------------------------------------------------
    async def take_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        fresh: list[Delivery] = []
        seen: set[tuple[str, str]] = set()
        for d in deliveries:
            p = d.parsed
            if isinstance(p, Rejection):
                self._dead_letter(d, p.reason, p.detail)
                continue
            ident = (p.tenant_id, p.event_id)
            if ident in seen:
                self.report.events[(p.workflow, "duplicate")] += 1
                continue
            seen.add(ident)
            fresh.append(d)
        if not fresh:
            return
        # Sorted, so concurrent batches take the inbox's index locks in one order (no deadlock cycle).
        events = sorted((d.parsed for d in fresh), key=lambda e: (e.tenant_id, e.event_id))  # type: ignore[union-attr]
        inserted = await self.conn.fetch(
            q("insert_inbox"),
            [e.tenant_id for e in events],  # type: ignore[union-attr]
            [e.event_id for e in events],  # type: ignore[union-attr]
            [e.event_type for e in events],  # type: ignore[union-attr]
            [e.entity_id for e in events],  # type: ignore[union-attr]
        )
        new_ids = {(r["tenant_id"], r["event_id"]) for r in inserted}
        work: list[Delivery] = []
        for d in fresh:
            e = d.parsed
            assert isinstance(e, IncomingEvent)
            if (e.tenant_id, e.event_id) in new_ids:
                work.append(d)
            else:
                self.report.events[(e.workflow, "duplicate")] += 1
        if not work:
            return
        await self._load([d.parsed for d in work])  # type: ignore[misc]
        for d in work:
            e = d.parsed
            assert isinstance(e, IncomingEvent)
            run = self.runs[InstanceKey(e.tenant_id, e.workflow, e.entity_id)]
            self._offer_external(run, e, d)

    async def take_timers(self, rows: Sequence[asyncpg.Record], timers: Sequence[asyncpg.Record]) -> None:
        by_id: dict[int, _Run] = {}
        for r in rows:
            run = self._run_from_row(r)
            if run is not None and run.foreign_version is None:
                by_id[r["id"]] = run
        await self._load_parked([run for run in by_id.values() if run.loaded_parked_count > 0])
        for t in timers:
            run = by_id.get(t["instance_id"])
            if run is None or run.view is None:
                continue
            self.report.timers_fired += 1
            mark = self._mark(run)
            try:
                self._fire_timer(run, t["name"], t["due_at"], t["payload"])
                self._settle(run)
            except Exception as exc:
                # The unit of failure is the unit of what is kept: the timer with every step it led to in
                # this transaction (already-due follow-up timers, parked events) is undone as one, and the
                # timer that was taken is put back a minute later, to fire again once the definition is
                # fixed. Nothing of it was published, so nothing fires twice.
                self._rollback(run, mark)
                self._timer_failed(run, t["name"], t["payload"], exc)

    def _timer_failed(self, run: _Run, name: str, payload: dict[str, Any], exc: Exception) -> None:
        assert run.view is not None
        raised_by = next((n for n in getattr(exc, "__notes__", ()) if n.startswith("raised by ")), "")
        log.error(
            "timer failed; put back for 60 s", tenant_id=run.key.tenant_id, workflow=run.key.workflow,
            entity_id=run.key.entity_id, timer=name, raised_by=raised_by[len("raised by "):] or None,
            error=repr(exc)[:300], traceback=traceback.format_exc(limit=8),
        )  # fmt: skip
        run.timer_ops[name] = TimerRequest(name, self.now + RETRY_FAILED_TIMER, payload)
        detail = {"error": repr(exc)[:300], "timer": name, "retry_at": (self.now + RETRY_FAILED_TIMER).isoformat()}
        if raised_by:
            detail["raised_by"] = raised_by[len("raised by ") :]
        run.history.append(
            (run.row_id, run.view.version, None, f"{run.key.workflow}.timer.{name}", "failed",
             run.view.state, run.view.state, detail)
        )  # fmt: skip
        self.report.timer_failures += 1

    def _mark(self, run: _Run) -> _Mark:
        """What `_rollback` needs to undo everything one unit of work (a timer and its follow-ups) did."""
        return _Mark(
            run=copy.copy(run),
            timer_ops=dict(run.timer_ops),
            lengths=(len(run.history), len(run.outgoing), len(run.pending_effects), len(run.pending_claims),
                     len(run.pending_lookups), len(run.deferred), len(run.parked), len(self.dead),
                     len(self.releases), len(self.released_effects)),
            parked=[(p.done, p.tried) for p in run.parked],
            registers=dict(self.registers),
            claimed_here=dict(self.claimed_here),
            report=copy.deepcopy(self.report),
        )  # fmt: skip

    def _rollback(self, run: _Run, m: _Mark) -> None:
        (n_history, n_outgoing, n_effects, n_claims, n_lookups, n_deferred, n_parked, n_dead, n_releases,
         n_released) = m.lengths  # fmt: skip
        for name in ("view", "changed", "terminal", "last_event", "cancel_all", "transitions"):
            setattr(run, name, getattr(m.run, name))
        run.timer_ops = m.timer_ops
        del run.history[n_history:], run.outgoing[n_outgoing:], run.pending_effects[n_effects:]
        del run.pending_claims[n_claims:], run.pending_lookups[n_lookups:], run.deferred[n_deferred:]
        del run.parked[n_parked:], self.dead[n_dead:], self.releases[n_releases:]
        del self.released_effects[n_released:]
        for p, (done, tried) in zip(run.parked, m.parked, strict=True):
            p.done, p.tried = done, tried
        self.registers, self.claimed_here = m.registers, m.claimed_here
        timers_fired = self.report.timers_fired
        self.report = m.report
        self.report.timers_fired = timers_fired

    async def _load(self, events: Sequence[IncomingEvent]) -> None:
        """Create the batch's instances that do not exist, lock all of them, load their parked events.

        Locks are taken in one global order: first every instance key of the batch is inserted (a start
        event's instance, or a placeholder for an instance a concurrent batch may be creating right now:
        inserting its key waits for that batch, so the event is applied to it instead of being parked
        unseen), sorted by key, before any row lock; then every row is locked in id order. Placeholders
        (version 0) that no start event used are removed before commit."""
        keys: dict[InstanceKey, IncomingEvent | None] = {}
        for e in events:
            key = InstanceKey(e.tenant_id, e.workflow, e.entity_id)
            compiled = self.engine.workflow(e.workflow)
            starts = compiled is not None and e.name in compiled.definition.start_events
            if keys.get(key) is None:
                keys[key] = e if starts else None
        ks = sorted(keys, key=lambda k: (k.tenant_id, k.workflow, k.entity_id))
        compiled_of = {k: self.engine.workflow(k.workflow) for k in ks}
        await self.conn.execute(
            q("create_instances"),
            [k.tenant_id for k in ks],
            [k.workflow for k in ks],
            [k.entity_id for k in ks],
            [compiled_of[k].definition.version for k in ks],  # type: ignore[union-attr]
            [compiled_of[k].initial for k in ks],  # type: ignore[union-attr]
            [_correlation(keys[k]) for k in ks],
        )
        rows = await self.conn.fetch(
            q("lock_instances"), [k.tenant_id for k in ks], [k.workflow for k in ks], [k.entity_id for k in ks]
        )
        for r in rows:
            run = self._run_from_row(r)
            if run is not None and r["version"] == 0:
                self.created.append(r["id"])
        for key in ks:
            if key not in self.runs:  # gone meanwhile (pruned): its events are parked without an instance
                compiled = self.engine.workflow(key.workflow)
                assert compiled is not None  # the parser only admits event types of loaded workflows
                self.runs[key] = _Run(key=key, compiled=compiled)
        await self._load_parked(
            [
                run
                for run in self.runs.values()
                if run.row_id is not None
                and run.foreign_version is None
                and (run.loaded_parked_count > 0 or run.loaded_version == 0)
            ]
        )
        for run in self.runs.values():
            # Events that waited for this replica's definition version came first: try them first.
            if run.view is not None and any(p.awaiting_version is not None for p in run.parked):
                self._settle(run)

    def _run_from_row(self, r: asyncpg.Record) -> _Run | None:
        key = InstanceKey(r["tenant_id"], r["workflow"], r["entity_id"])
        compiled = self.engine.workflow(r["workflow"], r["definition_version"])
        if compiled is None:
            latest = self.engine.workflow(r["workflow"])
            if latest is None:
                return None
            run = _Run(
                key=key,
                compiled=latest,
                row_id=r["id"],
                loaded_version=r["version"],
                loaded_parked_count=r["parked_count"],
                foreign_version=r["definition_version"],
            )
            self.runs[key] = run
            return run
        view = None
        if r["version"] > 0:
            view = InstanceView(
                key, r["state"], r["context"], r["version"], r["definition_version"], r["correlation_id"]
            )
        run = _Run(
            key=key,
            compiled=compiled,
            row_id=r["id"],
            view=view,
            loaded_version=r["version"],
            correlation_id=r["correlation_id"],
            loaded_parked_count=r["parked_count"],
            terminal=r["state"] in compiled.definition.terminal,
        )
        self.runs[key] = run
        return run

    async def _load_parked(self, runs: Sequence[_Run]) -> None:
        if not runs:
            return
        rows = await self.conn.fetch(
            q("load_parked"),
            [r.key.tenant_id for r in runs],
            [r.key.workflow for r in runs],
            [r.key.entity_id for r in runs],
        )
        for r in rows:
            run = self.runs[InstanceKey(r["tenant_id"], r["workflow"], r["entity_id"])]
            try:
                event = event_from_body(r["body"])
            except Exception:  # stored before a schema change; leave it for the expiry sweep
                log.exception("parked event cannot be read", event_id=r["event_id"])
                continue
            run.parked.append(
                _Parked(event, r["body"], r["headers"], db_id=r["id"], awaiting_version=r["awaiting_version"])
            )

    # ---- engine --------------------------------------------------------------------------------
    def _step(self, run: _Run, event: EngineEvent) -> Decision | None:
        return self.engine.step(run.compiled, run.key, run.view, event, self.now)

    def _offer_external(self, run: _Run, e: IncomingEvent, d: Delivery) -> None:
        if run.foreign_version is not None:
            self._leave_for_version(run, e, d)
            return
        if run.row_id is None:
            # No row (deleted between its insert and its lock): nothing to apply the event to, so it waits
            # parked, even a start event, which would otherwise be applied to nothing.
            run.parked.append(_Parked(e, d.body, d.headers))
            self.report.events[(run.key.workflow, "parked")] += 1
            return
        if run.deferred or run.waiting_for_answers():
            run.deferred.append((e, d))
            return
        self._offer_now(run, e, d)

    def _leave_for_version(self, run: _Run, e: IncomingEvent, d: Delivery) -> None:
        """Park an event of an instance on a definition version this replica has not loaded, for a replica
        that has it (it re-drives the instance's parked events, see Store.redrive_awaiting_version)."""
        run.parked.append(_Parked(e, d.body, d.headers, awaiting_version=run.foreign_version))
        self.report.events[(run.key.workflow, "awaiting_version")] += 1
        log.warning(
            "event left for a replica with the instance's definition version",
            tenant_id=e.tenant_id, workflow=e.workflow, entity_id=e.entity_id, event_id=e.event_id,
            event_type=e.event_type, definition_version=run.foreign_version,
            loaded_versions=sorted(v for w, v in self.engine.compiled if w == e.workflow),
        )  # fmt: skip

    def _offer_now(self, run: _Run, e: IncomingEvent, d: Delivery) -> None:
        with structlog.contextvars.bound_contextvars(
            tenant_id=e.tenant_id, workflow=e.workflow, entity_id=e.entity_id, event_id=e.event_id
        ):
            self._offer_bound(run, e, d)

    def _offer_bound(self, run: _Run, e: IncomingEvent, d: Delivery) -> None:
        workflow = run.key.workflow
        try:
            decision = self._step(run, _engine_event(e))
        except Exception as exc:
            self._engine_failed(run, e, d.body, d.headers, exc)
            return
        assert decision is not None
        if decision.outcome is Outcome.APPLIED:
            self._absorb(run, decision, e.event_id, e.event_type)
            self._settle(run)
        elif decision.outcome is Outcome.IGNORED:
            self._ignored(run, decision, e)
        else:
            run.parked.append(_Parked(e, d.body, d.headers))
        self.report.events[(workflow, str(decision.outcome))] += 1
        log.debug(
            "event " + str(decision.outcome),
            tenant_id=e.tenant_id,
            workflow=workflow,
            entity_id=e.entity_id,
            event_id=e.event_id,
            event_type=e.event_type,
            from_state=decision.from_state,
            to_state=decision.to_state,
            reason=decision.reason,
        )

    def _ignored(self, run: _Run, decision: Decision, e: IncomingEvent) -> None:
        if run.row_id is not None:
            run.history.append(
                (
                    run.row_id,
                    decision.version,
                    e.event_id,
                    e.event_type,
                    "ignored",
                    decision.from_state,
                    decision.to_state,
                    {"reason": decision.reason},
                )
            )

    def _engine_failed(self, run: _Run, e: IncomingEvent, body: bytes, headers: dict[str, Any], exc: Exception) -> None:
        detail = f"applying {e.event_type} raised {type(exc).__name__}: {str(exc)[:300]}"
        log.error(
            "engine step failed; event dead-lettered",
            tenant_id=e.tenant_id,
            workflow=e.workflow,
            entity_id=e.entity_id,
            event_id=e.event_id,
            event_type=e.event_type,
            error=detail,
            traceback=traceback.format_exc(limit=8),
        )
        self.dead.append(
            dead_letter_row(
                body,
                headers,
                DeadReason.INTERNAL_ERROR,
                detail,
                message_id_seed=f"{e.tenant_id}/{e.event_id}",
                routing_key=e.event_type,
                exchange="sfworkflow.events",
                content_type="application/json",
            )
        )
        self.report.events[(e.workflow, "dead_lettered")] += 1
        self.report.dead[str(DeadReason.INTERNAL_ERROR)] += 1

    def _absorb(
        self, run: _Run, d: Decision, event_id: str | None, event_type: str, internal: EngineEvent | None = None
    ) -> None:
        run.transitions += 1
        if run.transitions > MAX_TRANSITIONS_PER_INSTANCE:
            # Not one event's fault: the batch as a whole is too much for this instance (or its definition
            # loops). It raises out of the batch, which the consumer then applies message by message.
            raise StepLimitExceeded(f"more than {MAX_TRANSITIONS_PER_INSTANCE} transitions of {run.key} in one batch")
        run.view = InstanceView(
            run.key,
            d.to_state,
            d.context,
            d.version,
            run.compiled.definition.version,
            run.view.correlation_id if run.view else run.correlation_id,
        )
        run.changed = True
        run.terminal = d.terminal
        if event_id is not None:
            run.last_event = (event_id, event_type)
        detail = dict(d.notes) if d.notes else None
        if internal is not None:  # what sfworkflow told the instance itself: kept, so its history replays
            detail = {**(detail or {}), "trigger": internal.name, "data": dict(internal.data)}
        run.history.append((run.row_id, d.version, event_id, event_type, "applied", d.from_state, d.to_state, detail))
        if d.cancel_all_timers:
            run.timer_ops.clear()
            run.cancel_all = True
        for name in d.timers_cancelled:
            run.timer_ops[name] = None
        for t in d.timers_set:
            run.timer_ops[t.name] = t
        for m in d.outgoing:
            run.outgoing.append(m)
            if m.effect_key is not None:
                run.pending_effects.append(m)
        if d.requests:
            r = d.requests
            # A claim not resolved yet and then released (a later step of this batch) is dropped: the
            # release must not run before the claim's insert and leave the key held.
            run.pending_claims.extend(r.claims)
            for key in r.releases:
                while key in run.pending_claims:
                    run.pending_claims.remove(key)
                self.releases.append((key, run.row_id))
                self.claimed_here.pop(key, None)
            for key in r.release_effects:
                self.released_effects.append((key, run.row_id))
            run.pending_lookups.extend(r.lookups)
            for key, value in r.remember.items():
                self.registers[key] = (value, run)
        self.report.transitions[run.key.workflow] += 1

    def _fire_timer(self, run: _Run, name: str, due_at: datetime, payload: dict[str, Any]) -> None:
        event_id = str(uuid.uuid5(ID_NAMESPACE, f"timer/{run.key}/{name}/{due_at.isoformat()}"))
        event = EngineEvent(event_id, f"timer_{name}", payload, due_at, internal=True)
        try:
            decision = self._step(run, event)
        except Exception as exc:
            if not any(n.startswith("raised by ") for n in getattr(exc, "__notes__", ())):
                exc.add_note(f"raised by timer_{name}")
            raise
        assert decision is not None
        if decision.outcome is Outcome.APPLIED:
            self._absorb(run, decision, None, f"{run.key.workflow}.timer.{name}", event)

    def _settle(self, run: _Run) -> None:
        """After a transition: fire timers that are already due, then retry parked events, until quiet."""
        while True:
            due = [t for t in run.timer_ops.values() if t is not None and t.due_at <= self.now]
            if due and not run.terminal:
                t = min(due, key=lambda x: x.due_at)
                run.timer_ops[t.name] = None
                self._fire_timer(run, t.name, t.due_at, t.payload)
                continue
            progressed = False
            for p in run.parked:
                if p.done:
                    continue
                p.tried = True
                try:
                    decision = self._step(run, _engine_event(p.event))
                except Exception as exc:
                    p.done = True
                    self._engine_failed(run, p.event, p.body, p.headers, exc)
                    continue
                assert decision is not None
                if decision.outcome is Outcome.APPLIED:
                    p.done = True
                    self._absorb(run, decision, p.event.event_id, p.event.event_type)
                    run.history[-1] = (*run.history[-1][:7], {**(run.history[-1][7] or {}), "unparked": True})
                    if p.db_id is not None:
                        self.report.unparked[run.key.workflow] += 1
                    progressed = True
                    break
                if decision.outcome is Outcome.IGNORED:
                    p.done = True
                    self._ignored(run, decision, p.event)
            if not progressed:
                return

    async def _resolve_requests(self) -> None:
        """Resolve what steps asked of the database, feeding answers back, until nothing is pending."""
        while True:
            progressed = await self._resolve_effects()
            progressed = await self._resolve_claims() or progressed
            progressed = await self._resolve_lookups() or progressed
            for run in self.runs.values():  # answers are in: go on with the events held back
                while run.deferred and not run.waiting_for_answers():
                    e, d = run.deferred.pop(0)
                    self._offer_now(run, e, d)
                    progressed = True
            if not progressed:
                return

    async def _resolve_claims(self) -> bool:
        """Hold claim keys; an instance whose key another instance holds gets `claim_refused`."""
        pending = [(run, k) for run in self.runs.values() for k in run.pending_claims]
        if not pending:
            return False
        for run in self.runs.values():
            run.pending_claims = []
        if self.releases:  # give up keys before taking new ones: a key may pass from one instance to another
            await self._delete_keys("delete_claims", self.releases)
            self.releases = []
        first: dict[str, _Run] = {}
        refused: list[tuple[_Run, str, _Run | None]] = []
        for run, key in pending:
            holder = self.claimed_here.get(key) or first.get(key)
            if holder is None:
                first[key] = run
            elif holder is not run:
                refused.append((run, key, holder))
        keys = sorted(first)  # every key statement of a batch in key order (the global lock order)
        taken = {
            r["claim_key"]
            for r in await self.conn.fetch(
                q("insert_claims"),
                keys,
                [first[k].key.tenant_id for k in keys],
                [first[k].key.workflow for k in keys],
                [first[k].key.entity_id for k in keys],
                [first[k].row_id for k in keys],
            )
        }
        others = [k for k in keys if k not in taken]
        holders = {}
        if others:
            holders = {r["claim_key"]: r for r in await self.conn.fetch(q("claim_holders"), others)}
        for k in keys:
            run = first[k]
            if k in taken:
                self.claimed_here[k] = run
                continue
            h = holders.get(k)
            if h is not None and h["instance_id"] == run.row_id:
                self.claimed_here[k] = run  # held already by this very instance
                continue
            # Held by another instance (or released by one that has not committed yet: refused too).
            self._refuse(run, k, h["entity_id"] if h else "", h["workflow"] if h else "")
        for run, key, holder in refused:
            if holder is not None:
                self._refuse(run, key, holder.key.entity_id, holder.key.workflow)
        return True

    def _refuse(self, run: _Run, key: str, holder_entity: str, holder_workflow: str) -> None:
        data = {"key": key, "holder_entity_id": holder_entity, "holder_workflow": holder_workflow}
        self._feedback(run, "claim_refused", data, f"claim/{key}/{run.key}")

    async def _resolve_lookups(self) -> bool:
        """Answer register reads with `lookup_result` {name, key, value}; this batch's writes come first."""
        pending = [(run, name, key) for run in self.runs.values() for name, key in run.pending_lookups]
        if not pending:
            return False
        for run in self.runs.values():
            run.pending_lookups = []
        missing = sorted({key for _r, _n, key in pending if key not in self.registers})
        stored = {}
        if missing:
            stored = {r["key"]: r["value"] for r in await self.conn.fetch(q("read_registers"), missing)}
        for run, name, key in pending:
            value = self.registers[key][0] if key in self.registers else stored.get(key)
            self._feedback(run, "lookup_result", {"name": name, "key": key, "value": value}, f"lookup/{key}/{run.key}")
        return True

    def _feedback(self, run: _Run, trigger: str, data: dict[str, Any], seed: str) -> None:
        """Step an internal event carrying the database's answer, then settle the instance."""
        if run.view is None:
            return
        event_id = str(uuid.uuid5(ID_NAMESPACE, f"{seed}/{run.view.version}"))
        event = EngineEvent(event_id, trigger, data, self.now, internal=True)
        decision = self._step(run, event)
        assert decision is not None
        if decision.outcome is Outcome.APPLIED:
            self._absorb(run, decision, None, f"{run.key.workflow}.{trigger}", event)
            self._settle(run)

    async def _resolve_effects(self) -> bool:
        """Claim effect keys; tell instances whose key was taken before that their command is suppressed."""
        pending = [(run, m) for run in self.runs.values() for m in run.pending_effects]
        if not pending:
            return False
        for run in self.runs.values():
            run.pending_effects = []
        first: dict[str, tuple[_Run, OutgoingMessage]] = {}
        losers: list[tuple[_Run, OutgoingMessage]] = []
        for run, m in pending:
            assert m.effect_key is not None
            if m.effect_key in first:
                losers.append((run, m))
            else:
                first[m.effect_key] = (run, m)
        keys = sorted(first)
        claimed = {
            r["effect_key"]
            for r in await self.conn.fetch(
                q("insert_effects"),
                keys,
                [first[k][0].key.tenant_id for k in keys],
                [first[k][0].row_id for k in keys],
                [first[k][1].message_id for k in keys],
                [first[k][1].body["idempotency_key"] for k in keys],
            )
        }
        losers += [first[k] for k in keys if k not in claimed]
        for run, m in losers:
            self._suppress(run, m)
        return True

    def _suppress(self, run: _Run, m: OutgoingMessage) -> None:
        run.outgoing = [o for o in run.outgoing if o is not m]
        assert run.view is not None
        run.history.append(
            (
                run.row_id,
                run.view.version,
                None,
                m.routing_key,
                "suppressed",
                run.view.state,
                run.view.state,
                {"effect_key": m.effect_key, "command_id": m.message_id, "idempotency_key": m.body["idempotency_key"]},
            )
        )
        self.report.suppressed[run.key.workflow] += 1
        data = {"effect_key": m.effect_key, "command_type": m.routing_key, "command_id": m.message_id}
        self._feedback(run, "effect_suppressed", data, f"suppressed/{m.message_id}")

    # ---- output --------------------------------------------------------------------------------
    def _dead_letter(self, d: Delivery, reason: DeadReason, detail: str) -> None:
        self.dead.append(
            dead_letter_row(
                d.body,
                d.headers,
                reason,
                detail,
                # Without a message id, two identical bad bodies are two dead letters, not one.
                message_id_seed=d.message_id or str(uuid.uuid4()),
                routing_key=d.routing_key,
                exchange=d.exchange,
                content_type=d.content_type,
                replaced_in_headers=d.replaced_in_headers,
            )
        )
        workflow = d.routing_key.partition(".")[0] if isinstance(d.parsed, Rejection) else "unknown"
        self.report.events[(_metric_workflow(workflow, self.engine), "dead_lettered")] += 1
        self.report.dead[str(reason)] += 1

    async def _delete_keys(self, query: str, keys: Sequence[tuple[str, int | None]]) -> None:
        ordered = sorted(keys, key=lambda k: (k[0], k[1] or 0))
        await self.conn.execute(q(query), [k for k, _ in ordered], [i for _, i in ordered])

    async def finish(self) -> None:
        await self._resolve_requests()
        conn = self.conn
        upd, history, parked_new, parked_done, parked_tried = [], [], [], [], []
        foreign_ids, foreign_added = [], []
        cancel_all_ids, cancel_ids, cancel_names, timers = [], [], [], []
        # Dead letters in message id order (two batches may hold copies of one bad message), then the
        # instances' messages in the order they were decided (the relay publishes in outbox order).
        outbox: list[tuple[Any, ...]] = sorted(self.dead, key=lambda row: row[0])
        for run in self.runs.values():
            for p in run.parked:
                if p.done and p.db_id is not None:
                    parked_done.append(p.db_id)
                elif not p.done and p.db_id is None:
                    parked_new.append(p)
                elif not p.done and p.tried and p.awaiting_version is not None:
                    parked_tried.append(p.db_id)  # a replica with the version has seen it: an ordinary parked event
            if run.row_id is None:
                continue
            if run.foreign_version is not None:
                foreign_ids.append(run.row_id)
                foreign_added.append(sum(1 for p in run.parked if p.db_id is None))
                continue
            parked_count = sum(1 for p in run.parked if not p.done)
            if run.changed or parked_count != run.loaded_parked_count:
                v = run.view
                if v is not None:
                    upd.append(
                        (
                            run.row_id,
                            v.state,
                            v.context,
                            v.version,
                            run.terminal,
                            parked_count,
                            run.last_event[0],
                            run.last_event[1],
                        )
                    )
            history.extend(run.history)
            if run.cancel_all:
                cancel_all_ids.append(run.row_id)
            for name, t in run.timer_ops.items():
                if t is None:
                    if not run.cancel_all:
                        cancel_ids.append(run.row_id)
                        cancel_names.append(name)
                else:
                    timers.append((run.row_id, name, t.due_at, t.payload))
            for m in run.outgoing:
                outbox.append(
                    (
                        m.message_id,
                        m.kind,
                        _EXCHANGE_OF_KIND[m.kind],
                        m.routing_key,
                        run.row_id,
                        orjson.dumps(m.body),
                        {},
                        m.kind != "lifecycle",
                    )
                )
                self.report.queued[(run.key.workflow, m.kind)] += 1
        if upd:
            await conn.execute(q("update_instances"), *_columns(upd, 8))
        changed_ids = {r.row_id for r in self.runs.values() if r.changed}
        unstarted = [i for i in self.created if i not in changed_ids]
        if unstarted:
            await conn.execute(q("delete_unstarted"), unstarted)
        if history:
            await conn.execute(q("insert_history"), *_columns(history, 8))
        if cancel_all_ids or cancel_ids:
            await conn.execute(q("delete_timers"), cancel_all_ids, cancel_ids, cancel_names)
        if timers:
            await conn.execute(q("upsert_timers"), *_columns(timers, 4))
        if parked_new:
            await conn.execute(
                q("insert_parked"),
                [p.event.tenant_id for p in parked_new],
                [p.event.workflow for p in parked_new],
                [p.event.entity_id for p in parked_new],
                [p.event.event_id for p in parked_new],
                [p.event.event_type for p in parked_new],
                [p.body for p in parked_new],
                [p.headers for p in parked_new],
                [_park_reason(p) for p in parked_new],
                [self.deadline] * len(parked_new),
                [p.awaiting_version for p in parked_new],
            )
        if foreign_ids:
            await conn.execute(q("raise_parked_counts"), foreign_ids, foreign_added)
        if parked_tried:
            await conn.execute(q("clear_awaiting_version"), parked_tried)
        if parked_done:
            await conn.execute(q("delete_parked"), parked_done)
        if self.releases:
            await self._delete_keys("delete_claims", self.releases)
        if self.released_effects:
            await self._delete_keys("delete_effects", self.released_effects)
        if self.registers:
            keys = sorted(self.registers)
            await conn.execute(
                q("upsert_registers"),
                keys,
                [self.registers[k][0] for k in keys],
                [self.registers[k][1].key.tenant_id for k in keys],
                [self.registers[k][1].row_id for k in keys],
            )
        if outbox:
            await conn.fetch(q("insert_outbox"), *_columns(outbox, 8))
            self.report.outbox_rows = len(outbox)


def _correlation(start: IncomingEvent | None) -> str | None:
    return None if start is None else start.correlation_id


def _park_reason(p: _Parked) -> str:
    if p.awaiting_version is not None:
        return (
            f"the instance is on {p.event.workflow} v{p.awaiting_version}, which the receiving replica has not loaded"
        )
    return f"{p.event.name} not allowed yet"


def _engine_event(e: IncomingEvent) -> EngineEvent:
    return EngineEvent(e.event_id, e.name, e.data, e.timestamp, e.correlation_id, e.causation_id)


def _metric_workflow(name: str, engine: Engine) -> str:
    """A workflow label value that cannot grow without bound: known names, else 'unknown'."""
    return name if name in engine.latest else "unknown"
