"""The batch plan driven by an in-memory database (tests/unit/plankit.py): every arbitration rule, the
order of requests, and the write set, without PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from sfworkflow.core.batch import (
    ClaimEffects,
    ClaimKeys,
    Delivery,
    InsertInbox,
    LoadParked,
    LockInstances,
    ReadRegisters,
    WriteSet,
)
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Engine
from sfworkflow.core.plan import RETRY_FAILED_TIMER
from sfworkflow.errors import DeadReason, Rejection
from tests.unit.plankit import TENANT, FakeDatabase, delivery, plan


def key(entity: str) -> InstanceKey:
    return InstanceKey(TENANT, "toy", entity)


def state(db: FakeDatabase, entity: str) -> str:
    return str(db.instances[key(entity)]["state"])


def notes(ws: WriteSet, outcome: str = "applied") -> list[dict[str, Any]]:
    """The notes of the history entries (what the toy workflow heard), without the trigger record."""
    return [
        {k: v for k, v in (h.detail or {}).items() if k not in ("trigger", "data")}
        for h in ws.history
        if h.outcome == outcome
    ]


def started(db: FakeDatabase, *entities: str) -> None:
    db.apply(plan().deliveries([delivery("start", e) for e in entities]))
    db.requests.clear()


# ---- intake ------------------------------------------------------------------------------------------
def test_a_batch_of_rejections_asks_nothing_and_writes_only_dead_letters() -> None:
    db = FakeDatabase()
    bad = Delivery(Rejection(DeadReason.INVALID_JSON, "not JSON"), b"{", routing_key="toy.start", message_id="m1")
    p = plan()
    ws = db.apply(p.deliveries([bad]))
    assert db.requests == []
    assert [(r.kind, r.headers["x-sfworkflow-reason"]) for r in ws.outbox] == [("dead_letter", "invalid_json")]
    assert p.report.dead == {"invalid_json": 1}
    assert p.report.events[("toy", "dead_lettered")] == 1


def test_duplicates_in_the_batch_and_redeliveries_are_dropped() -> None:
    db = FakeDatabase()
    first = delivery("start", "a")
    p = plan()
    db.apply(p.deliveries([first, first]))
    assert p.report.events[("toy", "duplicate")] == 1
    inbox = [r for r in db.requests if isinstance(r, InsertInbox)]
    assert [len(r.events) for r in inbox] == [1]  # the copy never reaches the database
    again = plan()
    ws = db.apply(again.deliveries([first]))
    assert again.report.events[("toy", "duplicate")] == 1
    assert ws == WriteSet()  # a redelivery writes nothing


def test_requests_of_a_plain_batch_come_in_load_order_whatever_its_size() -> None:
    def kinds(n: int) -> list[str]:
        db = FakeDatabase()
        started(db, *[f"e{i}" for i in range(n)])
        db.apply(plan().deliveries([delivery("send", f"e{i}", key=f"k{i}") for i in range(n)]))
        return [type(r).__name__ for r in db.requests]

    assert kinds(1) == kinds(50) == ["InsertInbox", "LockInstances", "ClaimEffects"]


def test_instances_are_locked_in_key_order_and_placeholders_no_start_used_are_removed() -> None:
    db = FakeDatabase()
    ws = db.apply(plan().deliveries([delivery("send", "b", key="x"), delivery("start", "a")]))
    lock = next(r for r in db.requests if isinstance(r, LockInstances))
    assert [n.key.entity_id for n in lock.instances] == ["a", "b"]
    assert len(ws.unstarted) == 1 and key("b") not in db.instances  # `send` cannot start an instance
    assert state(db, "a") == "waiting"


# ---- effects -----------------------------------------------------------------------------------------
def test_the_second_request_for_an_effect_in_one_batch_is_suppressed_without_asking_the_database() -> None:
    db = FakeDatabase()
    started(db, "a", "b")
    p = plan()
    ws = db.apply(p.deliveries([delivery("send", "a", key="e"), delivery("send", "b", key="e")]))
    (claims,) = [r for r in db.requests if isinstance(r, ClaimEffects)]
    assert [c.effect_key for c in claims.claims] == ["e"]  # one insert for the key
    assert [r.routing_key for r in ws.outbox if r.kind == "command"] == ["toy.do"]  # sent once
    suppressed = [h for h in ws.history if h.outcome == "suppressed"]
    assert [h.instance_id for h in suppressed] == [db.instances[key("b")]["id"]]
    assert {"heard": "effect_suppressed", "effect_key": "e"}.items() <= notes(ws)[-1].items()
    assert p.report.suppressed == {"toy": 1}


def test_an_effect_claimed_in_an_earlier_batch_is_suppressed() -> None:
    db = FakeDatabase()
    started(db, "a", "b")
    db.apply(plan().deliveries([delivery("send", "a", key="e")]))
    ws = db.apply(plan().deliveries([delivery("send", "b", key="e")]))
    assert [r for r in ws.outbox if r.kind == "command"] == []
    assert [h.outcome for h in ws.history] == ["applied", "suppressed", "applied"]


# ---- claims ------------------------------------------------------------------------------------------
def test_a_key_asked_for_first_in_the_batch_is_refused_to_the_next_instance_naming_the_holder() -> None:
    db = FakeDatabase()
    started(db, "a", "b")
    ws = db.apply(plan().deliveries([delivery("grab", "a", key="k"), delivery("grab", "b", key="k")]))
    (claims,) = [r for r in db.requests if isinstance(r, ClaimKeys)]
    assert [c.instance.entity_id for c in claims.claims] == ["a"]
    assert (state(db, "a"), state(db, "b")) == ("holding", "waiting")
    refused = [n for n in notes(ws) if n.get("heard") == "claim_refused"]
    assert refused == [{"heard": "claim_refused", "key": "k", "holder_entity_id": "a", "holder_workflow": "toy"}]


def test_a_key_held_in_the_database_by_another_instance_is_refused_naming_it() -> None:
    db = FakeDatabase()
    started(db, "a", "b")
    db.apply(plan().deliveries([delivery("grab", "a", key="k")]))
    ws = db.apply(plan().deliveries([delivery("grab", "b", key="k")]))
    assert state(db, "b") == "waiting"
    assert notes(ws)[-1]["holder_entity_id"] == "a"


def test_a_key_held_by_the_instance_itself_is_granted_again() -> None:
    db = FakeDatabase()
    started(db, "a")
    db.apply(plan().deliveries([delivery("grab", "a", key="k")]))
    db.apply(plan().deliveries([delivery("drop", "a", key="other")]))  # back to waiting, still holds k
    db.apply(plan().deliveries([delivery("grab", "a", key="k")]))
    assert state(db, "a") == "holding"


def test_a_key_with_no_holder_row_after_a_refused_insert_is_refused_with_no_holder() -> None:
    """The insert lost to a release not committed yet: refused, no holder named."""

    class Racing(FakeDatabase):
        def answer(self, request: Any) -> Any:
            a = super().answer(request)
            if isinstance(request, ClaimKeys):
                return type(a)(set(), {})
            return a

    db = Racing()
    started(db, "a")
    ws = db.apply(plan().deliveries([delivery("grab", "a", key="k")]))
    assert state(db, "a") == "waiting"
    assert notes(ws)[-1] == {"heard": "claim_refused", "key": "k", "holder_entity_id": "", "holder_workflow": ""}


def test_a_key_released_in_the_batch_passes_to_another_instance_release_first() -> None:
    db = FakeDatabase()
    started(db, "a", "b")
    db.apply(plan().deliveries([delivery("grab", "a", key="k")]))
    db.requests.clear()
    db.apply(plan().deliveries([delivery("drop", "a", key="k"), delivery("grab", "b", key="k")]))
    (claims,) = [r for r in db.requests if isinstance(r, ClaimKeys)]
    assert [r.key for r in claims.releases] == ["k"]  # given up before the insert
    assert (state(db, "a"), state(db, "b")) == ("waiting", "holding")
    assert db.claims["k"][2] == "b"


# ---- lookups -----------------------------------------------------------------------------------------
def test_a_lookup_reads_the_stored_value_or_none() -> None:
    db = FakeDatabase()
    db.registers["r"] = 42
    started(db, "a")
    ws = db.apply(plan().deliveries([delivery("ask", "a", key="r"), delivery("ask", "a", key="missing")]))
    assert [r.keys for r in db.requests if isinstance(r, ReadRegisters)] == [["r"], ["missing"]]
    heard = [n["value"] for n in notes(ws) if n.get("heard") == "lookup_result"]
    assert heard == [42, None]


def test_a_lookup_sees_the_batch_own_write_without_asking_the_database() -> None:
    db = FakeDatabase()
    db.registers["r"] = "old"
    started(db, "a", "b")
    ws = db.apply(plan().deliveries([delivery("put", "a", key="r", value="new"), delivery("ask", "b", key="r")]))
    assert not [r for r in db.requests if isinstance(r, ReadRegisters)]
    assert [n["value"] for n in notes(ws) if n.get("heard") == "lookup_result"] == ["new"]
    assert [(w.key, w.value) for w in ws.registers] == [("r", "new")]


# ---- order within an instance ------------------------------------------------------------------------
def test_later_events_of_an_instance_wait_for_the_answers_its_earlier_step_asked_for() -> None:
    """`later` is allowed only in `holding`: it must see the instance as the claim's answer leaves it."""
    db = FakeDatabase()
    started(db, "a")
    ws = db.apply(plan().deliveries([delivery("grab", "a", key="k"), delivery("later", "a")]))
    assert state(db, "a") == "done"  # granted, then `later`, then its timer already due
    assert ws.parked == []


def test_an_event_not_allowed_yet_is_parked_and_retried_after_the_next_transition() -> None:
    db = FakeDatabase()
    started(db, "a")
    p = plan()
    ws = db.apply(p.deliveries([delivery("later", "a")]))
    assert [x.reason for x in ws.parked] == ["later not allowed yet"]
    assert db.instances[key("a")]["parked_count"] == 1
    db.requests.clear()
    ws = db.apply(plan().deliveries([delivery("grab", "a", key="k")]))
    assert any(isinstance(r, LoadParked) for r in db.requests)
    assert state(db, "a") == "done"
    assert ws.parked_done and db.parked == {}
    assert any(n.get("unparked") for n in notes(ws))


def test_a_foreign_definition_version_parks_events_for_a_replica_that_has_it() -> None:
    db = FakeDatabase()
    started(db, "a")
    db.instances[key("a")]["definition_version"] = 2  # started by a newer release
    p = plan()
    ws = db.apply(p.deliveries([delivery("grab", "a", key="k")]))
    assert [x.awaiting_version for x in ws.parked] == [2]
    assert [c.added for c in ws.parked_counts] == [1]
    assert ws.instances == [] and ws.history == []
    assert p.report.events[("toy", "awaiting_version")] == 1


# ---- timers ------------------------------------------------------------------------------------------
def test_a_timer_whose_step_raises_is_undone_alone_and_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    db = FakeDatabase()
    started(db, "a")
    row = dict(db.instances[key("a")])
    row.update(state="holding", version=3)
    timers = [{"instance_id": row["id"], "name": "soon", "due_at": plan().now, "payload": {"boom": 1}}]
    original = Engine.step

    def failing(self: Engine, compiled: Any, k: Any, view: Any, event: Any, now: Any) -> Any:
        if event.name == "timer_soon":
            raise RuntimeError("definition bug")
        return original(self, compiled, k, view, event, now)

    monkeypatch.setattr(Engine, "step", failing)
    p = plan()
    ws = db.run(p.timers([row], timers))
    assert [h.outcome for h in ws.history] == ["failed"]
    assert [(t.name, t.due_at - p.now) for t in ws.timers] == [("soon", RETRY_FAILED_TIMER)]
    assert ws.instances == []
    assert (p.report.timers_fired, p.report.timer_failures) == (1, 1)


def test_parked_events_past_their_deadline_become_dead_letters_with_the_reason() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 3, 10, tzinfo=UTC)
    rows = [
        {"tenant_id": TENANT, "workflow": "toy", "entity_id": "a", "event_id": "e1", "event_type": "toy.later",
         "body": b"{}", "headers": {}, "parked_at": at, "deadline": at, "reason": "r", "awaiting_version": None},
        {"tenant_id": TENANT, "workflow": "toy", "entity_id": "b", "event_id": "e2", "event_type": "toy.later",
         "body": b"{}", "headers": {}, "parked_at": at, "deadline": at, "reason": "r", "awaiting_version": 3},
    ]  # fmt: skip
    p = plan()
    ws = p.expired(rows)
    assert [r.headers["x-sfworkflow-reason"] for r in ws.outbox] == [
        "transition_not_allowed",
        "unknown_definition_version",
    ]
    assert "toy v3" in ws.outbox[1].headers["x-sfworkflow-detail"]
    assert p.report.dead == {"transition_not_allowed": 1, "unknown_definition_version": 1}


# ---- operator actions: the same write set ------------------------------------------------------------
def _row(db: FakeDatabase, entity: str) -> dict[str, Any]:
    return {**db.instances[key(entity)], "terminal": False}


def test_replaying_a_timer_moves_it_to_now_and_records_who_did_it() -> None:
    db = FakeDatabase()
    started(db, "a")
    p = plan()
    ws = p.replay_timer(_row(db, "a"), {"name": "soon", "payload": {"x": 1}}, {"by": "oncall", "reason": "drill"})
    assert [(t.name, t.due_at, t.payload) for t in ws.timers] == [("soon", p.now, {"x": 1})]
    (entry,) = ws.history
    assert (entry.outcome, entry.event_type, entry.seq) == ("replayed", "toy.replayed", 2)
    assert entry.detail == {"by": "oncall", "reason": "drill", "timer": "soon"}
    (update,) = ws.instances
    assert (update.version, update.state, update.restart_clock) == (2, "waiting", True)


def test_reissuing_a_command_queues_it_and_keeps_the_workflow_attempt_in_step() -> None:
    db = FakeDatabase()
    started(db, "a")
    row = _row(db, "a")
    row["context"] = {"attempt": 2, "other": "kept"}
    command = {"command_id": "c-3", "command_type": "toy.do", "idempotency_key": "do/k", "attempt": 3}
    p = plan()
    ws = db.run(p.reissue_command(row, command, {"by": "oncall"}))
    (out,) = ws.outbox
    assert (out.message_id, out.kind, out.exchange, out.routing_key) == (
        "c-3",
        "command",
        "sfworkflow.commands",
        "toy.do",
    )
    assert ws.instances[0].context == {"attempt": 3, "other": "kept"}
    assert row["context"] == {"attempt": 2, "other": "kept"}  # the loaded row is not edited in place
    assert ws.history[0].detail == {"by": "oncall", "command_type": "toy.do", "command_id": "c-3",
                                    "idempotency_key": "do/k", "attempt": 3}  # fmt: skip
    assert p.report.outbox_rows == 1


def test_migrating_moves_the_definition_version_and_the_state_with_a_history_entry() -> None:
    db = FakeDatabase()
    started(db, "a", "b")
    ws = plan().migrated([(_row(db, "a"), "holding"), (_row(db, "b"), "waiting")], 2, {"by": "oncall"})
    assert [(u.definition_version, u.state, u.version, u.restart_clock) for u in ws.instances] == [
        (2, "holding", 2, False),
        (2, "waiting", 2, False),
    ]
    assert [(h.outcome, h.from_state, h.to_state) for h in ws.history] == [
        ("migrated", "waiting", "holding"),
        ("migrated", "waiting", "waiting"),
    ]


def test_a_replayed_redrive_records_the_replay_after_the_events_it_applied() -> None:
    db = FakeDatabase()
    started(db, "a")
    db.apply(plan().deliveries([delivery("grab", "a", key="k")]))  # holding
    db.parked[99] = {"id": 99, "tenant_id": TENANT, "workflow": "toy", "entity_id": "a", "event_id": "p1",
                     "body": _parked_body("later", "a"), "headers": {}, "awaiting_version": None}  # fmt: skip
    row = _row(db, "a")
    row["parked_count"] = 1
    p = plan()
    ws = db.run(p.redrive(row, replayed={"by": "oncall"}))
    assert [h.outcome for h in ws.history][-1] == "replayed"
    assert ws.history[-1].detail == {"by": "oncall", "applied": 1}
    assert ws.history[-1].seq == max(h.seq for h in ws.history)
    assert ws.instances[0].restart_clock and ws.instances[0].state == "done"


def _parked_body(name: str, entity: str) -> bytes:
    from tests.unit.plankit import _body, event

    return _body(event(name, entity))
