"""Property-based tests of the pure `sequence` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.definition import EngineEvent, InstanceKey, InstanceView
from sfworkflow.engine import Engine, Outcome
from sfworkflow.workflows import sequence

ENGINE = Engine([sequence.DEFINITION])
SEQ = ENGINE.workflow("sequence")
assert SEQ is not None
KEY = InstanceKey("3f6e5d0e-3a52-4a8f-8d7e-4b4d2a1c9e00", "sequence", "enr-prop")
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


def _with_attempt(d: dict[str, Any], a: int | None) -> dict[str, Any]:
    return d if a is None else {**d, "attempt": a}


event_st = st.one_of(
    st.tuples(st.just("enrolled"), enrolled_st),
    st.tuples(
        st.just("step_sent"),
        st.builds(lambda s, a: _with_attempt({"step": s, "provider_message_id": "p"}, a), step_no, attempt),
    ),
    st.tuples(
        st.just("step_failed"),
        st.builds(
            lambda s, code, r, a: _with_attempt({"step": s, "error_code": code, "retryable": r}, a),
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
    view: InstanceView | None = None
    now = T0
    issued_commands = 0
    for n, ((name, data), gap_s) in enumerate(events):
        now += timedelta(seconds=gap_s)
        internal = name.startswith("timer_") or name == "effect_suppressed"
        ev = EngineEvent(f"e{n}", name, data, now, internal=internal)
        d = ENGINE.step(SEQ, KEY, view, ev, now)  # never raises
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
        view = InstanceView(KEY, d.to_state, d.context, d.version, 1)
