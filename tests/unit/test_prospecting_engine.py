"""`Engine.step` on the `prospecting` definition: the full state x trigger table, approval gate, crm_sync
effect key, retries, the operator's decisions in step_failed, cancel and its compensation (pure, no I/O)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from sfworkflow.core.definition import EngineEvent, InstanceKey, InstanceView, TimerRequest
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows.prospecting import DEFINITION, RETRY, S, is_outreach
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
    lifecycle_types,
    of_kind,
    schema_errors,
)

WF = enginekit.workflow(DEFINITION)

ENTITY = "run-42"
KEY = InstanceKey(TENANT, "prospecting", ENTITY)
CORRELATION = "corr-run-42"
LEAD = "lead-1093"
STEPS = ["qualification", "email_outreach", "linkedin_connection", "crm_sync"]
CRM_KEY = f"prospecting.crm_sync:{TENANT}:{LEAD}"
CRM_REGISTER = f"prospecting.crm_synced:{TENANT}:{LEAD}"

EXTERNAL = ("started", "step_completed", "step_failed", "approval_granted", "cancel_requested", "retry_requested")
INTERNAL = ("timer_retry_due", "effect_suppressed", "lookup_result")
TRIGGERS = EXTERNAL + INTERNAL


def ikey(step: str) -> str:
    return f"{TENANT}:prospecting:{ENTITY}:step:{step}"


# ---- driving the engine ---------------------------------------------------------------------------
def started(steps: list[str] | None = None, lead: str = LEAD) -> dict[str, Any]:
    return {"lead_id": lead, "steps": list(STEPS if steps is None else steps)}


def completed(step: str, attempt: int | None = None) -> dict[str, Any]:
    return {"step": step} if attempt is None else {"step": step, "attempt": attempt}


def failed(step: str, retryable: bool = True, attempt: int | None = None, code: str = "provider_timeout") -> dict:
    return enginekit.with_optional({"step": step, "error_code": code, "retryable": retryable}, attempt=attempt)


def approval(token: str = "apr-1") -> dict[str, Any]:
    return {"approval_token": token, "granted_by": "user-12"}


def suppressed(key: str = CRM_KEY, command_type: str = "prospecting.run_step") -> dict[str, Any]:
    return {"effect_key": key, "command_type": command_type, "command_id": "8c7e0d4e-0000-4000-8000-000000000001"}


def lookup(value: Any = None, key: str = CRM_REGISTER, name: str = "crm_synced") -> dict[str, Any]:
    return {"name": name, "key": key, "value": value}


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0) -> EngineEvent:
    return enginekit.event(DEFINITION, name, data, at, correlation=CORRELATION)


class Run(enginekit.Run):
    """One `prospecting` instance (`KEY`) driven event by event, a second apart unless told `now`."""

    def __init__(self) -> None:
        super().__init__(DEFINITION, KEY, correlation=CORRELATION, tick=timedelta(seconds=1))


def in_new() -> Run:
    return Run()


def in_running(steps: list[str] | None = None) -> Run:
    r = Run()
    r.do("started", started(steps))
    return r


def in_awaiting_approval() -> Run:
    r = in_running()
    r.do("step_completed", completed("qualification", 1))
    return r


def in_retry_wait() -> Run:
    r = in_running()
    r.do("step_failed", failed("qualification", attempt=1))
    return r


def in_step_failed() -> Run:
    r = in_running()
    r.do("step_failed", failed("qualification", retryable=False, attempt=1, code="lead_invalid"))
    return r


def in_completed() -> Run:
    r = in_running(["qualification"])
    r.do("step_completed", completed("qualification", 1))
    return r


def in_cancelled() -> Run:
    r = in_running()
    r.do("cancel_requested", {"requested_by": "user-1"})
    return r


BUILDERS = {
    S.NEW: in_new,
    S.RUNNING: in_running,
    S.AWAITING_APPROVAL: in_awaiting_approval,
    S.RETRY_WAIT: in_retry_wait,
    S.STEP_FAILED: in_step_failed,
    S.COMPLETED: in_completed,
    S.CANCELLED: in_cancelled,
}


def realistic(name: str, run: Run) -> dict[str, Any]:
    """Data for `name` that refers to the run's current step and attempt."""
    steps = run.ctx.get("steps", STEPS)
    current = steps[run.ctx.get("cursor", 0)]
    attempt = max(run.ctx.get("attempt", 0), 1)
    return {
        "started": started(),
        "step_completed": completed(current, attempt),
        "step_failed": failed(current, attempt=attempt),
        "approval_granted": approval(),
        "cancel_requested": {"requested_by": "user-1"},
        "retry_requested": {"requested_by": "user-1"},
        "timer_retry_due": {},
        "effect_suppressed": suppressed(),
        "lookup_result": lookup(),
    }[name]


# ---- the state x trigger table -------------------------------------------------------------------
ALL_IGNORED = {t: (I, None) for t in TRIGGERS}
TABLE: dict[str, dict[str, tuple[Outcome, str | None]]] = {
    S.NEW: {"started": (A, S.RUNNING), **{t: (P, None) for t in TRIGGERS if t != "started"}},
    S.RUNNING: {
        "started": (I, None),
        "step_completed": (A, S.AWAITING_APPROVAL),
        "step_failed": (A, S.RETRY_WAIT),
        "approval_granted": (A, "same"),
        "cancel_requested": (A, S.CANCELLED),
        "retry_requested": (I, None),
        "timer_retry_due": (I, None),
        "effect_suppressed": (I, None),  # the current step is not crm_sync
        "lookup_result": (I, None),  # no lookup is pending
    },
    S.AWAITING_APPROVAL: {
        "started": (I, None),
        "step_completed": (P, None),  # the outreach step was not issued yet
        "step_failed": (P, None),
        "approval_granted": (A, S.RUNNING),
        "cancel_requested": (A, S.CANCELLED),
        "retry_requested": (I, None),
        "timer_retry_due": (I, None),
        "effect_suppressed": (I, None),
        "lookup_result": (I, None),
    },
    S.RETRY_WAIT: {
        "started": (I, None),
        "step_completed": (A, S.AWAITING_APPROVAL),  # a late success of the failed attempt
        "step_failed": (I, None),  # no attempt is outstanding
        "approval_granted": (A, "same"),
        "cancel_requested": (A, S.CANCELLED),
        "retry_requested": (I, None),
        "timer_retry_due": (A, S.RUNNING),
        "effect_suppressed": (I, None),
        "lookup_result": (I, None),
    },
    S.STEP_FAILED: {
        "started": (I, None),
        "step_completed": (A, S.AWAITING_APPROVAL),
        "step_failed": (I, None),
        "approval_granted": (A, "same"),
        "cancel_requested": (A, S.CANCELLED),
        "retry_requested": (A, S.RUNNING),
        "timer_retry_due": (I, None),
        "effect_suppressed": (I, None),
        "lookup_result": (I, None),
    },
    S.COMPLETED: ALL_IGNORED,
    S.CANCELLED: ALL_IGNORED,
}


def test_trigger_lists_match_the_definition() -> None:
    check_table_covers(DEFINITION, TABLE, S, EXTERNAL, INTERNAL)
    assert DEFINITION.waits_for_operator == {S.AWAITING_APPROVAL, S.STEP_FAILED}
    assert DEFINITION.terminal == {S.COMPLETED, S.CANCELLED}
    assert (DEFINITION.retry.max_attempts, DEFINITION.retry.base_s, DEFINITION.retry.cap_s) == (3, 1.0, 60.0)


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


@pytest.mark.parametrize("trigger", [t for t in TRIGGERS if t != "started"])
def test_events_before_the_run_exists_are_parked(trigger: str) -> None:
    d = ENGINE.step(WF, KEY, None, event(trigger, realistic(trigger, Run())), T0)
    assert (d.outcome, d.version, d.reason) == (P, 0, "instance does not exist yet")


@pytest.mark.parametrize("builder", [in_running, in_awaiting_approval, in_retry_wait, in_step_failed])
def test_second_started_is_ignored(builder) -> None:
    run = builder()
    d = run.step("started", started(["crm_sync"], lead="other"))
    assert (d.outcome, d.reason) == (I, "instance already started")
    assert run.ctx["steps"] == STEPS and run.ctx["lead_id"] == LEAD


def test_outreach_step_names() -> None:
    assert [is_outreach(s) for s in ["whatsapp_outreach", "email_outreach", "linkedin_connection"]] == [True] * 3
    assert [is_outreach(s) for s in ["qualification", "crm_sync", "outreach_review", "linkedin"]] == [False] * 4


# ---- happy path ----------------------------------------------------------------------------------
def test_happy_path_waits_for_approval_before_the_first_outreach_step_only() -> None:
    run = Run()
    d = run.do("started", started())
    assert (d.from_state, d.to_state) == (S.NEW, S.RUNNING)
    (cmd,) = of_kind(d, "command")
    assert lifecycle_types(d) == ["workflow.started"]
    assert of_kind(d, "lifecycle")[0].body["data"] == {"start_event_type": "prospecting.started"}
    b = cmd.body
    assert cmd.routing_key == "prospecting.run_step" and cmd.effect_key is None
    assert (b["command_type"], b["kind"], b["attempt"], b["idempotency_key"]) == (
        "prospecting.run_step",
        "command",
        1,
        ikey("qualification"),
    )
    assert (b["tenant_id"], b["entity_id"], b["workflow"], b["correlation_id"]) == (
        TENANT,
        ENTITY,
        "prospecting",
        CORRELATION,
    )
    assert b["data"] == {"step": "qualification", "lead_id": LEAD}
    assert all(schema_errors(m) == [] for m in d.outgoing)
    ctx = d.context
    assert (ctx["cursor"], ctx["attempt"], ctx["approved"], ctx["issued"]) == (0, 1, False, 1)

    d = run.do("step_completed", completed("qualification", 1))
    assert (d.to_state, d.outgoing) == (S.AWAITING_APPROVAL, [])
    assert d.notes == {"awaiting_approval_for": "email_outreach"}
    assert (d.context["cursor"], d.context["attempt"], d.context["completed_steps"]) == (1, 0, ["qualification"])

    d = run.do("approval_granted", approval("apr-77"))
    assert d.to_state == S.RUNNING
    (cmd,) = d.outgoing
    assert cmd.body["data"] == {"step": "email_outreach", "lead_id": LEAD, "approval_token": "apr-77"}
    assert cmd.body["idempotency_key"] == ikey("email_outreach")
    assert schema_errors(cmd) == []

    # The second outreach step does not stop at the gate again; it carries the same token.
    d = run.do("step_completed", completed("email_outreach", 1))
    assert d.to_state == S.RUNNING
    (cmd,) = d.outgoing
    assert cmd.body["data"] == {"step": "linkedin_connection", "lead_id": LEAD, "approval_token": "apr-77"}

    d = run.do("step_completed", completed("linkedin_connection", 1))
    # crm_sync: first the register says whether the lead was synced before (answered in the same transaction).
    assert (d.to_state, d.outgoing, d.requests.lookups) == (S.RUNNING, [], [("crm_synced", CRM_REGISTER)])
    assert (d.context["crm_lookup"], d.context["attempt"]) == (True, 0)
    d = run.do("lookup_result", lookup(None))
    assert (d.from_state, d.to_state) == (S.RUNNING, S.RUNNING)
    (cmd,) = d.outgoing
    assert cmd.body["data"] == {"step": "crm_sync", "lead_id": LEAD}
    assert "crm_lookup" not in d.context
    assert cmd.effect_key == CRM_KEY
    assert d.context["crm_effect_key"] == CRM_KEY

    d = run.do("step_completed", completed("crm_sync", 1))
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.COMPLETED, True, True)
    assert d.requests.remember == {CRM_REGISTER: {"run_id": ENTITY, "synced_at": run.now.isoformat()}}
    assert lifecycle_types(d) == ["workflow.completed"]
    assert of_kind(d, "lifecycle")[0].body["data"] == {"final_state": "completed"}
    assert d.context["completed_steps"] == STEPS
    assert d.context["issued"] == 4


def test_steps_without_outreach_never_wait_for_approval() -> None:
    run = in_running(["qualification", "crm_sync"])
    d = run.do("step_completed", completed("qualification"))
    assert d.to_state == S.RUNNING and d.requests.lookups == [("crm_synced", CRM_REGISTER)]
    d = run.do("lookup_result", lookup())
    assert d.outgoing[0].body["data"]["step"] == "crm_sync"


def test_first_step_outreach_waits_for_approval_at_once() -> None:
    run = Run()
    d = run.do("started", started(["whatsapp_outreach", "crm_sync"]))
    assert (d.to_state, of_kind(d, "command"), lifecycle_types(d)) == (S.AWAITING_APPROVAL, [], ["workflow.started"])
    assert d.context["issued"] == 0
    d = run.do("approval_granted", approval("t-1"))
    (cmd,) = d.outgoing
    assert cmd.body["data"] == {"step": "whatsapp_outreach", "lead_id": LEAD, "approval_token": "t-1"}


@pytest.mark.parametrize("builder", [in_running, in_retry_wait, in_step_failed])
def test_an_approval_before_the_gate_is_recorded_and_the_run_does_not_stop(builder) -> None:
    run = builder()
    state = run.state
    d = run.do("approval_granted", approval("early"))
    assert (d.to_state, d.outgoing, d.timers_set) == (state, [], [])
    assert d.notes["approved_early"] is True
    assert (d.context["approved"], d.context["approval_token"]) == (True, "early")
    d = run.do("step_completed", completed("qualification", 1))
    assert d.to_state == S.RUNNING
    assert d.outgoing[0].body["data"] == {"step": "email_outreach", "lead_id": LEAD, "approval_token": "early"}


@pytest.mark.parametrize("builder", [in_running, in_awaiting_approval])
def test_a_second_approval_is_ignored(builder) -> None:
    run = builder()
    run.do("approval_granted", approval("first"))
    d = run.step("approval_granted", approval("second"))
    assert (d.outcome, d.reason) == (I, "the run is approved already")
    assert run.ctx["approval_token"] == "first"


# ---- crm_sync effect key -------------------------------------------------------------------------------
def _at_crm_sync(steps: list[str], lookup_answered: bool = True) -> Run:
    run = in_running(steps)
    for s in steps[: steps.index("crm_sync")]:
        if run.state == S.AWAITING_APPROVAL:
            run.do("approval_granted", approval())
        run.do("step_completed", completed(s, 1))
    assert run.state == S.RUNNING and run.ctx["steps"][run.ctx["cursor"]] == "crm_sync"
    if lookup_answered:
        run.do("lookup_result", lookup(None))
    return run


def test_crm_sync_suppressed_is_treated_as_done() -> None:
    run = _at_crm_sync(["qualification", "crm_sync"])
    d = run.do("effect_suppressed", suppressed())
    assert (d.to_state, d.terminal) == (S.COMPLETED, True)
    assert d.context["suppressed_steps"] == ["crm_sync"]
    assert d.context["completed_steps"] == ["qualification"]
    assert d.notes == {"suppressed_step": "crm_sync", "effect_key": CRM_KEY}
    assert "crm_effect_key" not in d.context  # the key is the other run's
    assert lifecycle_types(d) == ["workflow.completed"]


def test_crm_sync_suppressed_in_the_middle_runs_the_next_step() -> None:
    run = _at_crm_sync(["crm_sync", "email_outreach"])
    d = run.do("effect_suppressed", suppressed())
    assert d.to_state == S.AWAITING_APPROVAL
    run.do("approval_granted", approval())
    run = _at_crm_sync(["crm_sync", "qualification"])
    d = run.do("effect_suppressed", suppressed())
    assert d.to_state == S.RUNNING and d.outgoing[0].body["data"]["step"] == "qualification"


def test_suppression_of_another_command_or_step_is_ignored() -> None:
    run = _at_crm_sync(["qualification", "crm_sync"])
    d = run.step("effect_suppressed", suppressed(command_type="prospecting.other"))
    assert d.outcome is I
    run = in_running()
    assert run.step("effect_suppressed", suppressed()).outcome is I


def test_only_the_first_crm_sync_attempt_carries_the_effect_key() -> None:
    run = _at_crm_sync(["qualification", "crm_sync"])
    run.do("step_failed", failed("crm_sync", attempt=1, code="crm_unavailable"))
    d = run.do("timer_retry_due")
    (cmd,) = d.outgoing
    assert (cmd.effect_key, cmd.body["attempt"], cmd.body["idempotency_key"]) == (None, 2, ikey("crm_sync"))


def test_crm_effect_key_is_per_tenant_and_lead_not_per_run() -> None:
    a = _at_crm_sync(["qualification", "crm_sync"])
    other_key = InstanceKey(TENANT, "prospecting", "run-43")
    ev = event("step_completed", completed("qualification", 1), T0)
    view = in_running(["qualification", "crm_sync"]).view
    b = ENGINE.step(WF, other_key, view, ev, T0)
    assert b.requests.lookups == [("crm_synced", CRM_REGISTER)]
    view = InstanceView(other_key, b.to_state, b.context, b.version, 1)
    b = ENGINE.step(WF, other_key, view, event("lookup_result", lookup(None)), T0)
    assert b.outgoing[0].effect_key == CRM_KEY == a.ctx["crm_effect_key"]
    assert b.outgoing[0].body["idempotency_key"] != ikey("crm_sync")


# ---- retries ----------------------------------------------------------------------------------------
def test_retryable_failure_waits_for_backoff_and_publishes_retry_step() -> None:
    run = in_running()
    now = T0 + timedelta(seconds=5)
    d = run.do("step_failed", failed("qualification", attempt=1), now=now)
    assert (d.to_state, of_kind(d, "command")) == (S.RETRY_WAIT, [])
    delay = RETRY.delay_s(1, ikey("qualification"))
    assert 0.8 <= delay <= 1.2
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay), {})]
    (comp,) = of_kind(d, "compensation")
    assert comp.routing_key == "prospecting.retry_step"
    assert comp.body["data"] == {"step": "qualification", "attempt": 2, "error_code": "provider_timeout"}
    assert comp.body["idempotency_key"] == f"{TENANT}:prospecting:{ENTITY}:retry_step:qualification:2"
    assert comp.body["kind"] == "compensation"
    assert schema_errors(comp) == []
    assert d.context["last_error"] == {"step": "qualification", "error_code": "provider_timeout", "attempt": 1}


def test_retries_reissue_the_same_key_with_attempt_plus_one_until_exhausted() -> None:
    run = in_running()
    first = run.ctx
    assert first["attempt"] == 1
    commands, retry_steps = [], []
    for attempt in (1, 2):
        d = run.do("step_failed", failed("qualification", attempt=attempt))
        retry_steps += of_kind(d, "compensation")
        d = run.do("timer_retry_due")
        assert d.to_state == S.RUNNING and d.notes["retry_attempt"] == attempt + 1
        commands += d.outgoing
    assert [c.body["attempt"] for c in commands] == [2, 3]
    assert {c.body["idempotency_key"] for c in commands} == {ikey("qualification")}
    assert len({c.message_id for c in commands}) == 2
    assert [c.body["data"]["attempt"] for c in retry_steps] == [2, 3]
    d = run.do("step_failed", failed("qualification", attempt=3))
    assert (d.to_state, d.outgoing, d.timers_set) == (S.STEP_FAILED, [], [])
    assert d.notes["failure"] == "step qualification failed after 3 attempts (provider_timeout)"
    assert run.ctx["retries"] == 2
    assert S.STEP_FAILED in DEFINITION.waits_for_operator


def test_non_retryable_failure_waits_for_an_operator_at_once() -> None:
    run = in_running()
    d = run.do("step_failed", failed("qualification", retryable=False, attempt=1, code="lead_invalid"))
    assert (d.to_state, d.outgoing, d.timers_set) == (S.STEP_FAILED, [], [])
    assert d.notes["failure"] == "step qualification failed: lead_invalid"


def test_late_success_in_retry_wait_cancels_the_retry_timer() -> None:
    run = in_retry_wait()
    d = run.do("step_completed", completed("qualification", 1))
    assert d.timers_cancelled == ["retry_due"]
    assert d.context["last_error"] is None and "retry_due_at" not in d.context


@pytest.mark.parametrize("trigger", ["step_completed", "step_failed"])
def test_reports_about_an_older_attempt_or_earlier_step_are_stale(trigger: str) -> None:
    run = in_retry_wait()
    run.do("timer_retry_due")  # attempt 2 of qualification is out
    data = completed("qualification", 1) if trigger == "step_completed" else failed("qualification", attempt=1)
    d = run.step(trigger, data)
    assert d.outcome is I and "superseded by attempt 2" in d.reason
    run.do("step_completed", completed("qualification", 2))
    run.do("approval_granted", approval())
    data = completed("qualification", 2) if trigger == "step_completed" else failed("qualification", attempt=2)
    d = run.step(trigger, data)
    assert d.outcome is I and "already done" in d.reason


@pytest.mark.parametrize("trigger", ["step_completed", "step_failed"])
def test_a_report_about_a_step_the_run_does_not_have_is_ignored(trigger: str) -> None:
    run = in_running()
    data = completed("sms_outreach") if trigger == "step_completed" else failed("sms_outreach")
    d = run.step(trigger, data)
    assert d.outcome is I and "not a step of this run" in d.reason


def test_a_report_about_a_later_step_is_parked() -> None:
    run = in_running()
    d = run.step("step_completed", completed("crm_sync", 1))
    assert d.outcome is P


# ---- the operator's decisions in step_failed --------------------------------------------------------
def test_retry_requested_runs_the_failed_step_again_with_the_next_attempt() -> None:
    run = in_step_failed()
    d = run.do("retry_requested", {"requested_by": "ops-1"})
    assert d.to_state == S.RUNNING
    (cmd,) = d.outgoing
    assert (cmd.body["attempt"], cmd.body["idempotency_key"]) == (2, ikey("qualification"))
    assert d.notes == {"retry_attempt": 2, "retry_requested_by": "ops-1"}
    # Manual retries are one attempt each: past the automatic budget a failure waits for a person again.
    run = in_retry_wait()
    run.do("timer_retry_due")
    run.do("step_failed", failed("qualification", attempt=2))
    run.do("timer_retry_due")
    run.do("step_failed", failed("qualification", attempt=3))
    assert run.state == S.STEP_FAILED
    d = run.do("retry_requested", {"requested_by": "ops-1"})
    assert d.outgoing[0].body["attempt"] == 4
    d = run.do("step_failed", failed("qualification", attempt=4))
    assert (d.to_state, of_kind(d, "compensation")) == (S.STEP_FAILED, [])


@pytest.mark.parametrize("builder", [in_running, in_awaiting_approval, in_retry_wait])
def test_retry_requested_outside_step_failed_is_ignored(builder) -> None:
    run = builder()
    d = run.step("retry_requested", {"requested_by": "ops-1"})
    assert d.outcome is I and "nothing to retry" in d.reason


def test_cancel_in_step_failed_compensates_and_reports_the_failure() -> None:
    run = in_step_failed()
    d = run.do("cancel_requested", {"requested_by": "ops-1"})
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.CANCELLED, True, True)
    (comp,) = of_kind(d, "compensation")
    assert comp.routing_key == "prospecting.cancel_run"
    assert comp.body["data"] == {
        "lead_id": LEAD,
        "requested_by": "ops-1",
        "step": "qualification",
        "completed_steps": [],
        "reason": "step qualification failed (lead_invalid); cancelled by ops-1",
    }
    assert comp.body["idempotency_key"] == f"{TENANT}:prospecting:{ENTITY}:cancel_run"
    assert lifecycle_types(d) == ["workflow.failed", "workflow.compensated", "workflow.completed"]
    failed_, compensated, _completed = of_kind(d, "lifecycle")
    assert failed_.body["data"] == {"reason": comp.body["data"]["reason"], "error_code": "lead_invalid"}
    assert compensated.body["data"] == {"compensations": ["prospecting.cancel_run"]}
    assert all(schema_errors(m) == [] for m in d.outgoing)


def test_cancel_while_running_compensates_without_a_failure() -> None:
    run = in_awaiting_approval()
    run.do("approval_granted", approval())
    d = run.do("cancel_requested", {"requested_by": "sdr-4", "reason": "lead asked to stop"})
    (comp,) = of_kind(d, "compensation")
    assert comp.body["data"] == {
        "lead_id": LEAD,
        "requested_by": "sdr-4",
        "step": "email_outreach",
        "completed_steps": ["qualification"],
        "reason": "lead asked to stop",
    }
    assert lifecycle_types(d) == ["workflow.compensated", "workflow.completed"]
    assert d.notes == {"cancelled_by": "sdr-4"}


def test_cancel_awaiting_approval_names_no_step_in_flight() -> None:
    run = in_awaiting_approval()
    d = run.do("cancel_requested", {"requested_by": "sdr-4"})
    assert of_kind(d, "compensation")[0].body["data"]["step"] is None


def test_cancel_in_retry_wait_drops_the_retry_timer() -> None:
    run = in_retry_wait()
    d = run.do("cancel_requested", {"requested_by": "sdr-4"})
    assert (d.cancel_all_timers, d.timers_set) == (True, [])
    assert of_kind(d, "compensation")[0].body["data"]["step"] == "qualification"


def test_cancel_before_any_step_ran_has_nothing_to_compensate() -> None:
    run = Run()
    run.do("started", started(["whatsapp_outreach"]))
    d = run.do("cancel_requested", {"requested_by": "sdr-4"})
    assert (d.to_state, of_kind(d, "compensation"), lifecycle_types(d)) == (S.CANCELLED, [], ["workflow.completed"])


@pytest.mark.parametrize("how", ["step_failed", "retry_wait"])
def test_cancel_after_crm_sync_failed_frees_its_effect_key(how: str) -> None:
    run = _at_crm_sync(["qualification", "crm_sync"])
    run.do("step_failed", failed("crm_sync", retryable=how == "retry_wait", attempt=1, code="crm_rejected"))
    assert run.state == how
    d = run.do("cancel_requested", {"requested_by": "ops-1"})
    assert d.requests.release_effects == [CRM_KEY]
    assert d.notes["released_effect"] is True
    assert "crm_effect_key" not in d.context


def test_cancel_while_crm_sync_is_in_flight_keeps_its_effect_key() -> None:
    run = _at_crm_sync(["qualification", "crm_sync"])
    d = run.do("cancel_requested", {"requested_by": "ops-1"})
    assert d.requests.release_effects == []


# ---- purity and determinism -----------------------------------------------------------------------
@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", [S.RUNNING, S.AWAITING_APPROVAL, S.RETRY_WAIT, S.STEP_FAILED])
def test_same_inputs_give_equal_decisions_and_do_not_mutate(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    check_deterministic(run, event(trigger, realistic(trigger, run)), T0 + timedelta(hours=1))


# ---- crm_sync register: synced before (possibly long ago) ----------------------------------------------
def test_a_lead_synced_before_skips_crm_sync_without_a_command() -> None:
    run = _at_crm_sync(["qualification", "crm_sync"], lookup_answered=False)
    synced = {"run_id": "run-1", "synced_at": "2026-01-02T03:04:05+00:00"}
    d = run.do("lookup_result", lookup(synced))
    assert (d.to_state, d.terminal) == (S.COMPLETED, True)
    assert of_kind(d, "command") == [] and not d.requests
    assert d.context["suppressed_steps"] == ["crm_sync"] and "crm_lookup" not in d.context
    assert d.notes == {"suppressed_step": "crm_sync", "synced_before": synced}


def test_a_lead_synced_before_in_the_middle_runs_the_next_step() -> None:
    run = _at_crm_sync(["crm_sync", "qualification"], lookup_answered=False)
    d = run.do("lookup_result", lookup({"run_id": "run-1"}))
    assert d.to_state == S.RUNNING and d.outgoing[0].body["data"] == {"step": "qualification", "lead_id": LEAD}
    run = _at_crm_sync(["crm_sync", "email_outreach"], lookup_answered=False)
    assert run.do("lookup_result", lookup({"run_id": "run-1"})).to_state == S.AWAITING_APPROVAL


@pytest.mark.parametrize(
    "data", [lookup(None, key="prospecting.crm_synced:x:other-lead"), lookup(None, name="something_else")]
)
def test_a_lookup_answer_for_another_question_is_ignored(data: dict) -> None:
    run = _at_crm_sync(["qualification", "crm_sync"], lookup_answered=False)
    assert run.step("lookup_result", data).outcome is I
    assert run.ctx["crm_lookup"] is True


@pytest.mark.parametrize("trigger", ["step_completed", "step_failed"])
def test_a_crm_sync_report_while_the_lookup_is_pending_is_parked(trigger: str) -> None:
    run = _at_crm_sync(["qualification", "crm_sync"], lookup_answered=False)
    data = completed("crm_sync", 1) if trigger == "step_completed" else failed("crm_sync", attempt=1)
    assert run.step(trigger, data).outcome is P


def test_cancel_while_the_lookup_is_pending_names_no_step_in_flight() -> None:
    run = _at_crm_sync(["qualification", "crm_sync"], lookup_answered=False)
    d = run.do("cancel_requested", {"requested_by": "ops-1"})
    assert of_kind(d, "compensation")[0].body["data"]["step"] is None
    assert d.requests.release_effects == []


def test_a_crm_sync_suppressed_by_the_effect_key_writes_no_register() -> None:
    run = _at_crm_sync(["qualification", "crm_sync"])
    d = run.do("effect_suppressed", suppressed())
    assert d.requests.remember == {}


def test_first_step_crm_sync_starts_with_the_lookup() -> None:
    run = Run()
    d = run.do("started", started(["crm_sync"]))
    assert (d.to_state, of_kind(d, "command"), d.requests.lookups) == (S.RUNNING, [], [("crm_synced", CRM_REGISTER)])
    assert run.step("effect_suppressed", suppressed()).outcome is I  # nothing was issued to suppress
