"""`sequence`: multi-step outreach (WhatsApp, email, SMS) for one enrollment (entity = enrollment id).

    new ──enrolled──> waiting ──timer_step_due──> sending ──step_sent──> waiting … ──> completed
                                                   │  └─effect_suppressed (already sent today)──> next step
                                                   ├─step_failed (retryable, attempt < 3)──> retry_wait
                                                   │      retry_wait ──timer_retry_due──> sending (attempt + 1)
                                                   ├─step_failed consent_missing──> next step (skipped)
                                                   └─step_failed otherwise / retries exhausted──> compensated
    replied | unsubscribed ──> stopped;  cancelled ──> cancelled;  paused ⇄ resumed (last writer wins
    by event timestamp: a resumed while running is remembered, a paused older than it is ignored)

Context: sequence_id, lead_id, recipient, steps, cursor (current step), attempt (of the current
send), due_at (when the current step falls due), paused_from, and counters sent/skipped/suppressed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sfworkflow.core.definition import ANY_ACTIVE, RetryPolicy, Step, Transition, WorkflowDefinition
from sfworkflow.core.limits import RateLimit
from sfworkflow.core.schedules import CatchUp, Kind, Schedule, Spec
from sfworkflow.workflows._cursor import (
    current_and_has_next,
    current_and_last,
    has_next_step,
    is_current_step,
    is_last_step,
)

NAME = "sequence"
CONSENT_MISSING = "consent_missing"


class S(StrEnum):
    NEW = "new"
    WAITING = "waiting"  # the current step's timer is pending
    SENDING = "sending"  # send_step was issued; waiting for step_sent / step_failed
    RETRY_WAIT = "retry_wait"  # a retryable failure; the retry timer is pending
    PAUSED = "paused"
    COMPLETED = "completed"
    STOPPED = "stopped"  # the lead replied or unsubscribed
    CANCELLED = "cancelled"
    COMPENSATED = "compensated"  # failed; disable_sequence and raise_alert were published


RETRY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)


# ---- conditions -------------------------------------------------------------------------------


def may_retry(step: Step) -> bool:
    """A retryable failure of the current step with attempts left; consent_missing is never retried, whatever
    `retryable` says (a missing consent is a fact about the lead that no retry changes): the step is skipped."""
    return (
        is_current_step(step)
        and bool(step.data.get("retryable"))
        and step.data.get("error_code") != CONSENT_MISSING
        and step.context["attempt"] < RETRY.max_attempts
    )


def consent_missing_has_next(step: Step) -> bool:
    return is_current_step(step) and step.data.get("error_code") == CONSENT_MISSING and has_next_step(step)


def consent_missing_last(step: Step) -> bool:
    return is_current_step(step) and step.data.get("error_code") == CONSENT_MISSING and is_last_step(step)


def was_waiting(step: Step) -> bool:
    return step.context.get("paused_from") == S.WAITING


def was_sending(step: Step) -> bool:
    return step.context.get("paused_from") == S.SENDING


def was_retry_wait(step: Step) -> bool:
    return step.context.get("paused_from") == S.RETRY_WAIT


# ---- actions ----------------------------------------------------------------------------------
def _idempotency_key(step: Step) -> str:
    k = step.key
    return f"{k.tenant_id}:{NAME}:{k.entity_id}:step:{step.context['cursor']}"


def _schedule_current(step: Step, start: datetime) -> None:
    delay = step.context["steps"][step.context["cursor"]]["delay_seconds"]
    due = start + timedelta(seconds=delay)
    step.context["due_at"] = due.isoformat()
    step.set_timer("step_due", due)


def start(step: Step) -> None:
    d = step.data
    step.context.update(
        sequence_id=d["sequence_id"],
        lead_id=d["lead_id"],
        recipient=dict(d["recipient"]),
        steps=[dict(s) for s in d["steps"]],
        cursor=0,
        attempt=0,
        sent=0,
        skipped=0,
        suppressed=0,
        retries=0,
    )
    _schedule_current(step, step.event.timestamp)


def issue_send(step: Step) -> None:
    """The step fell due: publish send_step once per (tenant, template, recipient, UTC day)."""
    ctx = step.context
    template_id = ctx["steps"][ctx["cursor"]]["template_id"]
    recipient = ctx["recipient"]
    ctx["attempt"] = 1
    # The recipient's address enters the key hashed: effect keys are kept and shown to operators.
    address = hashlib.sha256(recipient["address"].encode()).hexdigest()[:20]
    effect_key = f"{NAME}.send_step:{step.key.tenant_id}:{template_id}:{address}:{step.now.date().isoformat()}"
    ctx["effect_key"] = effect_key
    step.command(
        "send_step",
        _send_data(ctx),
        idempotency_key=_idempotency_key(step),
        attempt=1,
        effect_key=effect_key,
    )


def _send_data(ctx: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": ctx["cursor"],
        "template_id": ctx["steps"][ctx["cursor"]]["template_id"],
        "recipient": ctx["recipient"],
        "sequence_id": ctx["sequence_id"],
        "lead_id": ctx["lead_id"],
    }


def reissue_send(step: Step) -> None:
    """Retry timer fired: the same command again, same idempotency key, attempt + 1."""
    ctx = step.context
    ctx["attempt"] = ctx["attempt"] + 1
    ctx["retries"] = ctx.get("retries", 0) + 1
    step.command("send_step", _send_data(ctx), idempotency_key=_idempotency_key(step), attempt=ctx["attempt"])
    step.note(retry_attempt=ctx["attempt"])


def advance(step: Step) -> None:
    """The current step is done (sent, skipped or suppressed): schedule the next one."""
    ctx = step.context
    _count(step)
    ctx["cursor"] = ctx["cursor"] + 1
    ctx["attempt"] = 0
    _schedule_current(step, step.now)


def finish(step: Step) -> None:
    _count(step)
    step.context["attempt"] = 0


def _count(step: Step) -> None:
    ctx = step.context
    name = step.event.name
    if name == "step_sent":
        ctx["sent"] = ctx.get("sent", 0) + 1
    elif name == "effect_suppressed":
        ctx["suppressed"] = ctx.get("suppressed", 0) + 1
        step.note(suppressed_step=ctx["cursor"], effect_key=step.data.get("effect_key"))
    elif name == "step_failed":
        ctx["skipped"] = ctx.get("skipped", 0) + 1
        step.note(skipped_step=ctx["cursor"], error_code=step.data.get("error_code"))
        _send_did_not_happen(step)


def _send_did_not_happen(step: Step) -> None:
    """A send that failed for good frees its effect key: another enrollment's send that day may go."""
    key = step.context.pop("effect_key", None)
    if key:
        step.release_effect(key)


def schedule_retry(step: Step) -> None:
    ctx = step.context
    delay = RETRY.delay_s(ctx["attempt"], _idempotency_key(step))
    step.set_timer_in("retry_due", delay)
    ctx["due_at"] = (step.now + timedelta(seconds=delay)).isoformat()
    step.note(error_code=step.data.get("error_code"), retry_in_s=round(delay, 3))


def compensate(step: Step) -> None:
    """A failure nothing will fix: disable the sequence and alert, then end compensated."""
    ctx = step.context
    error_code = str(step.data.get("error_code", "unknown"))
    exhausted = bool(step.data.get("retryable"))
    reason = (
        f"step {ctx['cursor']} failed after {ctx['attempt']} attempts ({error_code})"
        if exhausted
        else f"step {ctx['cursor']} failed: {error_code}"
    )
    _send_did_not_happen(step)
    key = f"{step.key.tenant_id}:{NAME}:{step.key.entity_id}:compensate"
    step.compensate("disable_sequence", {"sequence_id": ctx["sequence_id"], "reason": reason}, idempotency_key=key)
    step.compensate(
        "raise_alert",
        {
            "severity": "warning",
            "message": f"sequence {ctx['sequence_id']} disabled: {reason}",
            "error_code": error_code,
            "step": ctx["cursor"],
        },
        idempotency_key=key,
    )
    step.lifecycle("workflow.failed", S.COMPENSATED, {"reason": reason, "error_code": error_code})
    step.lifecycle(
        "workflow.compensated",
        S.COMPENSATED,
        {"compensations": [f"{NAME}.disable_sequence", f"{NAME}.raise_alert"]},
    )
    step.note(failure=reason)


def pause(step: Step) -> None:
    """Suspend: timers are cancelled; `resumed` returns to the state paused here."""
    step.context["paused_from"] = step.from_state
    step.context["paused_at"] = step.event.timestamp.isoformat()
    step.cancel_timers()


def advance_while_paused(step: Step) -> None:
    """The send decided just before a pause was suppressed: the next step is pending, to fall due on resume."""
    ctx = step.context
    _count(step)
    ctx["cursor"] = ctx["cursor"] + 1
    ctx["attempt"] = 0
    ctx["paused_from"] = S.WAITING
    ctx["due_at"] = (step.now + timedelta(seconds=ctx["steps"][ctx["cursor"]]["delay_seconds"])).isoformat()


def note_resume(step: Step) -> None:
    """A `resumed` while running changes nothing now, but a `paused` older than it must not apply later."""
    _remember_resume(step)
    step.note(resumed_while_running=True)


def _remember_resume(step: Step) -> None:
    ctx = step.context
    ts = step.event.timestamp
    if "resumed_at" not in ctx or ts > datetime.fromisoformat(ctx["resumed_at"]):
        ctx["resumed_at"] = ts.isoformat()


def resume_timer(step: Step) -> None:
    """Resume into a waiting state: the pending timer fires at its old due time, or now if passed."""
    ctx = step.context
    from_state = ctx.pop("paused_from", S.WAITING)
    ctx.pop("paused_at", None)
    _remember_resume(step)
    due = max(datetime.fromisoformat(ctx["due_at"]), step.now)
    step.set_timer("step_due" if from_state == S.WAITING else "retry_due", due)


def resume_sending(step: Step) -> None:
    step.context.pop("paused_from", None)
    step.context.pop("paused_at", None)
    _remember_resume(step)


def record_stop(step: Step) -> None:
    step.note(stopped_by=step.event.name)


def stale(step: Step) -> str | None:
    """Events that refer to the past are ignored, not parked: a report about an older step or
    attempt, a `paused` older than the last `resumed`, a `resumed` older than the pause it would end.

    Pause and resume are last-writer-wins by event timestamp, so they may arrive in any order
    (across consumers) and the newest intent holds; parking them instead would let a stray
    `resumed` end an unrelated later pause."""
    data = step.data
    name = step.event.name
    ctx = step.context
    if name == "paused":
        if step.from_state == S.PAUSED:
            return "already paused"
        if "resumed_at" in ctx and step.event.timestamp <= datetime.fromisoformat(ctx["resumed_at"]):
            return f"older than the resumed of {ctx['resumed_at']}"
    if name == "resumed" and step.from_state == S.PAUSED:
        if step.event.timestamp < datetime.fromisoformat(ctx["paused_at"]):
            return f"older than the pause of {ctx['paused_at']}"
    if name in ("step_sent", "step_failed"):
        cursor = ctx.get("cursor")
        if cursor is None:
            return None
        if data.get("step", cursor) < cursor:
            return f"step {data.get('step')} is already done (current step {cursor})"
        attempt = data.get("attempt")
        if attempt is not None and data.get("step") == cursor and attempt < ctx.get("attempt", 0):
            return f"attempt {attempt} of step {cursor} was superseded by attempt {ctx['attempt']}"
    return None


def by_sender(data: Mapping[str, Any]) -> str:
    """send_step's rate-limit key after the tenant: the channel and the sender ('-' when the enrollment named none)."""
    recipient = data["recipient"]
    return f"{recipient['channel']}:{recipient.get('sender', '-')}"


W, SE, R, P = S.WAITING, S.SENDING, S.RETRY_WAIT, S.PAUSED

DEFINITION = WorkflowDefinition(
    name=NAME,
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.COMPLETED, S.STOPPED, S.CANCELLED, S.COMPENSATED}),
    start_events=frozenset({"enrolled"}),
    events=frozenset(
        {"enrolled", "step_sent", "step_failed", "replied", "unsubscribed", "paused", "resumed", "cancelled"}
    ),
    internal_events=frozenset({"timer_step_due", "timer_retry_due", "effect_suppressed"}),
    commands=frozenset({"send_step"}),
    compensations=frozenset({"disable_sequence", "raise_alert"}),
    retry=RETRY,
    stale=stale,
    description="Multi-step outreach (WhatsApp, email, SMS) for one enrollment.",
    # When an instance counts as stuck (seconds in the state with no pending timer; a pending timer
    # counts only once overdue). Paused is a person's choice: never stuck.
    stuck_after_s={S.WAITING: 900.0, S.SENDING: 900.0, S.RETRY_WAIT: 900.0, S.PAUSED: None},
    # Channels limit senders, not sfworkflow: a WhatsApp Business number has a throughput, an e-mail provider limits
    # per sender domain. 50 sends a second per (tenant, channel, sender), bursts of 50; a send over it is deferred,
    # never dropped. A deployment changes it with SFWORKFLOW_RATE_LIMITS=sequence.send_step/per_sender=PER_S/BURST.
    limits=(
        RateLimit(
            "send_step",
            name="per_sender",
            per_s=50,
            burst=50,
            key=by_sender,
            description="sends per (tenant, channel, sender); at most 100,000 a UTC day (a WhatsApp number's "
            "highest messaging tier short of unlimited)",
            daily_cap=100_000,
        ),
    ),
    # SalesFlow's sequence tick (its Celery beat job, every 300 s): a tick on sfworkflow.schedules, routing key
    # sequence.tick, for SalesFlow's periodic sequence job; fired once per tick whatever the replicas.
    schedules=(
        Schedule(
            "sequence.tick",
            Kind.TICK,
            "sequence.tick",
            Spec(every_s=300, catch_up=CatchUp.ONCE),
            description="SalesFlow's periodic sequence job (was Celery beat's sequence tick)",
        ),
    ),
    transitions=(
        Transition("enrolled", S.NEW, W, action=start),
        Transition("timer_step_due", W, SE, action=issue_send),
        Transition("effect_suppressed", SE, W, [has_next_step], action=advance),
        Transition("effect_suppressed", SE, S.COMPLETED, [is_last_step], action=finish),
        Transition("step_sent", [SE, R], W, [current_and_has_next], action=advance),
        Transition("step_sent", [SE, R], S.COMPLETED, [current_and_last], action=finish),
        Transition("step_failed", SE, R, [may_retry], action=schedule_retry),
        Transition("step_failed", SE, W, [consent_missing_has_next], action=advance),
        Transition("step_failed", SE, S.COMPLETED, [consent_missing_last], action=finish),
        Transition("step_failed", SE, S.COMPENSATED, [is_current_step], action=compensate),
        Transition("timer_retry_due", R, SE, action=reissue_send),
        Transition("replied", ANY_ACTIVE, S.STOPPED, action=record_stop),
        Transition("unsubscribed", ANY_ACTIVE, S.STOPPED, action=record_stop),
        Transition("cancelled", ANY_ACTIVE, S.CANCELLED, action=record_stop),
        Transition("paused", [W, SE, R], P, action=pause),
        Transition("resumed", P, W, [was_waiting], action=resume_timer),
        Transition("resumed", P, R, [was_retry_wait], action=resume_timer),
        Transition("resumed", P, SE, [was_sending], action=resume_sending),
        Transition("resumed", [W, SE, R], None, action=note_resume),
        # A suppression decided in the same batch as a later `paused` arrives while paused.
        Transition("effect_suppressed", P, None, [was_sending, has_next_step], action=advance_while_paused),
        Transition("effect_suppressed", P, S.COMPLETED, [was_sending, is_last_step], action=finish),
    ),
)
