"""Property-based tests of the pure `notification` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows import notification
from tests.unit.enginekit import TENANT, Walk, with_optional

KEY = InstanceKey(TENANT, "notification", "notification-prop")
STATES = {str(s) for s in notification.S}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
EXT_IDS = ["ext-a", "ext-b"]
CHANNELS = ["email"]  # one channel: random claim answers then often match the instance's key
CLAIM_KEYS = [notification.claim_key(TENANT, c, e) for c in CHANNELS for e in EXT_IDS]

maybe_attempt = st.one_of(st.none(), st.integers(1, 4))


requested_st = st.builds(
    lambda c: {"channel": c, "recipient": "r", "template": "t", "body": "b"}, st.sampled_from(CHANNELS)
)
event_st = st.one_of(
    st.tuples(st.just("requested"), requested_st),
    st.tuples(
        st.just("provider_accepted"),
        st.builds(lambda e, a: with_optional({"external_id": e}, attempt=a), st.sampled_from(EXT_IDS), maybe_attempt),
    ),
    st.tuples(
        st.just("delivered"),
        st.builds(
            lambda e, a: with_optional({} if e is None else {"external_id": e}, attempt=a),
            st.one_of(st.none(), st.sampled_from(EXT_IDS)),
            maybe_attempt,
        ),
    ),
    st.tuples(
        st.just("failed"),
        st.builds(
            lambda r, a: with_optional({"error_code": "provider_unavailable", "retryable": r}, attempt=a),
            st.booleans(),
            maybe_attempt,
        ),
    ),
    st.tuples(st.just("timer_retry_due"), st.just({})),
    st.tuples(
        st.just("claim_refused"),
        st.builds(
            lambda k: {"key": k, "holder_entity_id": "notification-1", "holder_workflow": "notification"},
            st.sampled_from(CLAIM_KEYS),
        ),
    ),
    st.tuples(
        st.just("lookup_result"),
        st.builds(
            lambda n, k: {"name": n, "key": k, "value": None},
            st.sampled_from([notification.CLAIM_CHECK] * 3 + ["other"]),
            st.sampled_from(CLAIM_KEYS),
        ),
    ),
)


# Half the runs start with a send the provider accepted and whose claim was granted, so the random
# rest also explores `accepted` and `delivered`.
ACCEPTED_PREFIX = [
    (("requested", {"channel": "email", "recipient": "r", "template": "t", "body": "b"}), 0),
    (("provider_accepted", {"external_id": "ext-a", "attempt": 1}), 1),
    (("lookup_result", {"name": notification.CLAIM_CHECK, "key": CLAIM_KEYS[0], "value": None}), 0),
]


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([[], ACCEPTED_PREFIX]),
    st.lists(st.tuples(event_st, st.integers(0, 120)), min_size=1, max_size=40),
)
def test_random_event_sequences_keep_the_engine_sound(
    prefix: list[tuple[tuple[str, dict[str, Any]], int]], rest: list[tuple[tuple[str, dict[str, Any]], int]]
) -> None:
    events = prefix + rest
    walk = Walk(notification.DEFINITION, KEY, T0)
    sends = 0
    claimed: set[str] = set()  # claim keys this instance asked for
    for (name, data), gap_s in events:
        view = walk.view  # the instance the decision is about
        d = walk.step(name, data, gap_s)  # never raises
        assert d.outcome in (Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED)
        if d.outcome is not Outcome.APPLIED:
            assert d.outgoing == [] and d.timers_set == [] and not d.requests
            continue
        assert d.to_state in STATES
        event(f"reached {d.to_state}")
        for m in d.outgoing:
            if m.kind == "compensation":
                # skip_duplicate only ever follows a send the provider accepted under a claimed id
                assert m.routing_key == "notification.skip_duplicate"
                assert sends > 0
                ext = m.body["data"]["external_id"]
                assert notification.claim_key(TENANT, d.context["channel"], ext) in claimed
                assert d.to_state == notification.S.DUPLICATE_SUPPRESSED
            elif m.kind == "command":
                sends += 1
                assert m.body["attempt"] <= notification.RETRY.max_attempts
        if d.to_state == notification.S.DELIVERED:
            assert view is not None and view.state == notification.S.ACCEPTED  # only once the claim was granted
        if d.requests.claims:
            assert d.requests.lookups == [(notification.CLAIM_CHECK, k) for k in d.requests.claims]
        claimed.update(d.requests.claims)
        if d.terminal:
            assert d.cancel_all_timers
