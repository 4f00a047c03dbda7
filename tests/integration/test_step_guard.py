"""The per-batch step guard counts real transitions: a hot instance with parked events and many events in
one batch applies every one of them (retrying parked events after each transition is not a step the
guard counts). When the guard does trip, the batch is split and applied message by message: valid events
are never dead-lettered for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from sfworkflow.core import plan as plan_module
from sfworkflow.core.batch import BatchReport, Delivery
from sfworkflow.db.repository import Store
from sfworkflow.errors import StepLimitExceeded
from sfworkflow.settings import Settings
from tests.conftest import wait_for
from tests.integration.helpers_extra import DEAD_Q, Inbox, events_depth, quick
from tests.integration.storekit import delivery, direct_store
from tests.support import Amqp, enrolled_data, event, instance, running_service

T0 = datetime.now(UTC) - timedelta(hours=1)


def pause_resume(entity: str, pairs: int) -> list[dict]:
    """`pairs` pause/resume pairs, each newer than the one before (pause and resume are last-writer-wins)."""
    out = []
    for i in range(pairs):
        out.append(event("sequence.paused", entity, {"reason": "r"}, timestamp=T0 + timedelta(seconds=2 * i)))
        out.append(event("sequence.resumed", entity, {}, timestamp=T0 + timedelta(seconds=2 * i + 1)))
    return out


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    async with direct_store(database_url) as s:
        yield s


async def _hot_instance(store: Store, entity: str, parked: int) -> None:
    await store.apply_deliveries([delivery(event("sequence.enrolled", entity, enrolled_data(delay_s=3600)))])
    reports = [event("sequence.step_sent", entity, {"step": 0, "provider_message_id": f"p{i}"}) for i in range(parked)]
    await store.apply_deliveries([delivery(e) for e in reports])  # not allowed while waiting: parked


async def test_parked_retries_do_not_count_against_the_guard(store: Store, pg: asyncpg.Connection) -> None:
    await _hot_instance(store, "hot", parked=10)
    # 120 transitions, each followed by a retry of the 10 parked events: 1,320 engine steps in one batch.
    report = await store.apply_deliveries([delivery(e) for e in pause_resume("hot", 60)])
    assert report.dead == {}
    assert report.events[("sequence", "applied")] == 120
    assert (await instance(pg, "hot"))["state"] == "waiting"
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.parked") == 10
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE kind = 'dead_letter'") == 0


async def test_a_batch_over_the_guard_raises_to_be_split_instead_of_dead_lettering(
    store: Store, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _hot_instance(store, "hot", parked=2)
    monkeypatch.setattr(plan_module, "MAX_TRANSITIONS_PER_INSTANCE", 50)
    with pytest.raises(StepLimitExceeded):
        await store.apply_deliveries([delivery(e) for e in pause_resume("hot", 30)])
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.outbox WHERE kind = 'dead_letter'") == 0


async def test_the_consumer_splits_a_batch_that_trips_the_guard_and_applies_every_event(
    settings: Settings, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan_module, "MAX_TRANSITIONS_PER_INSTANCE", 50)
    # One channel that lingers long enough to take every queued event into its first batch.
    slow = quick(settings, consumers=1, batch_linger_ms=500.0)
    async with running_service(slow, consume=False) as service, Amqp(settings.amqp_url) as mq:
        assert service.store is not None and service.consumer is not None
        calls = _record_batches(service.store, monkeypatch)
        await mq.publish(event("sequence.enrolled", "hot", enrolled_data(delay_s=3600)))
        for e in pause_resume("hot", 40):  # 80 transitions, queued before consuming: they come in one batch
            await mq.publish(e)
        await wait_for(lambda: _depth(settings, 81), what="81 events queued")
        await service.consumer.start()
        await wait_for(lambda: pg.fetchval("SELECT count(*) = 81 FROM sfworkflow.inbox"), what="81 events recorded")
        assert await pg.fetchval("SELECT count(*) FROM sfworkflow.history WHERE outcome = 'applied'") == 81
        assert await Inbox(mq, DEAD_Q).settle(0.3) == []
    assert (await instance(pg, "hot"))["state"] == "waiting"
    # The batch over the guard raised, and what followed was its messages one by one, every one applied.
    tripped = [i for i, (size, error) in enumerate(calls) if error == "StepLimitExceeded"]
    assert tripped and calls[tripped[0]][0] > 50
    alone = calls[tripped[0] + 1 :]
    assert alone and all(size == 1 and error is None for size, error in alone)


def _record_batches(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str | None]]:
    """Every batch the consumer hands the store: (deliveries, exception class name or None)."""
    calls: list[tuple[int, str | None]] = []
    apply = store.apply_deliveries

    async def recording(deliveries: Sequence[Delivery]) -> BatchReport:
        try:
            report = await apply(deliveries)
        except Exception as exc:
            calls.append((len(deliveries), type(exc).__name__))
            raise
        calls.append((len(deliveries), None))
        return report

    monkeypatch.setattr(store, "apply_deliveries", recording)
    return calls


async def _depth(settings: Settings, n: int) -> bool:
    return (await events_depth(settings.amqp_url))[0] == n
