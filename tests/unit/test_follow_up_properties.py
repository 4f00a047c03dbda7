"""Property-based tests of the pure `follow_up` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.contract import schemas
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows import follow_up
from tests.unit.enginekit import TENANT, Walk, weighted, with_optional

KEY = InstanceKey(TENANT, "follow_up", "lead-prop")
STATES = {str(s) for s in follow_up.S}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
SCHEMAS = schemas.default()

steps_st = st.lists(
    st.fixed_dictionaries(
        {"template": st.sampled_from(["a", "b", "c"]), "delay_seconds": st.sampled_from([0, 1, 86400, 259200, 604800])}
    ),
    min_size=1,
    max_size=4,
)
step_no = st.sampled_from([0, 0, 1, 1, 2, 3])
attempt_st = st.one_of(st.none(), st.integers(1, 4))
reset_st = st.one_of(st.none(), st.integers(0, 2))


STRATEGIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "scheduled": st.builds(lambda s: {"owner_id": "owner-1", "steps": s}, steps_st),
    "sent": st.builds(lambda s, a, r: with_optional({"step": s}, attempt=a, reset=r), step_no, attempt_st, reset_st),
    "failed": st.builds(
        lambda s, code, r, a, n: with_optional({"step": s, "error_code": code, "retryable": r}, attempt=a, reset=n),
        step_no,
        st.sampled_from(["provider_timeout", "template_rejected"]),
        st.booleans(),
        attempt_st,
        reset_st,
    ),
    "reply_received": st.just({"channel": "email"}),
    "resume_requested": st.just({"requested_by": "u"}),
    "cancel_requested": st.just({"requested_by": "u"}),
    "timer_step_due": st.just({}),
    "timer_retry_due": st.just({}),
    "effect_suppressed": st.builds(
        lambda s, r: {
            "effect_key": f"follow_up.send:{TENANT}:lead-prop:{s}" + (f":reset:{r}" if r else ""),
            "command_type": "follow_up.send",
            "command_id": "c-1",
        },
        step_no,
        st.integers(0, 2),
    ),
}
# what moves a follow-up forward comes more often than the ends
WEIGHTS = {
    "sent": 12,
    "failed": 10,
    "timer_step_due": 12,
    "timer_retry_due": 6,
    "resume_requested": 5,
    "effect_suppressed": 2,
}
event_st = weighted(STRATEGIES, WEIGHTS)
first_st = st.one_of(st.tuples(st.just("scheduled"), STRATEGIES["scheduled"]), event_st)


@settings(max_examples=1000, deadline=None)
@given(first_st, st.lists(st.tuples(event_st, st.integers(0, 120)), max_size=40))
def test_random_event_sequences_keep_the_engine_sound(
    first: tuple[str, dict[str, Any]], rest: list[tuple[tuple[str, dict[str, Any]], int]]
) -> None:
    events = [(first, 0), *rest]
    walk = Walk(follow_up.DEFINITION, KEY, T0)
    sent_steps: set[int] = set()  # steps a send command was issued for
    effect_keys: list[str] = []
    for (name, data), gap_s in events:
        d = walk.step(name, data, gap_s)  # never raises
        assert d.outcome in (Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED)
        if d.outcome is not Outcome.APPLIED:
            assert d.outgoing == [] and d.timers_set == []
            continue
        assert d.to_state in STATES
        for m in d.outgoing:
            if m.kind in ("command", "compensation"):
                assert SCHEMAS.errors("commands", m.routing_key, m.body["data"]) == [], m.body
                assert SCHEMAS.errors("envelope", "command", m.body) == []
        for m in d.outgoing:
            if m.kind == "compensation" and m.routing_key == "follow_up.reset_step":
                # a step is only reset after a send was asked for it
                assert m.body["data"]["step"] in sent_steps
            if m.kind == "command":
                sent_steps.add(m.body["data"]["step"])
                if m.effect_key is not None:
                    effect_keys.append(m.effect_key)
        # each (tenant, lead, step[, reset]) effect key is asked for once
        assert len(effect_keys) == len(set(effect_keys))
        if any(m.kind == "compensation" for m in d.outgoing):
            assert d.to_state == follow_up.S.NEEDS_ATTENTION and not d.terminal
        if d.terminal:
            assert d.cancel_all_timers
