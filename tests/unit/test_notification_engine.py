"""`Engine.step` on the `notification` definition: the state x trigger table, send, the external-id claim
(granted via the lookup barrier, refused -> duplicate_suppressed), delivery, retries, failures, stale
reports. Pure: no I/O."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from sfworkflow.core.definition import EngineEvent, InstanceKey, OutgoingMessage, TimerRequest
from sfworkflow.core.engine import Decision, Outcome
from sfworkflow.workflows.notification import CLAIM_CHECK, DEFINITION, RETRY, S, claim_key
from tests.unit import enginekit
from tests.unit.enginekit import T0, TENANT, A, I, P, check_table_cell, check_table_covers, kinds, schema_errors

ENTITY = "notification-9"
KEY = InstanceKey(TENANT, "notification", ENTITY)
CORRELATION = "corr-notification-9"
SEND_KEY = f"{TENANT}:notification:{ENTITY}:send"
EXT = "0B7A2F9C41D3"
CLAIM = f"notification.external_id:{TENANT}:email:{EXT}"

EXTERNAL = ("requested", "provider_accepted", "delivered", "failed")
INTERNAL = ("timer_retry_due", "claim_refused", "lookup_result")
TRIGGERS = EXTERNAL + INTERNAL

REQUESTED = {
    "channel": "email",
    "recipient": "ana@example.com",
    "template": "tpl-demo-reminder",
    "body": "Hi Ana, your demo starts in one hour.",
}


def accepted(ext: str = EXT, attempt: int | None = None) -> dict[str, Any]:
    return enginekit.with_optional({"external_id": ext}, attempt=attempt)


def failed(retryable: bool = True, code: str = "provider_unavailable", attempt: int | None = None) -> dict[str, Any]:
    return enginekit.with_optional({"error_code": code, "retryable": retryable}, attempt=attempt)


def refused(key: str = CLAIM, holder: str = "notification-1") -> dict[str, Any]:
    return {"key": key, "holder_entity_id": holder, "holder_workflow": "notification"}


def granted(key: str = CLAIM) -> dict[str, Any]:
    return {"name": CLAIM_CHECK, "key": key, "value": None}


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0, n: int = 0) -> EngineEvent:
    return enginekit.event(DEFINITION, name, data, at, n, correlation=CORRELATION)


class Run(enginekit.Run):
    """One `notification` instance (`KEY`) driven event by event (numbered event ids)."""

    def __init__(self) -> None:
        super().__init__(DEFINITION, KEY, correlation=CORRELATION, numbered=True)


def in_new() -> Run:
    return Run()


def in_sending() -> Run:
    r = Run()
    r.do("requested", dict(REQUESTED))
    return r


def in_retry_wait() -> Run:
    r = in_sending()
    r.do("failed", failed(attempt=1))
    return r


def in_checking() -> Run:
    r = in_sending()
    r.do("provider_accepted", accepted(attempt=1))
    return r


def in_accepted() -> Run:
    r = in_checking()
    r.do("lookup_result", granted())
    return r


def in_delivered() -> Run:
    r = in_accepted()
    r.do("delivered", {"attempt": 1})
    return r


def in_duplicate_suppressed() -> Run:
    r = in_checking()
    r.do("claim_refused", refused())
    return r


def in_failed() -> Run:
    r = in_sending()
    r.do("failed", failed(False, "invalid_recipient", attempt=1))
    return r


BUILDERS = {
    S.NEW: in_new,
    S.SENDING: in_sending,
    S.RETRY_WAIT: in_retry_wait,
    S.CHECKING: in_checking,
    S.ACCEPTED: in_accepted,
    S.DELIVERED: in_delivered,
    S.DUPLICATE_SUPPRESSED: in_duplicate_suppressed,
    S.FAILED: in_failed,
}


def realistic(name: str, run: Run) -> dict[str, Any]:
    a = max(run.ctx.get("attempt", 1), 1)
    key = run.ctx.get("claim_key") or CLAIM
    return {
        "requested": dict(REQUESTED),
        "provider_accepted": accepted(attempt=a),
        "delivered": {"attempt": a},
        "failed": failed(attempt=a),
        "timer_retry_due": {},
        "claim_refused": refused(key),
        "lookup_result": granted(key),
    }[name]


# ---- the table -----------------------------------------------------------------------------------
ALL_IGNORED = {t: (I, None) for t in TRIGGERS}
TABLE: dict[str, dict[str, tuple[Outcome, str | None]]] = {
    S.NEW: {"requested": (A, S.SENDING), **{t: (P, None) for t in TRIGGERS if t != "requested"}},
    S.SENDING: {
        "requested": (I, None),
        "provider_accepted": (A, S.CHECKING),
        "delivered": (P, None),
        "failed": (A, S.RETRY_WAIT),
        "timer_retry_due": (I, None),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
    },
    S.RETRY_WAIT: {
        "requested": (I, None),
        "provider_accepted": (A, S.CHECKING),
        "delivered": (P, None),
        "failed": (I, None),
        "timer_retry_due": (A, S.SENDING),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
    },
    S.CHECKING: {
        "requested": (I, None),
        "provider_accepted": (I, None),
        "delivered": (P, None),
        "failed": (A, S.RETRY_WAIT),
        "timer_retry_due": (I, None),
        "claim_refused": (A, S.DUPLICATE_SUPPRESSED),
        "lookup_result": (A, S.ACCEPTED),
    },
    S.ACCEPTED: {
        "requested": (I, None),
        "provider_accepted": (I, None),
        "delivered": (A, S.DELIVERED),
        "failed": (A, S.RETRY_WAIT),
        "timer_retry_due": (I, None),
        "claim_refused": (A, S.DUPLICATE_SUPPRESSED),
        "lookup_result": (I, None),
    },
    S.DELIVERED: ALL_IGNORED,
    S.DUPLICATE_SUPPRESSED: ALL_IGNORED,
    S.FAILED: ALL_IGNORED,
}


def test_trigger_lists_match_the_definition() -> None:
    check_table_covers(DEFINITION, TABLE, S, EXTERNAL, INTERNAL)
    assert DEFINITION.terminal == {S.DELIVERED, S.DUPLICATE_SUPPRESSED, S.FAILED}
    assert DEFINITION.waits_for_operator == frozenset()
    assert DEFINITION.commands == {"send"} and DEFINITION.compensations == {"skip_duplicate"}


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", list(S))
def test_state_trigger_table(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    assert run.state == (state if state != S.NEW else "")
    ev = event(trigger, realistic(trigger, run), T0, 99)
    d = check_table_cell(run, ev, TABLE[state][trigger], T0 + timedelta(seconds=1))
    assert d.trigger == trigger
    if d.outcome is not A:
        assert not d.requests


@pytest.mark.parametrize("state", sorted(DEFINITION.terminal))
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_terminal_states_ignore_everything(state: str, trigger: str) -> None:
    run = BUILDERS[S(state)]()
    d = run.step(trigger, realistic(trigger, run))
    assert (d.outcome, d.reason) == (I, f"instance is {state}")


# ---- requested -----------------------------------------------------------------------------------
def test_requested_issues_send() -> None:
    d = Run().do("requested", dict(REQUESTED))
    assert (d.from_state, d.to_state) == (S.NEW, S.SENDING)
    assert kinds(d) == [("command", "notification.send"), ("lifecycle", "workflow.started.notification")]
    cmd = d.outgoing[0]
    assert cmd.body["data"] == REQUESTED
    assert (cmd.body["idempotency_key"], cmd.body["attempt"], cmd.body["kind"]) == (SEND_KEY, 1, "command")
    assert d.timers_set == [] and not d.requests
    assert all(schema_errors(m) == [] for m in d.outgoing)


@pytest.mark.parametrize("state", [S.SENDING, S.RETRY_WAIT, S.CHECKING, S.ACCEPTED])
def test_a_second_request_is_ignored(state: S) -> None:
    d = BUILDERS[state]().step("requested", {**REQUESTED, "body": "other"})
    assert (d.outcome, d.reason, d.outgoing) == (I, "instance already started", [])


# ---- provider_accepted: the claim ----------------------------------------------------------------
def test_provider_accepted_claims_the_external_id_per_tenant_and_channel() -> None:
    run = in_sending()
    d = run.do("provider_accepted", accepted(attempt=1))
    assert d.to_state == S.CHECKING and d.outgoing == []
    assert d.requests.claims == [CLAIM]
    assert d.requests.lookups == [(CLAIM_CHECK, CLAIM)]  # the barrier: answered after the claim is resolved
    assert (d.context["external_id"], d.context["claim_key"]) == (EXT, CLAIM)
    assert claim_key(TENANT, "email", EXT) == CLAIM


def test_claim_keys_differ_by_channel_and_tenant() -> None:
    keys = {claim_key(t, c, EXT) for t in (TENANT, "other-tenant") for c in ("email", "sms")}
    assert len(keys) == 4


def test_the_granted_claim_moves_to_accepted() -> None:
    run = in_checking()
    d = run.do("lookup_result", granted())
    assert d.to_state == S.ACCEPTED and d.outgoing == [] and not d.requests


def test_a_lookup_answer_about_another_key_is_ignored() -> None:
    run = in_checking()
    assert run.step("lookup_result", granted("other-key")).outcome is I
    assert run.step("lookup_result", {"name": "other", "key": CLAIM, "value": None}).outcome is I
    assert run.state == S.CHECKING


@pytest.mark.parametrize("builder", [in_checking, in_accepted])
def test_a_refused_claim_suppresses_the_duplicate(builder: Any) -> None:
    run = builder()
    d = run.do("claim_refused", refused(holder="notification-1"))
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.DUPLICATE_SUPPRESSED, True, True)
    assert kinds(d) == [
        ("compensation", "notification.skip_duplicate"),
        ("lifecycle", "workflow.compensated.notification"),
        ("lifecycle", "workflow.completed.notification"),
    ]
    comp, compensated, completed = d.outgoing
    assert comp.body["kind"] == "compensation"
    assert comp.body["data"] == {"external_id": EXT, "original_entity_id": "notification-1"}
    assert comp.body["idempotency_key"] == f"{TENANT}:notification:{ENTITY}:skip_duplicate"
    assert completed.body["data"] == {"final_state": "duplicate_suppressed"}
    assert compensated.body["data"] == {"compensations": ["notification.skip_duplicate"]}
    assert all(schema_errors(m) == [] for m in d.outgoing)
    # the second delivery is not counted
    late = run.step("delivered", {"attempt": 1})
    assert (late.outcome, late.reason) == (I, "instance is duplicate_suppressed")


def test_a_refusal_without_a_known_holder_still_suppresses() -> None:
    d = in_checking().do("claim_refused", {"key": CLAIM, "holder_entity_id": "", "holder_workflow": ""})
    assert d.outgoing[0].body["data"] == {"external_id": EXT, "original_entity_id": None}
    assert schema_errors(d.outgoing[0]) == []


def test_a_refusal_of_another_key_is_ignored() -> None:
    run = in_checking()
    d = run.step("claim_refused", refused("notification.external_id:x:email:other"))
    assert d.outcome is I and run.state == S.CHECKING


# ---- delivered -----------------------------------------------------------------------------------
def test_delivered_ends_delivered() -> None:
    d = in_accepted().do("delivered", {"attempt": 1, "external_id": EXT})
    assert (d.to_state, d.terminal) == (S.DELIVERED, True)
    assert kinds(d) == [("lifecycle", "workflow.completed.notification")]
    assert d.outgoing[0].body["data"] == {"final_state": "delivered"}


@pytest.mark.parametrize("builder", [in_sending, in_checking, in_retry_wait])
def test_delivered_before_the_claim_is_granted_is_parked(builder: Any) -> None:
    d = builder().step("delivered", {"attempt": 1})
    assert (d.outcome, d.reason) == (P, f"delivered is not allowed in state {d.from_state}")


def test_a_delivery_report_about_another_external_id_is_ignored() -> None:
    d = in_accepted().step("delivered", {"attempt": 1, "external_id": "other"})
    assert d.outcome is I and d.reason == f"delivery of other, not of the accepted {EXT}"


# ---- retries and failure -------------------------------------------------------------------------
def test_retryable_failure_waits_for_backoff() -> None:
    run = in_sending()
    now = T0 + timedelta(seconds=3)
    d = run.do("failed", failed(attempt=1), now=now)
    delay = RETRY.delay_s(1, SEND_KEY)
    assert 0.8 <= delay <= 1.2
    assert (d.to_state, d.outgoing) == (S.RETRY_WAIT, [])
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay), {})]
    assert d.context["last_error"] == "provider_unavailable"


def test_retry_reissues_the_same_send_with_attempt_plus_one() -> None:
    run = Run()
    first = run.do("requested", dict(REQUESTED)).outgoing[0]
    run.do("failed", failed(attempt=1))
    d = run.do("timer_retry_due")
    assert d.to_state == S.SENDING
    (m,) = d.outgoing
    assert m.body["idempotency_key"] == first.body["idempotency_key"] == SEND_KEY
    assert m.body["attempt"] == 2 and m.message_id != first.message_id
    assert m.body["data"] == first.body["data"]
    assert (d.context["attempt"], d.context["retries"]) == (2, 1)
    assert schema_errors(m) == []


def _exhaust() -> tuple[list[OutgoingMessage], Decision]:
    run = Run()
    sends = [run.do("requested", dict(REQUESTED)).outgoing[0]]
    for attempt in (1, 2):
        assert run.do("failed", failed(attempt=attempt)).to_state == S.RETRY_WAIT
        sends += run.do("timer_retry_due").outgoing
    return sends, run.do("failed", failed(attempt=3))


def test_three_attempts_share_one_key_and_backoff_grows() -> None:
    sends, _ = _exhaust()
    assert [m.body["attempt"] for m in sends] == [1, 2, 3]
    assert {m.body["idempotency_key"] for m in sends} == {SEND_KEY}
    assert RETRY.delay_s(1, SEND_KEY) < RETRY.delay_s(2, SEND_KEY)


def test_retries_exhausted_end_failed_without_compensation() -> None:
    _, d = _exhaust()
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.FAILED, True, True)
    assert kinds(d) == [("lifecycle", "workflow.failed.notification"), ("lifecycle", "workflow.completed.notification")]
    assert d.outgoing[0].body["data"] == {
        "reason": "send failed after 3 attempts (provider_unavailable)",
        "error_code": "provider_unavailable",
    }
    assert d.outgoing[1].body["data"] == {"final_state": "failed"}
    assert all(schema_errors(m) == [] for m in d.outgoing)


@pytest.mark.parametrize("builder", [in_sending, in_checking, in_accepted])
def test_a_non_retryable_failure_ends_failed(builder: Any) -> None:
    d = builder().do("failed", failed(False, "invalid_recipient", attempt=1))
    assert d.to_state == S.FAILED
    assert d.outgoing[0].body["data"] == {"reason": "send failed: invalid_recipient", "error_code": "invalid_recipient"}
    assert not [m for m in d.outgoing if m.kind == "compensation"]


def test_a_retry_after_acceptance_claims_the_new_external_id() -> None:
    run = in_accepted()
    run.do("failed", failed(attempt=1))
    run.do("timer_retry_due")
    d = run.do("provider_accepted", accepted("NEW-ID", attempt=2))
    new_key = claim_key(TENANT, "email", "NEW-ID")
    assert d.requests.claims == [new_key] and d.context["claim_key"] == new_key
    assert run.do("lookup_result", granted(new_key)).to_state == S.ACCEPTED


def test_a_late_acceptance_of_the_failed_attempt_is_taken() -> None:
    run = in_retry_wait()
    d = run.do("provider_accepted", accepted(attempt=1))
    assert d.to_state == S.CHECKING and d.timers_cancelled == ["retry_due"]


# ---- stale reports -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "data"),
    [("provider_accepted", accepted(attempt=1)), ("delivered", {"attempt": 1}), ("failed", failed(attempt=1))],
)
def test_reports_about_an_older_attempt_are_ignored(name: str, data: dict[str, Any]) -> None:
    run = in_retry_wait()
    run.do("timer_retry_due")
    d = run.step(name, data)
    assert (d.outcome, d.reason) == (I, "attempt 1 was superseded by attempt 2")


@pytest.mark.parametrize("builder", [in_checking, in_accepted])
def test_a_second_acceptance_is_ignored(builder: Any) -> None:
    d = builder().step("provider_accepted", accepted("OTHER"))
    assert (d.outcome, d.reason) == (I, f"attempt 1 was already accepted as {EXT}")


def test_a_second_failure_of_the_failed_attempt_is_ignored() -> None:
    d = in_retry_wait().step("failed", failed(False))
    assert (d.outcome, d.reason) == (I, "attempt 1 already failed")
