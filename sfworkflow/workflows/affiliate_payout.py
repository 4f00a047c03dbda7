"""`affiliate_payout`: one payout batch for an affiliate (entity = batch id).

    new ──batch_opened──> claiming ──lookup_result (every commission claimed, batch not paid before)──> posting
     │                      ├─claim_refused (a commission is in another open batch)──> rejected
     │                      └─lookup_result (batch already settled, per the register)──> duplicate
     └─batch_opened with an invalid amount / currency / commission list──> rejected

    posting ──ledger_posted──> paying ──payout_sent──> awaiting_settlement ──settled──> settled
       ├─failed (retryable, attempt < 3)──> posting_retry ──timer_retry_due──> posting (attempt + 1)
       ├─failed otherwise / retries exhausted──> ledger_failed   (nothing was posted: nothing to undo)
       └─effect_suppressed (ledger entry of this batch asked for before)──> duplicate
    paying
       ├─failed (retryable, attempt < 3)──> paying_retry ──timer_retry_due──> paying (attempt + 1)
       ├─failed otherwise / retries exhausted──> reversed      (compensation reverse_ledger_entry)
       └─effect_suppressed (payout of this batch asked for before)──> reversed (same compensation)
    awaiting_settlement ──failed (the payout was returned)──> reversed (same compensation)

Events (SalesFlow -> sfworkflow), as in the issue: `batch_opened` {affiliate_id, commission_ids, amount,
currency}, `ledger_posted` {entry_id}, `payout_sent` {payment_reference}, `settled`, `failed`
{error_code, retryable}. Added optional fields: `attempt` on ledger_posted / payout_sent / failed (the
worker echoes the command's attempt: a report about an older attempt is ignored), `command` on `failed`
(`post_ledger_entry` | `send_payout`: a failure about the other phase is ignored), `message`.

Commands (sfworkflow.commands.affiliate_payout): `post_ledger_entry` {affiliate_id, commission_ids,
amount, currency}, then `send_payout` {affiliate_id, entry_id, amount, currency}.
Compensation (sfworkflow.compensations.affiliate_payout): `reverse_ledger_entry` {entry_id, amount, currency}.

Added states: `claiming` (the commission claims are being resolved, within the start transaction),
`posting_retry` / `paying_retry` (backoff timers), `awaiting_settlement` (payout sent, money not yet
settled), `rejected` (a commission already belongs to another open batch, or the batch is invalid;
nothing was posted, so nothing is compensated), `ledger_failed` (the ledger entry could not be posted;
nothing to undo), `duplicate` (this batch's ledger entry was asked for, or the batch settled, before: an
earlier instance of the same batch; nothing is published twice). Terminal: settled, rejected,
ledger_failed, reversed, duplicate; rejected and ledger_failed publish `workflow.failed`, reversed
`workflow.failed` + `workflow.compensated`.

Uniqueness:
- effect keys `affiliate_payout.ledger:{tenant}:{batch}` and `affiliate_payout.payout:{tenant}:{batch}`:
  one ledger entry and one payout per batch, enforced by the database (a second request is suppressed
  and reported as `effect_suppressed`). Retries carry no effect key (the first try holds it) but the
  same idempotency key, attempt + 1.
- claims `affiliate_payout.commission:{tenant}:{commission_id}`: a commission belongs to one open batch.
  Claimed on batch_opened; released when the batch ends without paying (rejected, ledger_failed,
  reversed); kept when it is settled (the commission is paid) and when it ends `duplicate` (it may have
  been paid by the earlier request).
- register `affiliate_payout.settled:{tenant}:{batch}` := {entry_id, payment_reference} on settled.
  batch_opened looks it up. The store resolves a step's claims before its lookups, so the
  `lookup_result` is also the signal that every claim is held: the ledger command is only issued then,
  never before a `claim_refused`.

Money is never a float: `amount` is a positive decimal string with at most 2 places (`AMOUNT`, the
schemas' pattern), carried unchanged to every command; it is only ever parsed as decimal.Decimal.

Context: affiliate_id, commission_ids, amount, currency, claims (claim keys held), attempt (of the
current command), entry_id, payment_reference, retries.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from sfworkflow.core.definition import RetryPolicy, Step, Transition, WorkflowDefinition

NAME = "affiliate_payout"
LEDGER = "post_ledger_entry"
PAYOUT = "send_payout"
REVERSE = "reverse_ledger_entry"
# A positive decimal with at most 2 places, no leading zeros: the same pattern as the schemas.
AMOUNT = re.compile(r"^(?:[1-9][0-9]{0,15}(?:\.[0-9]{1,2})?|0\.(?:0[1-9]|[1-9][0-9]?))$")
CURRENCY = re.compile(r"^[A-Z]{3}$")
MAX_COMMISSIONS = 500


class S(StrEnum):
    NEW = "new"
    CLAIMING = "claiming"  # commission claims asked for; answered in the same transaction
    POSTING = "posting"  # post_ledger_entry issued
    POSTING_RETRY = "posting_retry"  # a retryable ledger failure; the retry timer is pending
    PAYING = "paying"  # send_payout issued
    PAYING_RETRY = "paying_retry"  # a retryable payout failure; the retry timer is pending
    AWAITING_SETTLEMENT = "awaiting_settlement"  # payout sent; waiting for `settled`
    SETTLED = "settled"
    REJECTED = "rejected"  # a commission is in another open batch, or the batch is invalid
    FAILED = "ledger_failed"  # the ledger entry could not be posted (nothing to undo)
    REVERSED = "reversed"  # the payout failed after the ledger entry: reverse_ledger_entry published
    DUPLICATE = "duplicate"  # the ledger entry / payout of this batch was asked for before


RETRY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)
POSTING_STATES = (S.POSTING, S.POSTING_RETRY)
PAYING_STATES = (S.PAYING, S.PAYING_RETRY)


# ---- keys -------------------------------------------------------------------------------------
def _idempotency_key(step: Step, what: str) -> str:
    return f"{step.key.tenant_id}:{NAME}:{step.key.entity_id}:{what}"


def _ledger_effect_key(step: Step) -> str:
    return f"{NAME}.ledger:{step.key.tenant_id}:{step.key.entity_id}"


def _payout_effect_key(step: Step) -> str:
    return f"{NAME}.payout:{step.key.tenant_id}:{step.key.entity_id}"


def _commission_claim(step: Step, commission_id: str) -> str:
    return f"{NAME}.commission:{step.key.tenant_id}:{commission_id}"


def _settled_register(step: Step) -> str:
    return f"{NAME}.settled:{step.key.tenant_id}:{step.key.entity_id}"


def parse_amount(value: Any) -> Decimal | None:
    """The amount as a Decimal when it is a valid positive decimal string, else None (never a float)."""
    if not isinstance(value, str) or not AMOUNT.fullmatch(value):
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        return None
    return amount if amount > 0 else None


# ---- conditions -------------------------------------------------------------------------------
def valid_batch(step: Step) -> bool:
    d = step.data
    ids = d.get("commission_ids")
    return (
        parse_amount(d.get("amount")) is not None
        and isinstance(d.get("currency"), str)
        and CURRENCY.fullmatch(d["currency"]) is not None
        and isinstance(d.get("affiliate_id"), str)
        and bool(d["affiliate_id"])
        and isinstance(ids, list)
        and 0 < len(ids) <= MAX_COMMISSIONS
        and all(isinstance(c, str) and c for c in ids)
    )


def invalid_batch(step: Step) -> bool:
    return not valid_batch(step)


def not_settled_before(step: Step) -> bool:
    return step.data.get("value") is None


def settled_before(step: Step) -> bool:
    return not not_settled_before(step)


def may_retry(step: Step) -> bool:
    return bool(step.data.get("retryable")) and step.context["attempt"] < RETRY.max_attempts


def ledger_suppressed(step: Step) -> bool:
    return step.data.get("command_type") == f"{NAME}.{LEDGER}"


def payout_suppressed(step: Step) -> bool:
    return step.data.get("command_type") == f"{NAME}.{PAYOUT}"


# ---- actions ----------------------------------------------------------------------------------
def open_batch(step: Step) -> None:
    """Claim every commission of the batch and look up whether the batch settled before.

    The ledger entry is not asked for yet: the lookup's answer comes after the claims are resolved."""
    d = step.data
    ids = list(dict.fromkeys(d["commission_ids"]))  # a commission listed twice is claimed once
    claims = [_commission_claim(step, c) for c in ids]
    step.context.update(
        affiliate_id=d["affiliate_id"],
        commission_ids=ids,
        amount=d["amount"],
        currency=d["currency"],
        claims=claims,
        attempt=0,
        retries=0,
        entry_id=None,
        payment_reference=None,
    )
    for key in claims:
        step.claim(key)
    step.lookup("settled", _settled_register(step))
    step.note(commissions=len(ids), amount=d["amount"], currency=d["currency"])


def reject_invalid(step: Step) -> None:
    d = step.data
    step.context.update(
        affiliate_id=d.get("affiliate_id"), amount=d.get("amount"), currency=d.get("currency"), claims=[]
    )
    reason = "the batch is invalid (amount must be a positive decimal string, currency ISO 4217, commissions listed)"
    step.lifecycle("workflow.failed", S.REJECTED, {"reason": reason, "error_code": "invalid_batch"})
    step.note(rejected="invalid_batch")


def reject_claimed(step: Step) -> None:
    """A commission belongs to another open batch: give up the claims this batch did get; nothing was posted."""
    refused = str(step.data.get("key", ""))
    holder = step.data.get("holder_entity_id") or "another batch"
    for key in step.context.get("claims", []):
        if key != refused:
            step.release(key)
    claims, ids = step.context.get("claims", []), step.context.get("commission_ids", [])
    commission = ids[claims.index(refused)] if refused in claims and len(ids) == len(claims) else refused
    step.context["claims"] = []
    step.context["rejected_by"] = {"claim": refused, "holder_entity_id": step.data.get("holder_entity_id")}
    reason = f"commission {commission} already belongs to open batch {holder}"
    step.lifecycle("workflow.failed", S.REJECTED, {"reason": reason, "error_code": "commission_in_open_batch"})
    step.note(refused_claim=refused, holder_entity_id=step.data.get("holder_entity_id"))


def already_settled(step: Step) -> None:
    """The register says this batch settled before (an earlier instance): pay nothing twice; keep the claims."""
    step.context["previous"] = step.data.get("value")
    step.note(duplicate="batch settled before", previous=step.data.get("value"))


def post_ledger(step: Step) -> None:
    """Every claim is held: ask for the batch's one ledger entry."""
    ctx = step.context
    ctx["attempt"] = 1
    step.command(
        LEDGER,
        _ledger_data(ctx),
        idempotency_key=_idempotency_key(step, "ledger"),
        attempt=1,
        effect_key=_ledger_effect_key(step),
    )


def _ledger_data(ctx: dict[str, Any]) -> dict[str, Any]:
    return {
        "affiliate_id": ctx["affiliate_id"],
        "commission_ids": list(ctx["commission_ids"]),
        "amount": ctx["amount"],
        "currency": ctx["currency"],
    }


def _payout_data(ctx: dict[str, Any]) -> dict[str, Any]:
    return {
        "affiliate_id": ctx["affiliate_id"],
        "entry_id": ctx["entry_id"],
        "amount": ctx["amount"],
        "currency": ctx["currency"],
    }


def ledger_done(step: Step) -> None:
    """The ledger entry is posted: ask for the batch's one payout."""
    ctx = step.context
    ctx["entry_id"] = str(step.data["entry_id"])
    ctx["attempt"] = 1
    step.cancel_timer("retry_due")
    step.command(
        PAYOUT,
        _payout_data(ctx),
        idempotency_key=_idempotency_key(step, "payout"),
        attempt=1,
        effect_key=_payout_effect_key(step),
    )
    step.note(entry_id=ctx["entry_id"])


def payout_done(step: Step) -> None:
    step.context["payment_reference"] = step.data.get("payment_reference")
    step.cancel_timer("retry_due")
    step.note(payment_reference=step.data.get("payment_reference"))


def settle(step: Step) -> None:
    """Paid: the claims stay held (the commissions are paid); remember the batch as settled."""
    ctx = step.context
    step.remember(
        _settled_register(step), {"entry_id": ctx["entry_id"], "payment_reference": ctx.get("payment_reference")}
    )


def schedule_retry(step: Step) -> None:
    ctx = step.context
    what = "ledger" if step.from_state == S.POSTING else "payout"
    delay = RETRY.delay_s(ctx["attempt"], _idempotency_key(step, what))
    step.set_timer_in("retry_due", delay)
    step.note(error_code=step.data.get("error_code"), retry_in_s=round(delay, 3))


def reissue_ledger(step: Step) -> None:
    """Retry timer fired: the same command again, same idempotency key, attempt + 1, no effect key."""
    ctx = step.context
    ctx["attempt"] += 1
    ctx["retries"] = ctx.get("retries", 0) + 1
    step.command(LEDGER, _ledger_data(ctx), idempotency_key=_idempotency_key(step, "ledger"), attempt=ctx["attempt"])
    step.note(retry_attempt=ctx["attempt"])


def reissue_payout(step: Step) -> None:
    ctx = step.context
    ctx["attempt"] += 1
    ctx["retries"] = ctx.get("retries", 0) + 1
    step.command(PAYOUT, _payout_data(ctx), idempotency_key=_idempotency_key(step, "payout"), attempt=ctx["attempt"])
    step.note(retry_attempt=ctx["attempt"])


def _release_claims(step: Step) -> None:
    for key in step.context.get("claims", []):
        step.release(key)
    step.context["claims"] = []


def _failure_reason(step: Step, what: str) -> tuple[str, str]:
    error_code = str(step.data.get("error_code", "unknown"))
    attempt = step.context.get("attempt", 0)
    if bool(step.data.get("retryable")):
        return f"{what} failed after {attempt} attempts ({error_code})", error_code
    return f"{what} failed: {error_code}", error_code


def ledger_failed(step: Step) -> None:
    """The ledger entry could not be posted: nothing was posted, nothing to undo; free the commissions."""
    reason, error_code = _failure_reason(step, "ledger entry")
    _release_claims(step)
    step.lifecycle("workflow.failed", S.FAILED, {"reason": reason, "error_code": error_code})
    step.note(failure=reason)


def ledger_duplicate(step: Step) -> None:
    """This batch's ledger entry was asked for before (an earlier instance): post nothing, keep the claims."""
    step.note(duplicate="ledger entry asked for before", effect_key=step.data.get("effect_key"))


def reverse(step: Step) -> None:
    """The payout failed (or was returned) after the ledger entry was posted: reverse the entry."""
    ctx = step.context
    if step.event.name == "effect_suppressed":
        reason, error_code = "the payout of this batch was asked for before", "payout_already_requested"
    elif step.from_state == S.AWAITING_SETTLEMENT:
        error_code = str(step.data.get("error_code", "unknown"))
        reason = f"payout returned after it was sent: {error_code}"
    else:
        reason, error_code = _failure_reason(step, "payout")
    step.compensate(
        REVERSE,
        {"entry_id": ctx["entry_id"], "amount": ctx["amount"], "currency": ctx["currency"]},
        idempotency_key=_idempotency_key(step, "reverse"),
    )
    _release_claims(step)
    step.lifecycle("workflow.failed", S.REVERSED, {"reason": reason, "error_code": error_code})
    step.lifecycle("workflow.compensated", S.REVERSED, {"compensations": [f"{NAME}.{REVERSE}"]})
    step.note(failure=reason)


# ---- stale reports ------------------------------------------------------------------------------
def _phase(state: str) -> str | None:
    if state in POSTING_STATES:
        return LEDGER
    if state in (*PAYING_STATES, S.AWAITING_SETTLEMENT):
        return PAYOUT
    return None


def stale(step: Step) -> str | None:
    """Reports about the past are ignored, not parked: a ledger entry or payout already recorded, a failure
    about the other phase, a report about an attempt older than the current one."""
    name = step.event.name
    state = step.from_state
    data = step.data
    ctx = step.context
    if name == "ledger_posted" and state in (*PAYING_STATES, S.AWAITING_SETTLEMENT):
        return f"the ledger entry is already posted ({ctx.get('entry_id')})"
    if name == "payout_sent" and state == S.AWAITING_SETTLEMENT:
        return f"the payout is already sent ({ctx.get('payment_reference')})"
    if name not in ("ledger_posted", "payout_sent", "failed"):
        return None
    phase = _phase(state)
    if phase is None:
        return None
    command = data.get("command")
    if name == "failed" and command is not None and command != phase:
        return f"a failure of {command}, but the batch is at {phase}"
    attempt = data.get("attempt")
    if isinstance(attempt, int) and attempt < ctx.get("attempt", 0):
        return f"attempt {attempt} of {phase} was superseded by attempt {ctx['attempt']}"
    return None


N, C = S.NEW, S.CLAIMING

DEFINITION = WorkflowDefinition(
    name=NAME,
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.SETTLED, S.REJECTED, S.FAILED, S.REVERSED, S.DUPLICATE}),
    start_events=frozenset({"batch_opened"}),
    events=frozenset({"batch_opened", "ledger_posted", "payout_sent", "settled", "failed"}),
    internal_events=frozenset({"claim_refused", "lookup_result", "effect_suppressed", "timer_retry_due"}),
    commands=frozenset({LEDGER, PAYOUT}),
    compensations=frozenset({REVERSE}),
    retry=RETRY,
    stale=stale,
    description="Affiliate payout batch: one ledger entry, one payout; the entry is reversed if the payout fails.",
    # When an instance counts as stuck (seconds in the state with no pending timer). Claims resolve in the
    # event's own transaction; settlement may take days on the payment rails.
    stuck_after_s={
        S.CLAIMING: 60.0,
        S.POSTING: 900.0,
        S.POSTING_RETRY: 900.0,
        S.PAYING: 900.0,
        S.PAYING_RETRY: 900.0,
        S.AWAITING_SETTLEMENT: 3 * 86400.0,
    },
    transitions=(
        Transition("batch_opened", N, C, [valid_batch], action=open_batch),
        Transition("batch_opened", N, S.REJECTED, [invalid_batch], action=reject_invalid),
        Transition("claim_refused", C, S.REJECTED, action=reject_claimed),
        Transition("lookup_result", C, S.POSTING, [not_settled_before], action=post_ledger),
        Transition("lookup_result", C, S.DUPLICATE, [settled_before], action=already_settled),
        Transition("effect_suppressed", S.POSTING, S.DUPLICATE, [ledger_suppressed], action=ledger_duplicate),
        Transition("ledger_posted", POSTING_STATES, S.PAYING, action=ledger_done),
        Transition("failed", S.POSTING, S.POSTING_RETRY, [may_retry], action=schedule_retry),
        Transition("failed", S.POSTING, S.FAILED, action=ledger_failed),
        Transition("timer_retry_due", S.POSTING_RETRY, S.POSTING, action=reissue_ledger),
        Transition("effect_suppressed", S.PAYING, S.REVERSED, [payout_suppressed], action=reverse),
        Transition("payout_sent", PAYING_STATES, S.AWAITING_SETTLEMENT, action=payout_done),
        Transition("failed", S.PAYING, S.PAYING_RETRY, [may_retry], action=schedule_retry),
        Transition("failed", S.PAYING, S.REVERSED, action=reverse),
        Transition("timer_retry_due", S.PAYING_RETRY, S.PAYING, action=reissue_payout),
        Transition("failed", S.AWAITING_SETTLEMENT, S.REVERSED, action=reverse),
        Transition("settled", S.AWAITING_SETTLEMENT, S.SETTLED, action=settle),
    ),
)
