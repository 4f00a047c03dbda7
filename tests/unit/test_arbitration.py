"""The arbitration rules (core/arbitration.py) as plain functions."""

from __future__ import annotations

from sfworkflow.core import arbitration as arb


class Owner:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


A, B, C = Owner("a"), Owner("b"), Owner("c")


def test_first_per_key_keeps_the_first_and_returns_the_rest_in_order() -> None:
    first, later = arb.first_per_key([("k", A), ("j", B), ("k", C)], key=lambda x: x[0])
    assert first == {"k": ("k", A), "j": ("j", B)}
    assert later == [("k", C)]


def test_effect_losers_are_the_first_requests_whose_key_was_claimed_before_in_key_order() -> None:
    first = {"z": "request z", "a": "request a", "m": "request m"}
    assert arb.effect_losers(first, claimed={"m"}) == ["request a", "request z"]


def test_claims_held_in_the_batch_or_asked_for_first_are_refused_to_other_instances() -> None:
    first, refused = arb.split_claims([(A, "k"), (B, "k"), (A, "k"), (C, "held")], held_here={"held": A})
    assert first == {"k": A}
    assert [(r.owner, r.key, r.holder) for r in refused] == [(B, "k", A), (C, "held", A)]


def test_an_instance_asking_again_for_its_own_key_is_neither_sent_nor_refused() -> None:
    first, refused = arb.split_claims([(A, "held")], held_here={"held": A})
    assert (first, refused) == ({}, [])


def test_claim_verdicts() -> None:
    assert arb.claim_verdict(1, taken=True, holder=None).granted
    assert arb.claim_verdict(1, taken=False, holder=(1, "toy", "a")).granted  # held by itself already
    assert arb.claim_verdict(1, taken=False, holder=(2, "toy", "b")) == arb.ClaimVerdict(False, "toy", "b")
    assert arb.claim_verdict(1, taken=False, holder=None) == arb.ClaimVerdict(False)  # released, not committed


def test_lookups_read_the_batch_last_write_first_then_the_stored_value() -> None:
    written = {"r": ("batch", A)}
    assert arb.registers_to_read(["r", "s", "s", "b"], written) == ["b", "s"]
    assert arb.lookup_value("r", written, {"r": "stored"}) == "batch"
    assert arb.lookup_value("s", written, {"s": "stored"}) == "stored"
    assert arb.lookup_value("t", written, {}) is None
