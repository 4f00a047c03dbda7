"""Driving a `BatchPlan` without PostgreSQL: a toy workflow and an in-memory database that answers the plan's
requests the way the repository's SQL does (procrastinate's in-memory connector is the model).

`FakeDatabase.run(steps)` answers every request a plan's entry point yields and returns its write set;
`FakeDatabase.write(ws)` applies a write set, so several batches can follow one another. `requests` records
what was asked, in order, for the round-trip tests.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sfworkflow.contract.envelope import IncomingEvent
from sfworkflow.core.batch import (
    ClaimAnswer,
    ClaimEffects,
    ClaimKeys,
    Delivery,
    Holder,
    InsertInbox,
    LoadParked,
    LockInstances,
    RateAnswer,
    ReadRegisters,
    Request,
    TakeRates,
    WriteSet,
)
from sfworkflow.core.definition import InstanceKey, Step, Transition, WorkflowDefinition
from sfworkflow.core.engine import Engine
from sfworkflow.core.limits import DayCount, Rate
from sfworkflow.core.plan import BatchPlan

TENANT = "3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00"
T0 = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)


class S(StrEnum):
    NEW = "new"
    WAITING = "waiting"
    HOLDING = "holding"
    DONE = "done"


def _send(step: Step) -> None:
    key = step.data["key"]
    step.command("do", {"key": key}, idempotency_key=f"do/{key}", effect_key=key)


def _grab(step: Step) -> None:
    step.claim(step.data["key"])


def _drop(step: Step) -> None:
    step.release(step.data["key"])


def _ask(step: Step) -> None:
    step.lookup("v", step.data["key"])


def _put(step: Step) -> None:
    step.remember(step.data["key"], step.data["value"])


def _heard(step: Step) -> None:
    step.note(heard=step.event.name, **{k: v for k, v in step.data.items() if isinstance(v, str | int | None)})


def _later(step: Step) -> None:
    step.set_timer_in("soon", 0)


TOY = WorkflowDefinition(
    name="toy",
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.DONE}),
    start_events=frozenset({"start"}),
    transitions=(
        Transition("start", S.NEW, S.WAITING),
        Transition("send", S.WAITING, None, action=_send),
        Transition("effect_suppressed", [S.WAITING, S.HOLDING], None, action=_heard),
        Transition("grab", S.WAITING, S.HOLDING, action=_grab),
        Transition("claim_refused", S.HOLDING, S.WAITING, action=_heard),
        Transition("drop", S.HOLDING, S.WAITING, action=_drop),
        Transition("ask", [S.WAITING, S.HOLDING], None, action=_ask),
        Transition("lookup_result", [S.WAITING, S.HOLDING], None, action=_heard),
        Transition("put", [S.WAITING, S.HOLDING], None, action=_put),
        Transition("later", S.HOLDING, None, action=_later),
        Transition("timer_soon", S.HOLDING, S.DONE),
    ),
    events=frozenset({"start", "send", "grab", "drop", "ask", "put", "later"}),
    commands=frozenset({"do"}),
    compensations=frozenset(),
    internal_events=frozenset({"effect_suppressed", "claim_refused", "lookup_result", "timer_soon"}),
)
ENGINE = Engine([TOY])
_seq = itertools.count(1)


def event(name: str, entity: str, **data: Any) -> IncomingEvent:
    n = next(_seq)
    return IncomingEvent(
        event_id=str(uuid.UUID(int=n)),
        event_type=f"toy.{name}",
        workflow="toy",
        name=name,
        tenant_id=TENANT,
        entity_id=entity,
        timestamp=T0,
        correlation_id=None,
        causation_id=None,
        schema_version=1,
        data=data,
    )


def delivery(name: str, entity: str, **data: Any) -> Delivery:
    return Delivery(event(name, entity, **data), b"{}")


def plan() -> BatchPlan:
    return BatchPlan(ENGINE, timedelta(hours=1), now=T0)


@dataclass
class FakeDatabase:
    """The tables a plan reads, in memory, answering requests as db/sql/queries.sql does."""

    inbox: set[tuple[str, str]] = field(default_factory=set)
    instances: dict[InstanceKey, dict[str, Any]] = field(default_factory=dict)
    parked: dict[int, dict[str, Any]] = field(default_factory=dict)
    effects: dict[str, int | None] = field(default_factory=dict)
    claims: dict[str, tuple[int | None, str, str]] = field(default_factory=dict)
    registers: dict[str, Any] = field(default_factory=dict)
    history: list[Any] = field(default_factory=list)
    outbox: list[Any] = field(default_factory=list)
    timers: dict[tuple[int, str], Any] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    buckets: dict[str, datetime] = field(default_factory=dict)  # rate-limit bucket key -> tat
    counts: dict[str, DayCount] = field(default_factory=dict)  # rate-limit bucket key -> its daily count
    overrides: dict[tuple[str, str], Rate] = field(default_factory=dict)  # (tenant, limit) -> the tenant's rate
    now: datetime = T0  # the transaction's clock, as the buckets see it
    keys_by_id: dict[int, InstanceKey] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def run(self, steps: Generator[Request, Any, Any]) -> Any:
        answer: Any = None
        try:
            while True:
                request = steps.send(answer)
                self.requests.append(request)
                answer = self.answer(request)
        except StopIteration as done:
            return done.value

    def apply(self, steps: Generator[Request, Any, Any]) -> WriteSet:
        ws = self.run(steps)
        self.write(ws)
        return ws

    def answer(self, request: Request) -> Any:
        match request:
            case InsertInbox(events=events):
                new = {(e.tenant_id, e.event_id) for e in events} - self.inbox
                self.inbox |= new
                return new
            case LockInstances(instances=new):
                for n in new:
                    if n.key not in self.instances:
                        self.instances[n.key] = {
                            "id": next(self._ids), "tenant_id": n.key.tenant_id, "workflow": n.key.workflow,
                            "entity_id": n.key.entity_id, "definition_version": n.definition_version,
                            "state": n.initial_state, "context": {}, "version": 0, "parked_count": 0,
                            "correlation_id": n.correlation_id,
                            "trace_id": None, "traceparent": None, "tracestate": None, "deferred_until": None,
                        }  # fmt: skip
                        self.keys_by_id[self.instances[n.key]["id"]] = n.key
                rows = [self.instances[n.key] for n in new if n.key in self.instances]
                parked_keys = {(p["tenant_id"], p["workflow"], p["entity_id"]) for p in self.parked.values()}
                return sorted(
                    (
                        dict(r, parked_for_key=r["version"] == 0
                             and (r["tenant_id"], r["workflow"], r["entity_id"]) in parked_keys)
                        for r in rows
                    ),
                    key=lambda r: r["id"],
                )  # fmt: skip
            case LoadParked(keys=keys):
                wanted = {(k.tenant_id, k.workflow, k.entity_id) for k in keys}
                return [
                    dict(p) for _, p in sorted(self.parked.items())
                    if (p["tenant_id"], p["workflow"], p["entity_id"]) in wanted
                ]  # fmt: skip
            case ClaimEffects(claims=claims):
                taken = set()
                for c in claims:
                    if c.effect_key not in self.effects:
                        self.effects[c.effect_key] = c.instance_id
                        taken.add(c.effect_key)
                return taken
            case ClaimKeys(releases=releases, claims=claims):
                self._release(releases)
                taken = set()
                for c in claims:
                    if c.key not in self.claims:
                        self.claims[c.key] = (c.instance_id, c.instance.workflow, c.instance.entity_id)
                        taken.add(c.key)
                holders = {
                    k: Holder(*self.claims[k]) for k in (c.key for c in claims) if k not in taken and k in self.claims
                }
                return ClaimAnswer(taken, holders)
            case ReadRegisters(keys=keys):
                return {k: self.registers[k] for k in keys if k in self.registers}
            case TakeRates(takes=takes):  # take_rates: tat = max(tat, now) + n intervals, at the tenant's rate
                rates = {t.bucket_key: self.overrides.get((t.tenant_id, t.limit_name), t.rate) for t in takes}
                for t in takes:
                    start = max(self.buckets.get(t.bucket_key, self.now), self.now)
                    self.buckets[t.bucket_key] = start + timedelta(seconds=t.n * rates[t.bucket_key].interval_s)
                counts = {t.bucket_key: self.counts.get(t.bucket_key, DayCount()) for t in takes
                          if rates[t.bucket_key].daily_cap is not None}  # fmt: skip
                return RateAnswer({t.bucket_key: self.buckets[t.bucket_key] for t in takes}, rates, self.now, counts)
        raise TypeError(request)

    def _release(self, releases: Any) -> None:
        for r in releases:
            if self.claims.get(r.key, (None,))[0] == r.instance_id:
                del self.claims[r.key]

    def write(self, ws: WriteSet) -> None:
        for b in ws.buckets:  # write_batch: a capped bucket as the plan booked it
            self.buckets[b.bucket_key], self.counts[b.bucket_key] = b.tat, b.count
        for u in ws.instances:
            row = self.instances[self.keys_by_id[u.instance_id]]
            row.update(state=u.state, context=u.context, version=u.version, parked_count=u.parked_count)
            if u.deferred_until is not None:
                row["deferred_until"] = max(u.deferred_until, row["deferred_until"] or u.deferred_until)
            if row["trace_id"] is None:
                row.update(trace_id=u.trace_id, traceparent=u.traceparent, tracestate=u.tracestate)
        for i in ws.unstarted:
            del self.instances[self.keys_by_id.pop(i)]
        self.history += ws.history
        for i in ws.cancel_all_timers:
            self.timers = {k: v for k, v in self.timers.items() if k[0] != i}
        for c in ws.cancel_timers:
            self.timers.pop((c.instance_id, c.name), None)
        for t in ws.timers:
            self.timers[(t.instance_id, t.name)] = t
        for p in ws.parked:
            pid = next(self._ids)
            e = p.event
            self.parked[pid] = {
                "id": pid, "tenant_id": e.tenant_id, "workflow": e.workflow, "entity_id": e.entity_id,
                "event_id": e.event_id, "body": _body(e), "headers": p.headers, "deadline": p.deadline,
                "awaiting_version": p.awaiting_version,
            }  # fmt: skip
        for i in ws.parked_done:
            del self.parked[i]
        self._release(ws.claim_releases)
        for r in ws.effect_releases:
            if self.effects.get(r.key, -1) == r.instance_id:
                del self.effects[r.key]
        for w in ws.registers:
            self.registers[w.key] = w.value
        self.outbox += ws.outbox


def _body(e: IncomingEvent) -> bytes:
    import orjson

    return orjson.dumps(
        {
            "event_id": e.event_id, "event_type": e.event_type, "spec_version": "1.0", "schema_version": 1,
            "tenant_id": e.tenant_id, "entity_id": e.entity_id, "correlation_id": None, "causation_id": None,
            "source": "test", "actor_type": "system", "timestamp": e.timestamp.isoformat(),
            "trace_id": e.trace.trace_id if e.trace else None,
            "data": e.data,
        }
    )  # fmt: skip
