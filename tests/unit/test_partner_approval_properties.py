"""Property-based tests of the pure `partner_approval` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.core.definition import InstanceKey, InstanceView
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows import partner_approval
from tests.unit.enginekit import TENANT, Walk

KEY = InstanceKey(TENANT, "partner_approval", "request-prop")
STATES = {str(s) for s in partner_approval.S}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
STAGES = ["manager", "legal", "executive"]

requested_st = st.builds(
    lambda stages, hours: {"partner_id": "p", "stages": stages, "sla_hours": dict(zip(stages, hours, strict=False))},
    st.lists(st.sampled_from(STAGES), min_size=1, max_size=3, unique=True),
    st.lists(st.floats(0.0001, 100, allow_nan=False), max_size=3),
)
# CURRENT is resolved against the instance when the event is applied, so decisions and timers about the
# stage under review are frequent enough to walk every stage, escalation and expiry.
CURRENT = "<current>"
stage = st.sampled_from([*STAGES, "board", CURRENT, CURRENT, CURRENT, CURRENT])


def _resolve(data: dict[str, Any], view: InstanceView | None) -> dict[str, Any]:
    if data.get("stage") != CURRENT:
        return data
    return {**data, "stage": view.context["stages"][view.context["cursor"]] if view else "manager"}


event_st = st.one_of(
    st.tuples(st.just("requested"), requested_st),
    st.tuples(st.just("approved"), st.builds(lambda s: {"stage": s, "approver_id": "u"}, stage)),
    st.tuples(st.just("rejected"), st.builds(lambda s: {"stage": s, "approver_id": "u", "reason": "no"}, stage)),
    st.tuples(st.just("withdrawn"), st.just({})),
    st.tuples(st.sampled_from(["timer_sla_due", "timer_expiry_due"]), st.builds(lambda s: {"stage": s}, stage)),
    st.tuples(
        st.just("effect_suppressed"),
        st.just({"effect_key": "k", "command_type": "partner_approval.escalate", "command_id": "c"}),
    ),
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(event_st, st.integers(0, 200_000)), min_size=1, max_size=30))
def test_random_event_sequences_keep_the_engine_sound(events: list[tuple[tuple[str, dict[str, Any]], int]]) -> None:
    walk = Walk(partner_approval.DEFINITION, KEY, T0)
    reviewed: set[str] = set()  # stages a request_review was issued for
    escalations: Counter[str] = Counter()
    notified = 0
    ended = False
    for (name, data), gap_s in events:
        data = _resolve(data, walk.view)
        d = walk.step(name, data, gap_s)  # never raises
        assert d.outcome in (Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED)
        if d.outcome is not Outcome.APPLIED:
            assert d.outgoing == [] and d.timers_set == []
            continue
        assert not ended
        assert d.to_state in STATES
        for m in d.outgoing:
            body = m.body
            if m.kind == "compensation":
                # void_request only concerns a stage whose review was asked for.
                assert m.routing_key == "partner_approval.void_request"
                assert body["data"]["stage"] in reviewed
            elif m.routing_key == "partner_approval.request_review":
                reviewed.add(body["data"]["stage"])
            elif m.routing_key == "partner_approval.escalate":
                assert body["data"]["stage"] in reviewed
                escalations[body["data"]["stage"]] += 1
            elif m.routing_key == "partner_approval.notify_outcome":
                notified += 1
        assert all(n == 1 for n in escalations.values()), "escalate at most once per stage"
        if d.terminal:
            assert d.cancel_all_timers and d.timers_set == []
            assert notified == 1
            ended = True
        else:
            assert notified == 0
