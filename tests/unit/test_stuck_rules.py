"""Every definition says, for each active state, when an instance in it counts as stuck."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sfworkflow.core.engine import Engine
from sfworkflow.core.stuck import classify, min_age_s, state_ages, stuck_rule, when
from sfworkflow.workflows import DEFINITIONS

ENGINE = Engine(DEFINITIONS)


@pytest.mark.parametrize("d", DEFINITIONS, ids=lambda d: f"{d.name}.v{d.version}")
def test_every_active_state_has_a_stuck_rule(d: object) -> None:
    states = {str(s) for s in d.states}  # type: ignore[attr-defined]
    active = states - {str(s) for s in d.terminal} - {str(d.initial)}  # type: ignore[attr-defined]
    declared = {str(s) for s in d.stuck_after_s} | {str(s) for s in d.waits_for_operator}  # type: ignore[attr-defined]
    assert active == declared, f"states without a stuck rule: {sorted(active - declared)}"


def _row(workflow: str, state: str, entered_ago_s: float, next_due_in_s: float | None = None) -> dict[str, object]:
    now = datetime.now(UTC)
    return {
        "id": 1, "tenant_id": "t", "workflow": workflow, "entity_id": "e", "definition_version": 1, "state": state,
        "version": 3, "state_entered_at": now - timedelta(seconds=entered_ago_s), "updated_at": now,
        "last_event_type": None, "parked_count": 0,
        "next_due": None if next_due_in_s is None else now + timedelta(seconds=next_due_in_s),
        "timer_name": None if next_due_in_s is None else "t", "command_type": None, "command_body": None,
    }  # fmt: skip


def test_rules_by_kind() -> None:
    now = datetime.now(UTC)
    assert classify(ENGINE, _row("sequence", "sending", 60), now) is None
    assert classify(ENGINE, _row("sequence", "sending", 1000), now).why == "no_progress"  # type: ignore[union-attr]
    assert classify(ENGINE, _row("sequence", "paused", 10 * 86400), now) is None  # a person paused it
    # a pending timer is the deadline: not stuck before it is overdue, however long in the state
    assert classify(ENGINE, _row("partner_approval", "in_review", 5 * 86400, next_due_in_s=3600), now) is None
    late = classify(ENGINE, _row("partner_approval", "in_review", 5 * 86400, next_due_in_s=-600), now)
    assert late is not None and late.why == "timer_overdue"
    op = classify(ENGINE, _row("follow_up", "needs_attention", 1), now)
    assert op is not None and op.why == "operator"


def test_each_rule_says_when_it_counts_as_stuck() -> None:
    sending = _row("sequence", "sending", 60)
    rule = stuck_rule(ENGINE, sending)
    assert rule.why == "no_progress" and rule.since == sending["state_entered_at"] + timedelta(minutes=15)
    assert rule.text == f"counts as stuck 15m after entering sending (at {when(rule.since)})"
    waiting = _row("partner_approval", "in_review", 60, next_due_in_s=3600)
    rule = stuck_rule(ENGINE, waiting)
    assert rule.why == "timer_overdue" and rule.since == waiting["next_due"] + timedelta(minutes=2)
    assert rule.text.startswith(f"its timer t is due at {when(waiting['next_due'])}: counts as stuck once it is 2m")
    rule = stuck_rule(ENGINE, _row("follow_up", "needs_attention", 1))
    assert rule.why == "operator" and rule.text.startswith("waits for an operator")
    rule = stuck_rule(ENGINE, _row("sequence", "paused", 86400))
    assert (rule.why, rule.since) == ("never", None) and rule.text.startswith("never by age")
    rule = stuck_rule(ENGINE, {**_row("sequence", "completed", 1), "terminal": True})
    assert (rule.why, rule.since) == ("ended", None)
    rule = stuck_rule(ENGINE, _row("sequence", "sending", 60), default_after_s=5)  # SFWORKFLOW_STUCK_AFTER_S
    assert rule.text.startswith("counts as stuck 15m")  # the definition's own threshold wins


def test_an_operator_s_no_progress_age_replaces_every_state_s_threshold() -> None:
    """`sfworkflow stuck --no-progress-for 30s`: what has not moved for 30 s, whatever its state's threshold;
    an operator's wait and an overdue timer keep their own rules, and a state that never counts stays so."""
    now = datetime.now(UTC)
    sending = _row("sequence", "sending", 60)  # its definition says 15 minutes
    assert classify(ENGINE, sending, now) is None
    found = classify(ENGINE, sending, now, no_progress_s=30)
    assert found is not None and found.why == "no_progress"
    assert stuck_rule(ENGINE, sending, no_progress_s=30).text.startswith("counts as stuck 30s after entering sending")
    assert classify(ENGINE, sending, now, no_progress_s=120) is None
    assert classify(ENGINE, _row("sequence", "paused", 3600), now, no_progress_s=30) is None
    timer = _row("partner_approval", "in_review", 3600, next_due_in_s=3600)
    assert classify(ENGINE, timer, now, no_progress_s=30) is None  # its timer is its deadline
    assert min_age_s(ENGINE, 900.0, no_progress_s=30) == 30


def test_the_stuck_query_takes_each_states_own_age() -> None:
    """What the stuck query is given to pick candidates by (tests/integration/test_stuck_candidates.py): each
    active state with its own threshold, never for a state that waits without a deadline, no final state."""
    ages = {(w, s): a for w, v, s, a in zip(*state_ages(ENGINE, 900.0), strict=True) if v == 1}
    assert ages[("sequence", "sending")] == 900.0
    assert ages[("sequence", "paused")] is None
    assert ages[("notification", "checking")] == 60.0
    assert ("sequence", "completed") not in ages
    assert min(a for a in ages.values() if a is not None) == min_age_s(ENGINE, 900.0)
    overridden = {(w, s): a for w, v, s, a in zip(*state_ages(ENGINE, 900.0, no_progress_s=30), strict=True) if v == 1}
    assert overridden[("sequence", "sending")] == 30 and overridden[("sequence", "paused")] is None


def test_a_command_a_rate_limit_deferred_starts_the_clock_at_its_slot() -> None:
    """A send deferred 40 minutes by its rate limit (a 100,000-lead enrollment at 50 sends a second) is not stuck
    15 minutes after the state was entered: the clock runs from the slot, as it runs from a timer's due time."""
    now = datetime.now(UTC)
    row = {
        **_row("sequence", "sending", 3600),
        "command_type": "sequence.send_step",
        "command_deferred_until": now - timedelta(minutes=5),
        "command_deferred_by": "sequence.send_step/per_sender",
    }
    assert classify(ENGINE, row, now) is None
    rule = stuck_rule(ENGINE, row)
    assert rule.since == row["command_deferred_until"] + timedelta(minutes=15)
    assert rule.text.startswith("its command sequence.send_step was deferred by sequence.send_step/per_sender until")
    late = classify(ENGINE, {**row, "command_deferred_until": now - timedelta(minutes=20)}, now)
    assert late is not None and late.why == "no_progress"
    undeferred = {**row, "command_deferred_until": None}
    assert classify(ENGINE, undeferred, now) is not None  # in sending an hour, nothing deferred: stuck
