"""Property-based tests of the pure `agent` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows import agent
from tests.unit.enginekit import TENANT, Walk, with_optional

KEY = InstanceKey(TENANT, "agent", "task-prop")
STATES = {str(s) for s in agent.S}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)

maybe_attempt = st.one_of(st.none(), st.integers(1, 4))
maybe_run = st.one_of(st.none(), st.integers(0, 3))


submitted_st = st.builds(
    lambda t, inp: {"agent_type": "lead_researcher", "input": inp, **({} if t is None else {"timeout_seconds": t})},
    st.one_of(st.none(), st.integers(1, 120)),
    st.one_of(st.just("prompt"), st.just({"lead_id": "l-1"})),
)
event_st = st.one_of(
    st.tuples(st.just("task_submitted"), submitted_st),
    st.tuples(
        st.just("started"), st.builds(lambda a, r: with_optional({}, attempt=a, run=r), maybe_attempt, maybe_run)
    ),
    st.tuples(
        st.just("checkpointed"),
        st.builds(
            lambda s, a, r: with_optional({"checkpoint_id": f"c{s}", "step": s}, attempt=a, run=r),
            st.integers(0, 8),
            maybe_attempt,
            maybe_run,
        ),
    ),
    st.tuples(
        st.just("succeeded"),
        st.builds(lambda a, r: with_optional({"output": 1}, attempt=a, run=r), maybe_attempt, maybe_run),
    ),
    st.tuples(
        st.just("failed"),
        st.builds(
            lambda c, rt, a, r: with_optional({"error_code": c, "retryable": rt}, attempt=a, run=r),
            st.sampled_from(["model_overloaded", "tool_crashed"]),
            st.booleans(),
            maybe_attempt,
            maybe_run,
        ),
    ),
    st.tuples(st.just("replay_requested"), st.just({"requested_by": "ops", "reason": "r"})),
    st.tuples(
        st.just("timer_run_timeout"),
        st.builds(lambda a, r: {"attempt": a, "run": r}, st.integers(1, 4), st.integers(0, 3)),
    ),
    st.tuples(st.just("timer_retry_due"), st.just({})),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(event_st, st.integers(0, 120)), min_size=1, max_size=30))
def test_random_event_sequences_keep_the_engine_sound(events: list[tuple[tuple[str, dict[str, Any]], int]]) -> None:
    walk = Walk(agent.DEFINITION, KEY, T0)
    runs_issued: set[int] = set()  # runs a run_task was issued for
    last_attempt: dict[str, int] = {}  # idempotency key -> last attempt issued
    for (name, data), gap_s in events:
        d = walk.step(name, data, gap_s)  # never raises
        assert d.outcome in (Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED)
        if d.outcome is not Outcome.APPLIED:
            assert d.outgoing == [] and d.timers_set == []
            continue
        assert d.to_state in STATES
        event(f"reached {d.to_state}")
        for m in d.outgoing:
            if m.kind == "compensation":
                # A dead letter only ever hands over a run that was asked for before.
                assert m.routing_key == "agent.dead_letter_task"
                assert m.body["data"]["run"] in runs_issued
                assert d.to_state == agent.S.DEAD_LETTERED
            elif m.kind == "command":
                key, attempt = m.body["idempotency_key"], m.body["attempt"]
                # a retry is the same key with attempt + 1; a new key (a new run) starts at 1
                assert attempt == last_attempt.get(key, 0) + 1
                assert attempt <= agent.RETRY.max_attempts
                last_attempt[key] = attempt
                runs_issued.add(m.body["data"]["run"])
                assert any(t.name == "run_timeout" for t in d.timers_set)  # every run is guarded
        if d.terminal:
            assert d.cancel_all_timers
