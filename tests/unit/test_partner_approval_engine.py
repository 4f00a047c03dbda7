"""`Engine.step` on the `partner_approval` definition: the full state x trigger table, stage by stage review,
SLA escalation once per stage, expiry, rejection, withdrawal and their compensation (pure, no I/O)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from sfworkflow.core.definition import EngineEvent, InstanceKey, TimerRequest
from sfworkflow.core.engine import Decision, Outcome
from sfworkflow.workflows.partner_approval import DEFAULT_SLA_HOURS, DEFINITION, S
from tests.unit import enginekit
from tests.unit.enginekit import (
    T0,
    TENANT,
    A,
    I,
    P,
    check_deterministic,
    check_table_cell,
    check_table_covers,
    lifecycle_types,
    of_kind,
    schema_errors,
)

ENTITY = "request-42"
KEY = InstanceKey(TENANT, "partner_approval", ENTITY)
CORRELATION = "corr-request-42"
PARTNER = "partner-311"
STAGES = ["manager", "legal", "executive"]
SLA = {"manager": 24, "legal": 72, "executive": 48}

EXTERNAL = ("requested", "approved", "rejected", "withdrawn")
INTERNAL = ("timer_sla_due", "timer_expiry_due", "effect_suppressed")
TRIGGERS = EXTERNAL + INTERNAL


def key(what: str) -> str:
    return f"{TENANT}:partner_approval:{ENTITY}:{what}"


def requested(stages: list[str] | None = None, sla: dict[str, float] | None = None) -> dict[str, Any]:
    return {"partner_id": PARTNER, "stages": list(STAGES if stages is None else stages), "sla_hours": sla or dict(SLA)}


def approved(stage: str, approver: str | None = None) -> dict[str, Any]:
    return {"stage": stage, "approver_id": approver or f"{stage}-1"}


def rejected(stage: str, reason: str = "Missing tax documents.") -> dict[str, Any]:
    return {"stage": stage, "approver_id": f"{stage}-1", "reason": reason}


def suppressed(stage: str = "manager") -> dict[str, Any]:
    return {
        "effect_key": f"partner_approval.escalate:{TENANT}:{ENTITY}:{stage}",
        "command_type": "partner_approval.escalate",
        "command_id": "8c7e0d4e-0000-4000-8000-000000000001",
    }


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0) -> EngineEvent:
    return enginekit.event(DEFINITION, name, data, at, correlation=CORRELATION)


class Run(enginekit.Run):
    """One `partner_approval` instance (`KEY`) driven event by event, a second apart unless told `now`."""

    def __init__(self) -> None:
        super().__init__(DEFINITION, KEY, correlation=CORRELATION, tick=timedelta(seconds=1))

    def fire(self, timer: str) -> Decision:
        """Fire the pending timer as the store does: the event's timestamp is the due time."""
        due = datetime.fromisoformat(self.ctx["due_at"])
        return self.do(f"timer_{timer}", {"stage": self.current}, at=due, now=max(due, self.now))

    @property
    def current(self) -> str:
        return self.ctx["stages"][self.ctx["cursor"]]


def in_new() -> Run:
    return Run()


def in_review(stages: list[str] | None = None, sla: dict[str, float] | None = None) -> Run:
    r = Run()
    r.do("requested", requested(stages, sla), at=T0, now=T0)
    return r


def in_escalated() -> Run:
    r = in_review()
    r.fire("sla_due")
    return r


def in_approved() -> Run:
    r = in_review(["manager"])
    r.do("approved", approved("manager"))
    return r


def in_rejected() -> Run:
    r = in_review()
    r.do("rejected", rejected("manager"))
    return r


def in_expired() -> Run:
    r = in_escalated()
    r.fire("expiry_due")
    return r


def in_withdrawn() -> Run:
    r = in_review()
    r.do("withdrawn", {"requested_by": "partner-portal"})
    return r


BUILDERS = {
    S.NEW: in_new,
    S.IN_REVIEW: in_review,
    S.ESCALATED: in_escalated,
    S.APPROVED: in_approved,
    S.REJECTED: in_rejected,
    S.EXPIRED: in_expired,
    S.WITHDRAWN: in_withdrawn,
}


def realistic(name: str, run: Run) -> dict[str, Any]:
    current = run.current if run.view else "manager"
    return {
        "requested": requested(),
        "approved": approved(current),
        "rejected": rejected(current),
        "withdrawn": {},
        "timer_sla_due": {"stage": current},
        "timer_expiry_due": {"stage": current},
        "effect_suppressed": suppressed(current),
    }[name]


def iso(t: datetime) -> str:
    return t.isoformat()


# ---- the state x trigger table -------------------------------------------------------------------
ALL_IGNORED = {t: (I, None) for t in TRIGGERS}
TABLE: dict[str, dict[str, tuple[Outcome, str | None]]] = {
    S.NEW: {"requested": (A, S.IN_REVIEW), **{t: (P, None) for t in TRIGGERS if t != "requested"}},
    S.IN_REVIEW: {
        "requested": (I, None),
        "approved": (A, S.IN_REVIEW),  # the next stage
        "rejected": (A, S.REJECTED),
        "withdrawn": (A, S.WITHDRAWN),
        "timer_sla_due": (A, S.ESCALATED),
        "timer_expiry_due": (I, None),
        "effect_suppressed": (I, None),
    },
    S.ESCALATED: {
        "requested": (I, None),
        "approved": (A, S.IN_REVIEW),
        "rejected": (A, S.REJECTED),
        "withdrawn": (A, S.WITHDRAWN),
        "timer_sla_due": (I, None),
        "timer_expiry_due": (A, S.EXPIRED),
        "effect_suppressed": (A, "same"),
    },
    S.APPROVED: ALL_IGNORED,
    S.REJECTED: ALL_IGNORED,
    S.EXPIRED: ALL_IGNORED,
    S.WITHDRAWN: ALL_IGNORED,
}


def test_trigger_lists_match_the_definition() -> None:
    check_table_covers(DEFINITION, TABLE, S, EXTERNAL, INTERNAL)
    assert DEFINITION.terminal == {S.APPROVED, S.REJECTED, S.EXPIRED, S.WITHDRAWN}
    assert DEFINITION.commands == {"request_review", "escalate", "notify_outcome"}
    assert DEFINITION.compensations == {"void_request"}


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", list(S))
def test_state_trigger_table(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    ev = event(trigger, realistic(trigger, run), T0)
    d = check_table_cell(run, ev, TABLE[state][trigger], T0 + timedelta(minutes=1))
    assert d.from_state == (run.state or (S.NEW if d.outcome is A else ""))
    if d.outcome is A:
        if d.terminal:  # nothing left pending: every timer cancelled, no timer set
            assert d.cancel_all_timers and d.timers_set == []
    else:
        assert d.timers_cancelled == []


@pytest.mark.parametrize("state", sorted(DEFINITION.terminal))
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_terminal_states_ignore_everything(state: str, trigger: str) -> None:
    run = BUILDERS[S(state)]()
    d = run.step(trigger, realistic(trigger, run))
    assert (d.outcome, d.reason) == (I, f"instance is {state}")


def test_second_requested_is_ignored() -> None:
    run = in_review()
    d = run.step("requested", requested(["legal"]))
    assert (d.outcome, d.reason) == (I, "instance already started")


# ---- requested and review ----------------------------------------------------------------------------
def test_requested_asks_the_first_stage_with_a_durable_sla_timer() -> None:
    run = Run()
    at = T0 - timedelta(minutes=10)
    d = run.do("requested", requested(), at=at, now=T0)
    due = at + timedelta(hours=24)
    assert (d.from_state, d.to_state) == (S.NEW, S.IN_REVIEW)
    assert d.timers_set == [TimerRequest("sla_due", due, {"stage": "manager"})]
    (cmd,) = of_kind(d, "command")
    assert cmd.routing_key == "partner_approval.request_review" and cmd.effect_key is None
    assert cmd.body["data"] == {"stage": "manager", "partner_id": PARTNER, "sla_hours": 24, "due_at": iso(due)}
    assert (cmd.body["idempotency_key"], cmd.body["attempt"], cmd.body["kind"]) == (key("review:manager"), 1, "command")
    assert lifecycle_types(d) == ["workflow.started"]
    assert all(schema_errors(m) == [] for m in d.outgoing)
    ctx = d.context
    assert (ctx["partner_id"], ctx["stages"], ctx["sla_hours"], ctx["cursor"]) == (PARTNER, STAGES, SLA, 0)
    assert (ctx["approvals"], ctx["escalated_stages"], ctx["due_at"]) == ([], [], iso(due))


def test_fractional_and_missing_sla_hours() -> None:
    run = Run()
    d = run.do("requested", requested(["manager", "legal"], {"manager": 0.0005}), at=T0, now=T0)
    assert d.timers_set[0].due_at == T0 + timedelta(seconds=1.8)
    assert d.context["sla_hours"] == {"manager": 0.0005, "legal": DEFAULT_SLA_HOURS}
    d = run.do("approved", approved("manager"), now=T0 + timedelta(seconds=1))
    assert d.timers_set[0].due_at == T0 + timedelta(seconds=1, hours=DEFAULT_SLA_HOURS)
    assert d.outgoing[0].body["data"]["sla_hours"] == DEFAULT_SLA_HOURS


def test_every_stage_approved_ends_approved_and_notifies() -> None:
    run = in_review()
    reviews = []
    for n, stage in enumerate(STAGES[:-1]):
        now = T0 + timedelta(hours=n + 1)
        d = run.do("approved", approved(stage), now=now)
        nxt = STAGES[n + 1]
        assert d.to_state == S.IN_REVIEW
        # The next stage's SLA counts from when its review is requested.
        due = now + timedelta(hours=SLA[nxt])
        assert d.timers_set == [TimerRequest("sla_due", due, {"stage": nxt})]
        assert d.timers_cancelled == ["expiry_due"]
        reviews += d.outgoing
        assert d.notes == {"approved_stage": stage, "approver_id": f"{stage}-1"}
    assert [m.body["data"]["stage"] for m in reviews] == ["legal", "executive"]
    assert [m.body["idempotency_key"] for m in reviews] == [key("review:legal"), key("review:executive")]
    d = run.do("approved", approved("executive"))
    assert (d.to_state, d.terminal, d.cancel_all_timers, d.timers_set) == (S.APPROVED, True, True, [])
    (cmd,) = of_kind(d, "command")
    assert cmd.routing_key == "partner_approval.notify_outcome"
    assert cmd.body["idempotency_key"] == key("notify_outcome")
    assert cmd.body["data"] == {
        "outcome": "approved",
        "partner_id": PARTNER,
        "stage": None,
        "reason": None,
        "approvals": [{"stage": s, "approver_id": f"{s}-1"} for s in STAGES],
    }
    assert of_kind(d, "compensation") == []
    assert lifecycle_types(d) == ["workflow.completed"]
    assert all(schema_errors(m) == [] for m in d.outgoing)
    assert [a["stage"] for a in d.context["approvals"]] == STAGES


# ---- SLA: escalate once, then expire -------------------------------------------------------------------
def test_sla_passed_escalates_once_with_a_second_sla() -> None:
    run = in_review()
    due = T0 + timedelta(hours=24)
    late = due + timedelta(seconds=3)  # the timer poll is late: the deadline does not move
    d = run.do("timer_sla_due", {"stage": "manager"}, at=due, now=late)
    expires = due + timedelta(hours=24)
    assert d.to_state == S.ESCALATED
    assert d.timers_set == [TimerRequest("expiry_due", expires, {"stage": "manager"})]
    (cmd,) = d.outgoing
    assert cmd.routing_key == "partner_approval.escalate"
    assert cmd.effect_key == f"partner_approval.escalate:{TENANT}:{ENTITY}:manager"
    assert cmd.body["idempotency_key"] == key("escalate:manager")
    assert cmd.body["data"] == {
        "stage": "manager",
        "partner_id": PARTNER,
        "sla_hours": 24,
        "overdue_since": iso(due),
        "expires_at": iso(expires),
    }
    assert schema_errors(cmd) == []
    assert d.context["escalated_stages"] == ["manager"]
    # In escalated, a second SLA timer of this stage does not escalate again.
    assert run.step("timer_sla_due", {"stage": "manager"}).outcome is I


def test_each_stage_escalates_on_its_own() -> None:
    run = in_escalated()
    d = run.do("approved", approved("manager"))
    assert d.to_state == S.IN_REVIEW and d.timers_cancelled == ["expiry_due"]
    d = run.fire("sla_due")
    assert d.outgoing[0].effect_key == f"partner_approval.escalate:{TENANT}:{ENTITY}:legal"
    assert d.context["escalated_stages"] == ["manager", "legal"]


def test_a_timer_of_another_stage_does_not_apply() -> None:
    run = in_review()
    run.do("approved", approved("manager"))
    assert run.step("timer_sla_due", {"stage": "manager"}).outcome is I
    run.fire("sla_due")
    assert run.step("timer_expiry_due", {"stage": "manager"}).outcome is I


def test_no_decision_within_the_second_sla_expires_and_voids() -> None:
    run = in_escalated()
    d = run.fire("expiry_due")
    assert (d.to_state, d.terminal, d.cancel_all_timers, d.timers_set) == (S.EXPIRED, True, True, [])
    (comp,) = of_kind(d, "compensation")
    detail = "stage manager had no decision within twice its SLA of 24 h (escalated at 24 h)"
    assert comp.routing_key == "partner_approval.void_request"
    assert comp.body["data"] == {"partner_id": PARTNER, "reason": "expired", "stage": "manager", "detail": detail}
    assert comp.body["idempotency_key"] == key("void_request")
    (cmd,) = of_kind(d, "command")
    assert cmd.body["data"] == {
        "outcome": "expired",
        "partner_id": PARTNER,
        "stage": "manager",
        "reason": detail,
        "approvals": [],
    }
    assert lifecycle_types(d) == ["workflow.failed", "workflow.compensated", "workflow.completed"]
    failed_, compensated, _completed = of_kind(d, "lifecycle")
    assert failed_.body["data"] == {"reason": detail, "error_code": "sla_expired"}
    assert compensated.body["data"] == {"compensations": ["partner_approval.void_request"]}
    assert all(schema_errors(m) == [] for m in d.outgoing)


def test_a_suppressed_escalation_is_noted_and_changes_nothing() -> None:
    run = in_escalated()
    d = run.do("effect_suppressed", suppressed())
    assert (d.to_state, d.outgoing, d.timers_set) == (S.ESCALATED, [], [])
    assert d.notes == {"suppressed": "partner_approval.escalate", "effect_key": suppressed()["effect_key"]}


# ---- rejection and withdrawal ------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [in_review, in_escalated])
def test_rejection_voids_notifies_and_leaves_nothing_pending(builder) -> None:
    run = builder()
    run.do("approved", approved("manager"))
    d = run.do("rejected", rejected("legal"))
    assert (d.to_state, d.terminal, d.cancel_all_timers, d.timers_set) == (S.REJECTED, True, True, [])
    detail = "rejected at stage legal by legal-1: Missing tax documents."
    (comp,) = of_kind(d, "compensation")
    assert comp.body["data"] == {"partner_id": PARTNER, "reason": "rejected", "stage": "legal", "detail": detail}
    (cmd,) = of_kind(d, "command")
    assert cmd.body["data"] == {
        "outcome": "rejected",
        "partner_id": PARTNER,
        "stage": "legal",
        "reason": "Missing tax documents.",
        "approvals": [{"stage": "manager", "approver_id": "manager-1"}],
    }
    assert lifecycle_types(d) == ["workflow.failed", "workflow.compensated", "workflow.completed"]
    assert of_kind(d, "lifecycle")[0].body["data"] == {"reason": detail, "error_code": "rejected"}
    assert all(schema_errors(m) == [] for m in d.outgoing)


@pytest.mark.parametrize("builder", [in_review, in_escalated])
def test_withdrawal_voids_and_notifies(builder) -> None:
    run = builder()
    d = run.do("withdrawn", {"requested_by": "partner-portal", "reason": "signed elsewhere"})
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.WITHDRAWN, True, True)
    (comp,) = of_kind(d, "compensation")
    assert comp.body["data"] == {
        "partner_id": PARTNER,
        "reason": "withdrawn",
        "stage": "manager",
        "detail": "withdrawn at stage manager by partner-portal: signed elsewhere",
    }
    (cmd,) = of_kind(d, "command")
    assert (cmd.body["data"]["outcome"], cmd.body["data"]["reason"]) == ("withdrawn", "signed elsewhere")
    assert lifecycle_types(d) == ["workflow.compensated", "workflow.completed"]
    assert all(schema_errors(m) == [] for m in d.outgoing)


def test_withdrawal_without_data() -> None:
    d = in_review().do("withdrawn", {})
    assert of_kind(d, "compensation")[0].body["data"]["detail"] == "withdrawn at stage manager"
    assert of_kind(d, "command")[0].body["data"]["reason"] is None


# ---- stale and early decisions ------------------------------------------------------------------------
@pytest.mark.parametrize("trigger", ["approved", "rejected"])
def test_a_decision_about_a_decided_or_unknown_stage_is_ignored(trigger: str) -> None:
    run = in_review()
    run.do("approved", approved("manager"))
    data = approved("manager") if trigger == "approved" else rejected("manager")
    d = run.step(trigger, data)
    assert d.outcome is I and d.reason == "stage manager was decided already (current stage legal)"
    data = approved("board") if trigger == "approved" else rejected("board")
    d = run.step(trigger, data)
    assert d.outcome is I and d.reason == "stage 'board' is not a stage of this request"


@pytest.mark.parametrize("trigger", ["approved", "rejected"])
def test_a_decision_about_a_later_stage_is_parked(trigger: str) -> None:
    run = in_review()
    data = approved("executive") if trigger == "approved" else rejected("executive")
    d = run.step(trigger, data)
    assert d.outcome is P
    assert "not allowed in state in_review" in d.reason


# ---- purity and determinism -----------------------------------------------------------------------
@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", [S.IN_REVIEW, S.ESCALATED])
def test_same_inputs_give_equal_decisions_and_do_not_mutate(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    check_deterministic(run, event(trigger, realistic(trigger, run)), T0 + timedelta(hours=1))
