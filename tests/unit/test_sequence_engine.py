"""`Engine.step` on the `sequence` definition: the full state x trigger table, start, send, advance.

Retries, compensation, stop and pause/resume are in test_sequence_retry_pause.py.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from sfworkflow.core.definition import InstanceKey, TimerRequest
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows.sequence import DEFINITION, S
from tests.unit.enginekit import (
    ENGINE,
    T0,
    TENANT,
    A,
    I,
    P,
    check_deterministic,
    check_table_cell,
    check_table_covers,
    lifecycle_types,
    schema_errors,
)
from tests.unit.seqkit import (
    BUILDERS,
    CORRELATION,
    ENTITY,
    EXTERNAL,
    INTERNAL,
    KEY,
    SEQ,
    STEPS,
    TRIGGERS,
    Run,
    enrolled_data,
    event,
    failed,
    in_retry_wait,
    in_sending,
    in_waiting,
    realistic,
    sent,
)

# The recipient's address enters effect keys hashed (they are stored and shown to operators).
ADDRESS_HASH = hashlib.sha256(b"+5511987654321").hexdigest()[:20]
ALL_IGNORED = {t: (I, None) for t in TRIGGERS}

# state -> trigger -> (outcome, destination; None = unchanged)
TABLE: dict[str, dict[str, tuple[Outcome, str | None]]] = {
    S.NEW: {"enrolled": (A, S.WAITING), **{t: (P, None) for t in TRIGGERS if t != "enrolled"}},
    S.WAITING: {
        "enrolled": (I, None),
        "step_sent": (P, None),
        "step_failed": (P, None),
        "replied": (A, S.STOPPED),
        "unsubscribed": (A, S.STOPPED),
        "paused": (A, S.PAUSED),
        "resumed": (A, "same"),
        "cancelled": (A, S.CANCELLED),
        "timer_step_due": (A, S.SENDING),
        "timer_retry_due": (I, None),
        "effect_suppressed": (I, None),
    },
    S.SENDING: {
        "enrolled": (I, None),
        "step_sent": (A, S.WAITING),
        "step_failed": (A, S.RETRY_WAIT),
        "replied": (A, S.STOPPED),
        "unsubscribed": (A, S.STOPPED),
        "paused": (A, S.PAUSED),
        "resumed": (A, "same"),
        "cancelled": (A, S.CANCELLED),
        "timer_step_due": (I, None),
        "timer_retry_due": (I, None),
        "effect_suppressed": (A, S.WAITING),
    },
    S.RETRY_WAIT: {
        "enrolled": (I, None),
        "step_sent": (A, S.WAITING),
        "step_failed": (P, None),
        "replied": (A, S.STOPPED),
        "unsubscribed": (A, S.STOPPED),
        "paused": (A, S.PAUSED),
        "resumed": (A, "same"),
        "cancelled": (A, S.CANCELLED),
        "timer_step_due": (I, None),
        "timer_retry_due": (A, S.SENDING),
        "effect_suppressed": (I, None),
    },
    S.PAUSED: {
        "enrolled": (I, None),
        "step_sent": (P, None),
        "step_failed": (P, None),
        "replied": (A, S.STOPPED),
        "unsubscribed": (A, S.STOPPED),
        "paused": (I, None),
        "resumed": (A, S.WAITING),
        "cancelled": (A, S.CANCELLED),
        "timer_step_due": (I, None),
        "timer_retry_due": (I, None),
        "effect_suppressed": (I, None),
    },
    S.COMPLETED: ALL_IGNORED,
    S.STOPPED: ALL_IGNORED,
    S.CANCELLED: ALL_IGNORED,
    S.COMPENSATED: ALL_IGNORED,
}


def test_trigger_lists_match_the_definition() -> None:
    check_table_covers(DEFINITION, TABLE, S, EXTERNAL, INTERNAL)


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", list(S))
def test_state_trigger_table(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    assert run.state == (state if state != S.NEW else "")
    ev = event(trigger, realistic(trigger, run), T0)
    d = check_table_cell(run, ev, TABLE[state][trigger], T0 + timedelta(minutes=1))
    assert d.trigger == trigger
    # instance None: an applied start leaves `new`; anything else is parked with no state at all
    assert d.from_state == (run.state or (S.NEW if d.outcome is A else ""))
    if d.outcome is not A:
        assert d.timers_cancelled == []
        assert not d.cancel_all_timers


@pytest.mark.parametrize("state", sorted(DEFINITION.terminal))
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_terminal_states_ignore_everything_with_a_reason(state: str, trigger: str) -> None:
    run = BUILDERS[S(state)]()
    d = run.step(trigger, realistic(trigger, run))
    assert (d.outcome, d.to_state, d.reason) == (I, state, f"instance is {state}")


@pytest.mark.parametrize("state", [S.WAITING, S.SENDING, S.RETRY_WAIT, S.PAUSED])
def test_second_enrolled_on_started_instance_is_ignored(state: S) -> None:
    run = BUILDERS[state]()
    d = run.step("enrolled", enrolled_data(STEPS[:1]))
    assert (d.outcome, d.reason) == (I, "instance already started")
    assert run.ctx["steps"] == STEPS


@pytest.mark.parametrize("trigger", [t for t in TRIGGERS if t != "enrolled"])
def test_non_start_event_without_instance_is_parked(trigger: str) -> None:
    d = ENGINE.step(SEQ, KEY, None, event(trigger, realistic(trigger, Run())), T0)
    assert (d.outcome, d.version, d.reason) == (P, 0, "instance does not exist yet")
    assert d.outgoing == [] and d.timers_set == []


# ---- enrolled ------------------------------------------------------------------------------------
@pytest.mark.parametrize("delay", [0, 3600, 31536000])
@pytest.mark.parametrize(
    "timestamp",
    [T0 - timedelta(minutes=5), datetime(2026, 3, 10, 5, 0, tzinfo=timezone(timedelta(hours=-3)))],
)
def test_enrolled_schedules_first_step_from_event_timestamp(delay: int, timestamp: datetime) -> None:
    run = Run()
    steps = [{"template_id": "tpl-a", "delay_seconds": delay}, {"template_id": "tpl-b", "delay_seconds": 7}]
    d = run.do("enrolled", enrolled_data(steps), at=timestamp, now=T0)
    due = timestamp + timedelta(seconds=delay)
    assert d.timers_set == [TimerRequest("step_due", due, {})]
    assert (d.from_state, d.to_state, d.version) == (S.NEW, S.WAITING, 1)
    ctx = d.context
    assert datetime.fromisoformat(ctx["due_at"]) == due
    assert (ctx["cursor"], ctx["attempt"], ctx["sent"], ctx["skipped"], ctx["suppressed"]) == (0, 0, 0, 0, 0)
    assert (ctx["sequence_id"], ctx["lead_id"], ctx["recipient"], ctx["steps"]) == (
        "seq-onboarding-7",
        "lead-1093",
        {"channel": "whatsapp", "address": "+5511987654321"},
        steps,
    )


def test_enrolled_emits_workflow_started() -> None:
    run = Run()
    d = run.do("enrolled", enrolled_data())
    assert [m.kind for m in d.outgoing] == ["lifecycle"]
    m = d.outgoing[0]
    assert m.routing_key == "workflow.started.sequence"
    assert m.message_id == m.body["event_id"]
    assert m.body["event_type"] == "workflow.started"
    assert m.body["data"] == {"start_event_type": "sequence.enrolled"}
    assert (m.body["tenant_id"], m.body["entity_id"], m.body["workflow"]) == (TENANT, ENTITY, "sequence")
    assert (m.body["state"], m.body["definition_version"]) == ("waiting", 1)
    assert m.body["correlation_id"] == CORRELATION
    assert schema_errors(m) == []


# ---- timer_step_due: the send_step command ---------------------------------------------------------
@pytest.mark.parametrize(
    ("now", "day"),
    [
        (datetime(2026, 3, 10, 23, 59, 59, 999999, tzinfo=UTC), "2026-03-10"),
        (datetime(2026, 3, 11, 0, 0, tzinfo=UTC), "2026-03-11"),
        (datetime(2027, 1, 1, 12, 30, tzinfo=UTC), "2027-01-01"),
    ],
)
def test_step_due_issues_one_send_step(now: datetime, day: str) -> None:
    run = in_waiting()
    d = run.do("timer_step_due", now=now)
    assert d.to_state == S.SENDING
    assert [m.kind for m in d.outgoing] == ["command"]
    m = d.outgoing[0]
    assert m.routing_key == "sequence.send_step"
    assert m.effect_key == f"sequence.send_step:{TENANT}:tpl-welcome:{ADDRESS_HASH}:{day}"
    b = m.body
    assert m.message_id == b["command_id"]
    assert (b["command_type"], b["kind"], b["attempt"]) == ("sequence.send_step", "command", 1)
    assert b["idempotency_key"] == f"{TENANT}:sequence:{ENTITY}:step:0"
    assert (b["tenant_id"], b["entity_id"], b["workflow"]) == (TENANT, ENTITY, "sequence")
    assert b["causation_id"] == event("timer_step_due", {}, now).event_id
    assert b["correlation_id"] == CORRELATION
    assert datetime.fromisoformat(b["issued_at"]) == now
    assert b["data"] == {
        "step": 0,
        "template_id": "tpl-welcome",
        "recipient": {"channel": "whatsapp", "address": "+5511987654321"},
        "sequence_id": "seq-onboarding-7",
        "lead_id": "lead-1093",
    }
    assert schema_errors(m) == []
    assert d.context["attempt"] == 1
    assert d.timers_set == []


def test_send_step_command_for_step_two() -> None:
    run = in_sending()
    run.do("step_sent", sent(0, 1))
    d = run.do("timer_step_due")
    (m,) = d.outgoing
    assert m.body["idempotency_key"] == f"{TENANT}:sequence:{ENTITY}:step:1"
    assert m.body["data"]["step"] == 1 and m.body["data"]["template_id"] == "tpl-follow-up-1"
    assert m.effect_key == f"sequence.send_step:{TENANT}:tpl-follow-up-1:{ADDRESS_HASH}:2026-03-10"
    assert schema_errors(m) == []


# ---- step_sent -------------------------------------------------------------------------------------
@pytest.mark.parametrize("attempt", [None, 1])
def test_step_sent_for_current_step_schedules_next(attempt: int | None) -> None:
    run = in_sending()
    now = T0 + timedelta(seconds=42)
    d = run.do("step_sent", sent(0, attempt), now=now)
    assert (d.from_state, d.to_state, d.terminal) == (S.SENDING, S.WAITING, False)
    assert (d.context["cursor"], d.context["attempt"], d.context["sent"]) == (1, 0, 1)
    due = now + timedelta(seconds=STEPS[1]["delay_seconds"])
    assert d.timers_set == [TimerRequest("step_due", due, {})]
    assert datetime.fromisoformat(d.context["due_at"]) == due
    assert d.outgoing == []


def test_step_sent_walks_every_step_to_completed() -> None:
    run = in_sending()
    for i in range(len(STEPS) - 1):
        run.do("step_sent", sent(i, 1))
        run.do("timer_step_due")
    d = run.do("step_sent", sent(len(STEPS) - 1, 1))
    assert (d.to_state, d.terminal, d.cancel_all_timers, d.timers_set) == (S.COMPLETED, True, True, [])
    assert d.context["sent"] == len(STEPS)
    assert lifecycle_types(d) == ["workflow.completed"]
    (m,) = d.outgoing
    assert m.routing_key == "workflow.completed.sequence"
    assert m.body["data"] == {"final_state": "completed"}
    assert m.body["state"] == "completed"
    assert schema_errors(m) == []


@pytest.mark.parametrize("builder", [in_sending, in_retry_wait])
def test_step_sent_for_a_future_step_is_parked(builder) -> None:
    run = builder()
    d = run.step("step_sent", sent(2, 1))
    assert d.outcome is P
    assert d.to_state == run.state


@pytest.mark.parametrize("trigger", ["step_sent", "step_failed"])
def test_report_for_a_past_step_is_ignored_as_stale(trigger: str) -> None:
    run = in_sending()
    run.do("step_sent", sent(0, 1))
    run.do("timer_step_due")
    data = sent(0, 1) if trigger == "step_sent" else failed(0, attempt=1)
    d = run.step(trigger, data)
    assert d.outcome is I
    assert "already done" in d.reason


def _sending_at_attempt_2() -> Run:
    run = in_retry_wait()
    run.do("timer_retry_due")
    assert (run.state, run.ctx["attempt"]) == (S.SENDING, 2)
    return run


def _retry_wait_at_attempt_2() -> Run:
    run = _sending_at_attempt_2()
    run.do("step_failed", failed(0, attempt=2))
    assert (run.state, run.ctx["attempt"]) == (S.RETRY_WAIT, 2)
    return run


@pytest.mark.parametrize(
    ("builder", "trigger"),
    [
        pytest.param(_sending_at_attempt_2, "step_sent"),
        pytest.param(_sending_at_attempt_2, "step_failed"),
        pytest.param(_retry_wait_at_attempt_2, "step_sent"),
        pytest.param(_retry_wait_at_attempt_2, "step_failed"),
    ],
)
def test_report_about_an_older_attempt_is_ignored(builder, trigger: str) -> None:
    run = builder()
    data = sent(0, 1) if trigger == "step_sent" else failed(0, attempt=1)
    d = run.step(trigger, data)
    assert d.outcome is I, (d.outcome, d.to_state)
    assert "superseded" in d.reason


@pytest.mark.parametrize("attempt", [None, 2])
def test_report_about_the_current_attempt_applies(attempt: int | None) -> None:
    run = _sending_at_attempt_2()
    assert run.do("step_sent", sent(0, attempt)).to_state == S.WAITING
    run = _sending_at_attempt_2()
    assert run.do("step_failed", failed(0, attempt=attempt)).to_state == S.RETRY_WAIT


# ---- purity and determinism --------------------------------------------------------------------------
@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", [S.WAITING, S.SENDING, S.RETRY_WAIT, S.PAUSED])
def test_same_inputs_give_equal_decisions_and_do_not_mutate(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    first, second = check_deterministic(run, event(trigger, realistic(trigger, run)), T0 + timedelta(hours=1))
    assert [m.message_id for m in first.outgoing] == [m.message_id for m in second.outgoing]
    if first.outcome is A:
        assert first.context is not run.view.context


def test_command_ids_differ_between_instances() -> None:
    run = in_waiting()
    ev = event("timer_step_due")
    other = InstanceKey(TENANT, "sequence", "enrollment-43")
    a = ENGINE.step(SEQ, KEY, run.view, ev, T0)
    b = ENGINE.step(SEQ, other, run.view, ev, T0)
    assert a.outgoing[0].message_id != b.outgoing[0].message_id
    assert a.outgoing[0].body["idempotency_key"] != b.outgoing[0].body["idempotency_key"]
