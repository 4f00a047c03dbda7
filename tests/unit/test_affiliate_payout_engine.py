"""`Engine.step` on the `affiliate_payout` definition: the full state x trigger table, claims, the ledger
entry and the payout (effect keys), retries, the reversal compensation, stale reports, money as strings."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from sfworkflow.core.definition import EngineEvent, InstanceKey, OutgoingMessage, TimerRequest
from sfworkflow.core.engine import Decision, Outcome
from sfworkflow.workflows.affiliate_payout import DEFINITION, RETRY, S, parse_amount
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

ENTITY = "batch-2026-03-001"
KEY = InstanceKey(TENANT, "affiliate_payout", ENTITY)
CORRELATION = "corr-batch-1"

EXTERNAL = ("batch_opened", "ledger_posted", "payout_sent", "settled", "failed")
INTERNAL = ("claim_refused", "lookup_result", "effect_suppressed", "timer_retry_due")
TRIGGERS = EXTERNAL + INTERNAL

COMMISSIONS = ["com-9001", "com-9002", "com-9017"]
CLAIMS = [f"affiliate_payout.commission:{TENANT}:{c}" for c in COMMISSIONS]
LEDGER_EFFECT = f"affiliate_payout.ledger:{TENANT}:{ENTITY}"
PAYOUT_EFFECT = f"affiliate_payout.payout:{TENANT}:{ENTITY}"
LEDGER_KEY = f"{TENANT}:affiliate_payout:{ENTITY}:ledger"
PAYOUT_KEY = f"{TENANT}:affiliate_payout:{ENTITY}:payout"
REGISTER = f"affiliate_payout.settled:{TENANT}:{ENTITY}"


def opened(amount: Any = "1250.50", **over: Any) -> dict[str, Any]:
    return {"affiliate_id": "aff-204", "commission_ids": list(COMMISSIONS), "amount": amount, "currency": "USD", **over}


def failed(retryable: bool = True, code: str = "provider_timeout", attempt: int | None = None, **kw: Any) -> dict:
    return enginekit.with_optional({"error_code": code, "retryable": retryable, **kw}, attempt=attempt)


def lookup(value: Any = None) -> dict[str, Any]:
    return {"name": "settled", "key": REGISTER, "value": value}


def refused(key: str = CLAIMS[1], holder: str = "batch-2026-02-007") -> dict[str, Any]:
    return {"key": key, "holder_entity_id": holder, "holder_workflow": "affiliate_payout"}


def suppressed(command: str) -> dict[str, Any]:
    effect = LEDGER_EFFECT if command == "post_ledger_entry" else PAYOUT_EFFECT
    return {"effect_key": effect, "command_type": f"affiliate_payout.{command}", "command_id": str(uuid.uuid4())}


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0) -> EngineEvent:
    return enginekit.event(DEFINITION, name, data, at, correlation=CORRELATION)


class Run(enginekit.Run):
    """One `affiliate_payout` instance (`KEY`) driven event by event."""

    def __init__(self) -> None:
        super().__init__(DEFINITION, KEY, correlation=CORRELATION)


def in_claiming(amount: str = "1250.50") -> Run:
    r = Run()
    r.do("batch_opened", opened(amount))
    return r


def in_posting(amount: str = "1250.50") -> Run:
    r = in_claiming(amount)
    r.do("lookup_result", lookup())
    return r


def in_posting_retry() -> Run:
    r = in_posting()
    r.do("failed", failed(attempt=1, command="post_ledger_entry"))
    return r


def in_paying(amount: str = "1250.50") -> Run:
    r = in_posting(amount)
    r.do("ledger_posted", {"entry_id": "le-417", "attempt": 1})
    return r


def in_paying_retry() -> Run:
    r = in_paying()
    r.do("failed", failed(attempt=1, command="send_payout"))
    return r


def in_awaiting() -> Run:
    r = in_paying()
    r.do("payout_sent", {"payment_reference": "po-1", "attempt": 1})
    return r


def in_settled() -> Run:
    r = in_awaiting()
    r.do("settled", {})
    return r


def in_rejected() -> Run:
    r = in_claiming()
    r.do("claim_refused", refused())
    return r


def in_ledger_failed() -> Run:
    r = in_posting()
    r.do("failed", failed(False, "ledger_rejected"))
    return r


def in_reversed() -> Run:
    r = in_paying()
    r.do("failed", failed(False, "account_closed"))
    return r


def in_duplicate() -> Run:
    r = in_posting()
    r.do("effect_suppressed", suppressed("post_ledger_entry"))
    return r


BUILDERS = {
    S.NEW: Run,
    S.CLAIMING: in_claiming,
    S.POSTING: in_posting,
    S.POSTING_RETRY: in_posting_retry,
    S.PAYING: in_paying,
    S.PAYING_RETRY: in_paying_retry,
    S.AWAITING_SETTLEMENT: in_awaiting,
    S.SETTLED: in_settled,
    S.REJECTED: in_rejected,
    S.FAILED: in_ledger_failed,
    S.REVERSED: in_reversed,
    S.DUPLICATE: in_duplicate,
}


def realistic(name: str, run: Run) -> dict[str, Any]:
    """Data for `name` about the run's current command and attempt."""
    attempt = max(run.ctx.get("attempt", 0), 1)
    paying = run.state in (S.PAYING, S.PAYING_RETRY, S.AWAITING_SETTLEMENT)
    return {
        "batch_opened": opened(),
        "ledger_posted": {"entry_id": "le-417", "attempt": attempt},
        "payout_sent": {"payment_reference": "po-1", "attempt": attempt},
        "settled": {},
        "failed": failed(attempt=attempt),
        "claim_refused": refused(),
        "lookup_result": lookup(),
        "effect_suppressed": suppressed("send_payout" if paying else "post_ledger_entry"),
        "timer_retry_due": {},
    }[name]


def has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(has_float(v) for v in value)
    return False


ALL_IGNORED = {t: (I, None) for t in TRIGGERS}
TABLE: dict[str, dict[str, tuple[Outcome, str | None]]] = {
    S.NEW: {"batch_opened": (A, S.CLAIMING), **{t: (P, None) for t in TRIGGERS if t != "batch_opened"}},
    S.CLAIMING: {
        "batch_opened": (I, None),
        "ledger_posted": (P, None),
        "payout_sent": (P, None),
        "settled": (P, None),
        "failed": (P, None),
        "claim_refused": (A, S.REJECTED),
        "lookup_result": (A, S.POSTING),
        "effect_suppressed": (I, None),
        "timer_retry_due": (I, None),
    },
    S.POSTING: {
        "batch_opened": (I, None),
        "ledger_posted": (A, S.PAYING),
        "payout_sent": (P, None),
        "settled": (P, None),
        "failed": (A, S.POSTING_RETRY),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "effect_suppressed": (A, S.DUPLICATE),
        "timer_retry_due": (I, None),
    },
    S.POSTING_RETRY: {
        "batch_opened": (I, None),
        "ledger_posted": (A, S.PAYING),
        "payout_sent": (P, None),
        "settled": (P, None),
        "failed": (P, None),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "effect_suppressed": (I, None),
        "timer_retry_due": (A, S.POSTING),
    },
    S.PAYING: {
        "batch_opened": (I, None),
        "ledger_posted": (I, None),
        "payout_sent": (A, S.AWAITING_SETTLEMENT),
        "settled": (P, None),
        "failed": (A, S.PAYING_RETRY),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "effect_suppressed": (A, S.REVERSED),
        "timer_retry_due": (I, None),
    },
    S.PAYING_RETRY: {
        "batch_opened": (I, None),
        "ledger_posted": (I, None),
        "payout_sent": (A, S.AWAITING_SETTLEMENT),
        "settled": (P, None),
        "failed": (P, None),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "effect_suppressed": (I, None),
        "timer_retry_due": (A, S.PAYING),
    },
    S.AWAITING_SETTLEMENT: {
        "batch_opened": (I, None),
        "ledger_posted": (I, None),
        "payout_sent": (I, None),
        "settled": (A, S.SETTLED),
        "failed": (A, S.REVERSED),
        "claim_refused": (I, None),
        "lookup_result": (I, None),
        "effect_suppressed": (I, None),
        "timer_retry_due": (I, None),
    },
    **{s: ALL_IGNORED for s in DEFINITION.terminal},
}


def test_trigger_lists_match_the_definition() -> None:
    check_table_covers(DEFINITION, TABLE, S, EXTERNAL, INTERNAL)
    assert set(TABLE) == set(BUILDERS)
    assert DEFINITION.waits_for_operator == frozenset()


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", list(S))
def test_state_trigger_table(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    assert run.state == (state if state != S.NEW else "")
    ev = event(trigger, realistic(trigger, run), T0)
    d = check_table_cell(run, ev, TABLE[state][trigger], T0 + timedelta(minutes=1))
    assert d.trigger == trigger
    assert d.from_state == (run.state or (S.NEW if d.outcome is A else ""))
    if d.outcome is A:
        assert not any(has_float(m.body) for m in d.outgoing)
    else:
        assert d.timers_cancelled == [] and not d.requests


@pytest.mark.parametrize("state", sorted(DEFINITION.terminal))
@pytest.mark.parametrize("trigger", TRIGGERS)
def test_terminal_states_ignore_everything(state: str, trigger: str) -> None:
    run = BUILDERS[S(state)]()
    d = run.step(trigger, realistic(trigger, run))
    assert (d.outcome, d.to_state, d.reason) == (I, state, f"instance is {state}")


# ---- batch_opened: claims, then the lookup that follows them -------------------------------------------
def test_batch_opened_claims_every_commission_and_posts_nothing_yet() -> None:
    run = Run()
    d = run.do("batch_opened", opened())
    assert (d.from_state, d.to_state, d.version) == (S.NEW, S.CLAIMING, 1)
    assert kinds(d) == [("lifecycle", "workflow.started.affiliate_payout")]
    assert d.outgoing[0].body["data"] == {"start_event_type": "affiliate_payout.batch_opened"}
    assert d.requests.claims == CLAIMS
    assert d.requests.lookups == [("settled", REGISTER)]
    assert d.requests.releases == [] and d.requests.remember == {}
    ctx = d.context
    assert (ctx["affiliate_id"], ctx["commission_ids"], ctx["amount"], ctx["currency"]) == (
        "aff-204",
        COMMISSIONS,
        "1250.50",
        "USD",
    )
    assert ctx["claims"] == CLAIMS and ctx["attempt"] == 0 and ctx["entry_id"] is None
    assert d.timers_set == []


def test_a_commission_listed_twice_is_claimed_once() -> None:
    d = Run().do("batch_opened", opened(commission_ids=["c-1", "c-2", "c-1"]))
    assert d.requests.claims == [
        f"affiliate_payout.commission:{TENANT}:c-1",
        f"affiliate_payout.commission:{TENANT}:c-2",
    ]
    assert d.context["commission_ids"] == ["c-1", "c-2"]


def test_claim_keys_are_per_tenant() -> None:
    other = InstanceKey("9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d", "affiliate_payout", ENTITY)
    d = ENGINE.step(WF, other, None, event("batch_opened", opened()), T0)
    assert d.requests.claims[0] == "affiliate_payout.commission:9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d:com-9001"


@pytest.mark.parametrize(
    "data",
    [
        opened("0.00"),
        opened("0"),
        opened(1250.5),
        opened(1250),
        opened("12.345"),
        opened("-5.00"),
        opened("1e3"),
        opened(currency="usd"),
        opened(commission_ids=[]),
        opened(commission_ids="com-1"),
        opened(affiliate_id=""),
    ],
    ids=[
        "zero",
        "zero-int-string",
        "float",
        "int",
        "three-places",
        "negative",
        "exponent",
        "currency",
        "no-ids",
        "ids-not-list",
        "no-affiliate",
    ],
)
def test_an_invalid_batch_is_rejected_at_once_without_claims(data: dict[str, Any]) -> None:
    d = Run().do("batch_opened", data)
    assert (d.to_state, d.terminal) == (S.REJECTED, True)
    assert not d.requests
    # the engine adds workflow.started after what the action published, and workflow.completed at the end
    assert [m.body["event_type"] for m in d.outgoing] == ["workflow.failed", "workflow.started", "workflow.completed"]
    assert d.outgoing[0].body["data"]["error_code"] == "invalid_batch"
    assert not any(m.kind in ("command", "compensation") for m in d.outgoing)
    assert all(schema_errors(m) == [] for m in d.outgoing)


@pytest.mark.parametrize("amount", ["0.01", "0.1", "0.10", "10", "1250.50", "9999999999999999.99"])
def test_parse_amount_gives_a_decimal(amount: str) -> None:
    value = parse_amount(amount)
    assert isinstance(value, Decimal) and value == Decimal(amount) and value > 0


@pytest.mark.parametrize(
    "amount", ["0", "0.00", "0.0", "00.50", "01", "-1", "1.234", "1e3", " 1", "1,00", "", None, 1.5, 2]
)
def test_parse_amount_refuses_what_is_not_a_positive_decimal_string(amount: Any) -> None:
    assert parse_amount(amount) is None


def test_claims_held_post_the_one_ledger_entry() -> None:
    run = in_claiming()
    now = T0 + timedelta(milliseconds=3)
    d = run.do("lookup_result", lookup(), now=now)
    assert (d.from_state, d.to_state) == (S.CLAIMING, S.POSTING)
    (m,) = d.outgoing
    assert (m.kind, m.routing_key, m.effect_key) == ("command", "affiliate_payout.post_ledger_entry", LEDGER_EFFECT)
    b = m.body
    assert (b["idempotency_key"], b["attempt"], b["kind"]) == (LEDGER_KEY, 1, "command")
    assert (b["tenant_id"], b["entity_id"], b["workflow"], b["correlation_id"]) == (
        TENANT,
        ENTITY,
        "affiliate_payout",
        CORRELATION,
    )
    assert b["data"] == {
        "affiliate_id": "aff-204",
        "commission_ids": COMMISSIONS,
        "amount": "1250.50",
        "currency": "USD",
    }
    assert datetime.fromisoformat(b["issued_at"]) == now
    assert schema_errors(m) == []
    assert d.context["attempt"] == 1
    assert not d.requests


def test_a_refused_claim_rejects_the_batch_and_releases_the_claims_it_got() -> None:
    run = in_claiming()
    d = run.do("claim_refused", refused(CLAIMS[1], "batch-2026-02-007"))
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.REJECTED, True, True)
    assert d.requests.releases == [CLAIMS[0], CLAIMS[2]]  # not the one another batch holds
    assert d.requests.claims == [] and d.requests.remember == {}
    assert kinds(d) == [
        ("lifecycle", "workflow.failed.affiliate_payout"),
        ("lifecycle", "workflow.completed.affiliate_payout"),
    ]  # nothing was posted: no command, no compensation
    failed_ev = d.outgoing[0].body["data"]
    assert failed_ev["error_code"] == "commission_in_open_batch"
    assert "com-9002" in failed_ev["reason"] and "batch-2026-02-007" in failed_ev["reason"]
    assert d.outgoing[1].body["data"] == {"final_state": "rejected"}
    assert d.context["rejected_by"] == {"claim": CLAIMS[1], "holder_entity_id": "batch-2026-02-007"}
    assert all(schema_errors(m) == [] for m in d.outgoing)
    # a second refusal (another commission) and the lookup's answer come after: ignored, nothing posted
    assert run.step("claim_refused", refused(CLAIMS[2])).outcome is I
    assert run.step("lookup_result", lookup()).outcome is I


def test_a_batch_settled_before_is_a_duplicate_and_keeps_its_claims() -> None:
    run = in_claiming()
    d = run.do("lookup_result", lookup({"entry_id": "le-1", "payment_reference": "po-1"}))
    assert (d.to_state, d.terminal) == (S.DUPLICATE, True)
    assert kinds(d) == [("lifecycle", "workflow.completed.affiliate_payout")]
    assert not d.requests


# ---- ledger_posted, payout_sent, settled ------------------------------------------------------------------
def test_ledger_posted_sends_the_one_payout() -> None:
    run = in_posting()
    d = run.do("ledger_posted", {"entry_id": "le-417", "attempt": 1})
    assert d.to_state == S.PAYING
    (m,) = d.outgoing
    assert (m.kind, m.routing_key, m.effect_key) == ("command", "affiliate_payout.send_payout", PAYOUT_EFFECT)
    assert (m.body["idempotency_key"], m.body["attempt"]) == (PAYOUT_KEY, 1)
    assert m.body["data"] == {"affiliate_id": "aff-204", "entry_id": "le-417", "amount": "1250.50", "currency": "USD"}
    assert schema_errors(m) == []
    assert (d.context["entry_id"], d.context["attempt"]) == ("le-417", 1)
    assert d.timers_cancelled == ["retry_due"]


def test_payout_sent_then_settled_keeps_the_claims_and_remembers_the_batch() -> None:
    run = in_paying()
    d = run.do("payout_sent", {"payment_reference": "po-1", "attempt": 1})
    assert (d.to_state, d.outgoing, d.terminal) == (S.AWAITING_SETTLEMENT, [], False)
    assert d.context["payment_reference"] == "po-1"
    d = run.do("settled", {"payment_reference": "po-1"})
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.SETTLED, True, True)
    assert d.requests.releases == []  # the commissions are paid: their claims stay
    assert d.requests.remember == {REGISTER: {"entry_id": "le-417", "payment_reference": "po-1"}}
    assert kinds(d) == [("lifecycle", "workflow.completed.affiliate_payout")]
    assert d.outgoing[0].body["data"] == {"final_state": "settled"}


def test_settled_before_payout_sent_is_parked() -> None:
    run = in_paying()
    assert run.step("settled", {}).outcome is P


def test_happy_path_issues_exactly_two_commands_with_two_effect_keys() -> None:
    run = Run()
    out: list[OutgoingMessage] = []
    out += run.do("batch_opened", opened()).outgoing
    out += run.do("lookup_result", lookup()).outgoing
    out += run.do("ledger_posted", {"entry_id": "le-1"}).outgoing
    out += run.do("payout_sent", {"payment_reference": "po-1"}).outgoing
    out += run.do("settled", {}).outgoing
    commands = [m for m in out if m.kind == "command"]
    assert [(m.routing_key, m.effect_key) for m in commands] == [
        ("affiliate_payout.post_ledger_entry", LEDGER_EFFECT),
        ("affiliate_payout.send_payout", PAYOUT_EFFECT),
    ]
    assert [m.body["event_type"] for m in out if m.kind == "lifecycle"] == ["workflow.started", "workflow.completed"]
    assert run.state == S.SETTLED


@pytest.mark.parametrize("amount", ["0.01", "1250.50", "1250.5", "7", "9999999999999999.99"])
def test_the_amount_string_is_carried_unchanged_to_every_command(amount: str) -> None:
    run = in_claiming(amount)
    ledger_cmd = run.do("lookup_result", lookup()).outgoing[0]
    payout_cmd = run.do("ledger_posted", {"entry_id": "le-1"}).outgoing[0]
    reverse = run.do("failed", failed(False, "account_closed")).outgoing[0]
    for m in (ledger_cmd, payout_cmd, reverse):
        assert m.body["data"]["amount"] == amount and isinstance(m.body["data"]["amount"], str)
        assert not has_float(m.body)
        assert schema_errors(m) == []


# ---- retries ------------------------------------------------------------------------------------------------
def test_a_retryable_ledger_failure_waits_then_reissues_the_same_key_with_attempt_2() -> None:
    run = in_posting()
    now = T0 + timedelta(seconds=2)
    d = run.do("failed", failed(attempt=1, command="post_ledger_entry"), now=now)
    assert (d.to_state, d.outgoing) == (S.POSTING_RETRY, [])
    delay = RETRY.delay_s(1, LEDGER_KEY)
    assert 0.8 <= delay <= 1.2
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay), {})]
    d = run.do("timer_retry_due")
    (m,) = d.outgoing
    assert (m.routing_key, m.body["idempotency_key"], m.body["attempt"], m.effect_key) == (
        "affiliate_payout.post_ledger_entry",
        LEDGER_KEY,
        2,
        None,  # a retry must not be suppressed by the first try's effect key
    )
    assert d.notes == {"retry_attempt": 2}
    assert schema_errors(m) == []


def _exhaust(run: Run, command: str) -> tuple[list[OutgoingMessage], Decision]:
    commands: list[OutgoingMessage] = []
    for attempt in (1, 2):
        assert run.do("failed", failed(attempt=attempt, command=command)).outgoing == []
        commands += run.do("timer_retry_due").outgoing
    return commands, run.do("failed", failed(attempt=3, command=command))


def test_ledger_retries_exhausted_end_ledger_failed_without_compensation() -> None:
    run = in_posting()
    first = run.ctx
    retries, d = _exhaust(run, "post_ledger_entry")
    assert [m.body["attempt"] for m in retries] == [2, 3]
    assert {m.body["idempotency_key"] for m in retries} == {LEDGER_KEY}
    assert first["attempt"] == 1
    assert (d.to_state, d.terminal) == (S.FAILED, True)
    assert kinds(d) == [
        ("lifecycle", "workflow.failed.affiliate_payout"),
        ("lifecycle", "workflow.completed.affiliate_payout"),
    ]
    assert "after 3 attempts" in d.outgoing[0].body["data"]["reason"]
    assert d.requests.releases == CLAIMS  # the batch ends unpaid: its commissions are free again


def test_a_fatal_ledger_failure_ends_at_once() -> None:
    run = in_posting()
    d = run.do("failed", failed(False, "ledger_rejected", attempt=1))
    assert d.to_state == S.FAILED
    assert d.outgoing[0].body["data"] == {
        "reason": "ledger entry failed: ledger_rejected",
        "error_code": "ledger_rejected",
    }


def _assert_reversal(d: Decision, error_code: str) -> None:
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.REVERSED, True, True)
    assert kinds(d) == [
        ("compensation", "affiliate_payout.reverse_ledger_entry"),
        ("lifecycle", "workflow.failed.affiliate_payout"),
        ("lifecycle", "workflow.compensated.affiliate_payout"),
        ("lifecycle", "workflow.completed.affiliate_payout"),
    ]
    comp, failed_ev, compensated, _completed = d.outgoing
    assert comp.body["kind"] == "compensation"
    assert comp.body["data"] == {"entry_id": "le-417", "amount": "1250.50", "currency": "USD"}
    assert comp.body["idempotency_key"] == f"{TENANT}:affiliate_payout:{ENTITY}:reverse"
    assert comp.effect_key is None
    assert failed_ev.body["data"]["error_code"] == error_code
    assert compensated.body["data"] == {"compensations": ["affiliate_payout.reverse_ledger_entry"]}
    assert failed_ev.body["state"] == compensated.body["state"] == "reversed"
    assert d.requests.releases == CLAIMS
    for m in d.outgoing:
        assert schema_errors(m) == [], m.routing_key


def test_payout_retries_exhausted_reverse_the_ledger_entry() -> None:
    run = in_paying()
    retries, d = _exhaust(run, "send_payout")
    assert [(m.routing_key, m.body["idempotency_key"], m.body["attempt"]) for m in retries] == [
        ("affiliate_payout.send_payout", PAYOUT_KEY, 2),
        ("affiliate_payout.send_payout", PAYOUT_KEY, 3),
    ]
    assert all(m.effect_key is None for m in retries)
    _assert_reversal(d, "provider_timeout")
    assert "after 3 attempts" in d.outgoing[1].body["data"]["reason"]


def test_a_fatal_payout_failure_reverses_the_ledger_entry() -> None:
    _assert_reversal(in_paying().do("failed", failed(False, "account_closed", attempt=1)), "account_closed")


def test_a_payout_returned_after_it_was_sent_reverses_the_ledger_entry() -> None:
    d = in_awaiting().do("failed", failed(False, "payout_returned", command="send_payout"))
    _assert_reversal(d, "payout_returned")
    assert "returned" in d.outgoing[1].body["data"]["reason"]


def test_payout_sent_during_the_retry_wait_cancels_the_retry() -> None:
    run = in_paying_retry()
    d = run.do("payout_sent", {"payment_reference": "po-1", "attempt": 1})
    assert d.to_state == S.AWAITING_SETTLEMENT and d.timers_cancelled == ["retry_due"]


def test_ledger_posted_during_the_retry_wait_cancels_the_retry() -> None:
    run = in_posting_retry()
    d = run.do("ledger_posted", {"entry_id": "le-417", "attempt": 1})
    assert d.to_state == S.PAYING and "retry_due" in d.timers_cancelled


# ---- effect keys: a second request is suppressed ----------------------------------------------------------
def test_a_suppressed_ledger_entry_ends_duplicate_and_posts_nothing() -> None:
    d = in_posting().do("effect_suppressed", suppressed("post_ledger_entry"))
    assert (d.to_state, d.terminal) == (S.DUPLICATE, True)
    assert kinds(d) == [("lifecycle", "workflow.completed.affiliate_payout")]
    assert not d.requests  # the commissions may have been paid by the earlier request: claims kept
    assert d.notes["effect_key"] == LEDGER_EFFECT


def test_a_suppressed_payout_reverses_this_batch_ledger_entry() -> None:
    _assert_reversal(in_paying().do("effect_suppressed", suppressed("send_payout")), "payout_already_requested")


def test_a_suppression_of_the_other_command_does_not_apply() -> None:
    assert in_posting().step("effect_suppressed", suppressed("send_payout")).outcome is I
    assert in_paying().step("effect_suppressed", suppressed("post_ledger_entry")).outcome is I


# ---- stale reports ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("builder", "name", "data", "reason"),
    [
        (in_paying, "ledger_posted", {"entry_id": "le-2"}, "already posted"),
        (in_awaiting, "ledger_posted", {"entry_id": "le-417"}, "already posted"),
        (in_awaiting, "payout_sent", {"payment_reference": "po-2"}, "already sent"),
        (in_paying, "failed", failed(False, command="post_ledger_entry"), "a failure of post_ledger_entry"),
        (in_awaiting, "failed", failed(False, command="post_ledger_entry"), "a failure of post_ledger_entry"),
        (in_posting, "failed", failed(False, command="send_payout"), "a failure of send_payout"),
    ],
)
def test_reports_about_the_past_are_ignored(builder, name: str, data: dict, reason: str) -> None:
    run = builder()
    d = run.step(name, data)
    assert d.outcome is I and reason in d.reason and d.outgoing == []


@pytest.mark.parametrize("command", ["post_ledger_entry", "send_payout"])
@pytest.mark.parametrize("name", ["failed", "success"])
def test_a_report_about_an_older_attempt_is_ignored(command: str, name: str) -> None:
    run = in_posting() if command == "post_ledger_entry" else in_paying()
    run.do("failed", failed(attempt=1))
    run.do("timer_retry_due")
    assert run.ctx["attempt"] == 2
    if command == "post_ledger_entry":
        success = ("ledger_posted", {"entry_id": "le-9", "attempt": 1})
    else:
        success = ("payout_sent", {"payment_reference": "po-9", "attempt": 1})
    trigger, data = ("failed", failed(False, attempt=1)) if name == "failed" else success
    d = run.step(trigger, data)
    assert d.outcome is I and "superseded" in d.reason


# ---- purity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize(
    "state", [S.CLAIMING, S.POSTING, S.POSTING_RETRY, S.PAYING, S.PAYING_RETRY, S.AWAITING_SETTLEMENT]
)
def test_same_inputs_give_equal_decisions_and_do_not_mutate(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    check_deterministic(run, event(trigger, realistic(trigger, run)), T0 + timedelta(hours=1))
