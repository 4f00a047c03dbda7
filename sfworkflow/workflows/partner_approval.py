"""`partner_approval`: a partner request that waits, stage by stage, for people (entity = request id).

    new ──requested──> in_review ──approved (stage has a next)──> in_review (next stage) … ──approved──> approved
    in_review ──timer_sla_due (the stage passed its SLA)──> escalated
    escalated ──approved──> in_review (next stage) / approved;   escalated ──timer_expiry_due──> expired
    in_review | escalated ──rejected──> rejected;   any active state ──withdrawn──> withdrawn

States: `new`; `in_review` (request_review is out for the current stage; the durable SLA timer `sla_due`
is pending); `escalated` (the stage passed its SLA: escalate was published once, and a second SLA timer
`expiry_due` is pending); terminal `approved`, `rejected`, `expired`, `withdrawn`.

Events (`partner_approval.<event>`): `requested` {partner_id, stages (unique, in order), sla_hours (stage ->
hours, a positive number, may be fractional)}, `approved` {stage, approver_id}, `rejected` {stage,
approver_id, reason}, `withdrawn` {requested_by?, reason?}. A stage without an entry in sla_hours gets
DEFAULT_SLA_HOURS. A decision about an earlier stage (or a stage the request does not have) is ignored
(`stale`); a decision about a later stage is parked and applies when that stage is reached (an executive
who approves before legal did).

SLA: each stage's first SLA counts from when its review was requested (the first stage: the `requested`
event's timestamp); the second SLA (escalated -> expired) is as long again, counted from the first's due
time, so a stage expires at request time + 2 x its SLA whatever the timer poll's lag.

Commands (sfworkflow.commands.partner_approval):
- `request_review` {stage, partner_id, sla_hours, due_at}: key `<tenant>:partner_approval:<request>:review:<stage>`.
- `escalate` {stage, partner_id, sla_hours, overdue_since, expires_at}: once per stage, held by effect key
  `partner_approval.escalate:<tenant>:<request>:<stage>` (a second request for it is suppressed and noted);
  idempotency key `…:escalate:<stage>`.
- `notify_outcome` {outcome (approved|rejected|expired|withdrawn), partner_id, stage, reason, approvals} on
  every end; idempotency key `…:notify_outcome`.
No worker reports failures for these commands, so there is no retry in this workflow (the definition
carries the standard RetryPolicy for the record).

Compensation (sfworkflow.compensations.partner_approval): `void_request` {partner_id, reason (rejected |
expired | withdrawn), stage, detail} on rejection, on expiry, and on withdrawal too (the reviewers' open
tasks for the request are closed the same way whoever ended it). Reaching a terminal state cancels every
timer, and nothing else is left to publish. Rejection and expiry emit workflow.failed (error_code
`rejected` / `sla_expired`) and workflow.compensated; a withdrawal emits workflow.compensated only.

Context: partner_id, stages, sla_hours (resolved for every stage), cursor (index of the current stage),
due_at (of the pending timer), escalated_stages, approvals [{stage, approver_id, at}].
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sfworkflow.core.definition import ANY_ACTIVE, RetryPolicy, Step, Transition, WorkflowDefinition

NAME = "partner_approval"
DEFAULT_SLA_HOURS = 72.0


class S(StrEnum):
    NEW = "new"
    IN_REVIEW = "in_review"  # request_review is out; the stage's SLA timer is pending
    ESCALATED = "escalated"  # SLA passed: escalate published; the second SLA timer is pending
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


RETRY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)


# ---- conditions -------------------------------------------------------------------------------
def _current(ctx: dict[str, Any]) -> str:
    stage: str = ctx["stages"][ctx["cursor"]]
    return stage


def is_current_stage(step: Step) -> bool:
    return step.data.get("stage") == _current(step.context)


def current_and_has_next(step: Step) -> bool:
    return is_current_stage(step) and step.context["cursor"] + 1 < len(step.context["stages"])


def current_and_last(step: Step) -> bool:
    return is_current_stage(step) and step.context["cursor"] + 1 == len(step.context["stages"])


def timer_for_current_stage(step: Step) -> bool:
    return bool(step.data.get("stage", _current(step.context)) == _current(step.context))


# ---- actions ----------------------------------------------------------------------------------
def _key(step: Step, what: str) -> str:
    return f"{step.key.tenant_id}:{NAME}:{step.key.entity_id}:{what}"


def _sla_s(ctx: dict[str, Any], stage: str) -> float:
    return float(ctx["sla_hours"][stage]) * 3600.0


def _request_review(step: Step, start: datetime) -> None:
    """Ask for the current stage's review and start its SLA timer."""
    ctx = step.context
    stage = _current(ctx)
    due = start + timedelta(seconds=_sla_s(ctx, stage))
    ctx["due_at"] = due.isoformat()
    step.set_timer("sla_due", due, {"stage": stage})
    step.command(
        "request_review",
        {
            "stage": stage,
            "partner_id": ctx["partner_id"],
            "sla_hours": ctx["sla_hours"][stage],
            "due_at": due.isoformat(),
        },
        idempotency_key=_key(step, f"review:{stage}"),
    )


def start(step: Step) -> None:
    d = step.data
    stages = list(d["stages"])
    given = d.get("sla_hours") or {}
    step.context.update(
        partner_id=d["partner_id"],
        stages=stages,
        sla_hours={s: given.get(s, DEFAULT_SLA_HOURS) for s in stages},
        cursor=0,
        escalated_stages=[],
        approvals=[],
    )
    _request_review(step, step.event.timestamp)


def _record_approval(step: Step) -> None:
    ctx = step.context
    entry = {"stage": _current(ctx), "approver_id": step.data["approver_id"], "at": step.event.timestamp.isoformat()}
    ctx["approvals"] = [*ctx["approvals"], entry]
    step.note(approved_stage=entry["stage"], approver_id=entry["approver_id"])


def advance(step: Step) -> None:
    """The stage is approved: drop its timers and ask the next stage."""
    _record_approval(step)
    step.cancel_timer("expiry_due")
    step.context["cursor"] += 1
    _request_review(step, step.now)


def _notify(step: Step, outcome: str, stage: str | None, reason: str | None) -> None:
    ctx = step.context
    step.command(
        "notify_outcome",
        {
            "outcome": outcome,
            "partner_id": ctx["partner_id"],
            "stage": stage,
            "reason": reason,
            "approvals": [{"stage": a["stage"], "approver_id": a["approver_id"]} for a in ctx["approvals"]],
        },
        idempotency_key=_key(step, "notify_outcome"),
    )


def finish_approved(step: Step) -> None:
    _record_approval(step)
    step.context.pop("due_at", None)
    _notify(step, "approved", None, None)


def _void(step: Step, reason: str, detail: str) -> None:
    ctx = step.context
    step.compensate(
        "void_request",
        {"partner_id": ctx["partner_id"], "reason": reason, "stage": _current(ctx), "detail": detail},
        idempotency_key=_key(step, "void_request"),
    )


def reject(step: Step) -> None:
    ctx = step.context
    stage = _current(ctx)
    d = step.data
    detail = f"rejected at stage {stage} by {d.get('approver_id')}: {d.get('reason')}"
    ctx.pop("due_at", None)
    _void(step, "rejected", detail)
    _notify(step, "rejected", stage, str(d.get("reason")))
    step.lifecycle("workflow.failed", S.REJECTED, {"reason": detail, "error_code": "rejected"})
    step.lifecycle("workflow.compensated", S.REJECTED, {"compensations": [f"{NAME}.void_request"]})
    step.note(rejected_stage=stage, approver_id=d.get("approver_id"))


def escalate(step: Step) -> None:
    """The stage passed its SLA: escalate once, and give it as long again before it expires."""
    ctx = step.context
    stage = _current(ctx)
    overdue_since = datetime.fromisoformat(ctx["due_at"])
    expires = overdue_since + timedelta(seconds=_sla_s(ctx, stage))
    ctx["due_at"] = expires.isoformat()
    ctx["escalated_stages"] = [*ctx["escalated_stages"], stage]
    step.set_timer("expiry_due", expires, {"stage": stage})
    step.command(
        "escalate",
        {
            "stage": stage,
            "partner_id": ctx["partner_id"],
            "sla_hours": ctx["sla_hours"][stage],
            "overdue_since": overdue_since.isoformat(),
            "expires_at": expires.isoformat(),
        },
        idempotency_key=_key(step, f"escalate:{stage}"),
        effect_key=f"{NAME}.escalate:{step.key.tenant_id}:{step.key.entity_id}:{stage}",
    )
    step.note(escalated_stage=stage)


def note_suppressed(step: Step) -> None:
    step.note(suppressed=step.data.get("command_type"), effect_key=step.data.get("effect_key"))


def expire(step: Step) -> None:
    ctx = step.context
    stage = _current(ctx)
    hours = ctx["sla_hours"][stage]
    detail = f"stage {stage} had no decision within twice its SLA of {hours:g} h (escalated at {hours:g} h)"
    ctx.pop("due_at", None)
    _void(step, "expired", detail)
    _notify(step, "expired", stage, detail)
    step.lifecycle("workflow.failed", S.EXPIRED, {"reason": detail, "error_code": "sla_expired"})
    step.lifecycle("workflow.compensated", S.EXPIRED, {"compensations": [f"{NAME}.void_request"]})
    step.note(expired_stage=stage)


def withdraw(step: Step) -> None:
    ctx = step.context
    stage = _current(ctx)
    d = step.data
    by = d.get("requested_by")
    detail = (
        f"withdrawn at stage {stage}" + (f" by {by}" if by else "") + (f": {d['reason']}" if d.get("reason") else "")
    )
    ctx.pop("due_at", None)
    _void(step, "withdrawn", detail)
    _notify(step, "withdrawn", stage, d.get("reason"))
    step.lifecycle("workflow.compensated", S.WITHDRAWN, {"compensations": [f"{NAME}.void_request"]})
    step.note(withdrawn_stage=stage, withdrawn_by=by)


def stale(step: Step) -> str | None:
    """A decision about an earlier stage, or about a stage the request does not have, is ignored."""
    if step.event.name not in ("approved", "rejected") or "stages" not in step.context:
        return None
    ctx = step.context
    stage = step.data.get("stage")
    if stage not in ctx["stages"]:
        return f"stage {stage!r} is not a stage of this request"
    if ctx["stages"].index(stage) < ctx["cursor"]:
        return f"stage {stage} was decided already (current stage {_current(ctx)})"
    return None


IR, ES = S.IN_REVIEW, S.ESCALATED

DEFINITION = WorkflowDefinition(
    name=NAME,
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.APPROVED, S.REJECTED, S.EXPIRED, S.WITHDRAWN}),
    start_events=frozenset({"requested"}),
    events=frozenset({"requested", "approved", "rejected", "withdrawn"}),
    internal_events=frozenset({"timer_sla_due", "timer_expiry_due", "effect_suppressed"}),
    commands=frozenset({"request_review", "escalate", "notify_outcome"}),
    compensations=frozenset({"void_request"}),
    retry=RETRY,
    stale=stale,
    description="Multi-day partner approval: one review per stage, SLA escalation once per stage, then expiry.",
    # When an instance counts as stuck: a stage waits for people under its SLA timer, so it is stuck only
    # once that timer is overdue, never before its SLA; without a timer (never expected), after a week.
    stuck_after_s={S.IN_REVIEW: 7 * 86400.0, S.ESCALATED: 7 * 86400.0},
    transitions=(
        Transition("requested", S.NEW, IR, action=start),
        Transition("approved", [IR, ES], IR, [current_and_has_next], action=advance),
        Transition("approved", [IR, ES], S.APPROVED, [current_and_last], action=finish_approved),
        Transition("rejected", [IR, ES], S.REJECTED, [is_current_stage], action=reject),
        Transition("timer_sla_due", IR, ES, [timer_for_current_stage], action=escalate),
        Transition("timer_expiry_due", ES, S.EXPIRED, [timer_for_current_stage], action=expire),
        Transition("effect_suppressed", ES, None, action=note_suppressed),
        Transition("withdrawn", ANY_ACTIVE, S.WITHDRAWN, action=withdraw),
    ),
)
