"""`prospecting`: one lead pipeline run, step by step (entity = run id).

    new ──started──> running ──step_completed──> running (next step) … ──> completed
         └─(first step is outreach)──> awaiting_approval
    running ──step_completed (next step is the first outreach step, not approved yet)──> awaiting_approval
    awaiting_approval ──approval_granted──> running (the outreach step is issued)
    running (crm_sync is next: register looked up) ──lookup_result (synced before)──> next step / completed
                                                   └─lookup_result (not synced)──> running (crm_sync issued)
    running ──effect_suppressed (crm_sync of this lead is another run's)──> next step / completed
    running ──step_failed (retryable, attempt < 3)──> retry_wait ──timer_retry_due──> running (attempt + 1)
    running ──step_failed (not retryable / retries exhausted)──> step_failed   (waits for an operator)
    step_failed ──retry_requested──> running (the same step, attempt + 1)
    retry_wait | step_failed ──step_completed (a late success of the failed attempt)──> next step / completed
    any active state ──cancel_requested──> cancelled

States: `new`; `running` (a run_step command is out and its report awaited, or, before crm_sync, the
register lookup is pending); `awaiting_approval` (waits for an operator: the next step is the first Class B
outreach step and nobody approved the run yet); `retry_wait` (a retryable failure, the backoff timer
`retry_due` is pending); `step_failed` (waits for an operator: the step failed for good, a person decides:
`cancel_requested` or `retry_requested`); terminal `completed` and `cancelled`.

Events (`prospecting.<event>`): `started` {lead_id, steps (unique step names, in order)}, `step_completed`
{step, attempt?}, `step_failed` {step, error_code, retryable, attempt?}, `approval_granted` {approval_token,
granted_by?}, `cancel_requested` {requested_by, reason?}, and, added here, `retry_requested` {requested_by,
reason?}: the operator's other manual decision in `step_failed` (one more attempt of the failed step, same
idempotency key, attempt + 1; if that attempt fails too the run is back in `step_failed`).
Workers echo the command's `attempt` in their reports: a report about an older attempt or an earlier step
is ignored (`stale`), as is a `step_failed` while no attempt is outstanding (retry_wait, step_failed), a
second `approval_granted`, and a `retry_requested` outside `step_failed`. A report about a later step is
parked until that step runs.

Approval: outreach steps (names ending in `_outreach`, and `linkedin_connection`) are Class B actions. Before
the FIRST outreach step the run waits in `awaiting_approval` until `approval_granted`; one approval covers
every later outreach step of the run. An `approval_granted` that arrives while an earlier step still runs
(or retries, or failed) is recorded, and the run then goes through the gate without stopping.

Commands (sfworkflow.commands.prospecting): `run_step` {step, lead_id, approval_token (outreach steps only)},
idempotency key `<tenant>:prospecting:<run>:step:<step>`, the same for every attempt of that step.
CRM sync once per lead, in two layers:
- register `prospecting.crm_synced:<tenant>:<lead_id>` (sfworkflow.register, never pruned): written when a
  run's crm_sync completes. Before issuing crm_sync, the run looks it up (`lookup_result`, answered in the
  same transaction); when it is set, crm_sync is treated as done without a command.
- effect key `prospecting.crm_sync:<tenant>:<lead_id>` on crm_sync's first attempt: covers two runs of a
  lead in flight at once (the register is only written on completion). A second run gets `effect_suppressed`
  and treats crm_sync as done. Retries of crm_sync carry no effect key (the key is this run's already).
  Effect keys of ended instances are pruned after the retention period, hence the register.
  A run cancelled while its crm_sync had failed with no attempt outstanding (`retry_wait`, `step_failed`)
  releases the key (`release_effect`): the lead never reached the CRM, so a later run may write it. A cancel
  while crm_sync is in flight keeps it.

Compensations (sfworkflow.compensations.prospecting):
- `retry_step` {step, attempt, error_code}: published with each automatic retry that is scheduled, for
  visibility (attempt = the attempt about to be made). Idempotency key `…:retry_step:<step>:<attempt>`.
- `cancel_run` {lead_id, requested_by, step, completed_steps, reason}: on `cancel_requested`, when the run
  had issued at least one run_step (a run cancelled before any step ran has nothing to undo and just ends
  `cancelled` with workflow.completed). A cancel from `step_failed` also emits workflow.failed (the run
  failed); every cancel that compensates emits workflow.compensated.

Context: lead_id, steps, cursor (index of the current step), attempt (of the current step), approved,
approval_token, issued (run_step commands issued), completed_steps, suppressed_steps, retries, last_error,
retry_due_at, crm_effect_key (the effect key this run's crm_sync holds), crm_lookup (the register lookup
before crm_sync is pending; crm_sync reports are parked meanwhile).
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Any

from sfworkflow.core.definition import ANY_ACTIVE, RetryPolicy, Step, Transition, WorkflowDefinition

NAME = "prospecting"
CRM_SYNC = "crm_sync"
CRM_REGISTER = "crm_synced"  # lookup name
RUN_STEP = f"{NAME}.run_step"


class S(StrEnum):
    NEW = "new"
    RUNNING = "running"  # run_step is out; step_completed / step_failed awaited
    AWAITING_APPROVAL = "awaiting_approval"  # the next step is the first outreach step: a person approves
    RETRY_WAIT = "retry_wait"  # a retryable failure; the retry timer is pending
    STEP_FAILED = "step_failed"  # failed for good; an operator decides (cancel_requested / retry_requested)
    COMPLETED = "completed"
    CANCELLED = "cancelled"


RETRY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)


def is_outreach(name: str) -> bool:
    """Class B actions: they contact the lead, so a person approves the run before the first one."""
    return name.endswith("_outreach") or name == "linkedin_connection"


# ---- conditions -------------------------------------------------------------------------------
def _current(ctx: dict[str, Any]) -> str:
    name: str = ctx["steps"][ctx["cursor"]]
    return name


def _gated(ctx: dict[str, Any], index: int) -> bool:
    return is_outreach(ctx["steps"][index]) and not ctx.get("approved", False)


def _crm_lookup_answer(step: Step) -> bool:
    ctx = step.context
    return (
        bool(ctx.get("crm_lookup"))
        and _current(ctx) == CRM_SYNC
        and step.data.get("name") == CRM_REGISTER
        and step.data.get("key") == _crm_register_key(step)
    )


def is_current_step(step: Step) -> bool:
    """A report about the step whose run_step is out (crm_sync's is not out while its lookup is pending)."""
    return step.data.get("step") == _current(step.context) and not step.context.get("crm_lookup")


def reports_current_done(step: Step) -> bool:
    """A step_completed for the current step; or crm_sync suppressed by its effect key, or synced before."""
    if step.event.name == "effect_suppressed":
        ctx = step.context
        return _current(ctx) == CRM_SYNC and not ctx.get("crm_lookup") and step.data.get("command_type") == RUN_STEP
    if step.event.name == "lookup_result":
        return _crm_lookup_answer(step) and step.data.get("value") is not None
    return is_current_step(step)


def crm_not_synced_before(step: Step) -> bool:
    return _crm_lookup_answer(step) and step.data.get("value") is None


def _has_next(step: Step) -> bool:
    cursor: int = step.context["cursor"]
    return cursor + 1 < len(step.context["steps"])


def done_next_runs(step: Step) -> bool:
    ctx = step.context
    return reports_current_done(step) and _has_next(step) and not _gated(ctx, ctx["cursor"] + 1)


def done_next_needs_approval(step: Step) -> bool:
    ctx = step.context
    return reports_current_done(step) and _has_next(step) and _gated(ctx, ctx["cursor"] + 1)


def done_last(step: Step) -> bool:
    return reports_current_done(step) and not _has_next(step)


def may_retry(step: Step) -> bool:
    return is_current_step(step) and bool(step.data.get("retryable")) and step.context["attempt"] < RETRY.max_attempts


def first_step_runs(step: Step) -> bool:
    return not is_outreach(step.data["steps"][0])


def first_step_needs_approval(step: Step) -> bool:
    return is_outreach(step.data["steps"][0])


# ---- actions ----------------------------------------------------------------------------------
def _crm_register_key(step: Step) -> str:
    return f"{NAME}.crm_synced:{step.key.tenant_id}:{step.context['lead_id']}"


def _idempotency_key(step: Step, step_name: str) -> str:
    k = step.key
    return f"{k.tenant_id}:{NAME}:{k.entity_id}:step:{step_name}"


def _run_data(ctx: dict[str, Any]) -> dict[str, Any]:
    name = _current(ctx)
    data: dict[str, Any] = {"step": name, "lead_id": ctx["lead_id"]}
    if is_outreach(name):
        data["approval_token"] = ctx["approval_token"]
    return data


def _issue(step: Step, attempt: int) -> None:
    """Publish run_step for the current step; crm_sync's first attempt carries the lead's effect key."""
    ctx = step.context
    name = _current(ctx)
    ctx["attempt"] = attempt
    ctx["issued"] = ctx.get("issued", 0) + 1
    effect_key = f"{NAME}.crm_sync:{step.key.tenant_id}:{ctx['lead_id']}" if name == CRM_SYNC and attempt == 1 else None
    if effect_key is not None:
        ctx["crm_effect_key"] = effect_key
    step.command(
        "run_step", _run_data(ctx), idempotency_key=_idempotency_key(step, name), attempt=attempt, effect_key=effect_key
    )


def _run_current(step: Step) -> None:
    """Start the current step: crm_sync first asks the register whether the lead was synced before."""
    ctx = step.context
    if _current(ctx) == CRM_SYNC:
        ctx["attempt"] = 0
        ctx["crm_lookup"] = True
        step.lookup(CRM_REGISTER, _crm_register_key(step))
        return
    _issue(step, 1)


def issue_crm_sync(step: Step) -> None:
    """The lead was not synced before: run crm_sync (its first attempt carries the lead's effect key)."""
    step.context.pop("crm_lookup", None)
    _issue(step, 1)


def _start(step: Step) -> None:
    d = step.data
    step.context.update(
        lead_id=d["lead_id"],
        steps=list(d["steps"]),
        cursor=0,
        attempt=0,
        approved=False,
        approval_token=None,
        issued=0,
        completed_steps=[],
        suppressed_steps=[],
        retries=0,
        last_error=None,
    )


def start_and_run(step: Step) -> None:
    _start(step)
    _run_current(step)


def start_and_wait(step: Step) -> None:
    _start(step)
    step.note(awaiting_approval_for=_current(step.context))


def _mark_done(step: Step) -> None:
    ctx = step.context
    name = _current(ctx)
    if step.event.name == "effect_suppressed":
        ctx.pop("crm_effect_key", None)  # the key is another run's
        ctx["suppressed_steps"] = [*ctx["suppressed_steps"], name]
        step.note(suppressed_step=name, effect_key=step.data.get("effect_key"))
    elif step.event.name == "lookup_result":
        ctx.pop("crm_lookup", None)
        ctx["suppressed_steps"] = [*ctx["suppressed_steps"], name]
        step.note(suppressed_step=name, synced_before=step.data.get("value"))
    else:
        ctx["completed_steps"] = [*ctx["completed_steps"], name]
        if name == CRM_SYNC:  # the lead is in the CRM: no later run of the tenant writes it again
            step.remember(
                _crm_register_key(step), {"run_id": step.key.entity_id, "synced_at": step.event.timestamp.isoformat()}
            )
    ctx["last_error"] = None
    ctx.pop("retry_due_at", None)
    if step.from_state == S.RETRY_WAIT:
        step.cancel_timer("retry_due")


def advance_and_run(step: Step) -> None:
    _mark_done(step)
    step.context["cursor"] += 1
    _run_current(step)


def advance_and_wait(step: Step) -> None:
    _mark_done(step)
    ctx = step.context
    ctx["cursor"] += 1
    ctx["attempt"] = 0
    step.note(awaiting_approval_for=_current(ctx))


def finish(step: Step) -> None:
    _mark_done(step)


def approve_and_run(step: Step) -> None:
    _record_approval(step)
    _run_current(step)


def record_approval(step: Step) -> None:
    """An approval before the run reached the gate: remembered, the run will not stop there."""
    _record_approval(step)
    step.note(approved_early=True)


def _record_approval(step: Step) -> None:
    step.context["approved"] = True
    step.context["approval_token"] = step.data["approval_token"]
    step.note(approved_by=step.data.get("granted_by"))


def schedule_retry(step: Step) -> None:
    ctx = step.context
    name = _current(ctx)
    error_code = str(step.data.get("error_code", "unknown"))
    delay = RETRY.delay_s(ctx["attempt"], _idempotency_key(step, name))
    step.set_timer_in("retry_due", delay)
    ctx["retry_due_at"] = (step.now + timedelta(seconds=delay)).isoformat()
    ctx["last_error"] = {"step": name, "error_code": error_code, "attempt": ctx["attempt"]}
    nxt = ctx["attempt"] + 1
    step.compensate(
        "retry_step",
        {"step": name, "attempt": nxt, "error_code": error_code},
        idempotency_key=f"{step.key.tenant_id}:{NAME}:{step.key.entity_id}:retry_step:{name}:{nxt}",
    )
    step.note(error_code=error_code, retry_in_s=round(delay, 3))


def reissue(step: Step) -> None:
    """Retry timer fired (or an operator asked): the same command again, same key, attempt + 1."""
    ctx = step.context
    ctx["retries"] = ctx.get("retries", 0) + 1
    ctx.pop("retry_due_at", None)
    _issue(step, ctx["attempt"] + 1)
    step.note(retry_attempt=ctx["attempt"])


def manual_retry(step: Step) -> None:
    reissue(step)
    step.note(retry_requested_by=step.data.get("requested_by"))


def give_up(step: Step) -> None:
    """Not retryable, or retries exhausted: wait in step_failed for a person's decision."""
    ctx = step.context
    error_code = str(step.data.get("error_code", "unknown"))
    ctx["last_error"] = {"step": _current(ctx), "error_code": error_code, "attempt": ctx["attempt"]}
    exhausted = bool(step.data.get("retryable"))
    step.note(
        failure=(
            f"step {_current(ctx)} failed after {ctx['attempt']} attempts ({error_code})"
            if exhausted
            else f"step {_current(ctx)} failed: {error_code}"
        )
    )


def cancel(step: Step) -> None:
    """Cancelled by a person: stop the run; if any step was issued, SalesFlow is told to undo/stop it."""
    ctx = step.context
    requested_by = str(step.data.get("requested_by", "unknown"))
    step.note(cancelled_by=requested_by)
    if step.from_state in (S.RETRY_WAIT, S.STEP_FAILED) and _current(ctx) == CRM_SYNC and ctx.get("crm_effect_key"):
        # crm_sync failed and no attempt is outstanding: the lead was not written; free the key for a later run.
        step.release_effect(ctx.pop("crm_effect_key"))
        step.note(released_effect=True)
    if not ctx.get("issued"):
        return
    pending = _current(ctx) if step.from_state != S.AWAITING_APPROVAL and not ctx.get("crm_lookup") else None
    err: dict[str, Any] = ctx.get("last_error") or {}
    failed = step.from_state == S.STEP_FAILED and bool(err)
    reason = step.data.get("reason") or (
        f"step {err['step']} failed ({err['error_code']}); cancelled by {requested_by}"
        if failed
        else f"cancelled by {requested_by}"
    )
    step.compensate(
        "cancel_run",
        {
            "lead_id": ctx["lead_id"],
            "requested_by": requested_by,
            "step": pending,
            "completed_steps": list(ctx["completed_steps"]),
            "reason": reason,
        },
        idempotency_key=f"{step.key.tenant_id}:{NAME}:{step.key.entity_id}:cancel_run",
    )
    if failed:
        step.lifecycle("workflow.failed", S.CANCELLED, {"reason": reason, "error_code": err["error_code"]})
    step.lifecycle("workflow.compensated", S.CANCELLED, {"compensations": [f"{NAME}.cancel_run"]})


def stale(step: Step) -> str | None:
    """Reports about the past are ignored, not parked."""
    name = step.event.name
    ctx = step.context
    data = step.data
    if "steps" not in ctx:
        return None
    if name in ("step_completed", "step_failed"):
        reported = data.get("step")
        if reported not in ctx["steps"]:
            return f"step {reported!r} is not a step of this run"
        index = ctx["steps"].index(reported)
        if index < ctx["cursor"]:
            return f"step {reported} is already done (current step {_current(ctx)})"
        if index == ctx["cursor"]:
            attempt = data.get("attempt")
            if attempt is not None and attempt < ctx.get("attempt", 0):
                return f"attempt {attempt} of step {reported} was superseded by attempt {ctx['attempt']}"
            if name == "step_failed" and step.from_state in (S.RETRY_WAIT, S.STEP_FAILED):
                return f"step {reported} already failed (attempt {ctx['attempt']}); no attempt is outstanding"
    if name == "approval_granted" and ctx.get("approved"):
        return "the run is approved already"
    if name == "retry_requested" and step.from_state != S.STEP_FAILED:
        return f"nothing to retry: the run is {step.from_state}, not step_failed"
    return None


RU, AA, RW, SF = S.RUNNING, S.AWAITING_APPROVAL, S.RETRY_WAIT, S.STEP_FAILED

DEFINITION = WorkflowDefinition(
    name=NAME,
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.COMPLETED, S.CANCELLED}),
    start_events=frozenset({"started"}),
    events=frozenset(
        {"started", "step_completed", "step_failed", "approval_granted", "cancel_requested", "retry_requested"}
    ),
    internal_events=frozenset({"timer_retry_due", "effect_suppressed", "lookup_result"}),
    commands=frozenset({"run_step"}),
    compensations=frozenset({"retry_step", "cancel_run"}),
    retry=RETRY,
    waits_for_operator=frozenset({S.AWAITING_APPROVAL, S.STEP_FAILED}),
    stale=stale,
    description="Lead pipeline run: qualification, approved outreach (Class B), CRM sync once per lead.",
    # When an instance counts as stuck (seconds in the state with no pending timer).
    stuck_after_s={S.RUNNING: 900.0, S.RETRY_WAIT: 900.0},
    transitions=(
        Transition("started", S.NEW, RU, [first_step_runs], action=start_and_run),
        Transition("started", S.NEW, AA, [first_step_needs_approval], action=start_and_wait),
        Transition("step_completed", [RU, RW, SF], RU, [done_next_runs], action=advance_and_run),
        Transition("step_completed", [RU, RW, SF], AA, [done_next_needs_approval], action=advance_and_wait),
        Transition("step_completed", [RU, RW, SF], S.COMPLETED, [done_last], action=finish),
        Transition("effect_suppressed", RU, RU, [done_next_runs], action=advance_and_run),
        Transition("effect_suppressed", RU, AA, [done_next_needs_approval], action=advance_and_wait),
        Transition("effect_suppressed", RU, S.COMPLETED, [done_last], action=finish),
        Transition("lookup_result", RU, None, [crm_not_synced_before], action=issue_crm_sync),
        Transition("lookup_result", RU, RU, [done_next_runs], action=advance_and_run),
        Transition("lookup_result", RU, AA, [done_next_needs_approval], action=advance_and_wait),
        Transition("lookup_result", RU, S.COMPLETED, [done_last], action=finish),
        Transition("step_failed", RU, RW, [may_retry], action=schedule_retry),
        Transition("step_failed", RU, SF, [is_current_step], action=give_up),
        Transition("timer_retry_due", RW, RU, action=reissue),
        Transition("approval_granted", AA, RU, action=approve_and_run),
        Transition("approval_granted", [RU, RW, SF], None, action=record_approval),
        Transition("retry_requested", SF, RU, action=manual_retry),
        Transition("cancel_requested", ANY_ACTIVE, S.CANCELLED, action=cancel),
    ),
)
