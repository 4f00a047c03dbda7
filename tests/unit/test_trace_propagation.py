"""Trace context through a batch plan: what an event causes carries its trace (envelope trace_id, traceparent
header, history); what an instance does on its own (a timer) carries the instance's, kept from its first event."""

from __future__ import annotations

from typing import Any

import orjson

from sfworkflow.contract.tracing import TRACEPARENT, Trace, derived_trace
from sfworkflow.core.batch import Delivery, OutboxRow
from sfworkflow.core.definition import InstanceKey
from tests.unit.plankit import TENANT, FakeDatabase, delivery, event, plan

A = Trace("4bf92f3577b34da6a3ce929d0e0e4736", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
B = Trace("0af7651916cd43dd8448eb211c80319c", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")


def traced(name: str, entity: str, trace: Trace | None, **data: Any) -> Delivery:
    e = event(name, entity, **data)
    e.trace = trace
    return Delivery(e, b"{}")


def carried(rows: list[OutboxRow]) -> list[tuple[str, str | None, str | None]]:
    """(routing key, envelope trace_id, traceparent header) of each message queued."""
    return [(r.routing_key, orjson.loads(r.body).get("trace_id"), r.headers.get(TRACEPARENT)) for r in rows]


def test_what_an_event_causes_carries_its_trace_and_the_instance_keeps_the_first() -> None:
    db = FakeDatabase()
    ws = db.apply(plan().deliveries([traced("start", "a", A)]))
    assert carried(ws.outbox) == [("workflow.started.toy", A.trace_id, A.traceparent)]
    assert [h.trace_id for h in ws.history] == [A.trace_id]
    assert (ws.instances[0].trace_id, ws.instances[0].traceparent) == (A.trace_id, A.traceparent)

    ws = db.apply(plan().deliveries([traced("send", "a", B, key="k1")]))  # an event of another trace
    assert carried(ws.outbox) == [("toy.do", B.trace_id, B.traceparent)]
    assert [h.trace_id for h in ws.history] == [B.trace_id]
    row = db.instances[InstanceKey(TENANT, "toy", "a")]
    assert (row["trace_id"], row["traceparent"]) == (A.trace_id, A.traceparent)  # the instance's stays its first

    ws = db.apply(plan().deliveries([traced("send", "a", None, key="k2")]))  # an event without one: the instance's
    assert carried(ws.outbox) == [("toy.do", A.trace_id, A.traceparent)]
    assert [h.trace_id for h in ws.history] == [A.trace_id]


def test_a_timer_carries_the_trace_of_its_instance() -> None:
    db = FakeDatabase()
    db.apply(plan().deliveries([traced("start", "t", A), traced("grab", "t", B, key="c1")]))
    row = dict(db.instances[InstanceKey(TENANT, "toy", "t")], terminal=False)
    timers = [{"instance_id": row["id"], "name": "soon", "due_at": plan().now, "payload": {}}]
    ws = db.run(plan().timers([row], timers))
    assert carried(ws.outbox) == [("workflow.completed.toy", A.trace_id, A.traceparent)]
    assert [h.trace_id for h in ws.history] == [A.trace_id]


def test_an_instance_started_without_a_trace_gets_one_derived_from_its_key_and_start_event() -> None:
    db = FakeDatabase()
    start = delivery("start", "d")
    ws = db.apply(plan().deliveries([start]))
    expected = derived_trace(f"{TENANT}/toy/d/{start.parsed.event_id}")  # type: ignore[union-attr]
    assert carried(ws.outbox) == [("workflow.started.toy", expected.trace_id, expected.traceparent)]
    ws = db.apply(plan().deliveries([delivery("send", "d", key="k")]))
    assert carried(ws.outbox) == [("toy.do", expected.trace_id, expected.traceparent)]


def test_the_database_s_answer_carries_the_trace_of_the_step_that_asked() -> None:
    db = FakeDatabase()
    db.apply(plan().deliveries([traced("start", "l", A)]))
    ws = db.apply(plan().deliveries([traced("ask", "l", B, key="r1")]))  # lookup_result follows in the same batch
    assert [(h.event_type, h.trace_id) for h in ws.history] == [
        ("toy.ask", B.trace_id),
        ("toy.lookup_result", B.trace_id),
    ]


def test_tracestate_is_published_beside_the_traceparent() -> None:
    db = FakeDatabase()
    ws = db.apply(plan().deliveries([traced("start", "s", Trace(A.trace_id, A.traceparent, "rojo=1"))]))
    assert ws.outbox[0].headers == {TRACEPARENT: A.traceparent, "tracestate": "rojo=1"}


def test_a_reissued_command_keeps_the_trace_of_the_command_it_replaces() -> None:
    db = FakeDatabase()
    db.apply(plan().deliveries([traced("start", "r", A)]))
    ws = db.apply(plan().deliveries([traced("send", "r", B, key="k1")]))
    pending = orjson.loads(ws.outbox[0].body)
    again = {**pending, "command_id": "6f1c1f8e-0000-4000-8000-000000000001", "attempt": 2}
    row = dict(db.instances[InstanceKey(TENANT, "toy", "r")], terminal=False)
    (out,) = db.run(plan().reissue_command(row, again, {"by": "oncall"})).outbox
    body_trace, header = orjson.loads(out.body)["trace_id"], out.headers[TRACEPARENT]
    assert body_trace == B.trace_id and header.split("-")[1] == B.trace_id  # one trace, not the instance's A
    same = db.run(plan().reissue_command(row, {**again, "trace_id": A.trace_id}, {"by": "oncall"})).outbox[0]
    assert same.headers[TRACEPARENT] == A.traceparent  # the instance's own trace: its own parent


def test_a_trace_id_that_is_not_w3c_travels_in_envelopes_without_a_header() -> None:
    db = FakeDatabase()
    ws = db.apply(plan().deliveries([traced("start", "n", Trace("dd-42", None))]))
    assert carried(ws.outbox) == [("workflow.started.toy", "dd-42", None)]
    assert ws.outbox[0].headers == {}


def test_a_parked_event_keeps_its_trace_until_it_applies() -> None:
    db = FakeDatabase()
    e = event("send", "p", key="k")
    e.trace = B
    ws = db.apply(plan().deliveries([Delivery(e, b"{}", headers={TRACEPARENT: B.traceparent})]))
    assert ws.parked and not ws.outbox  # no instance yet: parked
    ws = db.apply(plan().deliveries([traced("start", "p", A)]))
    assert ("toy.do", B.trace_id, B.traceparent) in carried(ws.outbox)
