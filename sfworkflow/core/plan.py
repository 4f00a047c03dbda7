"""The batch plan: what one transaction does to its instances, decided without I/O.

A `BatchPlan` is built for one transaction. Its entry points are generators: each *yields* a request
(core/batch.py: insert the inbox rows, lock the instances, load their parked events, claim effect keys, claim
keys, read registers), is *resumed* with the database's answer, and finally *returns* the `WriteSet`, every
row the transaction writes. The repository (db/repository.py) is the executor: it answers requests with SQL
and writes the write set; it decides nothing. Unit tests drive a plan with answers of their own.

    deliveries(ds)   inbox -> lock/create instances -> parked events -> steps -> (resolve -> resume)* -> writes
    timers(rows, ts) parked events -> timer steps (a failing timer is undone alone) -> (resolve -> resume)* -> writes
    redrive(row)     parked events -> retry them -> (resolve -> resume)* -> writes   (replay, rolling deploys)
    expired(rows)    parked events past their deadline -> dead letters
    replay_timer, reissue_command, migrated      the operator's actions (ops/replay.py, ops/versions.py)

Per instance, in delivery order: the engine steps the event (core/engine.py); after each transition the plan
fires timers that are already due and retries parked events, until the instance is quiet. What a step asks of
the database (effect keys, claims, lookups) holds the instance's later events back until the answers are in.
The arbitration rules (who gets an effect or a claim, what a lookup sees) are core/arbitration.py.
"""

from __future__ import annotations

import copy
import traceback
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog

from sfworkflow.contract import headers as wire
from sfworkflow.contract.envelope import IncomingEvent, event_from_body
from sfworkflow.contract.topology import COMMANDS_EXCHANGE, COMPENSATIONS_EXCHANGE, EVENTS_EXCHANGE, LIFECYCLE_EXCHANGE
from sfworkflow.contract.tracing import Trace, trace_from_columns, trace_headers, trace_of
from sfworkflow.core import arbitration
from sfworkflow.core.batch import (
    BatchReport,
    BucketWrite,
    ClaimAnswer,
    ClaimEffects,
    ClaimKeys,
    Delivery,
    EffectClaim,
    GateTimer,
    HistoryEntry,
    InsertInbox,
    InstanceUpdate,
    KeyClaim,
    KeyRelease,
    LoadParked,
    LockInstances,
    NewInstance,
    OutboxRow,
    ParkedCountRaise,
    ParkedInsert,
    RateAnswer,
    RateTake,
    ReadRegisters,
    RegisterWrite,
    Request,
    Row,
    SlotRelease,
    TakeRates,
    TimerCancel,
    TimerSet,
    WriteSet,
    dead_letter_row,
)
from sfworkflow.core.definition import (
    EngineEvent,
    InstanceKey,
    InstanceView,
    OutgoingMessage,
    TimerRequest,
    derive_id,
)
from sfworkflow.core.engine import CompiledWorkflow, Decision, Engine, Outcome
from sfworkflow.core.limits import DayCount, Limit, Rate, advance_s, bucket_key, reserve, slots
from sfworkflow.errors import DeadReason, Rejection, StepLimitExceeded

log = structlog.get_logger("sfworkflow.store")

MAX_TRANSITIONS_PER_INSTANCE = 1000  # applied transitions per instance per batch: a definition that loops
# on itself (timers already due, feedback) trips it; retries of parked events that do not apply do not count
RETRY_FAILED_TIMER = timedelta(seconds=60)  # a timer whose step raised fires again this much later

EXCHANGE_OF_KIND = {
    "command": COMMANDS_EXCHANGE,
    "compensation": COMPENSATIONS_EXCHANGE,
    "lifecycle": LIFECYCLE_EXCHANGE,
}

Steps = Generator[Request, Any, WriteSet]


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
    loaded_parked_count: int = 0
    parked_for_key: bool = False  # created now, and events were parked under its key before it existed
    parked: list[_Parked] = field(default_factory=list)
    outgoing: list[OutgoingMessage] = field(default_factory=list)
    pending_effects: list[OutgoingMessage] = field(default_factory=list)
    pending_claims: list[str] = field(default_factory=list)
    pending_lookups: list[tuple[str, str]] = field(default_factory=list)
    # Later events of this instance in the batch, held while it waits for the database's answers
    # (effect, claim, lookup), so they see the instance as those answers leave it.
    deferred: list[tuple[IncomingEvent, Delivery]] = field(default_factory=list)
    timer_ops: dict[str, TimerRequest | None] = field(default_factory=dict)
    cancel_all: bool = False
    history: list[HistoryEntry] = field(default_factory=list)
    changed: bool = False
    terminal: bool = False
    last_event: tuple[str | None, str | None] = (None, None)
    transitions: int = 0  # applied in this batch: what the guard counts
    restart_clock: bool = False  # an operator acted on the instance (replay): its state's clock restarts
    step_trace: Trace | None = None  # the trace of its last transition: the database's answers to it carry it
    trace_stored: bool = False  # its row has a trace already: the update does not send it again
    # The latest slot its queued messages wait for (a rate limit's): messages queued after it wait for it too.
    deferred_floor: datetime | None = None

    def waiting_for_answers(self) -> bool:
        return bool(self.pending_effects or self.pending_claims or self.pending_lookups)


@dataclass(slots=True)
class _Mark:
    """A run and its batch as they were before one unit of work (see BatchPlan._mark)."""

    run: _Run
    timer_ops: dict[str, TimerRequest | None]
    lengths: tuple[int, ...]
    parked: list[tuple[bool, bool]]
    registers: dict[str, tuple[Any, _Run]]
    claimed_here: dict[str, _Run]
    report: BatchReport


class BatchPlan:
    """The decisions of one transaction; see the module docstring for its entry points."""

    def __init__(self, engine: Engine, park_timeout: timedelta, now: datetime | None = None) -> None:
        self.engine = engine
        self.now = now or datetime.now(UTC)
        self.deadline = self.now + park_timeout
        self.runs: dict[InstanceKey, _Run] = {}
        self.dead: list[OutboxRow] = []
        self.created: list[int] = []
        self.report = BatchReport()
        self.releases: list[KeyRelease] = []  # claim keys given up in this batch
        self.claimed_here: dict[str, _Run] = {}  # claim keys taken in this batch
        self.registers: dict[str, tuple[Any, _Run]] = {}  # register writes of this batch (last wins)
        self.released_effects: list[KeyRelease] = []  # effects that did not happen after all
        self.deferrals: dict[str, tuple[datetime, str]] = {}  # message id -> (its rate limit's slot, the limit)
        self.capped: set[str] = set()  # message ids whose slot a daily cap moved to a later day
        self.bucket_writes: list[BucketWrite] = []  # capped buckets booked: their tat and count, written with the batch
        self.gates: dict[str, tuple[str, list[GateTimer]]] = {}  # message id -> (its concurrency key, timers at grant)
        self.releases_of: list[SlotRelease] = []  # instances with concurrency limits this batch changed
        self.behind_gate: set[str] = set()  # message ids queued after a gated message of their instance
        self.gate_checked: set[str] = set()  # message ids of instances whose workflow has concurrency limits

    # ---- entry points --------------------------------------------------------------------------
    def deliveries(self, deliveries: Sequence[Delivery]) -> Steps:
        """A micro-batch of deliveries: bad messages become dead letters, duplicates are dropped."""
        work = yield from self._admit(deliveries)
        if work:
            yield from self._load([d.parsed for d in work])  # type: ignore[misc]
            for d in work:
                e = d.parsed
                assert isinstance(e, IncomingEvent)
                self._offer_external(self.runs[InstanceKey(e.tenant_id, e.workflow, e.entity_id)], e, d)
        return (yield from self._finish())

    def timers(self, rows: Sequence[Row], timers: Sequence[Row]) -> Steps:
        """Due timers (`timers`: instance_id, name, due_at, payload) of locked instances (`rows`)."""
        by_id: dict[int, _Run] = {}
        for r in rows:
            run = self._run_from_row(r)
            if run is not None and run.foreign_version is None:
                by_id[r["id"]] = run
        yield from self._load_parked([run for run in by_id.values() if run.loaded_parked_count > 0])
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
        return (yield from self._finish())

    def redrive(self, row: Row, replayed: dict[str, Any] | None = None) -> Generator[Request, Any, WriteSet | None]:
        """Retry the parked events of one locked instance; None (nothing to write) when this process has
        not loaded its definition version. `replayed`: an operator asked for it (replay): the instance also
        gets a `replayed` history entry (its detail plus `applied`, the events applied) and its clock restarts."""
        run = self._run_from_row(row)
        if run is None or run.foreign_version is not None:
            return None
        yield from self._load_parked([run])
        self._settle(run)
        yield from self._resolve()
        if replayed is not None and run.view is not None:
            v = run.view
            run.view = InstanceView(v.key, v.state, v.context, v.version + 1, v.definition_version, v.correlation_id,
                                    v.trace)  # fmt: skip
            run.changed = run.restart_clock = True
            detail = {**replayed, "applied": sum(self.report.unparked.values())}
            run.history.append(
                HistoryEntry(run.row_id, v.version + 1, None, f"{run.key.workflow}.replayed", "replayed", v.state,
                             v.state, detail, _trace_id(v.trace))
            )  # fmt: skip
        return (yield from self._finish())

    def expired(self, rows: Sequence[Row]) -> WriteSet:
        """Dead letters for parked events past their deadline: `transition_not_allowed`, or
        `unknown_definition_version` for events that waited for a version no replica brought."""
        out = []
        for r in rows:
            if r["awaiting_version"] is None:
                reason = DeadReason.TRANSITION_NOT_ALLOWED
                became = "become applicable"
            else:
                reason = DeadReason.UNKNOWN_DEFINITION_VERSION
                became = f"reach a replica that has {r['workflow']} v{r['awaiting_version']}"
            self.report.dead[str(reason)] += 1
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
                    exchange=EVENTS_EXCHANGE,
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
        self.report.outbox_rows = len(out)
        return WriteSet(outbox=out)

    # ---- operator actions: the same write set and the same writer as the event path ----------------
    def replay_timer(self, row: Row, timer: Row, detail: dict[str, Any]) -> WriteSet:
        """Replay `fire_timer`: the timer falls due now (the timer loop fires it through `timers`)."""
        ws = self._operator_entry(row, "replayed", row["state"], row["context"], {**detail, "timer": timer["name"]})
        ws.timers.append(TimerSet(row["id"], timer["name"], self.now, timer["payload"]))
        return ws

    def reissue_command(self, row: Row, command: dict[str, Any], detail: dict[str, Any]) -> Steps:
        """Replay `reissue_command`: publish `command` (a pending command with a new command id and the next
        attempt) again. The instance's own attempt count follows, when it counted the attempt replaced, so the
        workflow's retry rules see the attempt that is out. It takes a slot under the command's rate limits like
        any command (a replay of a thousand stuck sends goes out at the limit's rate), and waits for the instance's
        earlier deferred messages."""
        context = dict(row["context"])
        if context.get("attempt") == command["attempt"] - 1:
            context["attempt"] = command["attempt"]
        detail = {**detail, "command_type": command["command_type"], "command_id": command["command_id"],
                  "idempotency_key": command["idempotency_key"], "attempt": command["attempt"]}  # fmt: skip
        ws = self._operator_entry(row, "replayed", row["state"], context, detail)
        # The trace of the command it replaces (its envelope says which), published as a child of its instance's
        # span when that is the same trace, else of a span derived from the new command id.
        instance_trace = trace_from_columns(row["trace_id"], row["traceparent"], row["tracestate"])
        trace_id = command.get("trace_id") or (instance_trace.trace_id if instance_trace else None)
        if instance_trace is not None and trace_id == instance_trace.trace_id:
            trace: Trace | None = instance_trace
        else:
            trace = trace_of(trace_id, None, command["command_id"])
        if trace is not None:
            command = {**command, "trace_id": trace.trace_id}
        until, by, cause = yield from self._slot_of(row, command)
        ws.buckets = self.bucket_writes
        ws.outbox.append(
            OutboxRow(command["command_id"], "command", COMMANDS_EXCHANGE, command["command_type"], row["id"],
                      orjson.dumps(command), trace_headers(trace), True, until, by)
        )  # fmt: skip
        if until is not None:
            ws.instances[0].deferred_until = until
            detail = {"command_id": command["command_id"], "limit": by, "until": until.isoformat()}
            if cause is not None:  # a daily cap's
                detail.update(cause="daily_cap", daily_cap=cause)
                self.report.capped[(row["workflow"], command["command_type"], str(by))] += 1
            ws.history.append(
                HistoryEntry(row["id"], ws.instances[0].version, None, command["command_type"], "deferred",
                             row["state"], row["state"], detail, row["trace_id"])
            )  # fmt: skip
        self.report.outbox_rows = len(ws.outbox)
        return ws

    def _slot_of(
        self, row: Row, command: dict[str, Any]
    ) -> Generator[Request, Any, tuple[datetime | None, str | None, int | None]]:
        """One command's slot under its rate limits, and the instance's earlier deferred messages: (until, by, the
        daily cap when one moved it to a later day), or (None, None, None) when it goes now."""
        compiled = self.engine.workflow(row["workflow"], row["definition_version"])
        limits = [] if compiled is None else self.engine.rate_limits(compiled, command["command_type"])
        now, until, by, cause = self.now, None, None, None
        if limits:
            keyed = {}
            for name, limit, rate in limits:
                keyed[_bucket(name, str(row["tenant_id"]), command["data"], limit, command["command_type"])] = (
                    name, rate
                )  # fmt: skip
            answer: RateAnswer = yield TakeRates(
                [RateTake(k, str(row["tenant_id"]), keyed[k][0], 1, keyed[k][1]) for k in sorted(keyed)]
            )
            now = answer.now
            for k, (name, _rate) in keyed.items():
                (slot,), (capped,) = self._book(answer, k, 1)
                if slot > now and (until is None or slot > until):
                    until, by, cause = slot, name, answer.rates[k].daily_cap if capped else None
        floor = row["deferred_until"]
        if floor is not None and floor > now and (until is None or floor > until):
            until, by, cause = floor, "the instance's earlier deferred message", None
        return until, by, cause

    def migrated(self, moves: Sequence[tuple[Row, str]], to_version: int, detail: dict[str, Any]) -> WriteSet:
        """`sfworkflow migrate-instances`: each (locked instance row, state in the target version) moves to
        definition version `to_version`; context, parked events and timers stay as they are."""
        ws = WriteSet()
        for row, to_state in moves:
            entry = self._operator_entry(row, "migrated", to_state, row["context"], detail, to_version)
            entry.instances[0].restart_clock = False  # the clock restarts only if the state changes
            ws.instances += entry.instances
            ws.history += entry.history
        return ws

    def _operator_entry(
        self, row: Row, outcome: str, to_state: str, context: dict[str, Any], detail: dict[str, Any],
        definition_version: int | None = None,
    ) -> WriteSet:  # fmt: skip
        """An operator's action on one instance: its version goes up, a history entry says what was done."""
        version = row["version"] + 1
        update = InstanceUpdate(
            row["id"], to_state, context, version, row["terminal"], row["parked_count"], None, None,
            row["definition_version"] if definition_version is None else definition_version, restart_clock=True,
        )  # fmt: skip
        entry = HistoryEntry(
            row["id"],
            version,
            None,
            f"{row['workflow']}.{outcome}",
            outcome,
            row["state"],
            to_state,
            detail,
            row["trace_id"],
        )
        return WriteSet(instances=[update], history=[entry])

    # ---- intake --------------------------------------------------------------------------------
    def _admit(self, deliveries: Sequence[Delivery]) -> Generator[Request, Any, list[Delivery]]:
        """Dead-letter rejections, drop duplicates (in the batch, then those the inbox saw before)."""
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
            return []
        events = sorted((d.parsed for d in fresh), key=lambda e: (e.tenant_id, e.event_id))  # type: ignore[union-attr]
        new_ids: set[tuple[str, str]] = yield InsertInbox(events)  # type: ignore[arg-type]
        work: list[Delivery] = []
        for d in fresh:
            e = d.parsed
            assert isinstance(e, IncomingEvent)
            if (e.tenant_id, e.event_id) in new_ids:
                work.append(d)
                if wire.REDRIVES not in d.headers:
                    self.report.first_seen.append(e.timestamp)
            else:
                self.report.events[(e.workflow, "duplicate")] += 1
        return work

    def _load(self, events: Sequence[IncomingEvent]) -> Generator[Request, Any, None]:
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
        new = []
        for k in ks:
            compiled = self.engine.workflow(k.workflow)
            assert compiled is not None  # the parser only admits event types of loaded workflows
            start = keys[k]
            new.append(
                NewInstance(
                    k, compiled.definition.version, compiled.initial, None if start is None else start.correlation_id
                )
            )
        rows: Sequence[Row] = yield LockInstances(new)
        for r in rows:
            run = self._run_from_row(r)
            if run is not None and r["version"] == 0:
                self.created.append(r["id"])
                run.parked_for_key = r["parked_for_key"]
        for key in ks:
            if key not in self.runs:  # gone meanwhile (pruned): its events are parked without an instance
                compiled = self.engine.workflow(key.workflow)
                assert compiled is not None
                self.runs[key] = _Run(key=key, compiled=compiled)
        yield from self._load_parked(
            [
                run
                for run in self.runs.values()
                if run.row_id is not None
                and run.foreign_version is None
                and (run.loaded_parked_count > 0 or run.parked_for_key)
            ]
        )
        for run in self.runs.values():
            # Events that waited for this replica's definition version came first: try them first.
            if run.view is not None and any(p.awaiting_version is not None for p in run.parked):
                self._settle(run)

    def _run_from_row(self, r: Row) -> _Run | None:
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
                loaded_parked_count=r["parked_count"],
                foreign_version=r["definition_version"],
            )
            self.runs[key] = run
            return run
        view = None
        if r["version"] > 0:
            view = InstanceView(
                key, r["state"], r["context"], r["version"], r["definition_version"], r["correlation_id"],
                trace_from_columns(r["trace_id"], r["traceparent"], r["tracestate"]),
            )  # fmt: skip
        run = _Run(
            key=key,
            compiled=compiled,
            row_id=r["id"],
            view=view,
            correlation_id=r["correlation_id"],
            loaded_parked_count=r["parked_count"],
            terminal=r["state"] in compiled.definition.terminal,
            trace_stored=r["trace_id"] is not None,
            deferred_floor=r["deferred_until"],
        )
        self.runs[key] = run
        return run

    def _load_parked(self, runs: Sequence[_Run]) -> Generator[Request, Any, None]:
        if not runs:
            return
        rows: Sequence[Row] = yield LoadParked([r.key for r in runs])
        for r in rows:
            run = self.runs[InstanceKey(r["tenant_id"], r["workflow"], r["entity_id"])]
            try:
                event = event_from_body(r["body"], r["headers"])
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
            correlation_id=e.correlation_id, trace_id=_trace_id(e.trace),
        )  # fmt: skip

    def _offer_now(self, run: _Run, e: IncomingEvent, d: Delivery) -> None:
        """Step the instance with `e`. What is logged names the instance and the event in its own fields
        (no per-event context binding: its cost was 6 % of planning, for lines that are rare)."""
        workflow = run.key.workflow
        try:
            decision = self._step(run, _engine_event(e))
        except Exception as exc:
            self._engine_failed(run, e, d.body, d.headers, exc)
            return
        assert decision is not None
        if decision.outcome is Outcome.APPLIED:
            self._absorb(run, decision, e.event_id, e.event_type, body=d.body)
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
            correlation_id=e.correlation_id,
            trace_id=_trace_id(decision.trace or e.trace or (run.view.trace if run.view else None)),
        )

    def _ignored(self, run: _Run, decision: Decision, e: IncomingEvent) -> None:
        if run.row_id is not None:
            run.history.append(
                HistoryEntry(
                    run.row_id,
                    decision.version,
                    e.event_id,
                    e.event_type,
                    "ignored",
                    decision.from_state,
                    decision.to_state,
                    {"reason": decision.reason},
                    _trace_id(e.trace or (run.view.trace if run.view else None)),
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
            correlation_id=e.correlation_id,
            trace_id=_trace_id(e.trace),
        )
        self.dead.append(
            dead_letter_row(
                body,
                headers,
                DeadReason.INTERNAL_ERROR,
                detail,
                message_id_seed=f"{e.tenant_id}/{e.event_id}",
                routing_key=e.event_type,
                exchange=EVENTS_EXCHANGE,
                content_type="application/json",
            )
        )
        self.report.events[(e.workflow, "dead_lettered")] += 1
        self.report.dead[str(DeadReason.INTERNAL_ERROR)] += 1

    def _absorb(
        self, run: _Run, d: Decision, event_id: str | None, event_type: str, internal: EngineEvent | None = None,
        body: bytes | None = None,
    ) -> None:  # fmt: skip
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
            run.view.trace if run.view and run.view.trace else d.trace,  # kept from its first transition on
        )
        run.changed = True
        run.terminal = d.terminal
        run.step_trace = d.trace
        if event_id is not None:
            run.last_event = (event_id, event_type)
        detail = dict(d.notes) if d.notes else None
        if internal is not None:  # what sfworkflow told the instance itself: kept, so its history replays
            detail = {**(detail or {}), "trigger": internal.name, "data": dict(internal.data)}
        # An internal event (a timer firing, the database's answer) is recorded under its derived id: the commands it
        # caused name it as their causation_id, and the history is where that id resolves.
        recorded_id = event_id if event_id is not None else (internal.event_id if internal is not None else None)
        run.history.append(
            HistoryEntry(run.row_id, d.version, recorded_id, event_type, "applied", d.from_state, d.to_state, detail,
                         _trace_id(d.trace), body)
        )  # fmt: skip
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
                self.releases.append(KeyRelease(key, run.row_id))
                self.claimed_here.pop(key, None)
            for key in r.release_effects:
                self.released_effects.append(KeyRelease(key, run.row_id))
            run.pending_lookups.extend(r.lookups)
            for key, value in r.remember.items():
                self.registers[key] = (value, run)
        self.report.transitions[run.key.workflow] += 1

    def _fire_timer(self, run: _Run, name: str, due_at: datetime, payload: dict[str, Any]) -> None:
        event_id = derive_id(f"timer/{run.key}/{name}/{due_at.isoformat()}")
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

    def _timer_failed(self, run: _Run, name: str, payload: dict[str, Any], exc: Exception) -> None:
        assert run.view is not None
        raised_by = next((n for n in getattr(exc, "__notes__", ()) if n.startswith("raised by ")), "")
        log.error(
            "timer failed; put back for 60 s", tenant_id=run.key.tenant_id, workflow=run.key.workflow,
            entity_id=run.key.entity_id, timer=name, raised_by=raised_by[len("raised by "):] or None,
            error=repr(exc)[:300], traceback=traceback.format_exc(limit=8), trace_id=_trace_id(run.view.trace),
        )  # fmt: skip
        run.timer_ops[name] = TimerRequest(name, self.now + RETRY_FAILED_TIMER, payload)
        detail = {"error": repr(exc)[:300], "timer": name, "retry_at": (self.now + RETRY_FAILED_TIMER).isoformat()}
        if raised_by:
            detail["raised_by"] = raised_by[len("raised by ") :]
        run.history.append(
            HistoryEntry(run.row_id, run.view.version, None, f"{run.key.workflow}.timer.{name}", "failed",
                         run.view.state, run.view.state, detail, _trace_id(run.view.trace))
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
                    self._absorb(run, decision, p.event.event_id, p.event.event_type, body=p.body)
                    entry = run.history[-1]
                    entry.detail = {**(entry.detail or {}), "unparked": True}
                    if p.db_id is not None:
                        self.report.unparked[run.key.workflow] += 1
                    progressed = True
                    break
                if decision.outcome is Outcome.IGNORED:
                    p.done = True
                    self._ignored(run, decision, p.event)
            if not progressed:
                return

    # ---- what the steps asked of the database ----------------------------------------------------
    def _resolve(self) -> Generator[Request, Any, None]:
        """Resolve what steps asked of the database, feeding answers back, until nothing is pending."""
        while True:
            progressed = yield from self._resolve_effects()
            progressed = (yield from self._resolve_claims()) or progressed
            progressed = (yield from self._resolve_lookups()) or progressed
            for run in self.runs.values():  # answers are in: go on with the events held back
                while run.deferred and not run.waiting_for_answers():
                    e, d = run.deferred.pop(0)
                    self._offer_now(run, e, d)
                    progressed = True
            if not progressed:
                return

    def _resolve_effects(self) -> Generator[Request, Any, bool]:
        """Claim effect keys; tell instances whose key was taken before that their command is suppressed."""
        pending = [(run, m) for run in self.runs.values() for m in run.pending_effects]
        if not pending:
            return False
        for run in self.runs.values():
            run.pending_effects = []
        first, losers = arbitration.first_per_key(pending, lambda p: p[1].effect_key or "")  # never None here
        keys = sorted(first)
        claims = [
            EffectClaim(k, first[k][0].key.tenant_id, first[k][0].row_id, first[k][1].message_id,
                        first[k][1].body["idempotency_key"])
            for k in keys
        ]  # fmt: skip
        claimed: set[str] = yield ClaimEffects(claims)
        losers += arbitration.effect_losers(first, claimed)
        for run, m in losers:
            self._suppress(run, m)
        return True

    def _suppress(self, run: _Run, m: OutgoingMessage) -> None:
        run.outgoing = [o for o in run.outgoing if o is not m]
        assert run.view is not None
        detail = {"effect_key": m.effect_key, "command_id": m.message_id, "idempotency_key": m.body["idempotency_key"]}
        run.history.append(
            HistoryEntry(
                run.row_id,
                run.view.version,
                None,
                m.routing_key,
                "suppressed",
                run.view.state,
                run.view.state,
                detail,
                _trace_id(m.trace),
            )
        )
        self.report.suppressed[run.key.workflow] += 1
        data = {"effect_key": m.effect_key, "command_type": m.routing_key, "command_id": m.message_id}
        self._feedback(run, "effect_suppressed", data, f"suppressed/{m.message_id}", m.trace)

    def _resolve_claims(self) -> Generator[Request, Any, bool]:
        """Hold claim keys; an instance whose key another instance holds gets `claim_refused`."""
        pending = [(run, k) for run in self.runs.values() for k in run.pending_claims]
        if not pending:
            return False
        for run in self.runs.values():
            run.pending_claims = []
        releases = _key_order(self.releases)  # given up before new keys are taken
        self.releases = []
        first, refused = arbitration.split_claims(pending, self.claimed_here)
        keys = sorted(first)  # every key statement of a batch in key order (the global lock order)
        answer: ClaimAnswer = yield ClaimKeys(releases, [KeyClaim(k, first[k].key, first[k].row_id) for k in keys])
        for k in keys:
            run = first[k]
            h = answer.holders.get(k)
            verdict = arbitration.claim_verdict(
                run.row_id, k in answer.taken, None if h is None else (h.instance_id, h.workflow, h.entity_id)
            )
            if verdict.granted:
                self.claimed_here[k] = run
            else:  # held by another instance (or released by one that has not committed yet: refused too)
                self._refuse(run, k, verdict.holder_entity_id, verdict.holder_workflow)
        for r in refused:
            if r.holder is not None:
                self._refuse(r.owner, r.key, r.holder.key.entity_id, r.holder.key.workflow)
        return True

    def _refuse(self, run: _Run, key: str, holder_entity: str, holder_workflow: str) -> None:
        data = {"key": key, "holder_entity_id": holder_entity, "holder_workflow": holder_workflow}
        self._feedback(run, "claim_refused", data, f"claim/{key}/{run.key}", run.step_trace)

    def _resolve_lookups(self) -> Generator[Request, Any, bool]:
        """Answer register reads with `lookup_result` {name, key, value}; this batch's writes come first."""
        pending = [(run, name, key) for run in self.runs.values() for name, key in run.pending_lookups]
        if not pending:
            return False
        for run in self.runs.values():
            run.pending_lookups = []
        missing = arbitration.registers_to_read((key for _r, _n, key in pending), self.registers)
        stored: dict[str, Any] = {}
        if missing:
            stored = yield ReadRegisters(missing)
        for run, name, key in pending:
            value = arbitration.lookup_value(key, self.registers, stored)
            data = {"name": name, "key": key, "value": value}
            self._feedback(run, "lookup_result", data, f"lookup/{key}/{run.key}", run.step_trace)
        return True

    def _feedback(self, run: _Run, trigger: str, data: dict[str, Any], seed: str, trace: Trace | None) -> None:
        """Step an internal event carrying the database's answer (in the trace of the step that asked), then
        settle the instance."""
        if run.view is None:
            return
        event_id = derive_id(f"{seed}/{run.view.version}")
        event = EngineEvent(event_id, trigger, data, self.now, internal=True, trace=trace)
        decision = self._step(run, event)
        assert decision is not None
        if decision.outcome is Outcome.APPLIED:
            self._absorb(run, decision, None, f"{run.key.workflow}.{trigger}", event)
            self._settle(run)

    # ---- output --------------------------------------------------------------------------------
    def _dead_letter(self, d: Delivery, reason: DeadReason, detail: str) -> None:
        self.dead.append(
            dead_letter_row(
                d.body,
                d.headers,
                reason,
                detail,
                # Without a message id, two identical bad bodies are two dead letters, not one. A redrive
                # re-publishes under the producer's message id: each round is a dead letter of its own.
                message_id_seed=f"{d.message_id}/{(d.headers or {}).get(wire.REDRIVES, 0)}"
                if d.message_id
                else str(uuid.uuid4()),
                routing_key=d.routing_key,
                exchange=d.exchange,
                content_type=d.content_type,
                original_message_id=d.message_id,
                replaced_in_headers=d.replaced_in_headers,
            )
        )
        workflow = d.routing_key.partition(".")[0] if isinstance(d.parsed, Rejection) else "unknown"
        self.report.events[(_metric_workflow(workflow, self.engine), "dead_lettered")] += 1
        self.report.dead[str(reason)] += 1

    def _finish(self) -> Steps:
        yield from self._resolve()
        yield from self._take_rates()
        self._gate()
        return self.write_set()

    # ---- concurrency limits (core/limits.py ConcurrencyLimit) -------------------------------------------------------
    def _gate(self) -> None:
        """Queue every command under a concurrency limit behind its key's gate (the gate loop grants slots, oldest
        first: runtime/gates.py), with the timers its step set that start at the grant; and note, for the release,
        every instance of a workflow with such limits that this batch changed. No history entry: most commands get
        their slot at once; the outbox row says when it was granted (`granted_at`), and `inspect` shows a wait."""
        for run in self.runs.values():
            if run.row_id is None or run.view is None or not run.compiled.concurrency:
                continue
            reissued: set[str] = set()
            gated = False
            for m in run.outgoing:
                self.gate_checked.add(m.message_id)
                gate = run.compiled.concurrency.get(m.routing_key) if m.kind == "command" else None
                if gate is None:
                    if gated:  # behind its instance's queued command: falls due with it, not before
                        self.behind_gate.add(m.message_id)
                    continue
                gated = True
                reissued.add(gate[0])
                name, limit = gate
                timers = []
                for t in limit.timers_after_release:
                    op = run.timer_ops.get(t)
                    if op is not None:  # set by this batch: it starts when the slot is granted
                        timers.append(GateTimer(t, max(0.0, (op.due_at - self.now).total_seconds()), op.payload))
                        run.timer_ops[t] = None  # and one of that name set before is cancelled
                self.gates[m.message_id] = (_bucket(name, run.key.tenant_id, m.body["data"], limit, m.routing_key),
                                            timers)  # fmt: skip
                self.report.gated[(run.key.workflow, m.routing_key, name)] += 1
            if run.changed:
                # A new command under a limit replaces the one the instance held a slot for (a retry, a replay).
                self.releases_of.append(SlotRelease(run.row_id, run.view.state, run.terminal, tuple(sorted(reissued))))

    # ---- rate limits (core/limits.py) -------------------------------------------------------------
    def _take_rates(self) -> Generator[Request, Any, None]:
        """Reserve a slot for every limited command the batch queues (once the effects are resolved: a suppressed
        send takes none), in one request, buckets in key order after every other lock of the batch. A command
        whose slot is later than now is written deferred until it (a `deferred` history entry says so): never
        dropped. An instance's messages keep their order: one queued after a deferred message of its instance (in
        this batch, or waiting from an earlier one: the instance's `deferred_until`) is deferred to that slot too,
        so the relay never finds it due behind a row that is not. An instance's commands in one bucket take its
        slots in the order they were decided."""
        wanted: dict[str, list[tuple[_Run, OutgoingMessage, str, Rate]]] = {}
        for run in self.runs.values():
            if run.row_id is None or not run.compiled.rate_limits:
                continue
            for m in run.outgoing:
                if m.kind != "command":
                    continue
                for name, limit, rate in self.engine.rate_limits(run.compiled, m.routing_key):
                    key = _bucket(name, run.key.tenant_id, m.body["data"], limit, m.routing_key)
                    wanted.setdefault(key, []).append((run, m, name, rate))
        now = self.now
        rate_of: dict[str, Rate] = {}
        if wanted:
            keys = sorted(wanted)
            takes = [RateTake(k, wanted[k][0][0].key.tenant_id, wanted[k][0][2], len(wanted[k]), wanted[k][0][3])
                     for k in keys]  # fmt: skip
            answer: RateAnswer = yield TakeRates(takes)
            now = answer.now
            for k in keys:
                reqs, rate = wanted[k], answer.rates[k]
                booked, capped = self._book(answer, k, len(reqs))
                for (_run, m, name, _asked), slot, moved in zip(reqs, booked, capped, strict=True):
                    if slot <= now:
                        continue
                    held = self.deferrals.get(m.message_id)
                    if held is None or slot > held[0]:  # under two limits a command waits for the later slot
                        self.deferrals[m.message_id] = (slot, name)
                        rate_of[m.message_id] = rate
                        if moved:
                            self.capped.add(m.message_id)
                        else:
                            self.capped.discard(m.message_id)
        for run in self.runs.values():
            floor = run.deferred_floor if run.deferred_floor is not None and run.deferred_floor > now else None
            by = "the instance's earlier deferred message"
            for m in run.outgoing:
                own = self.deferrals.get(m.message_id)
                if own is not None and (floor is None or own[0] >= floor):
                    floor, by = own
                    if m.message_id in rate_of:
                        self._deferred(run, m, own[0], own[1], rate_of[m.message_id], now=now)
                elif floor is not None:  # behind an earlier deferred message of its instance: waits for it
                    self.deferrals[m.message_id] = (floor, by)
                    if m.kind != "lifecycle":
                        self._held(run, m, floor, by)
            if floor is not None and (run.deferred_floor is None or floor > run.deferred_floor):
                run.deferred_floor = floor  # written with the instance (a run with messages has changed)

    def _book(self, answer: RateAnswer, key: str, n: int) -> tuple[list[datetime], list[bool]]:
        """The slots of `n` requests on bucket `key` from take_rates' answer, and which of them a daily cap moved to a
        later day. A capped bucket is booked here (core/limits.py reserve) and written back with the batch."""
        rate = answer.rates[key]
        if rate.daily_cap is None:
            return slots(answer.tat[key], answer.now, n, rate), [False] * n
        start = answer.tat[key] - timedelta(seconds=advance_s(n, rate))  # max(tat, now) before this batch
        booked = reserve(start, answer.now, n, rate, answer.counts.get(key, DayCount()))
        self.bucket_writes.append(BucketWrite(key, booked.tat, booked.count))
        return booked.slots, booked.capped

    def _held(self, run: _Run, m: OutgoingMessage, until: datetime, by: str) -> None:
        assert run.view is not None
        detail = {"command_id": m.message_id, "until": until.isoformat(), "behind": by}
        run.history.append(
            HistoryEntry(run.row_id, run.view.version, None, m.routing_key, "deferred", run.view.state,
                         run.view.state, detail, _trace_id(m.trace))
        )  # fmt: skip

    def _deferred(
        self, run: _Run, m: OutgoingMessage, until: datetime, limit: str, rate: Rate, *, now: datetime
    ) -> None:
        assert run.view is not None
        detail = {"command_id": m.message_id, "limit": limit, "until": until.isoformat(), "per_s": rate.per_s,
                  "burst": rate.burst}  # fmt: skip
        if rate.daily_cap is not None:
            detail["daily_cap"] = rate.daily_cap
        if m.message_id in self.capped:  # the day's cap was reached: the next UTC day's first slots
            detail["cause"] = "daily_cap"
            self.report.capped[(run.key.workflow, m.routing_key, limit)] += 1
        run.history.append(
            HistoryEntry(run.row_id, run.view.version, None, m.routing_key, "deferred", run.view.state,
                         run.view.state, detail, _trace_id(m.trace))
        )  # fmt: skip
        self.report.deferred[(run.key.workflow, m.routing_key, limit)] += 1
        self.report.deferral_s.append((run.key.workflow, limit, (until - now).total_seconds()))

    def write_set(self) -> WriteSet:
        """Every row the batch writes, once nothing is pending."""
        ws = WriteSet(buckets=self.bucket_writes)
        # Dead letters in message id order (two batches may hold copies of one bad message), then the
        # instances' messages in the order they were decided (the relay publishes in outbox order).
        ws.outbox = sorted(self.dead, key=lambda row: row.message_id)
        for run in self.runs.values():
            for p in run.parked:
                if p.done and p.db_id is not None:
                    ws.parked_done.append(p.db_id)
                elif not p.done and p.db_id is None:
                    ws.parked.append(ParkedInsert(p.event, p.body, p.headers, _park_reason(p), self.deadline,
                                                  p.awaiting_version))  # fmt: skip
                elif not p.done and p.tried and p.awaiting_version is not None:
                    assert p.db_id is not None  # a replica with the version has seen it: an ordinary parked event
                    ws.parked_seen.append(p.db_id)
            if run.row_id is None:
                continue
            if run.foreign_version is not None:
                ws.parked_counts.append(ParkedCountRaise(run.row_id, sum(1 for p in run.parked if p.db_id is None)))
                continue
            parked_count = sum(1 for p in run.parked if not p.done)
            if (run.changed or parked_count != run.loaded_parked_count) and run.view is not None:
                v = run.view
                new_trace = None if run.trace_stored else v.trace  # written once, by the row's first transition
                ws.instances.append(
                    InstanceUpdate(run.row_id, v.state, v.context, v.version, run.terminal, parked_count,
                                   run.last_event[0], run.last_event[1], v.definition_version, run.restart_clock,
                                   _trace_id(new_trace), new_trace.traceparent if new_trace else None,
                                   new_trace.tracestate if new_trace else None, run.deferred_floor)
                )  # fmt: skip
            ws.history.extend(run.history)
            if run.cancel_all:
                ws.cancel_all_timers.append(run.row_id)
            for name, t in run.timer_ops.items():
                if t is None:
                    if not run.cancel_all:
                        ws.cancel_timers.append(TimerCancel(run.row_id, name))
                else:
                    ws.timers.append(TimerSet(run.row_id, name, t.due_at, t.payload))
            for m in run.outgoing:
                until, by = self.deferrals.get(m.message_id, (None, None))
                gate_key, gate_timers = self.gates.get(m.message_id, (None, None))
                ws.outbox.append(
                    OutboxRow(m.message_id, m.kind, EXCHANGE_OF_KIND[m.kind], m.routing_key, run.row_id,
                              orjson.dumps(m.body), trace_headers(m.trace), m.kind != "lifecycle", until, by,
                              gate_key, gate_timers, m.message_id in self.behind_gate,
                              m.message_id in self.gate_checked)
                )  # fmt: skip
                self.report.queued[(run.key.workflow, m.kind)] += 1
        changed_ids = {r.row_id for r in self.runs.values() if r.changed}
        ws.unstarted = [i for i in self.created if i not in changed_ids]
        ws.claim_releases = _key_order(self.releases)
        ws.effect_releases = _key_order(self.released_effects)
        ws.registers = [
            RegisterWrite(k, self.registers[k][0], self.registers[k][1].key.tenant_id, self.registers[k][1].row_id)
            for k in sorted(self.registers)
        ]
        ws.slot_releases = sorted(self.releases_of, key=lambda r: r.instance_id)
        self.report.outbox_rows = len(ws.outbox)
        return ws


def _bucket(name: str, tenant_id: str, data: dict[str, Any], limit: Limit, command_type: str) -> str:
    """The rate-limit bucket (or concurrency key) of a command; the tenant's own one for the limit when the declared
    key function does not fit the command's data (logged: a definition's bug, not a reason to fail the batch)."""
    try:
        return bucket_key(name, tenant_id, data, limit.key)
    except Exception as exc:
        log.error("rate limit key failed; the tenant's bucket is used", limit=name, command_type=command_type,
                  error=repr(exc)[:300])  # fmt: skip
        return bucket_key(name, tenant_id, data, None)


def _key_order(keys: Sequence[KeyRelease]) -> list[KeyRelease]:
    """Key statements in key order, the global lock order."""
    return sorted(keys, key=lambda k: (k.key, k.instance_id or 0))


def _park_reason(p: _Parked) -> str:
    if p.awaiting_version is not None:
        return (
            f"the instance is on {p.event.workflow} v{p.awaiting_version}, which the receiving replica has not loaded"
        )
    return f"{p.event.name} not allowed yet"


def _engine_event(e: IncomingEvent) -> EngineEvent:
    return EngineEvent(e.event_id, e.name, e.data, e.timestamp, e.correlation_id, e.causation_id, trace=e.trace)


def _trace_id(trace: Trace | None) -> str | None:
    return None if trace is None else trace.trace_id


def _metric_workflow(name: str, engine: Engine) -> str:
    """A workflow label value that cannot grow without bound: known names, else 'unknown'."""
    return name if name in engine.latest else "unknown"
