"""`agent`: one AI agent task, run by an agent worker, with a durable timeout (entity = task id).

    new ──task_submitted──> dispatched ──started / checkpointed──> running ──succeeded──> succeeded
                                │  (run_task issued; timer run_timeout = timeout_seconds)  │
                                └──────────── failed (retryable, attempt < 3) ─────────────┤
                                              timer_run_timeout (attempt < 3) ─────────────┤
                                                                                           v
                          dispatched <──timer_retry_due (same key, attempt + 1)── retry_wait
                  failed not retryable / retries exhausted / last timeout ──> dead_lettered
                  dead_lettered ──replay_requested──> dispatched (run_task from the last checkpoint)

States: `new`; `dispatched` (run_task issued, the worker has not reported yet); `running` (the worker
reported `started` or a checkpoint); `retry_wait` (a retryable failure or a timeout; the backoff timer
`retry_due` is pending); `succeeded` (terminal); `dead_lettered` (retries exhausted or a failure nothing
retries: `agent.dead_letter_task` was published; NOT terminal, an operator may revive it with
`replay_requested`, so it is in `waits_for_operator`).

Events (from SalesFlow): `agent.task_submitted` {agent_type, input, timeout_seconds (default 30)} starts
the instance; `agent.started`, `agent.checkpointed` {checkpoint_id, step}, `agent.succeeded` {output},
`agent.failed` {error_code, retryable} come from the agent worker, which echoes the command's `attempt`
and `run` (optional fields, added beyond the issue: they let late reports about an older attempt or an
older run be ignored); `agent.replay_requested` {requested_by, reason} comes from an operator.

Commands: `agent.run_task` {agent_type, input, from_checkpoint_id (null on the first run), run,
timeout_seconds} to sfworkflow.commands.agent. `run` (added) is 0 for the submitted run and n for the
n-th replay. Idempotency key `<tenant>:agent:<task>:run` for the submitted run and
`<tenant>:agent:<task>:run:replay:<n>` for replay n (a replay is a new decision); a retry re-issues the
run's key with `attempt` + 1 and resumes from the last checkpoint recorded so far.

Compensation: `agent.dead_letter_task` {last_checkpoint_id, error_code, attempts, run} to
sfworkflow.compensations.agent, key `<tenant>:agent:<task>:dead_letter:<run>` (once per run), with
lifecycle `workflow.failed` {reason, error_code} and `workflow.compensated`.

Dedupe: "a task submitted twice runs once" is the instance key itself (tenant, agent, task id), unique
in sfworkflow.instance: a second `task_submitted` for a started task is ignored by the engine
("instance already started"), and a redelivered one (same event id) is dropped by the inbox.

Concurrency: at most 4 runs per tenant in flight (`agent.run_task/per_tenant`, core/limits.py ConcurrencyLimit): a
run_task past them is queued until a run of the tenant leaves dispatched/running, and its `run_timeout` starts then.

Timeout: the durable timer `run_timeout` is set when run_task is issued (each attempt, each replay),
not when `started` arrives, so a run that is never picked up times out too; `started` does not extend
it. Its firing counts as a retryable failure with error code `timeout`. The timer's payload names the
run and attempt it guards; a timer about another attempt is ignored.

Context: agent_type, input, timeout_seconds, run, run_key, attempt, last_checkpoint_id,
checkpoint_step, checkpoints, retries, replays, last_error.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Any

from sfworkflow.core.definition import RetryPolicy, Step, Transition, WorkflowDefinition
from sfworkflow.core.limits import ConcurrencyLimit

NAME = "agent"
DEFAULT_TIMEOUT_S = 30
TIMEOUT = "timeout"  # error code of a run that passed its timeout_seconds


class S(StrEnum):
    NEW = "new"
    DISPATCHED = "dispatched"  # run_task issued; run_timeout pending
    RUNNING = "running"  # the worker reported started (or a checkpoint)
    RETRY_WAIT = "retry_wait"  # a retryable failure or timeout; retry_due pending
    SUCCEEDED = "succeeded"
    DEAD_LETTERED = "dead_lettered"  # dead_letter_task published; waits for replay_requested


RETRY = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=60.0)
REPORTS = frozenset({"started", "checkpointed", "succeeded", "failed"})


# ---- conditions -------------------------------------------------------------------------------
def may_retry(step: Step) -> bool:
    return bool(step.data.get("retryable")) and step.context["attempt"] < RETRY.max_attempts


def attempts_left(step: Step) -> bool:
    attempt: int = step.context["attempt"]
    return attempt < RETRY.max_attempts


# ---- actions ----------------------------------------------------------------------------------
def _key(step: Step, what: str) -> str:
    return f"{step.key.tenant_id}:{NAME}:{step.key.entity_id}:{what}"


def _run_data(ctx: dict[str, Any]) -> dict[str, Any]:
    return {
        "agent_type": ctx["agent_type"],
        "input": ctx["input"],
        "from_checkpoint_id": ctx["last_checkpoint_id"],
        "run": ctx["run"],
        "timeout_seconds": ctx["timeout_seconds"],
    }


def _issue_run(step: Step) -> None:
    """Publish run_task for the current run and attempt, and arm its durable timeout."""
    ctx = step.context
    step.command("run_task", _run_data(ctx), idempotency_key=ctx["run_key"], attempt=ctx["attempt"])
    step.set_timer_in("run_timeout", ctx["timeout_seconds"], {"run": ctx["run"], "attempt": ctx["attempt"]})


def submit(step: Step) -> None:
    d = step.data
    step.context.update(
        agent_type=d["agent_type"],
        input=d["input"],
        timeout_seconds=d.get("timeout_seconds", DEFAULT_TIMEOUT_S),
        run=0,
        run_key=_key(step, "run"),
        attempt=1,
        last_checkpoint_id=None,
        checkpoint_step=None,
        checkpoints=0,
        retries=0,
        replays=0,
        last_error=None,
    )
    _issue_run(step)


def record_started(step: Step) -> None:
    step.context["started_at"] = step.event.timestamp.isoformat()
    step.note(attempt=step.context["attempt"], run=step.context["run"])


def record_checkpoint(step: Step) -> None:
    ctx = step.context
    ctx["last_checkpoint_id"] = step.data["checkpoint_id"]
    ctx["checkpoint_step"] = step.data["step"]
    ctx["checkpoints"] = ctx.get("checkpoints", 0) + 1
    step.note(checkpoint_id=step.data["checkpoint_id"], checkpoint_step=step.data["step"])


def record_success(step: Step) -> None:
    step.note(attempt=step.context["attempt"], run=step.context["run"])


def _failure(step: Step) -> tuple[str, bool]:
    """(error code, retryable) of the failure this step reports: a `failed` event or the run's timeout."""
    if step.event.name == "timer_run_timeout":
        return TIMEOUT, True
    return str(step.data.get("error_code", "unknown")), bool(step.data.get("retryable"))


def schedule_retry(step: Step) -> None:
    ctx = step.context
    error_code, _ = _failure(step)
    ctx["last_error"] = error_code
    delay = RETRY.delay_s(ctx["attempt"], ctx["run_key"])
    step.cancel_timer("run_timeout")
    step.set_timer_in("retry_due", delay)
    ctx["due_at"] = (step.now + timedelta(seconds=delay)).isoformat()
    step.note(error_code=error_code, retry_in_s=round(delay, 3))


def reissue_run(step: Step) -> None:
    """Backoff elapsed: run_task again, same idempotency key, attempt + 1, from the last checkpoint."""
    ctx = step.context
    ctx["attempt"] += 1
    ctx["retries"] = ctx.get("retries", 0) + 1
    ctx.pop("due_at", None)
    _issue_run(step)
    step.note(retry_attempt=ctx["attempt"], from_checkpoint_id=ctx["last_checkpoint_id"])


def dead_letter(step: Step) -> None:
    """Nothing retries this run any more: hand the task to the dead-letter queue, wait for an operator."""
    ctx = step.context
    error_code, retryable = _failure(step)
    ctx["last_error"] = error_code
    reason = (
        f"run {ctx['run']} failed after {ctx['attempt']} attempts ({error_code})"
        if retryable
        else f"run {ctx['run']} failed: {error_code}"
    )
    step.cancel_timers()
    step.compensate(
        "dead_letter_task",
        {
            "last_checkpoint_id": ctx["last_checkpoint_id"],
            "error_code": error_code,
            "attempts": ctx["attempt"],
            "run": ctx["run"],
        },
        idempotency_key=_key(step, f"dead_letter:{ctx['run']}"),
    )
    step.lifecycle("workflow.failed", S.DEAD_LETTERED, {"reason": reason, "error_code": error_code})
    step.lifecycle("workflow.compensated", S.DEAD_LETTERED, {"compensations": [f"{NAME}.dead_letter_task"]})
    step.note(failure=reason)


def replay(step: Step) -> None:
    """An operator asked to run the dead-lettered task again: a new run, from the last checkpoint."""
    ctx = step.context
    ctx["run"] += 1
    ctx["replays"] = ctx.get("replays", 0) + 1
    ctx["run_key"] = _key(step, f"run:replay:{ctx['run']}")
    ctx["attempt"] = 1
    _issue_run(step)
    step.note(
        replay=ctx["run"],
        requested_by=step.data.get("requested_by"),
        reason=step.data.get("reason"),
        from_checkpoint_id=ctx["last_checkpoint_id"],
    )


def stale(step: Step) -> str | None:
    """Reports about the past are ignored, not parked: an older run or attempt, a second `started` or
    `failed` of the current attempt, a checkpoint older than the last one, any worker report once the
    run was dead-lettered, a timeout of another attempt, and `replay_requested` unless dead-lettered."""
    name = step.event.name
    ctx = step.context
    state = step.from_state
    data = step.data
    if name == "replay_requested":
        return None if state == S.DEAD_LETTERED else f"the task is {state}, not dead-lettered: nothing to replay"
    if name == "timer_run_timeout":
        if (data.get("run", ctx["run"]), data.get("attempt", ctx["attempt"])) != (ctx["run"], ctx["attempt"]):
            return f"timeout of run {data.get('run')} attempt {data.get('attempt')} is not the current attempt"
        return None
    if name not in REPORTS:
        return None
    if state == S.DEAD_LETTERED:
        return f"run {ctx['run']} was dead-lettered; {name} reports on it"
    run, attempt = data.get("run"), data.get("attempt")
    if run is not None and run < ctx["run"]:
        return f"run {run} was replaced by replay {ctx['run']}"
    if run is None or run == ctx["run"]:
        if attempt is not None and attempt < ctx["attempt"]:
            return f"attempt {attempt} was superseded by attempt {ctx['attempt']}"
        current = attempt is None or attempt == ctx["attempt"]
        if current and name == "started" and state in (S.RUNNING, S.RETRY_WAIT):
            return f"attempt {ctx['attempt']} already started"
        if current and name == "failed" and state == S.RETRY_WAIT:
            return f"attempt {ctx['attempt']} already failed"
    if (
        name == "checkpointed"
        and ctx.get("checkpoint_step") is not None
        and data.get("step", 0) < ctx["checkpoint_step"]
    ):
        return f"checkpoint of step {data.get('step')} is older than the one of step {ctx['checkpoint_step']}"
    return None


D, R, W = S.DISPATCHED, S.RUNNING, S.RETRY_WAIT

DEFINITION = WorkflowDefinition(
    name=NAME,
    version=1,
    states=S,
    initial=S.NEW,
    terminal=frozenset({S.SUCCEEDED}),
    waits_for_operator=frozenset({S.DEAD_LETTERED}),
    start_events=frozenset({"task_submitted"}),
    events=frozenset({"task_submitted", "started", "checkpointed", "succeeded", "failed", "replay_requested"}),
    internal_events=frozenset({"timer_run_timeout", "timer_retry_due"}),
    commands=frozenset({"run_task"}),
    compensations=frozenset({"dead_letter_task"}),
    retry=RETRY,
    stale=stale,
    description="One AI agent task run by an agent worker, with a durable timeout, checkpoints, "
    "retries, a dead letter and operator replay.",
    # When an instance counts as stuck (seconds in the state with no pending timer; the run timeout is a
    # timer, so a run is stuck only if that timer is overdue).
    stuck_after_s={S.DISPATCHED: 900.0, S.RUNNING: 900.0, S.RETRY_WAIT: 900.0},
    # LLM calls cost money per call and providers limit parallel requests: at most 4 runs of a tenant in flight. A
    # run_task beyond them is queued (its instance stays `dispatched`) and goes out when one of the tenant's runs
    # leaves dispatched/running (succeeded, failed, timed out); its timeout starts then, not while it waits.
    # A tenant's own number: `sfworkflow limits set TENANT agent.run_task/per_tenant --slots N`.
    limits=(
        ConcurrencyLimit(
            "run_task",
            name="per_tenant",
            slots=4,
            held_in=frozenset({S.DISPATCHED, S.RUNNING}),
            timers_after_release=("run_timeout",),
            description="agent runs in flight per tenant",
        ),
    ),
    transitions=(
        Transition("task_submitted", S.NEW, D, action=submit),
        Transition("started", D, R, action=record_started),
        Transition("checkpointed", D, R, action=record_checkpoint),
        Transition("checkpointed", [R, W], None, action=record_checkpoint),
        Transition("succeeded", [D, R, W], S.SUCCEEDED, action=record_success),
        Transition("failed", [D, R], W, [may_retry], action=schedule_retry),
        Transition("failed", [D, R], S.DEAD_LETTERED, action=dead_letter),
        Transition("timer_run_timeout", [D, R], W, [attempts_left], action=schedule_retry),
        Transition("timer_run_timeout", [D, R], S.DEAD_LETTERED, action=dead_letter),
        Transition("timer_retry_due", W, D, action=reissue_run),
        Transition("replay_requested", S.DEAD_LETTERED, D, action=replay),
    ),
)
