"""The consumer's ladder for one message that the batch path could not apply is bounded: no message,
whatever the database answers, makes `Consumer._apply_alone` try without end (the last form is a raw
publish to sfworkflow.dead). Only "PostgreSQL unreachable" waits without a bound, and only until stop.

The store here is a stand-in that always fails in a chosen way: the ladder is the consumer's own logic.
The same path against the real PostgreSQL and RabbitMQ: tests/integration/test_unstorable.py.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from sfworkflow.core.batch import Delivery
from sfworkflow.errors import DeadReason, Rejection
from sfworkflow.runtime import consumer as consumer_module
from sfworkflow.runtime.consumer import MAX_TRANSIENT_RETRIES, Consumer, Health
from sfworkflow.runtime.metrics import Metrics
from sfworkflow.settings import Settings


class FailingStore:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.calls: list[Delivery] = []

    async def apply_deliveries(self, deliveries: list[Delivery]) -> Any:
        self.calls.extend(deliveries)
        raise self.exc


class Recording(Consumer):
    def __init__(self, store: FailingStore) -> None:
        super().__init__(Settings(), None, store, None, Metrics(), Health(), queues=[])  # type: ignore[arg-type]
        self.published: list[tuple[Delivery, str]] = []

    async def _publish_unstorable(self, d: Delivery, error: str) -> bool:
        self.published.append((d, error))
        return True


def bad(headers: dict[str, Any] | None = None) -> Delivery:
    return Delivery(Rejection(DeadReason.SCHEMA_VIOLATION, "envelope: nope"), b"{}", headers=headers or {"x-a": "1"})


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "BACKOFF_START_S", 0.0)


async def test_a_dead_letter_that_never_stores_ends_in_one_raw_publish_after_two_tries() -> None:
    store = FailingStore(asyncpg.exceptions.UntranslatableCharacterError("\\u0000 cannot be converted to text"))
    c = Recording(store)
    assert await c._apply_alone(bad()) is True
    assert len(store.calls) == 2  # with its headers, then without them
    assert store.calls[1].headers == {
        "x-sfworkflow-headers-dropped": "could not be stored: UntranslatableCharacterError"
    }
    ((d, error),) = c.published
    assert d.body == b"{}" and "UntranslatableCharacterError" in error


async def test_a_valid_event_that_never_stores_becomes_internal_error_then_raw() -> None:
    from datetime import UTC, datetime

    from sfworkflow.contract.envelope import IncomingEvent

    event = IncomingEvent(
        "e1", "sequence.enrolled", "sequence", "enrolled", "t", "x", datetime.now(UTC), None, None, 1, {}
    )
    store = FailingStore(RuntimeError("a definition action raised"))
    c = Recording(store)
    assert await c._apply_alone(Delivery(event, b"{}", headers={"x-a": "1"})) is True
    assert len(store.calls) == 3  # the event, its internal_error dead letter, that dead letter without headers
    assert isinstance(store.calls[1].parsed, Rejection) and store.calls[1].parsed.reason == DeadReason.INTERNAL_ERROR
    assert len(c.published) == 1


async def test_transient_errors_other_than_unreachable_are_bounded_too() -> None:
    store = FailingStore(asyncpg.exceptions.DeadlockDetectedError("deadlock detected"))
    c = Recording(store)
    assert await c._apply_alone(bad()) is True
    assert len(store.calls) == 2 * (1 + MAX_TRANSIENT_RETRIES)
    assert len(c.published) == 1


async def test_unreachable_database_waits_until_stop_and_gives_the_message_back() -> None:
    store = FailingStore(ConnectionRefusedError("connection refused"))
    c = Recording(store)
    c._stopping.set()
    assert await c._apply_alone(bad()) is False  # not settled: not acked, the broker redelivers it
    assert len(store.calls) == 1 and not c.published
