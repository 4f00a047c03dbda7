"""Claims and registers, resolved by the store inside the event transaction (no RabbitMQ needed)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import asyncpg
import pytest

from sfworkflow import db
from sfworkflow.contract.envelope import IncomingEvent
from sfworkflow.core.batch import Delivery
from sfworkflow.core.definition import Step, Transition, WorkflowDefinition
from sfworkflow.core.engine import Engine
from sfworkflow.db.repository import Store
from tests.support import OTHER_TENANT, TENANT


class T(StrEnum):
    NEW = "new"
    OPEN = "open"
    REFUSED = "refused"
    CLOSED = "closed"


def _open(step: Step) -> None:
    step.context["key"] = step.data["key"]
    step.claim(step.data["key"])


def _refused(step: Step) -> None:
    step.context["holder"] = step.data["holder_entity_id"]


def _close(step: Step) -> None:
    step.release(step.context["key"])


def _check(step: Step) -> None:
    step.lookup("seen", step.data["key"])


def _answer(step: Step) -> None:
    step.context.setdefault("answers", []).append(step.data["value"])


def _mark(step: Step) -> None:
    step.remember(step.data["key"], step.data["value"])


TOY = WorkflowDefinition(
    name="toy",
    version=1,
    states=T,
    initial=T.NEW,
    terminal=frozenset({T.REFUSED, T.CLOSED}),
    start_events=frozenset({"opened"}),
    events=frozenset({"opened", "closed", "check", "mark"}),
    internal_events=frozenset({"claim_refused", "lookup_result"}),
    commands=frozenset(),
    compensations=frozenset(),
    transitions=(
        Transition("opened", T.NEW, T.OPEN, action=_open),
        Transition("claim_refused", T.OPEN, T.REFUSED, action=_refused),
        Transition("closed", T.OPEN, T.CLOSED, action=_close),
        Transition("check", T.OPEN, None, action=_check),
        Transition("lookup_result", T.OPEN, None, action=_answer),
        Transition("mark", T.OPEN, None, action=_mark),
    ),
)


def delivery(name: str, entity: str, data: dict[str, Any], tenant: str = TENANT) -> Delivery:
    e = IncomingEvent(
        event_id=str(uuid.uuid4()),
        event_type=f"toy.{name}",
        workflow="toy",
        name=name,
        tenant_id=tenant,
        entity_id=entity,
        timestamp=datetime.now(UTC),
        correlation_id=None,
        causation_id=None,
        schema_version=1,
        data=data,
    )
    return Delivery(parsed=e, body=b"{}")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    pool = await db.create_pool(database_url, 2)
    yield Store(pool, Engine([TOY]), park_timeout_s=60)
    await pool.close()


async def state(pg: asyncpg.Connection, entity: str, tenant: str = TENANT) -> tuple[str, dict[str, Any]]:
    row = await pg.fetchrow(
        "SELECT state, context FROM sfworkflow.instance WHERE tenant_id = $1 AND entity_id = $2", tenant, entity
    )
    assert row is not None
    return row["state"], row["context"]


async def test_a_held_claim_is_refused_to_another_instance(store: Store, pg: asyncpg.Connection) -> None:
    await store.apply_deliveries([delivery("opened", "a", {"key": "k1"})])
    await store.apply_deliveries([delivery("opened", "b", {"key": "k1"})])
    assert await state(pg, "a") == ("open", {"key": "k1"})
    assert await state(pg, "b") == ("refused", {"key": "k1", "holder": "a"})
    holders = await pg.fetch("SELECT claim_key, entity_id FROM sfworkflow.claim")
    assert [(r["claim_key"], r["entity_id"]) for r in holders] == [("k1", "a")]


async def test_two_claims_of_one_key_in_one_batch_the_first_wins(store: Store, pg: asyncpg.Connection) -> None:
    await store.apply_deliveries([delivery("opened", "a", {"key": "k"}), delivery("opened", "b", {"key": "k"})])
    assert (await state(pg, "a"))[0] == "open"
    assert await state(pg, "b") == ("refused", {"key": "k", "holder": "a"})


async def test_a_released_claim_can_be_taken_again(store: Store, pg: asyncpg.Connection) -> None:
    await store.apply_deliveries([delivery("opened", "a", {"key": "k"})])
    await store.apply_deliveries([delivery("closed", "a", {}), delivery("opened", "b", {"key": "k"})])
    assert (await state(pg, "a"))[0] == "closed"
    assert (await state(pg, "b"))[0] == "open"
    holders = await pg.fetch("SELECT entity_id FROM sfworkflow.claim")
    assert [r["entity_id"] for r in holders] == ["b"]


async def test_registers_are_read_back_within_and_across_batches(store: Store, pg: asyncpg.Connection) -> None:
    await store.apply_deliveries([delivery("opened", "a", {"key": "ka"}), delivery("opened", "b", {"key": "kb"})])
    await store.apply_deliveries([delivery("check", "a", {"key": "r1"})])
    # written and read in the same batch: the read sees the write
    await store.apply_deliveries(
        [delivery("mark", "a", {"key": "r1", "value": "h1"}), delivery("check", "b", {"key": "r1"})]
    )
    await store.apply_deliveries([delivery("check", "a", {"key": "r1"})])
    assert (await state(pg, "a"))[1]["answers"] == [None, "h1"]
    assert (await state(pg, "b"))[1]["answers"] == ["h1"]
    row = await pg.fetchrow("SELECT value, tenant_id FROM sfworkflow.register WHERE key = 'r1'")
    assert (row["value"], row["tenant_id"]) == ("h1", TENANT)


async def test_claims_of_the_same_key_by_two_tenants_conflict_only_if_the_key_says_so(
    store: Store, pg: asyncpg.Connection
) -> None:
    # Keys are global: a workflow that wants per-tenant uniqueness puts the tenant in the key.
    await store.apply_deliveries([delivery("opened", "a", {"key": f"{TENANT}:x"})])
    await store.apply_deliveries([delivery("opened", "a", {"key": f"{OTHER_TENANT}:x"}, tenant=OTHER_TENANT)])
    assert (await state(pg, "a"))[0] == "open"
    assert (await state(pg, "a", OTHER_TENANT))[0] == "open"


async def test_retention_removes_only_what_ended_before_the_period(store: Store, pg: asyncpg.Connection) -> None:
    await store.apply_deliveries([delivery("opened", "old", {"key": "ko"}), delivery("opened", "live", {"key": "kl"})])
    await store.apply_deliveries([delivery("closed", "old", {})])
    await pg.execute("UPDATE sfworkflow.instance SET updated_at = now() - interval '20 days' WHERE entity_id = 'old'")
    await pg.execute("UPDATE sfworkflow.inbox SET received_at = now() - interval '20 days'")
    pruned = await store.prune(retention_days=14)
    assert pruned["instances"] == 1 and pruned["inbox"] == 3
    left = [r["entity_id"] for r in await pg.fetch("SELECT entity_id FROM sfworkflow.instance")]
    assert left == ["live"]
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM sfworkflow.history h LEFT JOIN sfworkflow.instance i ON i.id = h.instance_id "
            "WHERE i.id IS NULL"
        )
        == 0
    )


async def test_a_claim_released_in_the_same_batch_is_not_left_held(store: Store, pg: asyncpg.Connection) -> None:
    await store.apply_deliveries([delivery("opened", "a", {"key": "k"}), delivery("closed", "a", {})])
    assert (await state(pg, "a"))[0] == "closed"
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.claim") == 0
    await store.apply_deliveries([delivery("opened", "b", {"key": "k"})])
    assert (await state(pg, "b"))[0] == "open"
