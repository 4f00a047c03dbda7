"""`Engine.step` on the `agent` definition: the state x trigger table, submission, checkpoints, the durable
timeout, retries, dead-lettering and operator replay, stale reports. Pure: no I/O."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

import pytest

from sfworkflow.core.definition import EngineEvent, InstanceKey, OutgoingMessage, TimerRequest
from sfworkflow.core.engine import Decision, Outcome
from sfworkflow.workflows.agent import DEFINITION, RETRY, S
from tests.unit import enginekit
from tests.unit.enginekit import (
    ENGINE,
    T0,
    TENANT,
    A,
    I,
    P,
    check_table_cell,
    check_table_covers,
    kinds,
    of_kind,
    schema_errors,
)

AGENT = enginekit.workflow(DEFINITION)

ENTITY = "task-77"
KEY = InstanceKey(TENANT, "agent", ENTITY)
CORRELATION = "corr-task-77"
RUN_KEY = f"{TENANT}:agent:{ENTITY}:run"

EXTERNAL = ("task_submitted", "started", "checkpointed", "succeeded", "failed", "replay_requested")
INTERNAL = ("timer_run_timeout", "timer_retry_due")
TRIGGERS = EXTERNAL + INTERNAL

INPUT = {"lead_id": "lead-1093", "question": "Which CRM does this company use?"}


def submitted(timeout: int | None = 5) -> dict[str, Any]:
    d: dict[str, Any] = {"agent_type": "lead_researcher", "input": dict(INPUT)}
    if timeout is not None:
        d["timeout_seconds"] = timeout
    return d


def report(attempt: int | None = None, run: int | None = None, **data: Any) -> dict[str, Any]:
    return enginekit.with_optional(data, attempt=attempt, run=run)


def failed(retryable: bool = True, code: str = "model_overloaded", **kw: Any) -> dict[str, Any]:
    return report(error_code=code, retryable=retryable, **kw)


def ckpt(step: int, **kw: Any) -> dict[str, Any]:
    return report(checkpoint_id=f"ckpt-{step}", step=step, **kw)


REPLAY = {"requested_by": "ops-maria", "reason": "search tool fixed"}


def event(name: str, data: dict[str, Any] | None = None, at: datetime = T0, n: int = 0) -> EngineEvent:
    return enginekit.event(DEFINITION, name, data, at, n, correlation=CORRELATION)


class Run(enginekit.Run):
    """One `agent` instance (`KEY`) driven event by event (numbered event ids). It keeps the pending
    timers as the store would, and a timer fires with the payload it was set with."""

    def __init__(self) -> None:
        super().__init__(DEFINITION, KEY, correlation=CORRELATION, numbered=True)
        self.timers: dict[str, TimerRequest] = {}  # pending timers, as the store would keep them

    def step(self, name: str, data: dict[str, Any] | None = None, **kw: Any) -> Decision:
        if data is None and name.startswith("timer_") and name[6:] in self.timers:
            data = self.timers[name[6:]].payload  # a timer fires with the payload it was set with
        d = super().step(name, data, **kw)
        if d.outcome is A:
            if d.cancel_all_timers:
                self.timers.clear()
            for t in d.timers_cancelled:
                self.timers.pop(t, None)
            for t in d.timers_set:
                self.timers[t.name] = t
            if name.startswith("timer_"):
                self.timers.pop(name[6:], None)
        return d


def in_new() -> Run:
    return Run()


def in_dispatched() -> Run:
    r = Run()
    r.do("task_submitted", submitted())
    return r


def in_running() -> Run:
    r = in_dispatched()
    r.do("started", report(1, 0))
    return r


def in_retry_wait() -> Run:
    r = in_running()
    r.do("checkpointed", ckpt(1, attempt=1, run=0))
    r.do("failed", failed(attempt=1, run=0))
    return r


def in_succeeded() -> Run:
    r = in_running()
    r.do("succeeded", report(1, 0, output={"crm": "HubSpot"}))
    return r


def in_dead_lettered() -> Run:
    r = in_running()
    r.do("checkpointed", ckpt(2, attempt=1, run=0))
    r.do("failed", failed(False, "tool_crashed", attempt=1, run=0))
    return r


BUILDERS = {
    S.NEW: in_new,
    S.DISPATCHED: in_dispatched,
    S.RUNNING: in_running,
    S.RETRY_WAIT: in_retry_wait,
    S.SUCCEEDED: in_succeeded,
    S.DEAD_LETTERED: in_dead_lettered,
}


def realistic(name: str, run: Run) -> dict[str, Any]:
    """Data for `name` about the run's current run and attempt."""
    a, r = max(run.ctx.get("attempt", 1), 1), run.ctx.get("run", 0)
    step = (run.ctx.get("checkpoint_step") or 0) + 1
    return {
        "task_submitted": submitted(),
        "started": report(a, r),
        "checkpointed": ckpt(step, attempt=a, run=r),
        "succeeded": report(a, r, output={"crm": "HubSpot"}),
        "failed": failed(attempt=a, run=r),
        "replay_requested": dict(REPLAY),
        "timer_run_timeout": {"run": r, "attempt": a},
        "timer_retry_due": {},
    }[name]


# ---- the table -----------------------------------------------------------------------------------
ALL_IGNORED = {t: (I, None) for t in TRIGGERS}
TABLE: dict[str, dict[str, tuple[Outcome, str | None]]] = {
    S.NEW: {"task_submitted": (A, S.DISPATCHED), **{t: (P, None) for t in TRIGGERS if t != "task_submitted"}},
    S.DISPATCHED: {
        "task_submitted": (I, None),
        "started": (A, S.RUNNING),
        "checkpointed": (A, S.RUNNING),
        "succeeded": (A, S.SUCCEEDED),
        "failed": (A, S.RETRY_WAIT),
        "replay_requested": (I, None),
        "timer_run_timeout": (A, S.RETRY_WAIT),
        "timer_retry_due": (I, None),
    },
    S.RUNNING: {
        "task_submitted": (I, None),
        "started": (I, None),
        "checkpointed": (A, "same"),
        "succeeded": (A, S.SUCCEEDED),
        "failed": (A, S.RETRY_WAIT),
        "replay_requested": (I, None),
        "timer_run_timeout": (A, S.RETRY_WAIT),
        "timer_retry_due": (I, None),
    },
    S.RETRY_WAIT: {
        "task_submitted": (I, None),
        "started": (I, None),
        "checkpointed": (A, "same"),
        "succeeded": (A, S.SUCCEEDED),
        "failed": (I, None),
        "replay_requested": (I, None),
        "timer_run_timeout": (I, None),
        "timer_retry_due": (A, S.DISPATCHED),
    },
    S.SUCCEEDED: ALL_IGNORED,
    S.DEAD_LETTERED: {**ALL_IGNORED, "replay_requested": (A, S.DISPATCHED)},
}


def test_trigger_lists_match_the_definition() -> None:
    check_table_covers(DEFINITION, TABLE, S, EXTERNAL, INTERNAL)
    assert DEFINITION.terminal == {S.SUCCEEDED}
    assert DEFINITION.waits_for_operator == {S.DEAD_LETTERED}
    assert DEFINITION.commands == {"run_task"} and DEFINITION.compensations == {"dead_letter_task"}


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("state", list(S))
def test_state_trigger_table(state: S, trigger: str) -> None:
    run = BUILDERS[state]()
    assert run.state == (state if state != S.NEW else "")
    ev = event(trigger, realistic(trigger, run), T0, 99)
    d = check_table_cell(run, ev, TABLE[state][trigger], T0 + timedelta(seconds=1))
    assert d.trigger == trigger
    if d.outcome is not A:
        assert d.timers_cancelled == [] and not d.cancel_all_timers


@pytest.mark.parametrize("trigger", TRIGGERS)
def test_succeeded_ignores_everything(trigger: str) -> None:
    run = in_succeeded()
    d = run.step(trigger, realistic(trigger, run))
    assert (d.outcome, d.reason) == (I, "instance is succeeded")


# ---- submission: a task submitted twice runs once ------------------------------------------------
def test_task_submitted_issues_run_task_and_arms_the_timeout() -> None:
    run = Run()
    d = run.do("task_submitted", submitted(timeout=5))
    assert (d.from_state, d.to_state, d.version) == (S.NEW, S.DISPATCHED, 1)
    assert kinds(d) == [("command", "agent.run_task"), ("lifecycle", "workflow.started.agent")]
    cmd = d.outgoing[0]
    assert cmd.body["idempotency_key"] == RUN_KEY
    assert cmd.body["attempt"] == 1
    assert cmd.body["kind"] == "command" and cmd.effect_key is None
    assert cmd.body["data"] == {
        "agent_type": "lead_researcher",
        "input": INPUT,
        "from_checkpoint_id": None,
        "run": 0,
        "timeout_seconds": 5,
    }
    assert d.timers_set == [TimerRequest("run_timeout", T0 + timedelta(seconds=5), {"run": 0, "attempt": 1})]
    assert d.outgoing[1].body["data"] == {"start_event_type": "agent.task_submitted"}
    ctx = d.context
    assert (ctx["run"], ctx["attempt"], ctx["last_checkpoint_id"], ctx["checkpoint_step"]) == (0, 1, None, None)
    assert all(schema_errors(m) == [] for m in d.outgoing)


def test_timeout_defaults_to_30_seconds() -> None:
    d = Run().do("task_submitted", submitted(timeout=None))
    assert d.timers_set == [TimerRequest("run_timeout", T0 + timedelta(seconds=30), {"run": 0, "attempt": 1})]
    assert d.outgoing[0].body["data"]["timeout_seconds"] == 30


def test_text_input_is_passed_as_is() -> None:
    d = Run().do("task_submitted", {"agent_type": "email_writer", "input": "Write to Ana."})
    assert d.outgoing[0].body["data"]["input"] == "Write to Ana."
    assert schema_errors(d.outgoing[0]) == []


@pytest.mark.parametrize("state", [S.DISPATCHED, S.RUNNING, S.RETRY_WAIT, S.DEAD_LETTERED])
def test_a_second_submission_of_a_started_task_is_ignored(state: S) -> None:
    run = BUILDERS[state]()
    ctx = copy.deepcopy(run.ctx)
    d = run.step("task_submitted", {"agent_type": "email_writer", "input": "other", "timeout_seconds": 9})
    assert (d.outcome, d.reason, d.outgoing) == (I, "instance already started", [])
    assert run.ctx == ctx


def test_events_before_the_submission_are_parked() -> None:
    for trigger in TRIGGERS:
        if trigger == "task_submitted":
            continue
        d = ENGINE.step(AGENT, KEY, None, event(trigger, realistic(trigger, Run())), T0)
        assert (d.outcome, d.reason) == (P, "instance does not exist yet")


# ---- started, checkpoints, success ---------------------------------------------------------------
def test_started_does_not_move_the_timeout() -> None:
    run = in_dispatched()
    d = run.do("started", report(1, 0), now=T0 + timedelta(seconds=2))
    assert d.to_state == S.RUNNING
    assert (d.timers_set, d.timers_cancelled, d.outgoing) == ([], [], [])
    assert d.context["started_at"] == (T0 + timedelta(seconds=2)).isoformat()
    assert run.timers["run_timeout"].due_at == T0 + timedelta(seconds=5)


def test_checkpoints_record_the_last_one() -> None:
    run = in_running()
    run.do("checkpointed", ckpt(1, attempt=1, run=0))
    d = run.do("checkpointed", ckpt(2, attempt=1, run=0))
    assert d.to_state == S.RUNNING and d.outgoing == []
    assert (d.context["last_checkpoint_id"], d.context["checkpoint_step"], d.context["checkpoints"]) == (
        "ckpt-2",
        2,
        2,
    )
    assert d.notes == {"checkpoint_id": "ckpt-2", "checkpoint_step": 2}


def test_an_older_checkpoint_arriving_late_is_ignored() -> None:
    run = in_running()
    run.do("checkpointed", ckpt(3, attempt=1, run=0))
    d = run.step("checkpointed", ckpt(2, attempt=1, run=0))
    assert d.outcome is I and "older" in d.reason
    assert run.ctx["last_checkpoint_id"] == "ckpt-3"


def test_a_checkpoint_before_started_means_running_and_the_late_started_is_ignored() -> None:
    run = in_dispatched()
    assert run.do("checkpointed", ckpt(1, attempt=1, run=0)).to_state == S.RUNNING
    d = run.step("started", report(1, 0))
    assert (d.outcome, d.reason) == (I, "attempt 1 already started")


@pytest.mark.parametrize("builder", [in_dispatched, in_running, in_retry_wait])
def test_succeeded_ends_the_task_and_cancels_its_timers(builder: Any) -> None:
    run = builder()
    d = run.do("succeeded", report(1, 0, output="done"))
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.SUCCEEDED, True, True)
    assert kinds(d) == [("lifecycle", "workflow.completed.agent")]
    assert d.outgoing[0].body["data"] == {"final_state": "succeeded"}


# ---- the durable timeout -------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [in_dispatched, in_running])
def test_timeout_counts_as_a_retryable_failure(builder: Any) -> None:
    run = builder()
    now = T0 + timedelta(seconds=5)
    d = run.do("timer_run_timeout", now=now)
    assert d.to_state == S.RETRY_WAIT and d.outgoing == []
    delay = RETRY.delay_s(1, RUN_KEY)
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay), {})]
    assert d.context["last_error"] == "timeout"
    assert d.notes["error_code"] == "timeout"


def test_a_timeout_of_another_attempt_is_ignored() -> None:
    run = in_running()
    d = run.step("timer_run_timeout", {"run": 0, "attempt": 2})
    assert d.outcome is I and "not the current attempt" in d.reason
    d = run.step("timer_run_timeout", {"run": 1, "attempt": 1})
    assert d.outcome is I


def test_failure_cancels_the_timeout_and_schedules_the_retry() -> None:
    run = in_running()
    now = T0 + timedelta(seconds=1)
    d = run.do("failed", failed(attempt=1, run=0), now=now)
    assert d.to_state == S.RETRY_WAIT
    assert "run_timeout" in d.timers_cancelled
    delay = RETRY.delay_s(1, RUN_KEY)
    assert 0.8 <= delay <= 1.2
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay), {})]
    assert d.context["due_at"] == (now + timedelta(seconds=delay)).isoformat()
    assert set(run.timers) == {"retry_due"}


# ---- retries -------------------------------------------------------------------------------------
def test_retry_reissues_the_same_key_with_attempt_plus_one_from_the_last_checkpoint() -> None:
    run = Run()
    first = run.do("task_submitted", submitted()).outgoing[0]
    run.do("started", report(1, 0))
    run.do("checkpointed", ckpt(4, attempt=1, run=0))
    run.do("failed", failed(attempt=1, run=0))
    now = T0 + timedelta(seconds=2)
    d = run.do("timer_retry_due", now=now)
    assert d.to_state == S.DISPATCHED
    (m,) = of_kind(d, "command")
    assert m.routing_key == "agent.run_task"
    assert m.body["idempotency_key"] == first.body["idempotency_key"] == RUN_KEY
    assert m.body["attempt"] == 2
    assert m.message_id != first.message_id
    assert m.body["data"] == {**first.body["data"], "from_checkpoint_id": "ckpt-4"}
    assert d.timers_set == [TimerRequest("run_timeout", now + timedelta(seconds=5), {"run": 0, "attempt": 2})]
    assert (d.context["attempt"], d.context["retries"]) == (2, 1)
    assert d.notes == {"retry_attempt": 2, "from_checkpoint_id": "ckpt-4"}
    assert schema_errors(m) == []


def test_a_checkpoint_reported_during_the_backoff_is_used_by_the_retry() -> None:
    run = in_retry_wait()
    d = run.do("checkpointed", ckpt(2, attempt=1, run=0))
    assert d.to_state == S.RETRY_WAIT and d.timers_set == []
    assert of_kind(run.do("timer_retry_due"), "command")[0].body["data"]["from_checkpoint_id"] == "ckpt-2"


def test_backoff_grows_between_attempts() -> None:
    run = in_running()
    run.do("failed", failed(attempt=1, run=0))
    run.do("timer_retry_due")
    d = run.do("failed", failed(attempt=2, run=0))
    delay = RETRY.delay_s(2, RUN_KEY)
    assert 1.6 <= delay <= 2.4
    assert d.timers_set == [TimerRequest("retry_due", T0 + timedelta(seconds=delay), {})]


def _exhaust(last: str) -> tuple[list[OutgoingMessage], Decision, Run]:
    """Three attempts: a timeout, a retryable failure, then `last` (a timeout or a failure)."""
    run = Run()
    cmds = of_kind(run.do("task_submitted", submitted()), "command")
    run.do("started", report(1, 0))
    run.do("checkpointed", ckpt(1, attempt=1, run=0))
    run.do("timer_run_timeout")
    cmds += of_kind(run.do("timer_retry_due"), "command")
    run.do("failed", failed(attempt=2, run=0))
    cmds += of_kind(run.do("timer_retry_due"), "command")
    run.do("checkpointed", ckpt(2, attempt=3, run=0))
    d = run.do("timer_run_timeout") if last == "timeout" else run.do("failed", failed(attempt=3, run=0))
    return cmds, d, run


def test_three_attempts_share_one_idempotency_key() -> None:
    cmds, _, _ = _exhaust("timeout")
    assert [c.body["attempt"] for c in cmds] == [1, 2, 3]
    assert {c.body["idempotency_key"] for c in cmds} == {RUN_KEY}
    assert len({c.message_id for c in cmds}) == 3
    assert [c.body["data"]["from_checkpoint_id"] for c in cmds] == [None, "ckpt-1", "ckpt-1"]


@pytest.mark.parametrize(("last", "code"), [("timeout", "timeout"), ("failed", "model_overloaded")])
def test_retries_exhausted_dead_letters_the_task(last: str, code: str) -> None:
    _, d, run = _exhaust(last)
    assert (d.to_state, d.terminal, d.cancel_all_timers, d.timers_set) == (S.DEAD_LETTERED, False, True, [])
    assert kinds(d) == [
        ("compensation", "agent.dead_letter_task"),
        ("lifecycle", "workflow.failed.agent"),
        ("lifecycle", "workflow.compensated.agent"),
    ]
    comp, failed_ev, compensated = d.outgoing
    assert comp.body["kind"] == "compensation"
    assert comp.body["data"] == {"last_checkpoint_id": "ckpt-2", "error_code": code, "attempts": 3, "run": 0}
    assert comp.body["idempotency_key"] == f"{TENANT}:agent:{ENTITY}:dead_letter:0"
    assert failed_ev.body["data"] == {"reason": f"run 0 failed after 3 attempts ({code})", "error_code": code}
    assert compensated.body["data"] == {"compensations": ["agent.dead_letter_task"]}
    assert failed_ev.body["state"] == compensated.body["state"] == "dead_lettered"
    assert all(schema_errors(m) == [] for m in d.outgoing)
    assert run.timers == {}


@pytest.mark.parametrize("builder", [in_dispatched, in_running])
def test_a_non_retryable_failure_dead_letters_at_once(builder: Any) -> None:
    run = builder()
    d = run.do("failed", failed(False, "tool_crashed", attempt=1, run=0))
    assert d.to_state == S.DEAD_LETTERED
    comp = d.outgoing[0]
    assert comp.body["data"] == {"last_checkpoint_id": None, "error_code": "tool_crashed", "attempts": 1, "run": 0}
    assert d.outgoing[1].body["data"]["reason"] == "run 0 failed: tool_crashed"
    assert all(schema_errors(m) == [] for m in d.outgoing)


# ---- replay --------------------------------------------------------------------------------------
def test_replay_runs_the_task_again_from_the_last_checkpoint_under_a_new_key() -> None:
    run = in_dead_lettered()
    now = T0 + timedelta(minutes=10)
    d = run.do("replay_requested", dict(REPLAY), now=now)
    assert d.to_state == S.DISPATCHED
    (m,) = d.outgoing
    assert m.kind == "command" and m.routing_key == "agent.run_task"
    assert m.body["idempotency_key"] == f"{RUN_KEY}:replay:1"
    assert m.body["attempt"] == 1
    assert m.body["data"] == {
        "agent_type": "lead_researcher",
        "input": INPUT,
        "from_checkpoint_id": "ckpt-2",
        "run": 1,
        "timeout_seconds": 5,
    }
    assert d.timers_set == [TimerRequest("run_timeout", now + timedelta(seconds=5), {"run": 1, "attempt": 1})]
    assert (d.context["run"], d.context["replays"], d.context["attempt"]) == (1, 1, 1)
    assert d.notes["requested_by"] == "ops-maria" and d.notes["replay"] == 1
    assert schema_errors(m) == []


def test_replayed_task_retries_under_its_own_key_and_may_succeed() -> None:
    run = in_dead_lettered()
    run.do("replay_requested", dict(REPLAY))
    run.do("failed", failed(attempt=1, run=1))
    d = run.do("timer_retry_due")
    assert d.outgoing[0].body["idempotency_key"] == f"{RUN_KEY}:replay:1"
    assert d.outgoing[0].body["attempt"] == 2
    assert run.do("succeeded", report(2, 1, output="ok")).to_state == S.SUCCEEDED


def test_a_replay_dead_lettered_again_can_be_replayed_again() -> None:
    run = in_dead_lettered()
    run.do("replay_requested", dict(REPLAY))
    d = run.do("failed", failed(False, "tool_crashed", attempt=1, run=1))
    assert d.to_state == S.DEAD_LETTERED
    assert d.outgoing[0].body["idempotency_key"] == f"{TENANT}:agent:{ENTITY}:dead_letter:1"
    assert d.outgoing[0].body["data"]["run"] == 1
    d = run.do("replay_requested", {"requested_by": "ops-2", "reason": "again"})
    assert d.outgoing[0].body["idempotency_key"] == f"{RUN_KEY}:replay:2"
    assert d.outgoing[0].body["data"]["run"] == 2


@pytest.mark.parametrize("state", [S.DISPATCHED, S.RUNNING, S.RETRY_WAIT])
def test_replay_of_a_task_that_is_not_dead_lettered_is_ignored(state: S) -> None:
    run = BUILDERS[state]()
    d = run.step("replay_requested", dict(REPLAY))
    assert d.outcome is I and d.reason == f"the task is {state}, not dead-lettered: nothing to replay"


def test_a_second_replay_request_is_ignored_once_the_replay_runs() -> None:
    run = in_dead_lettered()
    run.do("replay_requested", dict(REPLAY))
    d = run.step("replay_requested", dict(REPLAY))
    assert d.outcome is I
    assert run.ctx["run"] == 1


# ---- stale reports -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("started", report(1, 0)),
        ("checkpointed", ckpt(9, attempt=1, run=0)),
        ("succeeded", report(1, 0, output="late")),
        ("failed", failed(attempt=1, run=0)),
    ],
)
def test_reports_about_an_older_attempt_are_ignored(name: str, data: dict[str, Any]) -> None:
    run = in_retry_wait()
    run.do("timer_retry_due")  # attempt 2 is running
    d = run.step(name, data)
    assert (d.outcome, d.reason) == (I, "attempt 1 was superseded by attempt 2")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("started", report(3, 0)),
        ("checkpointed", ckpt(9, attempt=3, run=0)),
        ("succeeded", report(3, 0, output="late")),
        ("failed", failed(False, attempt=3, run=0)),
    ],
)
def test_reports_about_a_replaced_run_are_ignored(name: str, data: dict[str, Any]) -> None:
    run = in_dead_lettered()
    run.do("replay_requested", dict(REPLAY))
    d = run.step(name, data)
    assert (d.outcome, d.reason) == (I, "run 0 was replaced by replay 1")


@pytest.mark.parametrize("name", ["started", "checkpointed", "succeeded", "failed"])
def test_worker_reports_on_a_dead_lettered_run_are_ignored_not_parked(name: str) -> None:
    run = in_dead_lettered()
    d = run.step(name, realistic(name, run))
    assert (d.outcome, d.reason) == (I, f"run 0 was dead-lettered; {name} reports on it")


def test_a_second_failure_report_of_the_failed_attempt_is_ignored() -> None:
    run = in_retry_wait()
    d = run.step("failed", failed(False, "tool_crashed"))  # no attempt echoed: the current one
    assert (d.outcome, d.reason) == (I, "attempt 1 already failed")


def test_a_late_success_of_the_failed_attempt_wins_over_the_retry() -> None:
    run = in_retry_wait()
    d = run.do("succeeded", report(1, 0, output="late but fine"))
    assert (d.to_state, d.cancel_all_timers) == (S.SUCCEEDED, True)


def test_a_report_about_the_next_attempt_during_the_backoff_is_parked() -> None:
    run = in_retry_wait()
    d = run.step("started", report(2, 0))
    assert d.outcome is P


def test_the_definition_is_pure_for_the_same_input() -> None:
    a, b = in_retry_wait(), in_retry_wait()
    da, db = a.do("timer_retry_due"), b.do("timer_retry_due")
    assert [m.body for m in da.outgoing] == [m.body for m in db.outgoing]
    assert da.context == db.context
