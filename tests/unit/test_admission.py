"""Fair admission over event shards (core/admission.py): shares of a batch by what each shard has buffered."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfworkflow.core.admission import fair_shares


def test_a_shard_alone_fills_the_batch() -> None:
    assert fair_shares([0, 5000, 0, 0], 128) == [0, 128, 0, 0]


def test_a_burst_does_not_hold_back_a_single_delivery() -> None:
    assert fair_shares([100_000, 0, 1, 1], 128) == [126, 0, 1, 1]


def test_shares_are_equal_when_every_shard_has_enough() -> None:
    assert fair_shares([500, 500, 500, 500], 128) == [32, 32, 32, 32]


def test_what_a_small_shard_leaves_goes_to_the_others() -> None:
    assert fair_shares([10, 300, 300, 20], 128) == [10, 49, 49, 20]


def test_remainders_go_round_from_start() -> None:
    assert fair_shares([9, 9, 9], 4, start=0) == [2, 1, 1]
    assert fair_shares([9, 9, 9], 4, start=1) == [1, 2, 1]
    assert fair_shares([9, 9, 9], 4, start=2) == [1, 1, 2]
    assert fair_shares([9, 9, 9], 2, start=2) == [1, 0, 1]


def test_nothing_buffered_takes_nothing() -> None:
    assert fair_shares([0, 0], 128) == [0, 0]
    assert fair_shares([], 128) == []
    assert fair_shares([3, 4], 0) == [0, 0]


def test_negative_input_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        fair_shares([1, -1], 10)


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
    size=st.integers(min_value=0, max_value=300),
    start=st.integers(min_value=0, max_value=40),
)
def test_shares_are_max_min_fair_and_work_conserving(counts: list[int], size: int, start: int) -> None:
    take = fair_shares(counts, size, start)
    assert len(take) == len(counts)
    assert sum(take) == min(size, sum(counts))  # work-conserving: a batch is as full as the buffers allow
    assert all(0 <= t <= c for t, c in zip(take, counts, strict=True))
    for i, ti in enumerate(take):
        if ti < counts[i]:  # shard i was cut short: nobody got more than one above its share
            assert all(tj <= ti + 1 for tj in take), (counts, size, take)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(n=st.integers(min_value=1, max_value=16), size=st.integers(min_value=1, max_value=200))
def test_over_n_batches_every_busy_shard_gets_the_same(n: int, size: int) -> None:
    totals = [0] * n
    for start in range(n):  # the caller turns `start` one shard on per batch
        for k, t in enumerate(fair_shares([10_000] * n, size, start)):
            totals[k] += t
    assert max(totals) == min(totals) == size
