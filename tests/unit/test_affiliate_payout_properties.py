"""Property-based tests of the pure `affiliate_payout` engine over random event sequences (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.contract import schemas
from sfworkflow.core.definition import InstanceKey
from sfworkflow.core.engine import Outcome
from sfworkflow.workflows import affiliate_payout
from tests.unit.enginekit import TENANT, Walk, weighted, with_optional

KEY = InstanceKey(TENANT, "affiliate_payout", "batch-prop")
STATES = {str(s) for s in affiliate_payout.S}
T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
SCHEMAS = schemas.default()
LEDGER_EFFECT = f"affiliate_payout.ledger:{TENANT}:batch-prop"
PAYOUT_EFFECT = f"affiliate_payout.payout:{TENANT}:batch-prop"

# valid amounts mostly; now and then one the schema would refuse (the engine must still not fail)
amount_st = st.one_of(
    st.builds(lambda c: f"{c // 100}.{c % 100:02d}", st.integers(1, 10**9)),
    st.sampled_from(["0.01", "7", "0.5", "0", "0.00", "-3.00", "1.234", "abc", ""]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-5, 5),
)
commission_st = st.sampled_from(["c1", "c2", "c3", "c4"])
opened_st = st.fixed_dictionaries(
    {
        "affiliate_id": st.sampled_from(["aff-1", "aff-2"]),
        "commission_ids": st.lists(commission_st, min_size=0, max_size=4),
        "amount": amount_st,
        "currency": st.sampled_from(["USD", "EUR", "usd"]),
    }
)
attempt_st = st.one_of(st.none(), st.integers(1, 4))
command_st = st.one_of(st.none(), st.sampled_from(["post_ledger_entry", "send_payout"]))


STRATEGIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "batch_opened": opened_st,
    "ledger_posted": st.builds(
        lambda e, a: with_optional({"entry_id": e}, attempt=a), st.sampled_from(["le-1", "le-2"]), attempt_st
    ),
    "payout_sent": st.builds(lambda a: with_optional({"payment_reference": "po-1"}, attempt=a), attempt_st),
    "settled": st.just({}),
    "failed": st.builds(
        lambda code, r, a, c: with_optional({"error_code": code, "retryable": r}, attempt=a, command=c),
        st.sampled_from(["provider_timeout", "account_closed"]),
        st.booleans(),
        attempt_st,
        command_st,
    ),
    "claim_refused": st.builds(
        lambda c: {
            "key": f"affiliate_payout.commission:{TENANT}:{c}",
            "holder_entity_id": "b-0",
            "holder_workflow": "affiliate_payout",
        },
        commission_st,
    ),
    "lookup_result": st.builds(
        lambda v: {"name": "settled", "key": "k", "value": v}, st.sampled_from([None, None, None, {"entry_id": "x"}])
    ),
    "effect_suppressed": st.builds(
        lambda c: {"effect_key": "k", "command_type": f"affiliate_payout.{c}", "command_id": "c-1"},
        st.sampled_from(["post_ledger_entry", "send_payout"]),
    ),
    "timer_retry_due": st.just({}),
}
# the feedback and answers that move a batch forward come more often than the rest
WEIGHTS = {"ledger_posted": 4, "payout_sent": 4, "settled": 2, "failed": 4, "lookup_result": 4, "timer_retry_due": 3}
event_st = weighted(STRATEGIES, WEIGHTS)
# most runs start with a valid batch, so they get past the claims
valid_opened_st = st.builds(
    lambda ids, c: {
        "affiliate_id": "aff-1",
        "commission_ids": ids,
        "amount": f"{c // 100}.{c % 100:02d}",
        "currency": "EUR",
    },
    st.lists(commission_st, min_size=1, max_size=4, unique=True),
    st.integers(1, 10**9),
)
first_st = st.one_of(st.tuples(st.just("batch_opened"), valid_opened_st), event_st)


@settings(max_examples=1000, deadline=None)
@given(first_st, st.lists(st.tuples(event_st, st.integers(0, 120)), max_size=30))
def test_random_event_sequences_keep_the_engine_sound(
    first: tuple[str, dict[str, Any]], rest: list[tuple[tuple[str, dict[str, Any]], int]]
) -> None:
    events = [(first, 0), *rest]
    walk = Walk(affiliate_payout.DEFINITION, KEY, T0)
    ledger_commands: list[str] = []  # effect keys of post_ledger_entry commands issued
    payout_commands = 0
    entries_posted: set[str] = set()
    claimed: set[str] = set()
    amount: Any = None
    for (name, data), gap_s in events:
        d = walk.step(name, data, gap_s)  # never raises
        assert d.outcome in (Outcome.APPLIED, Outcome.PARKED, Outcome.IGNORED)
        if d.outcome is not Outcome.APPLIED:
            assert d.outgoing == [] and d.timers_set == [] and not d.requests
            continue
        assert d.to_state in STATES
        if name == "batch_opened":
            amount = data["amount"]
        for m in d.outgoing:
            if m.kind in ("command", "compensation"):
                # every command is valid against its schema, and money is the batch's decimal string
                assert SCHEMAS.errors("commands", m.routing_key, m.body["data"]) == [], m.body
                assert SCHEMAS.errors("envelope", "command", m.body) == []
                assert m.body["data"]["amount"] == amount and isinstance(amount, str)
        compensations = [m for m in d.outgoing if m.kind == "compensation"]
        for m in compensations:
            # a reversal only ever undoes a ledger entry that was asked for and reported posted
            assert m.routing_key == "affiliate_payout.reverse_ledger_entry"
            assert ledger_commands and m.body["data"]["entry_id"] in entries_posted
        commands = [m for m in d.outgoing if m.kind == "command"]
        for m in commands:
            if m.routing_key == "affiliate_payout.post_ledger_entry":
                assert m.effect_key in (LEDGER_EFFECT, None)
                ledger_commands.append(m.effect_key or "")
            else:
                assert m.effect_key in (PAYOUT_EFFECT, None)
                assert ledger_commands  # no payout before a ledger entry was asked for
                payout_commands += 1
        # one ledger entry and one payout per batch: the effect key goes out once (retries carry none)
        assert ledger_commands.count(LEDGER_EFFECT) <= 1
        if name == "ledger_posted":
            entries_posted.add(data["entry_id"])
        claimed |= set(d.requests.claims)
        assert set(d.requests.releases) <= claimed  # only claims this batch asked for are given up
        if d.to_state == affiliate_payout.S.SETTLED:
            assert d.requests.releases == [] and payout_commands > 0
        if d.terminal:
            assert d.cancel_all_timers
