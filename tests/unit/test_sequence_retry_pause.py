"""`Engine.step` on `sequence`: retries and backoff, skips, compensation, suppression, stop, pause/resume."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from sfworkflow.core.definition import RetryPolicy, TimerRequest
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows.sequence import RETRY, S
from tests.unit.enginekit import T0, TENANT, lifecycle_types, of_kind, schema_errors
from tests.unit.seqkit import (
    BUILDERS,
    ENTITY,
    STEPS,
    failed,
    in_paused,
    in_retry_wait,
    in_sending,
    in_waiting,
    sent,
    suppressed,
)

IDEMPOTENCY_0 = f"{TENANT}:sequence:{ENTITY}:step:0"


# ---- retry ---------------------------------------------------------------------------------------
def test_retryable_failure_at_attempt_1_waits_for_backoff() -> None:
    run = in_sending()
    now = T0 + timedelta(seconds=3)
    d = run.do("step_failed", failed(0, attempt=1), now=now)
    assert (d.to_state, d.outgoing, d.context["attempt"], d.context["cursor"]) == (S.RETRY_WAIT, [], 1, 0)
    delay = RETRY.delay_s(1, IDEMPOTENCY_0)
    assert 0.8 <= delay <= 1.2
    assert d.timers_set == [TimerRequest("retry_due", now + timedelta(seconds=delay), {})]
    assert d.context["due_at"] == (now + timedelta(seconds=delay)).isoformat()
    assert d.notes["error_code"] == "provider_timeout"


def test_retry_reissues_the_same_command_with_next_attempt() -> None:
    run = in_waiting()
    first = run.do("timer_step_due").outgoing[0]
    run.do("step_failed", failed(0, attempt=1))
    d = run.do("timer_retry_due", now=T0 + timedelta(seconds=2))
    assert d.to_state == S.SENDING
    (m,) = d.outgoing
    assert m.kind == "command" and m.routing_key == "sequence.send_step"
    assert m.body["idempotency_key"] == first.body["idempotency_key"] == IDEMPOTENCY_0
    assert m.body["attempt"] == 2
    assert m.message_id == m.body["command_id"] != first.message_id
    assert m.body["data"] == first.body["data"]
    assert m.effect_key is None  # a retry must not be suppressed by the first send's effect key
    assert schema_errors(m) == []
    assert (d.context["attempt"], d.context["retries"]) == (2, 1)
    assert d.notes == {"retry_attempt": 2}


def test_backoff_grows_between_attempts() -> None:
    run = in_sending()
    run.do("step_failed", failed(0, attempt=1))
    run.do("timer_retry_due")
    d = run.do("step_failed", failed(0, attempt=2))
    assert d.to_state == S.RETRY_WAIT
    delay = RETRY.delay_s(2, IDEMPOTENCY_0)
    assert 1.6 <= delay <= 2.4
    assert d.timers_set == [TimerRequest("retry_due", T0 + timedelta(seconds=delay), {})]


def _exhaust() -> tuple[list, object]:
    run = in_waiting()
    commands = list(run.do("timer_step_due").outgoing)
    for attempt in (1, 2):
        assert run.do("step_failed", failed(0, attempt=attempt)).to_state == S.RETRY_WAIT
        commands += run.do("timer_retry_due").outgoing
    return commands, run.do("step_failed", failed(0, attempt=3))


def test_three_attempts_share_one_idempotency_key_and_have_distinct_ids() -> None:
    commands, _ = _exhaust()
    assert [c.body["attempt"] for c in commands] == [1, 2, 3]
    assert {c.body["idempotency_key"] for c in commands} == {IDEMPOTENCY_0}
    assert len({c.message_id for c in commands}) == 3


def test_retries_exhausted_compensates() -> None:
    _, d = _exhaust()
    assert (d.to_state, d.terminal, d.cancel_all_timers, d.timers_set) == (S.COMPENSATED, True, True, [])
    assert [(m.kind, m.routing_key) for m in d.outgoing] == [
        ("compensation", "sequence.disable_sequence"),
        ("compensation", "sequence.raise_alert"),
        ("lifecycle", "workflow.failed.sequence"),
        ("lifecycle", "workflow.compensated.sequence"),
        ("lifecycle", "workflow.completed.sequence"),
    ]
    disable, alert, failed_ev, compensated, _completed = d.outgoing
    assert disable.body["kind"] == alert.body["kind"] == "compensation"
    assert disable.body["data"]["sequence_id"] == "seq-onboarding-7"
    assert "after 3 attempts" in disable.body["data"]["reason"]
    assert alert.body["data"]["severity"] in ("info", "warning", "critical")
    assert alert.body["data"]["error_code"] == "provider_timeout"
    assert alert.body["data"]["step"] == 0
    assert "seq-onboarding-7" in alert.body["data"]["message"]
    assert failed_ev.body["data"]["error_code"] == "provider_timeout"
    assert compensated.body["data"] == {"compensations": ["sequence.disable_sequence", "sequence.raise_alert"]}
    assert failed_ev.body["state"] == compensated.body["state"] == "compensated"
    for m in d.outgoing:
        assert schema_errors(m) == [], m.routing_key


@pytest.mark.parametrize("code", ["template_rejected", "invalid_recipient", "provider_timeout"])
@pytest.mark.parametrize("attempt", [1, 2])
def test_non_retryable_failure_compensates(code: str, attempt: int) -> None:
    run = in_sending() if attempt == 1 else in_retry_wait()
    if attempt == 2:
        run.do("timer_retry_due")
    d = run.do("step_failed", failed(0, code, retryable=False, attempt=attempt))
    assert (d.to_state, d.terminal) == (S.COMPENSATED, True)
    assert [m.kind for m in d.outgoing] == ["compensation", "compensation", "lifecycle", "lifecycle", "lifecycle"]
    assert lifecycle_types(d) == ["workflow.failed", "workflow.compensated", "workflow.completed"]
    reason = of_kind(d, "compensation")[0].body["data"]["reason"]
    assert reason == f"step 0 failed: {code}"
    assert all(schema_errors(m) == [] for m in d.outgoing)


# ---- RetryPolicy.delay_s -------------------------------------------------------------------------
SEEDS = [f"{TENANT}:sequence:enrollment-{i}:step:{i % 5}" for i in range(40)]


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8])
def test_delay_is_deterministic(attempt: int) -> None:
    assert RETRY.delay_s(attempt, "seed") == RETRY.delay_s(attempt, "seed")
    assert RetryPolicy().delay_s(attempt, "seed") == RETRY.delay_s(attempt, "seed")


def test_delay_jitter_depends_on_the_seed() -> None:
    assert len({RETRY.delay_s(1, s) for s in SEEDS}) > 10


@pytest.mark.parametrize("attempt", range(1, 7))
def test_delay_within_20_percent_of_exponential_base(attempt: int) -> None:
    raw = 1.0 * 2 ** (attempt - 1)
    for s in SEEDS:
        assert 0.8 * raw <= RETRY.delay_s(attempt, s) <= 1.2 * raw


@pytest.mark.parametrize("attempt", [7, 8, 20, 64, 500])
def test_delay_is_capped_at_60_seconds(attempt: int) -> None:
    for s in SEEDS:
        assert 48.0 <= RETRY.delay_s(attempt, s) <= 60.0


def test_delay_grows_with_attempt_until_the_cap() -> None:
    for s in SEEDS:
        delays = [RETRY.delay_s(a, s) for a in range(1, 8)]
        assert delays == sorted(delays) and len(set(delays)) == len(delays)


@pytest.mark.parametrize(("base", "cap"), [(0.5, 10.0), (2.0, 5.0)])
def test_delay_honours_custom_base_and_cap(base: float, cap: float) -> None:
    policy = RetryPolicy(max_attempts=9, base_s=base, cap_s=cap)
    assert 0.8 * base <= policy.delay_s(1, "s") <= 1.2 * base
    assert all(policy.delay_s(a, "s") <= cap for a in range(1, 30))


def test_delay_for_a_huge_attempt_is_still_capped() -> None:
    assert RETRY.delay_s(1100, "seed") <= 60.0


# ---- consent_missing: skip -----------------------------------------------------------------------
def test_consent_missing_skips_to_next_step() -> None:
    run = in_sending()
    now = T0 + timedelta(seconds=5)
    d = run.do("step_failed", failed(0, "consent_missing", retryable=False, attempt=1), now=now)
    assert d.to_state == S.WAITING
    ctx = d.context
    assert (ctx["cursor"], ctx["skipped"], ctx["sent"], ctx["attempt"]) == (1, 1, 0, 0)
    assert d.timers_set == [TimerRequest("step_due", now + timedelta(seconds=STEPS[1]["delay_seconds"]), {})]
    assert d.outgoing == []
    assert d.notes == {"skipped_step": 0, "error_code": "consent_missing"}


@pytest.mark.parametrize("steps", [STEPS, STEPS[:1]])
def test_consent_missing_wins_over_retryable(steps: list[dict[str, object]]) -> None:
    """A worker that reports consent_missing with retryable: true gets the step skipped, not retried: a missing
    consent is a fact about the lead that no retry changes (the README's precedence rule)."""
    run = in_sending(steps)
    d = run.do("step_failed", failed(0, "consent_missing", retryable=True, attempt=1))
    assert d.to_state == (S.WAITING if len(steps) > 1 else S.COMPLETED)
    assert (d.context["skipped"], d.context["attempt"]) == (1, 0)


def test_consent_missing_on_last_step_completes() -> None:
    run = in_sending(STEPS[:1])
    d = run.do("step_failed", failed(0, "consent_missing", retryable=False, attempt=1))
    assert (d.to_state, d.terminal, d.cancel_all_timers) == (S.COMPLETED, True, True)
    assert d.context["skipped"] == 1
    assert lifecycle_types(d) == ["workflow.completed"]
    assert d.outgoing[0].body["data"] == {"final_state": "completed"}


# ---- effect_suppressed -----------------------------------------------------------------------------
def test_suppressed_send_moves_to_next_step() -> None:
    run = in_sending()
    d = run.do("effect_suppressed", suppressed())
    assert d.to_state == S.WAITING
    assert (d.context["cursor"], d.context["suppressed"], d.context["sent"]) == (1, 1, 0)
    assert d.timers_set == [TimerRequest("step_due", T0 + timedelta(seconds=STEPS[1]["delay_seconds"]), {})]
    assert d.notes == {"suppressed_step": 0, "effect_key": "sequence.send_step:x"}


def test_suppressed_send_on_last_step_completes() -> None:
    run = in_sending(STEPS[:1])
    d = run.do("effect_suppressed", suppressed())
    assert (d.to_state, d.terminal, d.context["suppressed"]) == (S.COMPLETED, True, 1)
    assert lifecycle_types(d) == ["workflow.completed"]


# ---- replied / unsubscribed / cancelled ----------------------------------------------------------
ACTIVE = [S.WAITING, S.SENDING, S.RETRY_WAIT, S.PAUSED]


@pytest.mark.parametrize(
    ("trigger", "dest"), [("replied", S.STOPPED), ("unsubscribed", S.STOPPED), ("cancelled", S.CANCELLED)]
)
@pytest.mark.parametrize("state", ACTIVE)
def test_stop_events_end_the_instance(state: S, trigger: str, dest: S) -> None:
    run = BUILDERS[state]()
    d = run.do(trigger, {})
    assert (d.from_state, d.to_state, d.terminal) == (state, dest, True)
    assert d.cancel_all_timers is True and d.timers_set == []
    assert d.notes == {"stopped_by": trigger}
    assert of_kind(d, "command") == of_kind(d, "compensation") == []
    assert lifecycle_types(d) == ["workflow.completed"]
    assert d.outgoing[0].body["data"] == {"final_state": str(dest)}
    assert schema_errors(d.outgoing[0]) == []


# ---- pause / resume --------------------------------------------------------------------------------
PAUSABLE = [S.WAITING, S.SENDING, S.RETRY_WAIT]


@pytest.mark.parametrize("state", PAUSABLE)
def test_pause_cancels_timers_and_remembers_the_state(state: S) -> None:
    run = BUILDERS[state]()
    d = run.do("paused", {"reason": "holiday"})
    assert (d.to_state, d.cancel_all_timers, d.timers_set, d.outgoing) == (S.PAUSED, True, [], [])
    assert d.context["paused_from"] == state


@pytest.mark.parametrize("state", PAUSABLE)
def test_resume_returns_to_the_paused_state(state: S) -> None:
    run = in_paused(state)
    d = run.do("resumed", {})
    assert d.to_state == state
    assert "paused_from" not in d.context
    assert d.outgoing == [] and not d.cancel_all_timers


@pytest.mark.parametrize(
    ("resume_after", "expected_due_after"),
    [(timedelta(minutes=20), timedelta(hours=1)), (timedelta(hours=2), timedelta(hours=2))],
)
def test_resume_into_waiting_resets_step_due(resume_after: timedelta, expected_due_after: timedelta) -> None:
    run = in_waiting([{"template_id": "tpl-a", "delay_seconds": 3600}])
    run.do("paused", now=T0 + timedelta(minutes=10))
    d = run.do("resumed", now=T0 + resume_after)
    assert d.to_state == S.WAITING
    assert d.timers_set == [TimerRequest("step_due", T0 + expected_due_after, {})]


@pytest.mark.parametrize("resume_after", [timedelta(milliseconds=100), timedelta(minutes=5)])
def test_resume_into_retry_wait_resets_retry_due(resume_after: timedelta) -> None:
    run = in_retry_wait()
    retry_due = datetime.fromisoformat(run.ctx["due_at"])
    run.do("paused")
    now = T0 + resume_after
    d = run.do("resumed", now=now)
    assert d.to_state == S.RETRY_WAIT
    assert d.timers_set == [TimerRequest("retry_due", max(retry_due, now), {})]


def test_resume_into_sending_sets_no_timer() -> None:
    run = in_paused(S.SENDING)
    d = run.do("resumed")
    assert (d.to_state, d.timers_set, d.timers_cancelled) == (S.SENDING, [], [])


def test_resumed_sending_still_accepts_the_report() -> None:
    run = in_paused(S.SENDING)
    run.do("resumed")
    assert run.do("step_sent", sent(0, 1)).to_state == S.WAITING


@pytest.mark.parametrize("state", PAUSABLE)
@pytest.mark.parametrize("trigger", ["step_sent", "step_failed"])
def test_reports_while_paused_are_parked(state: S, trigger: str) -> None:
    run = in_paused(state)
    data = sent(0, 1) if trigger == "step_sent" else failed(0, attempt=1)
    d = run.step(trigger, data)
    assert (d.outcome, d.to_state) == (Outcome.PARKED, S.PAUSED)


# ---- pause and resume are last-writer-wins by event timestamp ---------------------------------
def test_resume_while_running_is_remembered_and_an_older_pause_is_ignored() -> None:
    run = in_waiting()
    t = run.now
    noted = run.do("resumed", {}, at=t + timedelta(seconds=30))
    assert (noted.from_state, noted.to_state) == (S.WAITING, S.WAITING)
    assert noted.timers_set == [] and not noted.cancel_all_timers
    older_pause = run.step("paused", {}, at=t + timedelta(seconds=10))
    assert older_pause.outcome is Outcome.IGNORED
    assert "older than the resumed" in (older_pause.reason or "")
    assert run.state == S.WAITING
    newer_pause = run.step("paused", {}, at=t + timedelta(seconds=40))
    assert (newer_pause.outcome, newer_pause.to_state) == (Outcome.APPLIED, S.PAUSED)


def test_resume_older_than_the_pause_is_ignored() -> None:
    run = in_waiting()
    t = run.now
    run.do("paused", {}, at=t + timedelta(seconds=20))
    stale = run.step("resumed", {}, at=t + timedelta(seconds=5))
    assert stale.outcome is Outcome.IGNORED and "older than the pause" in (stale.reason or "")
    assert run.state == S.PAUSED
    fresh = run.step("resumed", {}, at=t + timedelta(seconds=25))
    assert (fresh.outcome, fresh.to_state) == (Outcome.APPLIED, S.WAITING)


def test_second_pause_while_paused_is_ignored() -> None:
    run = in_waiting()
    run.do("paused", {})
    again = run.step("paused", {}, at=run.now + timedelta(seconds=1))
    assert (again.outcome, again.reason) == (Outcome.IGNORED, "already paused")


def test_a_suppression_that_arrives_while_paused_moves_the_cursor() -> None:
    # In one batch: the step falls due (send decided), a `paused` arrives, then the store finds the
    # effect key taken: `effect_suppressed` lands in `paused` and must not strand the instance.
    run = in_sending()
    run.do("paused", {})
    d = run.do("effect_suppressed", suppressed())
    assert (d.from_state, d.to_state) == (S.PAUSED, S.PAUSED)
    assert run.ctx["cursor"] == 1 and run.ctx["paused_from"] == S.WAITING and run.ctx["suppressed"] == 1
    resumed = run.do("resumed", {}, at=run.now + timedelta(seconds=5))
    assert resumed.to_state == S.WAITING and [t.name for t in resumed.timers_set] == ["step_due"]


def test_a_send_that_failed_for_good_frees_its_effect_key() -> None:
    run = in_sending()
    key = run.ctx["effect_key"]
    skipped = run.do("step_failed", failed(0, code="consent_missing", retryable=False))
    assert skipped.requests.release_effects == [key]
    run2 = in_sending()
    key2 = run2.ctx["effect_key"]
    comp = run2.do("step_failed", failed(0, code="template_rejected", retryable=False))
    assert comp.to_state == S.COMPENSATED and comp.requests.release_effects == [key2]
    sent = in_sending()
    assert sent.do("step_sent", {"step": 0, "provider_message_id": "p"}).requests.release_effects == []
