"""`Engine.step` on the `follow_up` definition: the full state x trigger table, timed steps, the send effect
key, retries, reset + notify on a failure for good (not terminal), the operator's resume, stale reports."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from sfworkflow.core.definition import EngineEvent, InstanceKey, OutgoingMessage, TimerRequest
from sfworkflow.core.engine import Decision, Outcome
from sfworkflow.workflows.follow_up import DEFINITION, RETRY, S
from tests.unit import enginekit
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
    kinds,
    schema_errors,
)

WF = enginekit.workflow(DEFINITION)

ENTITY = "lead-1093"
KEY = InstanceKey(TENANT, "follow_up", ENTITY)
CORRELATION = "corr-lead-1093"

EXTERNAL = ("scheduled", "sent", "reply_received", "failed", "resume_requested", "cancel_requested")
INTERNAL = ("timer_step_due", "timer_retry_due", "effect_suppressed")
TRIGGERS = EXTERNAL + INTERNAL

DAY = 86400
STEPS = [
    {"template": "follow-up-24h", "delay_seconds": DAY},
    {"template": "follow-up-72h", "delay_seconds": 3 * DAY},
    {"template": "follow-up-7d", "delay_seconds": 7 * DAY},
]


def scheduled(steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"owner_id": "user-17", "steps": [dict(s) for s in (STEPS if steps is None else steps)]}


def sent(step: int, attempt: int | None = None, reset: int | None = None) -> dict[str, Any]:
    return enginekit.with_optional({"step": step}, attempt=attempt, reset=reset)


def failed(
    step: int,
    retryable: bool = True,
    code: str = "provider_timeout",
    attempt: int | None = None,
    reset: int | None = None,
) -> dict[str, Any]:
    return {**sent(step, attempt, reset), "error_code": code, "retryable": retryable}


def send_effect(step: int, reset: int = 0) -> str:
    return f"follow_up.send:{TENANT}:{ENTITY}:{step}" + (f":reset:{reset}" if reset else "")


def send_key(step: int, reset: int = 0) -> str:
    return f"{TENANT}:follow_up:{ENTITY}:step:{step}" + (f":reset:{reset}" if reset else "")


def suppressed(step: int, reset: int = 0) -> dict[str, Any]:
    return {"effect_key": send_effect(step, reset), "command_type": "follow_up.send", "command_id": str(uuid.uuid4())}


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0) -> EngineEvent:
    return enginekit.event(DEFINITION, name, data, at, correlation=CORRELATION)


class Run(enginekit.Run):
    """One `follow_up` instance (`KEY`) driven event by event."""

    def __init__(self) -> None:
        super().__init__(DEFINITION, KEY, correlation=CORRELATION)


def in_waiting(steps: list[dict[str, Any]] | None = None) -> Run:
    r = Run()
    r.do("scheduled", scheduled(steps))
    return r


def in_sending(steps: list[dict[str, Any]] | None = None) -> Run:
    r = in_waiting(steps)
    r.do("timer_step_due")
    return r


def in_retry_wait() -> Run:
    r = in_sending()
    r.do("failed", failed(0, attempt=1))
    return r


def in_needs_attention(steps: list[dict[str, Any]] | None = None) -> Run:
    r = in_sending(steps)
    r.do("failed", failed(0, False, "template_rejected", attempt=1))
    return r


def in_completed() -> Run:
    r = in_sending(STEPS[:1])
    r.do("sent", sent(0, 1))
    return r


def in_replied() -> Run:
    r = in_waiting()
    r.do("reply_received", {"channel": "email"})
    return r


def in_cancelled() -> Run:
    r = in_needs_attention()
    r.do("cancel_requested", {"requested_by": "user-17"})
    return r


BUILDERS = {
    S.NEW: Run,
    S.WAITING: in_waiting,
    S.SENDING: in_sending,
    S.RETRY_WAIT: in_retry_wait,
    S.NEEDS_ATTENTION: in_needs_attention,
    S.COMPLETED: in_completed,
    S.REPLIED: in_replied,
    S.CANCELLED: in_cancelled,
}


def realistic(name: str, run: Run) -> dict[str, Any]:
    cursor = run.ctx.get("cursor", 0)
    attempt = max(run.ctx.get("attempt", 0), 1)
    reset = run.ctx.get("reset", 0)
    return {
        "scheduled": scheduled(),
        "sent": sent(cursor, attempt, reset),
        "failed": failed(cursor, attempt=attempt, reset=reset),
        "reply_received": {"channel": "email"},
        "resume_requested": {"requested_by": "user-17"},
        "cancel_requested": {"requested_by": "user-17", "reason": "lead converted"},
        "timer_step_due": {},
        "timer_retry_due": {},
        "effect_suppressed": suppressed(cursor, reset),
    }[name]


ALL_IGNORED = {t: (I, None) for t in TRIGGERS}
ENDS = {"reply_received": (A, S.REPLIED), "cancel_requested": (A, S.CANCELLED)}
TABLE: dict[str, dict[str, tuple[Outcome, str | None]]] = {
    S.NEW: {"scheduled": (A, S.WAITING), **{t: (P, None) for t in TRIGGERS if t != "scheduled"}},
    S.WAITING: {
        "scheduled": (I, None),
        "sent": (P, None),
        "failed": (P, None),
        "resume_requested": (I, None),
        **ENDS,
        "timer_step_due": (A, S.SENDING),
        "timer_retry_due": (I, None),
        "effect_suppressed": (I, None),
    },
    S.SENDING: {
        "scheduled": (I, None),
        "sent": (A, S.WAITING),
        "failed": (A, S.RETRY_WAIT),
        "resume_requested": (I, None),
        **ENDS,
        "timer_step_due": (I, None),
        "timer_retry_due": (I, None),
        "effect_suppressed": (A, S.WAITING),
    },
    S.RETRY_WAIT: {
        "scheduled": (I, None),
        "sent": (A, S.WAITING),
        "failed": (P, None),
        "resume_requested": (I, None),
        **ENDS,
        "timer_step_due": (I, None),
        "timer_retry_due": (A, S.SENDING),
        "effect_suppressed": (I, None),
    },
    S.NEEDS_ATTENTION: {
        "scheduled": (I, None),
        "sent": (I, None),
        "failed": (I, None),
        "resume_requested": (A, S.SENDING),
        **ENDS,
        "timer_step_due": (I, None),
        "timer_retry_due": (I, None),
        "effect_suppressed": (I, None),
    },
    **{s: ALL_IGNORED for s in DEFINITION.terminal},
}


def test_trigger_lists_match_the_definition() -> None:
    check_table_covers(DEFINITION, TABLE, S, EXTERNAL, INTERNAL)
    assert set(TABLE) == set(BUILDERS)
    assert DEFINITION.waits_for_operator == {S.NEEDS_ATTENTION}
    assert S.NEEDS_ATTENTION not in DEFINITION.terminal


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", list(S))
def test_state_trigger_table(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    assert run.state == (state if state != S.NEW else "")
    ev = event(trigger, realistic(trigger, run), T0)
    d = check_table_cell(run, ev, TABLE[state][trigger], T0 + timedelta(minutes=1))
    assert d.trigger == trigger
    assert d.from_state == (run.state or (S.NEW if d.outcome is A else ""))
    if d.outcome is not A:
        assert d.timers_cancelled == []
        assert not d.cancel_all_timers


@pytest.mark.parametrize("state", sorted(DEFINITION.terminal))
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_terminal_states_ignore_everything(state: str, trigger: str) -> None:
    run = BUILDERS[S(state)]()
    d = run.step(trigger, realistic(trigger, run))
    assert (d.outcome, d.to_state, d.reason) == (I, state, f"instance is {state}")


# ---- scheduled and the real timers ------------------------------------------------------------------------
def test_scheduled_sets_the_first_step_timer_from_the_event_timestamp() -> None:
    run = Run()
    at = T0 - timedelta(minutes=5)
    d = run.do("scheduled", scheduled(), at=at)
    assert (d.from_state, d.to_state, d.version) == (S.NEW, S.WAITING, 1)
    assert d.timers_set == [TimerRequest("step_due", at + timedelta(days=1), {})]
    ctx = d.context
    assert (ctx["owner_id"], ctx["steps"], ctx["cursor"], ctx["attempt"], ctx["reset"]) == ("user-17", STEPS, 0, 0, 0)
    assert kinds(d) == [("lifecycle", "workflow.started.follow_up")]
    assert d.outgoing[0].body["data"] == {"start_event_type": "follow_up.scheduled"}
    assert schema_errors(d.outgoing[0]) == []


def test_24h_72h_7d_steps_are_durable_timers_relative_to_the_previous_send() -> None:
    run = in_waiting()
    dues = []
    now = T0
    for i in range(3):
        now = now + timedelta(seconds=STEPS[i]["delay_seconds"])
        d = run.do("timer_step_due", now=now)
        assert d.outgoing[0].body["data"] == {"step": i, "template": STEPS[i]["template"], "reset": 0}
        sent_at = now + timedelta(seconds=5)
        d = run.do("sent", sent(i, 1), now=sent_at)
        if i < 2:
            dues.append(d.timers_set[0].due_at - sent_at)
    assert dues == [timedelta(days=3), timedelta(days=7)]
    assert run.state == S.COMPLETED and run.ctx["sent"] == 3


def test_step_due_sends_the_current_step_once() -> None:
    run = in_waiting()
    d = run.do("timer_step_due", now=T0 + timedelta(days=1))
    assert d.to_state == S.SENDING
    (m,) = d.outgoing
    assert (m.kind, m.routing_key, m.effect_key) == ("command", "follow_up.send", send_effect(0))
    b = m.body
    assert (b["idempotency_key"], b["attempt"], b["kind"]) == (send_key(0), 1, "command")
    assert (b["tenant_id"], b["entity_id"], b["workflow"], b["correlation_id"]) == (
        TENANT,
        ENTITY,
        "follow_up",
        CORRELATION,
    )
    assert b["data"] == {"step": 0, "template": "follow-up-24h", "reset": 0}
    assert schema_errors(m) == []
    assert d.context["attempt"] == 1


def test_sent_for_the_last_step_completes() -> None:
    run = in_sending(STEPS[:1])
    d = run.do("sent", sent(0))
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.COMPLETED, True, True)
    assert kinds(d) == [("lifecycle", "workflow.completed.follow_up")]
    assert d.outgoing[0].body["data"] == {"final_state": "completed"}


def test_a_future_step_report_is_parked_and_a_past_one_ignored() -> None:
    run = in_sending()
    assert run.step("sent", sent(1)).outcome is P
    run.do("sent", sent(0, 1))
    run.do("timer_step_due")
    d = run.step("sent", sent(0, 1))
    assert d.outcome is I and "already done" in d.reason


# ---- effect key: each (tenant, lead, step) sent at most once ---------------------------------------------------
def test_a_suppressed_send_counts_as_sent_and_moves_on() -> None:
    run = in_sending()
    d = run.do("effect_suppressed", suppressed(0))
    assert (d.to_state, d.context["cursor"], d.context["suppressed"], d.context["sent"]) == (S.WAITING, 1, 0 + 1, 0)
    assert d.outgoing == [] and d.notes["effect_key"] == send_effect(0)
    assert d.timers_set == [TimerRequest("step_due", T0 + timedelta(days=3), {})]


def test_a_suppressed_last_send_completes() -> None:
    assert in_sending(STEPS[:1]).do("effect_suppressed", suppressed(0)).to_state == S.COMPLETED


def test_a_suppression_about_another_key_is_ignored() -> None:
    d = in_sending().step("effect_suppressed", suppressed(1))
    assert d.outcome is I


def test_keys_differ_per_lead_and_step() -> None:
    run = in_waiting()
    other = InstanceKey(TENANT, "follow_up", "lead-1094")
    a = ENGINE.step(WF, KEY, run.view, event("timer_step_due"), T0).outgoing[0]
    b = ENGINE.step(WF, other, run.view, event("timer_step_due"), T0).outgoing[0]
    assert a.effect_key != b.effect_key and a.body["idempotency_key"] != b.body["idempotency_key"]


# ---- retries ---------------------------------------------------------------------------------------------------
def test_a_retryable_failure_waits_then_resends_with_the_same_key_and_attempt_2() -> None:
    run = in_sending()
    first = run.view
    now = T0 + timedelta(seconds=1)
    d = run.do("failed", failed(0, attempt=1), now=now)
    delay = RETRY.delay_s(1, send_key(0))
    assert (d.to_state, d.outgoing) == (S.RETRY_WAIT, [])
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay), {})]
    d = run.do("timer_retry_due")
    (m,) = d.outgoing
    assert (m.body["idempotency_key"], m.body["attempt"], m.effect_key) == (send_key(0), 2, None)
    assert m.body["data"] == {"step": 0, "template": "follow-up-24h", "reset": 0}
    assert first is not None and first.context["attempt"] == 1
    assert d.notes == {"retry_attempt": 2}


def test_sent_during_the_retry_wait_cancels_the_retry_timer() -> None:
    d = in_retry_wait().do("sent", sent(0, 1))
    assert d.to_state == S.WAITING and "retry_due" in d.timers_cancelled


def _exhaust(run: Run, step: int = 0, reset: int = 0) -> tuple[list[OutgoingMessage], Decision]:
    commands: list[OutgoingMessage] = []
    for attempt in (1, 2):
        assert run.do("failed", failed(step, attempt=attempt, reset=reset)).to_state == S.RETRY_WAIT
        commands += run.do("timer_retry_due").outgoing
    return commands, run.do("failed", failed(step, attempt=3, reset=reset))


def _assert_reset(d: Decision, step: int, reason_part: str) -> None:
    assert (d.to_state, d.terminal, d.cancel_all_timers, d.timers_set) == (S.NEEDS_ATTENTION, False, False, [])
    assert kinds(d) == [
        ("compensation", "follow_up.reset_step"),
        ("compensation", "follow_up.notify_owner"),
        ("lifecycle", "workflow.compensated.follow_up"),
    ]
    reset, notify, compensated = d.outgoing
    assert reset.body["kind"] == notify.body["kind"] == "compensation"
    assert reset.body["data"] == {"step": step}
    assert notify.body["data"]["owner_id"] == "user-17"
    assert reason_part in notify.body["data"]["reason"]
    assert compensated.body["data"] == {"compensations": ["follow_up.reset_step", "follow_up.notify_owner"]}
    assert compensated.body["state"] == "needs_attention"
    assert d.context["cursor"] == step  # it waits on the reset step
    for m in d.outgoing:
        assert schema_errors(m) == [], m.routing_key


def test_retries_exhausted_reset_the_step_notify_the_owner_and_wait_for_an_operator() -> None:
    run = in_sending()
    retries, d = _exhaust(run)
    assert [(m.body["idempotency_key"], m.body["attempt"]) for m in retries] == [(send_key(0), 2), (send_key(0), 3)]
    _assert_reset(d, 0, "failed after 3 attempts (provider_timeout)")
    assert d.context["resets"] == 1 and d.context["failure"]["error_code"] == "provider_timeout"


def test_a_fatal_failure_resets_at_once() -> None:
    run = in_sending()
    run.do("sent", sent(0, 1))
    run.do("timer_step_due")
    d = run.do("failed", failed(1, False, "template_rejected", attempt=1))
    _assert_reset(d, 1, "step 1 (follow-up-72h) failed: template_rejected")


# ---- the operator's resume: a new send of the reset step --------------------------------------------------------
def test_resume_resends_the_reset_step_under_a_key_with_the_reset_count() -> None:
    run = in_needs_attention()
    d = run.do("resume_requested", {"requested_by": "user-17"})
    assert d.to_state == S.SENDING
    (m,) = d.outgoing
    assert (m.kind, m.routing_key) == ("command", "follow_up.send")
    assert m.effect_key == send_effect(0, 1) != send_effect(0)
    assert (m.body["idempotency_key"], m.body["attempt"]) == (send_key(0, 1), 1)
    assert m.body["data"] == {"step": 0, "template": "follow-up-24h", "reset": 1}
    assert schema_errors(m) == []
    assert d.notes == {"resumed_by": "user-17", "reset": 1}
    # a second failure and resume: reset 2, keys again new
    run.do("failed", failed(0, False, "template_rejected", attempt=1, reset=1))
    m2 = run.do("resume_requested", {"requested_by": "user-17"}).outgoing[0]
    assert (m2.effect_key, m2.body["idempotency_key"]) == (send_effect(0, 2), send_key(0, 2))
    # the step goes through: the next step's keys are plain again
    run.do("sent", sent(0, 1, 2))
    m3 = run.do("timer_step_due").outgoing[0]
    assert (m3.effect_key, m3.body["idempotency_key"], m3.body["data"]["reset"]) == (send_effect(1), send_key(1), 0)
    assert run.ctx["resets"] == 2


def test_retries_after_a_resume_keep_the_reset_key() -> None:
    run = in_needs_attention()
    run.do("resume_requested", {"requested_by": "user-17"})
    retries, d = _exhaust(run, 0, 1)
    assert [(m.body["idempotency_key"], m.body["attempt"], m.effect_key) for m in retries] == [
        (send_key(0, 1), 2, None),
        (send_key(0, 1), 3, None),
    ]
    _assert_reset(d, 0, "after 3 attempts")
    assert d.outgoing[0].body["idempotency_key"].endswith(":reset:2:compensate")


@pytest.mark.parametrize("builder", [in_waiting, in_sending, in_retry_wait])
def test_resume_when_nothing_waits_for_it_is_ignored_not_parked(builder) -> None:
    run = builder()
    d = run.step("resume_requested", {"requested_by": "user-17"})
    assert d.outcome is I and "nothing to resume" in d.reason


@pytest.mark.parametrize("name", ["sent", "failed"])
def test_reports_while_waiting_for_an_operator_are_ignored(name: str) -> None:
    run = in_needs_attention()
    data = sent(0, 1) if name == "sent" else failed(0, attempt=1)
    d = run.step(name, data)
    assert d.outcome is I and "waits for an operator" in d.reason


@pytest.mark.parametrize("name", ["sent", "failed"])
def test_a_report_from_before_the_reset_is_ignored_after_the_resume(name: str) -> None:
    run = in_needs_attention()
    run.do("resume_requested", {"requested_by": "user-17"})
    data = sent(0, 1, reset=0) if name == "sent" else failed(0, False, attempt=1, reset=0)
    d = run.step(name, data)
    assert d.outcome is I and "before its reset" in d.reason


@pytest.mark.parametrize("name", ["sent", "failed"])
def test_a_report_about_an_older_attempt_is_ignored(name: str) -> None:
    run = in_retry_wait()
    run.do("timer_retry_due")
    data = sent(0, 1) if name == "sent" else failed(0, attempt=1)
    d = run.step(name, data)
    assert d.outcome is I and "superseded" in d.reason


# ---- the ends -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("state", [S.WAITING, S.SENDING, S.RETRY_WAIT, S.NEEDS_ATTENTION])
def test_a_reply_ends_it_from_every_active_state(state: S) -> None:
    d = BUILDERS[state]().do("reply_received", {"channel": "email"})
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.REPLIED, True, True)
    assert kinds(d) == [("lifecycle", "workflow.completed.follow_up")]
    assert d.outgoing[0].body["data"] == {"final_state": "replied"}


def test_an_operator_may_cancel_instead_of_resuming() -> None:
    d = in_needs_attention().do("cancel_requested", {"requested_by": "user-17"})
    assert (d.to_state, d.terminal) == (S.CANCELLED, True)
    assert d.notes == {"ended_by": "cancel_requested", "requested_by": "user-17"}


# ---- purity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", [S.WAITING, S.SENDING, S.RETRY_WAIT, S.NEEDS_ATTENTION])
def test_same_inputs_give_equal_decisions_and_do_not_mutate(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    check_deterministic(run, event(trigger, realistic(trigger, run)), T0 + timedelta(hours=1))
