"""Property-based tests of the pure `sequence` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows import sequence
from tests.unit.enginekit import TENANT, Walk, with_optional

KEY = InstanceKey(TENANT, "sequence", "enr-prop")
STATES = {str(s) for s in sequence.S}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)

steps_st = st.lists(
    st.fixed_dictionaries({"template_id": st.sampled_from(["a", "b", "c"]), "delay_seconds": st.integers(0, 3600)}),
    min_size=1,
    max_size=5,
)
enrolled_st = st.builds(
    lambda steps, ch: {
        "sequence_id": "s",
        "lead_id": "l",
        "recipient": {"channel": ch, "address": "x@example.com"},
        "steps": steps,
    },
    steps_st,
    st.sampled_from(["email", "sms", "whatsapp"]),
)
step_no = st.integers(0, 6)
attempt = st.one_of(st.none(), st.integers(1, 4))


event_st = st.one_of(
    st.tuples(st.just("enrolled"), enrolled_st),
    st.tuples(
        st.just("step_sent"),
        st.builds(lambda s, a: with_optional({"step": s, "provider_message_id": "p"}, attempt=a), step_no, attempt),
    ),
    st.tuples(
        st.just("step_failed"),
        st.builds(
            lambda s, code, r, a: with_optional({"step": s, "error_code": code, "retryable": r}, attempt=a),
            step_no,
            st.sampled_from(["provider_timeout", "consent_missing", "template_rejected"]),
            st.booleans(),
            attempt,
        ),
    ),
    st.tuples(st.sampled_from(["replied", "unsubscribed", "paused", "resumed", "cancelled"]), st.just({})),
    st.tuples(st.sampled_from(["timer_step_due", "timer_retry_due", "effect_suppressed"]), st.just({})),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(event_st, st.integers(0, 120)), min_size=1, max_size=30))
def test_random_event_sequences_keep_the_engine_sound(events: list[tuple[tuple[str, dict[str, Any]], int]]) -> None:
    walk = Walk(sequence.DEFINITION, KEY, T0)
    issued_commands = 0
    for (name, data), gap_s in events:
        d = walk.step(name, data, gap_s)  # never raises
        assert d.outcome in (Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED)
        if d.outcome is not Outcome.APPLIED:
            assert d.outgoing == [] and d.timers_set == []
            continue
        assert d.to_state in STATES
        compensations = [m for m in d.outgoing if m.kind == "compensation"]
        # A compensation only ever undoes something that was asked for before.
        assert not compensations or issued_commands > 0
        issued_commands += sum(1 for m in d.outgoing if m.kind == "command")
        if d.terminal:
            assert d.cancel_all_timers
