"""Driving the Store directly against the test's PostgreSQL: parsed deliveries and a Store on its own pool,
for tests that need batches of a chosen shape (crossed locks, guard limits, timers, retention)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson

from sfworkflow import db
from sfworkflow.contract import schemas
from sfworkflow.contract.envelope import EventParser
from sfworkflow.core.batch import Delivery
from sfworkflow.core.definition import WorkflowDefinition
from sfworkflow.core.engine import Engine
from sfworkflow.db.repository import Store
from sfworkflow.runtime.service import known_event_types
from sfworkflow.workflows import DEFINITIONS

ENGINE = Engine(DEFINITIONS)
PARSER = EventParser(schemas.default(), known_event_types(ENGINE), 1 << 20)


def delivery(ev: dict[str, Any]) -> Delivery:
    """An event envelope as the consumer hands it to the store."""
    body = orjson.dumps(ev)
    return Delivery(PARSER.parse(body), body)


@contextlib.asynccontextmanager
async def direct_store(
    database_url: str,
    definitions: Iterable[WorkflowDefinition] = DEFINITIONS,
    pool_size: int = 2,
    park_timeout_s: float = 3600.0,
) -> AsyncIterator[Store]:
    pool = await db.create_pool(database_url, pool_size)
    try:
        yield Store(pool, Engine(definitions), park_timeout_s=park_timeout_s)
    finally:
        await pool.close()
