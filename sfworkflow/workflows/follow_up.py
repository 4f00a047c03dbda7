"""`follow_up`: timed follow-up steps for one lead (entity = lead id).

    new ──scheduled──> waiting ──timer_step_due──> sending ──sent──> waiting … ──> completed
                                                    │  └─effect_suppressed (step sent before)──> next step
                                                    ├─failed (retryable, attempt < 3)──> retry_wait
                                                    │      retry_wait ──timer_retry_due──> sending (attempt + 1)
                                                    └─failed otherwise / retries exhausted──> needs_attention
    needs_attention ──resume_requested──> sending (the reset step again, reset + 1)
    reply_received ──> replied;  cancel_requested ──> cancelled   (from every active state)

Events (SalesFlow -> sfworkflow), as in the issue: `scheduled` {owner_id, steps [{template,
delay_seconds}]}, `sent` {step}, `reply_received`, `failed` {step, error_code, retryable}. Added:
- `resume_requested` {requested_by}: the operator's decision on a step that failed after its retries;
  it sends that step again. Only applies in `needs_attention` (elsewhere it is ignored: nothing to resume).
- `cancel_requested` {requested_by, reason}: the operator's other way out (stop following up): `cancelled`.
- optional `attempt` and `reset` on `sent` / `failed`: the worker echoes the command's attempt and the
  command's `reset` number; a report about an older attempt or an earlier round is ignored.

Command (sfworkflow.commands.follow_up): `send` {step, template, reset} (`reset`: how many times this
step was reset before this send, 0 at first; added so a report about an earlier round can be told apart).

Compensations (sfworkflow.compensations.follow_up), when a send fails for good (not retryable, or
after 3 attempts): `reset_step` {step} (SalesFlow puts the step back to pending) and `notify_owner`
{owner_id, reason}. The instance is NOT terminal: it waits on the reset step in `needs_attention`
(in `waits_for_operator`: stuck-visible) until an operator resumes or cancels it, or the lead replies.
It publishes `workflow.compensated` but not `workflow.failed` (which means "no further progress").

States added: `retry_wait` (backoff timer pending), `needs_attention`, `cancelled`; terminal states
are `completed` (every step sent), `replied` and `cancelled`.

Each (tenant, lead, step) is sent at most once: effect key `follow_up.send:{tenant}:{lead}:{step}` on a
step's first send (a second request is suppressed: `effect_suppressed`, and the step counts as sent).
A re-send after a reset is a new decision the operator asked for, which that key would suppress, so it
carries `follow_up.send:{tenant}:{lead}:{step}:reset:{n}` (n = the step's reset count, 1, 2, …) and the
idempotency key `{tenant}:follow_up:{lead}:step:{step}:reset:{n}`; still at most once per reset.
Retries reuse the idempotency key of their send with attempt + 1 and carry no effect key.

The step cursor lives in the instance context. Context: owner_id, steps, cursor (current step), attempt
(of the current send), reset (resets of the current step), resets (all resets), sent, suppressed,
retries, due_at.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sfworkflow.core.definition import ANY_ACTIVE, RetryPolicy, Step, Transition, WorkflowDefinition
from sfworkflow.core.schedules import CatchUp, Kind, Schedule, Spec
from sfworkflow.workflows._cursor import (
    current_and_has_next,
    current_and_last,
    has_next_step,
    is_current_step,
    is_last_step,
)

NAME = "follow_up"
SEND = "send"


class S(StrEnum):
    NEW = "new"
    WAITING = "waiting"  # the current step's timer is pending
    SENDING = "sending"  # send was issued; waiting for sent / failed
    RETRY_WAIT = "retry_wait"  # a retryable failure; the retry timer is pending
    NEEDS_ATTENTION = "needs_attention"  # the current step failed for good and was reset; an operator decides
    COMPLETED = "completed"  # every step sent
    REPLIED = "replied"  # the lead replied
    CANCELLED = "cancelled"  # an operator stopped it


RETRY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)


# ---- keys -------------------------------------------------------------------------------------
def _suffix(ctx: dict[str, Any]) -> str:
    return f":reset:{ctx['reset']}" if ctx.get("reset") else ""


def idempotency_key(step: Step) -> str:
    k, ctx = step.key, step.context
    return f"{k.tenant_id}:{NAME}:{k.entity_id}:step:{ctx['cursor']}{_suffix(ctx)}"


def effect_key(step: Step) -> str:
    k, ctx = step.key, step.context
    return f"{NAME}.send:{k.tenant_id}:{k.entity_id}:{ctx['cursor']}{_suffix(ctx)}"


# ---- conditions -------------------------------------------------------------------------------


def may_retry(step: Step) -> bool:
    return is_current_step(step) and bool(step.data.get("retryable")) and step.context["attempt"] < RETRY.max_attempts


def _is_current_send(step: Step) -> bool:
    return step.data.get("effect_key") == effect_key(step)


def current_suppressed_has_next(step: Step) -> bool:
    return _is_current_send(step) and has_next_step(step)


def current_suppressed_last(step: Step) -> bool:
    return _is_current_send(step) and is_last_step(step)


# ---- actions ----------------------------------------------------------------------------------
def _schedule_current(step: Step, start: datetime) -> None:
    delay = step.context["steps"][step.context["cursor"]]["delay_seconds"]
    due = start + timedelta(seconds=delay)
    step.context["due_at"] = due.isoformat()
    step.set_timer("step_due", due)


def start(step: Step) -> None:
    d = step.data
    step.context.update(
        owner_id=d["owner_id"],
        steps=[{"template": s["template"], "delay_seconds": s["delay_seconds"]} for s in d["steps"]],
        cursor=0,
        attempt=0,
        reset=0,
        resets=0,
        sent=0,
        suppressed=0,
        retries=0,
    )
    _schedule_current(step, step.event.timestamp)


def _send_data(ctx: dict[str, Any]) -> dict[str, Any]:
    cursor = ctx["cursor"]
    return {"step": cursor, "template": ctx["steps"][cursor]["template"], "reset": ctx["reset"]}


def _issue(step: Step) -> None:
    ctx = step.context
    ctx["attempt"] = 1
    ctx.pop("due_at", None)
    step.command(SEND, _send_data(ctx), idempotency_key=idempotency_key(step), attempt=1, effect_key=effect_key(step))


def issue_send(step: Step) -> None:
    """The step fell due: send it, at most once per (tenant, lead, step[, reset])."""
    _issue(step)


def reissue_send(step: Step) -> None:
    """Retry timer fired: the same command again, same idempotency key, attempt + 1."""
    ctx = step.context
    ctx["attempt"] += 1
    ctx["retries"] = ctx.get("retries", 0) + 1
    ctx.pop("due_at", None)
    step.command(SEND, _send_data(ctx), idempotency_key=idempotency_key(step), attempt=ctx["attempt"])
    step.note(retry_attempt=ctx["attempt"])


def _count(step: Step) -> None:
    ctx = step.context
    if step.event.name == "effect_suppressed":
        ctx["suppressed"] = ctx.get("suppressed", 0) + 1
        step.note(suppressed_step=ctx["cursor"], effect_key=step.data.get("effect_key"))
    else:
        ctx["sent"] = ctx.get("sent", 0) + 1
    step.cancel_timer("retry_due")


def advance(step: Step) -> None:
    """The current step is sent (or was sent before): schedule the next one."""
    ctx = step.context
    _count(step)
    ctx["cursor"] += 1
    ctx["attempt"] = 0
    ctx["reset"] = 0
    _schedule_current(step, step.now)


def finish(step: Step) -> None:
    _count(step)
    step.context["attempt"] = 0


def schedule_retry(step: Step) -> None:
    ctx = step.context
    delay = RETRY.delay_s(ctx["attempt"], idempotency_key(step))
    step.set_timer_in("retry_due", delay)
    ctx["due_at"] = (step.now + timedelta(seconds=delay)).isoformat()
    step.note(error_code=step.data.get("error_code"), retry_in_s=round(delay, 3))


def reset_and_notify(step: Step) -> None:
    """A send failed for good: reset the step, tell the owner, and wait for an operator (not terminal)."""
    ctx = step.context
    cursor = ctx["cursor"]
    error_code = str(step.data.get("error_code", "unknown"))
    template = ctx["steps"][cursor]["template"]
    if bool(step.data.get("retryable")):
        reason = f"follow-up step {cursor} ({template}) failed after {ctx['attempt']} attempts ({error_code})"
    else:
        reason = f"follow-up step {cursor} ({template}) failed: {error_code}"
    reason += "; the step was reset and waits for an operator"
    ctx["resets"] = ctx.get("resets", 0) + 1
    ctx["failure"] = {"step": cursor, "error_code": error_code, "reason": reason}
    key = f"{step.key.tenant_id}:{NAME}:{step.key.entity_id}:step:{cursor}:reset:{ctx['reset'] + 1}:compensate"
    step.compensate("reset_step", {"step": cursor}, idempotency_key=key)
    step.compensate("notify_owner", {"owner_id": ctx["owner_id"], "reason": reason}, idempotency_key=key)
    step.lifecycle(
        "workflow.compensated",
        S.NEEDS_ATTENTION,
        {"compensations": [f"{NAME}.reset_step", f"{NAME}.notify_owner"]},
    )
    step.note(failure=reason, error_code=error_code)


def resend_reset_step(step: Step) -> None:
    """The operator asked to go on: send the reset step again, as a new decision (reset + 1)."""
    ctx = step.context
    ctx["reset"] = ctx.get("reset", 0) + 1
    ctx.pop("failure", None)
    _issue(step)
    step.note(resumed_by=step.data.get("requested_by"), reset=ctx["reset"])


def record_end(step: Step) -> None:
    step.note(ended_by=step.event.name, requested_by=step.data.get("requested_by"))


# ---- stale reports ------------------------------------------------------------------------------
def stale(step: Step) -> str | None:
    """Reports about the past are ignored, not parked: an older step, an earlier round (before a reset),
    an older attempt, any report while the step waits for an operator (no send is outstanding), and a
    `resume_requested` when nothing waits for one (parking it would resume a later failure unasked)."""
    name = step.event.name
    ctx = step.context
    data = step.data
    if name == "resume_requested" and step.from_state != S.NEEDS_ATTENTION:
        return f"nothing to resume: the follow-up is {step.from_state}"
    if name not in ("sent", "failed"):
        return None
    cursor = ctx.get("cursor")
    reported = data.get("step")
    if cursor is None or not isinstance(reported, int):
        return None
    if reported < cursor:
        return f"step {reported} is already done (current step {cursor})"
    if reported > cursor:
        return None  # a later step: parked until the instance gets there
    if step.from_state == S.NEEDS_ATTENTION:
        return f"step {cursor} was reset and waits for an operator"
    reset = data.get("reset")
    if isinstance(reset, int) and reset < ctx.get("reset", 0):
        return f"a report about step {cursor} before its reset {ctx['reset']}"
    attempt = data.get("attempt")
    if isinstance(attempt, int) and attempt < ctx.get("attempt", 0):
        return f"attempt {attempt} of step {cursor} was superseded by attempt {ctx['attempt']}"
    return None


W, SE, R = S.WAITING, S.SENDING, S.RETRY_WAIT

DEFINITION = WorkflowDefinition(
    name=NAME,
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.COMPLETED, S.REPLIED, S.CANCELLED}),
    waits_for_operator=frozenset({S.NEEDS_ATTENTION}),
    start_events=frozenset({"scheduled"}),
    events=frozenset({"scheduled", "sent", "reply_received", "failed", "resume_requested", "cancel_requested"}),
    internal_events=frozenset({"timer_step_due", "timer_retry_due", "effect_suppressed"}),
    commands=frozenset({SEND}),
    compensations=frozenset({"reset_step", "notify_owner"}),
    retry=RETRY,
    stale=stale,
    description="Timed follow-up steps for one lead; a step that fails for good is reset and waits for an operator.",
    # When an instance counts as stuck (seconds in the state with no pending timer; step delays of days
    # are timers, so waiting is stuck only once its timer is overdue).
    stuck_after_s={S.WAITING: 900.0, S.SENDING: 900.0, S.RETRY_WAIT: 900.0},
    # SalesFlow's follow-up scan (its Celery beat job, every 300 s) for leads stale over 24 h: a tick on
    # sfworkflow.schedules, routing key follow_up.scan; a scan missed while the service was down is not worth two.
    schedules=(
        Schedule(
            "follow_up.scan",
            Kind.TICK,
            "follow_up.scan",
            Spec(every_s=300, catch_up=CatchUp.ONCE),
            data={"stale_after_s": 86400},
            description="SalesFlow's scan for leads stale over 24 h (was Celery beat's)",
        ),
    ),
    transitions=(
        Transition("scheduled", S.NEW, W, action=start),
        Transition("timer_step_due", W, SE, action=issue_send),
        Transition("effect_suppressed", SE, W, [current_suppressed_has_next], action=advance),
        Transition("effect_suppressed", SE, S.COMPLETED, [current_suppressed_last], action=finish),
        Transition("sent", [SE, R], W, [current_and_has_next], action=advance),
        Transition("sent", [SE, R], S.COMPLETED, [current_and_last], action=finish),
        Transition("failed", SE, R, [may_retry], action=schedule_retry),
        Transition("failed", SE, S.NEEDS_ATTENTION, [is_current_step], action=reset_and_notify),
        Transition("timer_retry_due", R, SE, action=reissue_send),
        Transition("resume_requested", S.NEEDS_ATTENTION, SE, action=resend_reset_step),
        Transition("reply_received", ANY_ACTIVE, S.REPLIED, action=record_end),
        Transition("cancel_requested", ANY_ACTIVE, S.CANCELLED, action=record_end),
    ),
)
