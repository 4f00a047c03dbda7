"""Property-based tests of the pure `prospecting` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.core.definition import InstanceKey, InstanceView
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows import prospecting
from tests.unit.enginekit import TENANT, Walk, with_optional

KEY = InstanceKey(TENANT, "prospecting", "run-prop")
STATES = {str(s) for s in prospecting.S}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
NAMES = ["qualification", "whatsapp_outreach", "email_outreach", "linkedin_connection", "crm_sync"]

started_st = st.builds(
    lambda steps, lead: {"lead_id": lead, "steps": steps},
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True),
    st.sampled_from(["lead-1", "lead-2"]),
)
# CURRENT / CURRENT_ATTEMPT are resolved against the instance when the event is applied, so that reports
# about the step actually running are frequent enough to walk deep paths (retries, gate, exhaustion).
CURRENT, CURRENT_ATTEMPT = "<current>", -1
step_name = st.sampled_from([*NAMES, "sms_outreach", CURRENT, CURRENT, CURRENT, CURRENT])
attempt = st.one_of(st.none(), st.integers(1, 5), st.just(CURRENT_ATTEMPT), st.just(CURRENT_ATTEMPT))


def _resolve(data: dict[str, Any], view: InstanceView | None) -> dict[str, Any]:
    ctx = view.context if view else {"steps": ["qualification"], "cursor": 0, "attempt": 1}
    out = dict(data)
    if out.get("step") == CURRENT:
        out["step"] = ctx["steps"][ctx["cursor"]]
    if out.get("attempt") == CURRENT_ATTEMPT:
        out["attempt"] = max(ctx["attempt"], 1)
    if out.get("key") == CURRENT:  # the register key of the run's lead
        out["key"] = f"prospecting.crm_synced:{KEY.tenant_id}:{ctx.get('lead_id')}"
    return out


event_st = st.one_of(
    st.tuples(st.just("started"), started_st),
    st.tuples(
        st.just("step_completed"), st.builds(lambda s, a: with_optional({"step": s}, attempt=a), step_name, attempt)
    ),
    st.tuples(
        st.just("step_failed"),
        st.builds(
            lambda s, r, a: with_optional({"step": s, "error_code": "provider_timeout", "retryable": r}, attempt=a),
            step_name,
            st.booleans(),
            attempt,
        ),
    ),
    st.tuples(st.just("approval_granted"), st.builds(lambda t: {"approval_token": t}, st.sampled_from(["a", "b"]))),
    st.tuples(st.sampled_from(["cancel_requested", "retry_requested"]), st.just({"requested_by": "ops"})),
    st.tuples(st.just("timer_retry_due"), st.just({})),
    st.tuples(
        st.just("effect_suppressed"),
        st.builds(
            lambda t: {"effect_key": "k", "command_type": t, "command_id": "c"},
            st.sampled_from(["prospecting.run_step", "prospecting.other"]),
        ),
    ),
    st.tuples(
        st.just("lookup_result"),
        st.builds(
            lambda name, key, value: {"name": name, "key": key, "value": value},
            st.sampled_from(["crm_synced", "crm_synced", "other"]),
            st.sampled_from([CURRENT, CURRENT, "prospecting.crm_synced:x:y"]),
            st.sampled_from([None, None, {"run_id": "run-1"}]),
        ),
    ),
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(event_st, st.integers(0, 120)), min_size=1, max_size=40))
def test_random_event_sequences_keep_the_engine_sound(events: list[tuple[tuple[str, dict[str, Any]], int]]) -> None:
    walk = Walk(prospecting.DEFINITION, KEY, T0)
    issued_steps: set[str] = set()  # steps a run_step was issued for
    effect_keys: set[str] = set()
    approved = False
    ended = False
    for (name, data), gap_s in events:
        data = _resolve(data, walk.view)
        d = walk.step(name, data, gap_s)  # never raises
        assert d.outcome in (Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED)
        if d.outcome is not Outcome.APPLIED:
            assert d.outgoing == [] and d.timers_set == [] and not d.requests
            continue
        assert not ended, "a terminal instance never moves"
        assert d.to_state in STATES
        if name == "approval_granted":
            approved = True
        # A compensation only ever concerns a step that was issued before.
        for m in d.outgoing:
            if m.kind != "compensation":
                continue
            step = m.body["data"].get("step")
            if m.routing_key == "prospecting.retry_step":
                assert step in issued_steps
            else:
                assert m.routing_key == "prospecting.cancel_run"
                assert issued_steps and (step is None or step in issued_steps)
        for key in d.requests.release_effects:
            assert key in effect_keys
        # The register says "synced" only after this run's crm_sync was asked for and reported done.
        if d.requests.remember:
            assert "crm_sync" in issued_steps and name == "step_completed"
        for m in d.outgoing:
            if m.kind != "command":
                continue
            step = m.body["data"]["step"]
            # Class B: no outreach step runs before a person approved the run, and it carries the token.
            if prospecting.is_outreach(step):
                assert approved and m.body["data"]["approval_token"] in ("a", "b")
            if m.effect_key is not None:
                assert step == "crm_sync" and m.body["attempt"] == 1 and m.effect_key not in effect_keys
                effect_keys.add(m.effect_key)
            assert m.body["attempt"] >= 1
            issued_steps.add(step)
        if d.terminal:
            assert d.cancel_all_timers and d.timers_set == []
            ended = True
