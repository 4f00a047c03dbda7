"""`notification`: one notification sent through a provider (entity = notification id).

    new ──requested──> sending ──provider_accepted──> checking ──lookup_result──> accepted ──delivered──> delivered
                        │  ^          (claim the external id)  │                     │
                        │  └─timer_retry_due (same key,        └─claim_refused───────┴──> duplicate_suppressed
                        │     attempt + 1)── retry_wait           (another notification holds the external id:
                        │                       ^                  skip_duplicate published, no second delivery)
                        ├─failed (retryable, attempt < 3)───┘  (also from checking / accepted)
                        └─failed not retryable / retries exhausted ──> failed   (also from checking / accepted)

States: `new`; `sending` (send issued, waiting for the provider's answer); `retry_wait` (a retryable
failure; the backoff timer `retry_due` is pending); `checking` (the provider accepted the message; the
external id is being claimed); `accepted` (this notification holds the external id; waiting for the
delivery report); terminal `delivered`, `duplicate_suppressed`, `failed`. `checking` is a state added
beyond the issue, see "Claim" below.

Events: `notification.requested` {channel, recipient, template, body} starts the instance;
`notification.provider_accepted` {external_id}, `notification.delivered`, `notification.failed`
{error_code, retryable} come from the sending worker, which echoes the command's `attempt` (optional, added
beyond the issue: a report about an older attempt is ignored); `delivered` may also name the
`external_id` it is about (optional).

Command: `notification.send` {channel, recipient, template, body} to sfworkflow.commands.notification,
idempotency key `<tenant>:notification:<id>:send`; a retry re-issues it with `attempt` + 1.

Claim (the dedupe key): the provider's external id is unique per (tenant, channel). On
`provider_accepted` the instance claims `notification.external_id:<tenant>:<channel>:<external_id>`
(claims are held until released; this workflow never releases them, so the first notification that got
an external id keeps it). If another notification holds it, the store answers `claim_refused`
{key, holder_entity_id, holder_workflow}: the instance ends `duplicate_suppressed` and publishes
compensation `notification.skip_duplicate` {external_id, original_entity_id (= the holder)}, key
`<tenant>:notification:<id>:skip_duplicate`, with lifecycle `workflow.compensated` and then
`workflow.completed` {final_state}; a later `delivered` of it is ignored (the instance is terminal), so the second
delivery is not counted.
The store tells only of refusals, not of grants, and resolves a batch's claims after every event of the
batch was stepped; so a `delivered` applied in the same batch as its `provider_accepted` (e.g. one that
was parked waiting for it) would end the instance `delivered` before the refusal arrives. Hence
`checking`: with the claim the step also asks for a register lookup of the same key, which the store
answers after it resolved the claims of that round; `lookup_result` therefore means "the claim was
granted" and moves the instance to `accepted`, the only state that takes `delivered` (it is parked
before). The value looked up is not used.

Failure: `failed` not retryable, or retryable after 3 attempts, ends `failed` with lifecycle
`workflow.failed` {reason, error_code} (and the engine's `workflow.completed` {final_state}). The issue
names no compensation and nothing was delivered that could be undone, so none is published.

Context: channel, recipient, template, body, send_key, attempt, retries, external_id, claim_key,
last_error.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Any

from sfworkflow.core.definition import RetryPolicy, Step, Transition, WorkflowDefinition

NAME = "notification"
CLAIM_CHECK = "claim_check"  # name of the register lookup that confirms the claim was granted


class S(StrEnum):
    NEW = "new"
    SENDING = "sending"  # send issued; waiting for provider_accepted / failed
    RETRY_WAIT = "retry_wait"  # a retryable failure; retry_due pending
    CHECKING = "checking"  # provider accepted; claiming the external id
    ACCEPTED = "accepted"  # the external id is ours; waiting for delivered
    DELIVERED = "delivered"
    DUPLICATE_SUPPRESSED = "duplicate_suppressed"  # another notification holds the external id
    FAILED = "failed"


RETRY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)
REPORTS = frozenset({"provider_accepted", "delivered", "failed"})


def claim_key(tenant_id: str, channel: str, external_id: str) -> str:
    return f"{NAME}.external_id:{tenant_id}:{channel}:{external_id}"


# ---- conditions -------------------------------------------------------------------------------
def may_retry(step: Step) -> bool:
    return bool(step.data.get("retryable")) and step.context["attempt"] < RETRY.max_attempts


def refuses_our_claim(step: Step) -> bool:
    return step.data.get("key") == step.context.get("claim_key")


def confirms_our_claim(step: Step) -> bool:
    return step.data.get("name") == CLAIM_CHECK and step.data.get("key") == step.context.get("claim_key")


# ---- actions ----------------------------------------------------------------------------------
def _key(step: Step, what: str) -> str:
    return f"{step.key.tenant_id}:{NAME}:{step.key.entity_id}:{what}"


def _send_data(ctx: dict[str, Any]) -> dict[str, Any]:
    return {"channel": ctx["channel"], "recipient": ctx["recipient"], "template": ctx["template"], "body": ctx["body"]}


def request(step: Step) -> None:
    d = step.data
    step.context.update(
        channel=d["channel"],
        recipient=d["recipient"],
        template=d["template"],
        body=d["body"],
        send_key=_key(step, "send"),
        attempt=1,
        retries=0,
        external_id=None,
        claim_key=None,
        last_error=None,
    )
    ctx = step.context
    step.command("send", _send_data(ctx), idempotency_key=ctx["send_key"], attempt=1)


def accept(step: Step) -> None:
    """The provider took the message: claim its external id (and confirm the claim, see the docstring)."""
    ctx = step.context
    external_id = step.data["external_id"]
    key = claim_key(step.key.tenant_id, ctx["channel"], external_id)
    ctx["external_id"] = external_id
    ctx["claim_key"] = key
    ctx.pop("due_at", None)
    step.cancel_timer("retry_due")  # a late acceptance of the attempt that failed
    step.claim(key)
    step.lookup(CLAIM_CHECK, key)
    step.note(external_id=external_id, attempt=ctx["attempt"])


def claim_held(step: Step) -> None:
    step.note(claim_key=step.context["claim_key"])


def suppress_duplicate(step: Step) -> None:
    """Another notification holds this external id: skip it instead of counting a second delivery."""
    ctx = step.context
    holder = step.data.get("holder_entity_id") or None
    ctx["original_entity_id"] = holder
    step.compensate(
        "skip_duplicate",
        {"external_id": ctx["external_id"], "original_entity_id": holder},
        idempotency_key=_key(step, "skip_duplicate"),
    )
    step.lifecycle("workflow.compensated", S.DUPLICATE_SUPPRESSED, {"compensations": [f"{NAME}.skip_duplicate"]})
    # workflow.completed {final_state} follows from the engine, last, as for every ending.
    step.note(duplicate_of=holder, external_id=ctx["external_id"])


def record_delivered(step: Step) -> None:
    step.note(external_id=step.context["external_id"], attempt=step.context["attempt"])


def schedule_retry(step: Step) -> None:
    ctx = step.context
    ctx["last_error"] = str(step.data.get("error_code", "unknown"))
    delay = RETRY.delay_s(ctx["attempt"], ctx["send_key"])
    step.set_timer_in("retry_due", delay)
    ctx["due_at"] = (step.now + timedelta(seconds=delay)).isoformat()
    step.note(error_code=ctx["last_error"], retry_in_s=round(delay, 3))


def reissue_send(step: Step) -> None:
    """Backoff elapsed: the same send again, same idempotency key, attempt + 1."""
    ctx = step.context
    ctx["attempt"] += 1
    ctx["retries"] = ctx.get("retries", 0) + 1
    ctx.pop("due_at", None)
    step.command("send", _send_data(ctx), idempotency_key=ctx["send_key"], attempt=ctx["attempt"])
    step.note(retry_attempt=ctx["attempt"])


def fail(step: Step) -> None:
    """A failure nothing retries: end `failed` (nothing was delivered, so nothing is compensated)."""
    ctx = step.context
    error_code = str(step.data.get("error_code", "unknown"))
    ctx["last_error"] = error_code
    reason = (
        f"send failed after {ctx['attempt']} attempts ({error_code})"
        if step.data.get("retryable")
        else f"send failed: {error_code}"
    )
    step.lifecycle("workflow.failed", S.FAILED, {"reason": reason, "error_code": error_code})
    step.note(failure=reason)


def stale(step: Step) -> str | None:
    """Reports about the past are ignored, not parked: an older attempt, a second acceptance or failure
    of the current attempt, a delivery report about another external id than the one accepted."""
    name = step.event.name
    if name not in REPORTS:
        return None
    ctx = step.context
    state = step.from_state
    data = step.data
    attempt = data.get("attempt")
    if attempt is not None and attempt < ctx["attempt"]:
        return f"attempt {attempt} was superseded by attempt {ctx['attempt']}"
    current = attempt is None or attempt == ctx["attempt"]
    if current and name == "provider_accepted" and state in (S.CHECKING, S.ACCEPTED):
        return f"attempt {ctx['attempt']} was already accepted as {ctx['external_id']}"
    if current and name == "failed" and state == S.RETRY_WAIT:
        return f"attempt {ctx['attempt']} already failed"
    if name == "delivered" and state in (S.CHECKING, S.ACCEPTED):
        ext = data.get("external_id")
        if ext is not None and ext != ctx["external_id"]:
            return f"delivery of {ext}, not of the accepted {ctx['external_id']}"
    return None


SE, RW, CH, AC = S.SENDING, S.RETRY_WAIT, S.CHECKING, S.ACCEPTED

DEFINITION = WorkflowDefinition(
    name=NAME,
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.DELIVERED, S.DUPLICATE_SUPPRESSED, S.FAILED}),
    start_events=frozenset({"requested"}),
    events=frozenset({"requested", "provider_accepted", "delivered", "failed"}),
    internal_events=frozenset({"timer_retry_due", "claim_refused", "lookup_result"}),
    commands=frozenset({"send"}),
    compensations=frozenset({"skip_duplicate"}),
    retry=RETRY,
    stale=stale,
    description="One notification through a provider; the provider's external id is unique per "
    "(tenant, channel), a second notification with it is suppressed.",
    # When an instance counts as stuck (seconds in the state with no pending timer). The claim check
    # resolves in the event's transaction; a delivery receipt may take a day.
    stuck_after_s={S.SENDING: 900.0, S.RETRY_WAIT: 900.0, S.CHECKING: 60.0, S.ACCEPTED: 86400.0},
    transitions=(
        Transition("requested", S.NEW, SE, action=request),
        Transition("provider_accepted", [SE, RW], CH, action=accept),
        Transition("lookup_result", CH, AC, [confirms_our_claim], action=claim_held),
        Transition("claim_refused", [CH, AC], S.DUPLICATE_SUPPRESSED, [refuses_our_claim], action=suppress_duplicate),
        Transition("delivered", AC, S.DELIVERED, action=record_delivered),
        Transition("failed", [SE, CH, AC], RW, [may_retry], action=schedule_retry),
        Transition("failed", [SE, CH, AC], S.FAILED, action=fail),
        Transition("timer_retry_due", RW, SE, action=reissue_send),
    ),
)
